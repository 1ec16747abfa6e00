"""The ctypes binding of libdevmapper: structs, constants, one signature table.

Every function fiesnap calls is declared once in ``SIGNATURES`` (argtypes,
restype, error check) and bound by :func:`load`, the way pyudev binds
libudev. Task and target-cursor pointers are typed handles: ctypes refuses
any other pointer (or a bare int or NULL) in their place. A call declared
with an error check raises :class:`CallFailed` when libdm reports failure,
so callers only add what they were doing.

Layouts (lvm2 ``libdm/libdevmapper.h``): the task type enum, ``struct
dm_info`` (12 ints, 48 bytes), ``struct dm_versions`` (u32 next, u32
version[3], name at byte 16) and the DM_UDEV_* flags of dm_task_set_cookie.

The log hook. Both hooks libdm accepts are variadic (libdevmapper.h):
``dm_log_fn(int level, const char *file, int line, const char *f, ...)``
and ``dm_log_with_errno_fn(int level, const char *file, int line,
int dm_errno_or_class, const char *f, ...)``. Read in lvm2's
``libdm/libdm-common.c`` (with ``libdm/misc/dm-logging.h`` and
``lib/log/log.h``): every libdm message goes through ``dm_log_with_errno``
with its printf arguments unformatted; ``dm_log_with_errno_init(fn)``
makes that ``fn``; ``dm_log_init(fn)`` installs a wrapper that formats the
text and calls ``fn(level, file, line, "%s", buf)`` -- variadic again, the
text is the first variadic argument. No libdm entry point hands a formatted
string to a non-variadic callee, and ctypes can neither make a variadic
callback nor read a ``...`` list: there is no portable way to get the text.

Decision: the hook is installed with ``dm_log_with_errno_init`` and
declared with its five fixed parameters only; the variadic arguments are
never read. (A variadic call passes the named arguments as a fixed-arity
call would and the caller removes the rest, on x86-64, AArch64 and i386
alike.) It keeps the level and libdm's format string, e.g. ``New uuid
prefix %s too long.``; file, line and errno-or-class (-1 for a plain
log_error) go to the debug log. Error texts are built from the task's errno
and the operation (``fiesnap.kernel.dm.dm_error``); a libdm message joins
them only when its format has no conversions, so it is the whole sentence
(:func:`last_error`). ``dm_log_init`` would only ever give ``"%s"``.

libdevmapper is process-global and not thread-safe: it is loaded once per
process, keeps one log hook (alive until exit) and ``LOCK`` serialises
every task; messages are buffered per thread.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import threading
from collections.abc import Callable, Iterator
from ctypes import CFUNCTYPE, POINTER, c_char_p, c_int, c_int32, c_size_t, c_uint16, c_uint32, c_uint64, c_void_p

from fiesnap.errors import DeviceMapperError

log = logging.getLogger(__name__)

SONAME = "libdevmapper.so.1.02.1"
MISSING = "libdevmapper not found: install the dmsetup package"

# Task types (enum in libdevmapper.h).
DM_DEVICE_CREATE = 0
DM_DEVICE_RELOAD = 1
DM_DEVICE_REMOVE = 2
DM_DEVICE_REMOVE_ALL = 3
DM_DEVICE_SUSPEND = 4
DM_DEVICE_RESUME = 5
DM_DEVICE_INFO = 6
DM_DEVICE_DEPS = 7
DM_DEVICE_RENAME = 8
DM_DEVICE_VERSION = 9
DM_DEVICE_STATUS = 10
DM_DEVICE_TABLE = 11
DM_DEVICE_WAITEVENT = 12
DM_DEVICE_LIST = 13
DM_DEVICE_CLEAR = 14
DM_DEVICE_MKNODES = 15
DM_DEVICE_LIST_VERSIONS = 16
DM_DEVICE_TARGET_MSG = 17
DM_DEVICE_SET_GEOMETRY = 18

# udev flags for dm_task_set_cookie (libdevmapper.h, DM_UDEV_*).
UDEV_DISABLE_DM_RULES = 0x0001
UDEV_DISABLE_SUBSYSTEM_RULES = 0x0002
UDEV_DISABLE_DISK_RULES = 0x0004
UDEV_DISABLE_OTHER_RULES = 0x0008
UDEV_LOW_PRIORITY = 0x0010
UDEV_DISABLE_LIBRARY_FALLBACK = 0x0020
UDEV_PRIMARY_SOURCE = 0x0040
# What lvm2 gives private layers (-cow, -real): no /dev/disk links, no blkid.
UDEV_FLAGS_PRIVATE_LAYER = UDEV_DISABLE_SUBSYSTEM_RULES | UDEV_DISABLE_DISK_RULES | UDEV_DISABLE_OTHER_RULES

DM_NAME_LEN = 128  # includes the NUL
DM_UUID_LEN = 129  # includes the NUL
DM_MAX_TYPE_NAME = 16  # includes the NUL
# Besides ASCII letters and digits, what libdm passes through unmangled
# (libdm-common.c _is_whitelisted_char).
_UNMANGLED_EXTRA = frozenset("#+-.:=@_")

# Log levels (lvm2 lib/log/log.h); the level may carry _LOG_STDERR (128).
LOG_LEVEL_MASK = 0x0F
LOG_ERR = 3
LOG_WARN = 4


def mangled_chars(text: str) -> str:
    """The characters of ``text`` libdm would mangle, sorted."""
    return "".join(sorted({c for c in text if not (c.isascii() and c.isalnum()) and c not in _UNMANGLED_EXTRA}))


# --- structs ------------------------------------------------------------------


class DmInfoStruct(ctypes.Structure):
    """``struct dm_info`` (libdevmapper.h, since 1.02.97)."""

    _fields_ = [
        ("exists", c_int),
        ("suspended", c_int),
        ("live_table", c_int),
        ("inactive_table", c_int),
        ("open_count", c_int32),
        ("event_nr", c_uint32),
        ("major", c_uint32),
        ("minor", c_uint32),
        ("read_only", c_int),
        ("target_count", c_int32),
        ("deferred_remove", c_int),
        ("internal_suspend", c_int),
    ]


class DmInfoBuffer(ctypes.Structure):
    """Room for ``dm_task_get_info``: it writes sizeof(struct dm_info), which a
    newer libdm could grow; only the known 48 bytes are read back."""

    _fields_ = [("info", DmInfoStruct), ("spare", ctypes.c_ubyte * (256 - ctypes.sizeof(DmInfoStruct)))]


class DmVersionsStruct(ctypes.Structure):
    """Head of ``struct dm_versions``; the name follows at byte 16."""

    _fields_ = [("next", c_uint32), ("version", c_uint32 * 3)]


DM_VERSIONS_NAME_OFFSET = ctypes.sizeof(DmVersionsStruct)  # 16
_MAX_ENTRIES = 1 << 20

Version = tuple[int, int, int]


def _walk_versions(read: Callable[[int, int], bytes], cstr: Callable[[int], bytes]) -> dict[str, Version]:
    head_size = ctypes.sizeof(DmVersionsStruct)
    out: dict[str, Version] = {}
    off = 0
    for _ in range(_MAX_ENTRIES):
        ent = DmVersionsStruct.from_buffer_copy(read(off, head_size))
        name = cstr(off + DM_VERSIONS_NAME_OFFSET).decode("utf-8", "surrogateescape")
        if name:
            out[name] = (int(ent.version[0]), int(ent.version[1]), int(ent.version[2]))
        if ent.next == 0:
            return out
        off += ent.next
    raise ValueError("dm_versions list does not end")


def parse_dm_versions(buf: bytes) -> dict[str, Version]:
    """Parse a ``struct dm_versions`` chain held in ``buf``."""

    def read(off: int, n: int) -> bytes:
        if off < 0 or off + n > len(buf):
            raise ValueError(f"entry at offset {off} runs past the {len(buf)}-byte buffer")
        return buf[off : off + n]

    def cstr(off: int) -> bytes:
        end = buf.find(b"\0", off)
        if off >= len(buf) or end < 0:
            raise ValueError(f"unterminated name at offset {off}")
        return buf[off:end]

    return _walk_versions(read, cstr)


def versions_at(ptr) -> dict[str, Version]:
    """Parse the ``struct dm_versions`` chain libdm returned (a pointer to it)."""
    addr = ctypes.addressof(ptr.contents)
    return _walk_versions(lambda off, n: ctypes.string_at(addr + off, n), lambda off: ctypes.string_at(addr + off))


# --- typed handles -------------------------------------------------------------


class _Handle(c_void_p):
    """An opaque C pointer of one kind: as an argument ctypes accepts only an
    instance of the same class (never a bare int or another pointer); as a
    restype ctypes returns the instance (false when NULL)."""

    null_ok = False

    @classmethod
    def from_param(cls, obj):
        if isinstance(obj, cls) or (obj is None and cls.null_ok):
            return obj
        raise TypeError(f"expected {cls.__name__}, got {type(obj).__name__}")


class DmTask(_Handle):
    """``struct dm_task *``."""


class DmTargetCursor(_Handle):
    """The opaque cursor of ``dm_get_next_target``; None starts the walk."""

    null_ok = True


# --- the log hook ----------------------------------------------------------------

# dm_log_with_errno_fn without its variadic tail (see the module docstring).
LOG_FN = CFUNCTYPE(None, c_int, c_char_p, c_int, c_int, c_char_p)

_tls = threading.local()


def messages() -> list[tuple[int, str]]:
    """This thread's recent libdm warnings and errors: (level, format string)."""
    msgs = getattr(_tls, "messages", None)
    if msgs is None:
        msgs = _tls.messages = []
    return msgs


def _on_log(level: int, file: bytes | None, line: int, errno_or_class: int, fmt: bytes | None) -> None:
    try:
        text = (fmt or b"").decode("utf-8", "replace")
        lvl = level & LOG_LEVEL_MASK
        if lvl <= LOG_WARN:
            msgs = messages()
            msgs.append((lvl, text))
            del msgs[:-20]
        if log.isEnabledFor(logging.DEBUG):
            where = (file or b"?").decode("utf-8", "replace")
            log.debug("libdm[%d] %s:%d (%d) %s", lvl, where, line, errno_or_class, text)
    except Exception:  # noqa: BLE001 - never raise into C
        pass


def _is_sentence(fmt: str) -> bool:
    """True when a format string has no conversions, so it is the message."""
    return "%" not in fmt.replace("%%", "")


def last_error() -> str:
    """The newest libdm message of this thread worth showing a user: an
    error before a warning, and only a format without conversions."""
    for wanted in (lambda lvl: lvl <= LOG_ERR, lambda lvl: True):
        for lvl, fmt in reversed(messages()):
            if wanted(lvl) and _is_sentence(fmt):
                return fmt.replace("%%", "%")
    return ""


# --- the signature table -------------------------------------------------------------


class CallFailed(DeviceMapperError):
    """A libdm call reported failure; ``func`` and libdm's ``detail`` let the
    caller say which operation on which device it was part of."""

    def __init__(self, func: str, detail: str) -> None:
        super().__init__(f"libdevmapper {func} failed" + (f": {detail}" if detail else ""))
        self.func = func
        self.detail = detail


def _check(result, func, args):
    """For calls returning 0 or NULL on failure (libdm has logged why)."""
    if not result:
        raise CallFailed(func.__name__, last_error())
    return result


_p = POINTER
# name -> (argtypes, restype, errcheck). No check where failure is data:
# dm_task_run (the task's errno decides), dm_udev_wait and dm_udev_wait_immediate
# (libdm logs; the task already ran), dm_get_next_target (NULL ends the walk).
SIGNATURES: dict[str, tuple[list, object, Callable | None]] = {
    "dm_task_create": ([c_int], DmTask, _check),
    "dm_task_destroy": ([DmTask], None, None),
    "dm_task_run": ([DmTask], c_int, None),
    "dm_task_get_errno": ([DmTask], c_int, None),
    "dm_task_set_name": ([DmTask, c_char_p], c_int, _check),
    "dm_task_set_uuid": ([DmTask, c_char_p], c_int, _check),
    "dm_task_set_ro": ([DmTask], c_int, _check),
    "dm_task_add_target": ([DmTask, c_uint64, c_uint64, c_char_p, c_char_p], c_int, _check),
    "dm_task_get_info": ([DmTask, _p(DmInfoStruct)], c_int, _check),
    "dm_get_next_target": (
        [DmTask, DmTargetCursor, _p(c_uint64), _p(c_uint64), _p(c_char_p), _p(c_char_p)],
        DmTargetCursor,
        None,
    ),
    "dm_task_get_versions": ([DmTask], _p(DmVersionsStruct), _check),
    "dm_task_set_cookie": ([DmTask, _p(c_uint32), c_uint16], c_int, _check),
    "dm_udev_wait": ([c_uint32], c_int, None),
    "dm_udev_wait_immediate": ([c_uint32, _p(c_int)], c_int, None),
    "dm_task_skip_lockfs": ([DmTask], c_int, _check),
    "dm_task_no_open_count": ([DmTask], c_int, _check),
    "dm_task_set_message": ([DmTask, c_char_p], c_int, _check),
    "dm_task_set_sector": ([DmTask, c_uint64], c_int, _check),
    "dm_task_get_message_response": ([DmTask], c_char_p, None),
    "dm_task_update_nodes": ([], None, None),
    "dm_task_get_driver_version": ([DmTask, c_char_p, c_size_t], c_int, _check),
    "dm_get_library_version": ([c_char_p, c_size_t], c_int, _check),
    "dm_set_dev_dir": ([c_char_p], c_int, _check),
    "dm_log_with_errno_init": ([LOG_FN], None, None),
    "dm_log_init_verbose": ([c_int], None, None),
}

LOCK = threading.RLock()  # serialises every libdm call that touches global state
_LOADED: dict[str, ctypes.CDLL] = {}
_LOAD_LOCK = threading.Lock()
_HOOK = LOG_FN(_on_log)  # alive as long as the process


def _bind(soname: str) -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(soname, use_errno=True)
    except OSError as e:
        raise DeviceMapperError(MISSING) from e
    for fname, (argtypes, restype, errcheck) in SIGNATURES.items():
        try:
            fn = getattr(lib, fname)
        except AttributeError as e:
            raise DeviceMapperError(f"{soname} lacks {fname}: libdevmapper too old, upgrade the dmsetup package") from e
        fn.argtypes = argtypes
        fn.restype = restype
        if errcheck is not None:
            fn.errcheck = errcheck
    lib.dm_log_with_errno_init(_HOOK)
    lib.dm_log_init_verbose(0)
    atexit.register(_detach_log, lib)
    return lib


def _detach_log(lib: ctypes.CDLL) -> None:
    # libdm's destructor may log after the interpreter is gone.
    with contextlib.suppress(Exception):
        lib.dm_log_with_errno_init(LOG_FN())


def load(soname: str = SONAME) -> ctypes.CDLL:
    """libdevmapper with every signature bound and the log hook set (once)."""
    with _LOAD_LOCK:
        lib = _LOADED.get(soname)
        if lib is None:
            lib = _LOADED[soname] = _bind(soname)
        return lib


@contextlib.contextmanager
def task(lib: ctypes.CDLL, ttype: int) -> Iterator[DmTask]:
    """A new task of type ``ttype``, destroyed on leaving the block."""
    dmt = lib.dm_task_create(ttype)
    try:
        yield dmt
    finally:
        lib.dm_task_destroy(dmt)
