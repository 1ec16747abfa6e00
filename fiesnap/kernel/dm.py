"""Device-mapper through libdevmapper (ctypes).

fiesnap never runs dmsetup: every table change goes through libdevmapper's
task API (``dm_task_create`` / ``dm_task_run``), loaded lazily by
:class:`DeviceMapper` with every prototype declared below.

Facts this module relies on (lvm2 source, libdm/):

* ``libdevmapper.h``: task type numbers, ``struct dm_info`` (12 ints, 48
  bytes), ``struct dm_names`` (u64 dev, u32 next, name at byte 12) and
  ``struct dm_versions`` (u32 next, u32 version[3], name at byte 16).
* ``ioctl/libdm-iface.c``: ``dm_task_get_info`` clears the whole struct and
  fills ``exists`` from the ioctl flags; an INFO on a missing name succeeds
  with ``exists == 0`` (ENXIO is swallowed for INFO/MKNODES/STATUS).
  ``_create_and_load_v4`` (CREATE with a table) runs CREATE, RELOAD and
  RESUME as inner tasks and does not copy their errno to the caller's task,
  so fiesnap runs those three steps itself to report the errno of the step
  that failed, and removes the half-made device like libdm does.
  ``dm_task_run`` stacks /dev/mapper node operations (create on RESUME,
  delete on REMOVE); they happen in ``update_devs()``, called from
  ``dm_udev_wait`` -- so ``dm_udev_wait`` must run after every task that had
  a cookie, failed or not.
* ``libdm-common.c``: ``dm_task_set_cookie`` sets cookie 0 and no semaphore
  when udev is not running (libudev: /run/udev/control missing);
  ``_add_dev_node`` refuses a non-block file and replaces a block node with a
  wrong rdev; ``_rm_dev_node`` unlinks whatever is there.
* The kernel answers CREATE of a name (or uuid) already in use with EBUSY;
  fiesnap reports that as EEXIST after checking the name really exists.
* CREATE without a table sends no uevent with a cookie (dmsetup turns udev
  sync off for ``create --notable``), so no cookie is set on that step.

libdevmapper is process-global (one log hook, one control fd, one stack of
node operations, not thread-safe); the only module-level state here mirrors
that: the loaded library with its log hook (kept alive for the process), a
lock serialising tasks (``wait_event`` runs outside it, since it blocks),
and a per-thread buffer of libdm's messages for error texts.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno as errno_mod
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Sequence
from ctypes import (
    CFUNCTYPE,
    POINTER,
    byref,
    c_char_p,
    c_int,
    c_int32,
    c_size_t,
    c_uint16,
    c_uint32,
    c_uint64,
    c_void_p,
)
from dataclasses import dataclass
from typing import NamedTuple

try:  # waiting for udev: loaded up front, never while a filesystem is frozen
    import pyudev
except ImportError:  # pragma: no cover - pyudev is a dependency; polling still works
    pyudev = None

from fiesnap.model.dmtable import DmTarget
from fiesnap.errors import DeviceMapperError

log = logging.getLogger(__name__)

LIBDM_SONAME = "libdevmapper.so.1.02.1"
LIBDM_MISSING = "libdevmapper not found: install the dmsetup package"
UUID_PREFIX = "FIESNAP-"

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
UDEV_FLAGS_PRIVATE_LAYER = (
    UDEV_DISABLE_SUBSYSTEM_RULES | UDEV_DISABLE_DISK_RULES | UDEV_DISABLE_OTHER_RULES
)

DM_NAME_LEN = 128  # includes the NUL
DM_UUID_LEN = 129  # includes the NUL
DM_MAX_TYPE_NAME = 16  # includes the NUL
# Characters libdm passes through unmangled (libdm-common.c _is_whitelisted_char).
_NAME_EXTRA_CHARS = frozenset("#+-.:=@_")

# libdm log levels (lib/log/log.h).
_LOG_LEVEL_MASK = 0x0F
_LOG_ERR = 3
_LOG_WARN = 4

DEFAULT_REMOVE_RETRIES = 10
DEFAULT_UDEV_TIMEOUT = 10.0
UDEV_CONTROL = "/run/udev/control"


# --- C structures ---------------------------------------------------------


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


class DmNamesStruct(ctypes.Structure):
    """Head of ``struct dm_names``; the name follows ``next`` at byte 12."""

    _fields_ = [("dev", c_uint64), ("next", c_uint32)]


class DmVersionsStruct(ctypes.Structure):
    """Head of ``struct dm_versions``; the name follows at byte 16."""

    _fields_ = [("next", c_uint32), ("version", c_uint32 * 3)]


DM_NAMES_NAME_OFFSET = DmNamesStruct.next.offset + ctypes.sizeof(c_uint32)  # 12
DM_VERSIONS_NAME_OFFSET = ctypes.sizeof(DmVersionsStruct)  # 16
# dm_task_get_info writes sizeof(struct dm_info); a newer libdm could grow it,
# so it gets a roomy buffer and only the known 48 bytes are read back.
_INFO_BUFFER_SIZE = 256


# --- Python-side results ----------------------------------------------------


@dataclass(frozen=True)
class DmInfo:
    """What DM_DEVICE_INFO (or any task's reply) says about one device."""

    exists: bool
    suspended: bool
    live_table: bool
    inactive_table: bool
    open_count: int
    event_nr: int
    major: int
    minor: int
    read_only: bool
    target_count: int
    deferred_remove: bool = False
    internal_suspend: bool = False

    @property
    def devno(self) -> int:
        return os.makedev(self.major, self.minor)

    @property
    def devstr(self) -> str:
        """The "major:minor" form that tables use to name a device."""
        return f"{self.major}:{self.minor}"

    @classmethod
    def from_struct(cls, s: DmInfoStruct) -> DmInfo:
        return cls(
            exists=bool(s.exists),
            suspended=bool(s.suspended),
            live_table=bool(s.live_table),
            inactive_table=bool(s.inactive_table),
            open_count=int(s.open_count),
            event_nr=int(s.event_nr),
            major=int(s.major),
            minor=int(s.minor),
            read_only=bool(s.read_only),
            target_count=int(s.target_count),
            deferred_remove=bool(s.deferred_remove),
            internal_suspend=bool(s.internal_suspend),
        )

    @classmethod
    def from_buffer(cls, buf: bytes) -> DmInfo:
        """Parse a raw ``struct dm_info`` (native byte order)."""
        size = ctypes.sizeof(DmInfoStruct)
        if len(buf) < size:
            raise ValueError(f"struct dm_info needs {size} bytes, got {len(buf)}")
        return cls.from_struct(DmInfoStruct.from_buffer_copy(bytes(buf[:size])))


class TargetStatus(NamedTuple):
    """One line of STATUS (or TABLE) output."""

    start: int
    length: int
    target_type: str
    params: str


class DmDevice(NamedTuple):
    name: str
    major: int
    minor: int


# --- pure helpers (unit-tested) ---------------------------------------------


def dev_major(dev: int) -> int:
    """MAJOR() of libdm/misc/kdev_t.h, for the huge_encode_dev'd dm_names.dev."""
    return (dev & 0xFFF00) >> 8


def dev_minor(dev: int) -> int:
    """MINOR() of libdm/misc/kdev_t.h."""
    return (dev & 0xFF) | ((dev >> 12) & 0xFFF00)


_Reader = Callable[[int, int], bytes]
_CStr = Callable[[int], bytes]
_MAX_ENTRIES = 1 << 20


def _bytes_readers(buf: bytes) -> tuple[_Reader, _CStr]:
    def read(off: int, n: int) -> bytes:
        if off < 0 or off + n > len(buf):
            raise ValueError(f"entry at offset {off} runs past the {len(buf)}-byte buffer")
        return buf[off : off + n]

    def cstr(off: int) -> bytes:
        end = buf.find(b"\0", off)
        if off >= len(buf) or end < 0:
            raise ValueError(f"unterminated name at offset {off}")
        return buf[off:end]

    return read, cstr


def _pointer_readers(addr: int) -> tuple[_Reader, _CStr]:
    return (
        lambda off, n: ctypes.string_at(addr + off, n),
        lambda off: ctypes.string_at(addr + off),
    )


def _walk_names(read: _Reader, cstr: _CStr) -> list[DmDevice]:
    head_size = ctypes.sizeof(DmNamesStruct)
    first = DmNamesStruct.from_buffer_copy(read(0, head_size))
    if first.dev == 0:
        return []
    out: list[DmDevice] = []
    off = 0
    for _ in range(_MAX_ENTRIES):
        ent = DmNamesStruct.from_buffer_copy(read(off, head_size))
        name = cstr(off + DM_NAMES_NAME_OFFSET).decode("utf-8", "surrogateescape")
        out.append(DmDevice(name, dev_major(ent.dev), dev_minor(ent.dev)))
        if ent.next == 0:
            return out
        off += ent.next
    raise ValueError("dm_names list does not end")


def _walk_versions(read: _Reader, cstr: _CStr) -> dict[str, tuple[int, int, int]]:
    head_size = ctypes.sizeof(DmVersionsStruct)
    out: dict[str, tuple[int, int, int]] = {}
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


def parse_dm_names(buf: bytes) -> list[DmDevice]:
    """Parse a ``struct dm_names`` chain held in ``buf``."""
    return _walk_names(*_bytes_readers(buf))


def parse_dm_versions(buf: bytes) -> dict[str, tuple[int, int, int]]:
    """Parse a ``struct dm_versions`` chain held in ``buf``."""
    return _walk_versions(*_bytes_readers(buf))


def check_name(name: str) -> bytes:
    """Validate a dm device name; return it encoded.

    Only characters libdm does not mangle are allowed, so the kernel name,
    the /dev/mapper node and what we asked for are the same string.
    """
    if not isinstance(name, str) or not name:
        raise DeviceMapperError(f"invalid device-mapper name {name!r}: empty")
    raw = name.encode("ascii", "replace")
    bad = sorted({c for c in name if not (c.isascii() and c.isalnum()) and c not in _NAME_EXTRA_CHARS})
    if bad:
        raise DeviceMapperError(
            f"invalid device-mapper name {name!r}: characters {''.join(bad)!r} not allowed"
        )
    if name in (".", "..", "control"):
        raise DeviceMapperError(f"invalid device-mapper name {name!r}: reserved")
    if len(raw) >= DM_NAME_LEN:
        raise DeviceMapperError(
            f"invalid device-mapper name {name!r}: longer than {DM_NAME_LEN - 1} bytes"
        )
    return raw


def check_uuid(uuid: str) -> bytes:
    """fiesnap only ever creates devices whose uuid starts with FIESNAP-."""
    if not isinstance(uuid, str) or not uuid.startswith(UUID_PREFIX):
        raise AssertionError(f"device-mapper uuid {uuid!r} must start with {UUID_PREFIX!r}")
    raw = uuid.encode("ascii", "replace")
    bad = sorted({c for c in uuid if not (c.isascii() and c.isalnum()) and c not in _NAME_EXTRA_CHARS})
    if bad or len(raw) >= DM_UUID_LEN:
        raise AssertionError(f"device-mapper uuid {uuid!r} is malformed or too long")
    return raw


def _check_target(t: DmTarget) -> tuple[int, int, bytes, bytes]:
    if t.start < 0 or t.length <= 0:
        raise DeviceMapperError(f"invalid table line {t}: bad start or length")
    ttype = t.target_type.encode("ascii", "replace")
    if not t.target_type.isascii() or not ttype or len(ttype) >= DM_MAX_TYPE_NAME or b" " in ttype:
        raise DeviceMapperError(f"invalid table line {t}: bad target type")
    params = t.params.encode("utf-8")
    if b"\0" in params or b"\n" in params:
        raise DeviceMapperError(f"invalid table line {t}: params hold NUL or newline")
    return int(t.start), int(t.length), ttype, params


def errno_text(err: int) -> str:
    """'File exists (EEXIST)' style text for an errno."""
    if not err:
        return "unknown error"
    return f"{os.strerror(err)} ({errno_mod.errorcode.get(err, f'errno {err}')})"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def dm_error(op: str, name: str | None, err: int, detail: str = "") -> DeviceMapperError:
    """One-line DeviceMapperError naming the operation, device and errno."""
    what = f"device-mapper {op}" + (f" {name}" if name else "")
    msg = f"{what} failed: {errno_text(err)}" if err else f"{what} failed"
    detail = _one_line(detail)
    # libdm's own "device-mapper: X ioctl on NAME failed: <strerror>" adds nothing.
    redundant = bool(err) and detail.startswith("device-mapper:") and detail.endswith(os.strerror(err))
    if detail and not redundant:
        msg += f": {detail}"
    exc = DeviceMapperError(msg)
    exc.errno = err  # type: ignore[attr-defined]
    exc.op = op  # type: ignore[attr-defined]
    exc.device = name  # type: ignore[attr-defined]
    return exc


def udev_running() -> bool:
    """Same test as libudev's udev_queue_get_udev_is_active, plus libdm's
    DM_DISABLE_UDEV override (libdm then manages nodes itself)."""
    if os.environ.get("DM_DISABLE_UDEV"):
        return False
    return os.path.exists(UDEV_CONTROL)


# --- the library --------------------------------------------------------------

_p = POINTER
# name -> (argtypes, restype)
_SIGNATURES: dict[str, tuple[list, object]] = {
    "dm_task_create": ([c_int], c_void_p),
    "dm_task_destroy": ([c_void_p], None),
    "dm_task_run": ([c_void_p], c_int),
    "dm_task_get_errno": ([c_void_p], c_int),
    "dm_task_set_name": ([c_void_p, c_char_p], c_int),
    "dm_task_set_uuid": ([c_void_p, c_char_p], c_int),
    "dm_task_set_ro": ([c_void_p], c_int),
    "dm_task_add_target": ([c_void_p, c_uint64, c_uint64, c_char_p, c_char_p], c_int),
    "dm_task_get_info": ([c_void_p, c_void_p], c_int),
    "dm_get_next_target": (
        [c_void_p, c_void_p, _p(c_uint64), _p(c_uint64), _p(c_char_p), _p(c_char_p)],
        c_void_p,
    ),
    "dm_task_get_names": ([c_void_p], c_void_p),
    "dm_task_get_versions": ([c_void_p], c_void_p),
    "dm_task_set_cookie": ([c_void_p, _p(c_uint32), c_uint16], c_int),
    "dm_udev_wait": ([c_uint32], c_int),
    "dm_udev_get_sync_support": ([], c_int),
    "dm_task_skip_lockfs": ([c_void_p], c_int),
    "dm_task_no_flush": ([c_void_p], c_int),
    "dm_task_no_open_count": ([c_void_p], c_int),
    "dm_task_deferred_remove": ([c_void_p], c_int),
    "dm_task_set_message": ([c_void_p, c_char_p], c_int),
    "dm_task_set_sector": ([c_void_p, c_uint64], c_int),
    "dm_task_get_message_response": ([c_void_p], c_char_p),
    "dm_task_set_event_nr": ([c_void_p, c_uint32], c_int),
    "dm_task_update_nodes": ([], None),
    "dm_task_get_driver_version": ([c_void_p, c_char_p, c_size_t], c_int),
    "dm_get_library_version": ([c_char_p, c_size_t], c_int),
    "dm_set_dev_dir": ([c_char_p], c_int),
    "dm_log_init": ([c_void_p], None),
    "dm_log_init_verbose": ([c_int], None),
}

# Old-style log hook: void fn(int level, const char *file, int line, const char *f, ...).
# With a hook set by dm_log_init, libdm formats every message itself
# (_log_to_default_log) and calls the hook as fn(level, file, line, "%s", buf):
# the first variadic argument is then a char *, which on the Linux ABIs we run
# on (x86-64, arm64) arrives exactly like a fifth fixed pointer argument. It is
# typed void * and read as a string only when the format is "%s".
_LOG_FN = CFUNCTYPE(None, c_int, c_char_p, c_int, c_char_p, c_void_p)

_tls = threading.local()
_LIBDM_LOCK = threading.RLock()
_LOADED: dict[str, _LibDM] = {}
_LOAD_LOCK = threading.Lock()


def _messages() -> list[tuple[int, str]]:
    msgs = getattr(_tls, "messages", None)
    if msgs is None:
        msgs = _tls.messages = []
    return msgs


def _on_libdm_log(level: int, file: bytes | None, line: int, fmt: bytes | None, arg: int | None) -> None:
    try:
        if fmt == b"%s" and arg:
            text = ctypes.string_at(arg).decode("utf-8", "replace")
        else:
            text = (fmt or b"").decode("utf-8", "replace")
        lvl = level & _LOG_LEVEL_MASK
        if lvl <= _LOG_WARN:
            msgs = _messages()
            msgs.append((lvl, text))
            del msgs[:-20]
        if log.isEnabledFor(logging.DEBUG):
            log.debug("libdm[%d] %s", lvl, text)
    except Exception:  # noqa: BLE001 - never raise into C
        pass


class _LibDM:
    """libdevmapper loaded once per process, with prototypes and a quiet log."""

    def __init__(self, soname: str) -> None:
        try:
            lib = ctypes.CDLL(soname, use_errno=True)
        except OSError as e:
            raise DeviceMapperError(LIBDM_MISSING) from e
        for fname, (argtypes, restype) in _SIGNATURES.items():
            try:
                fn = getattr(lib, fname)
            except AttributeError as e:
                raise DeviceMapperError(
                    f"{soname} lacks {fname}: libdevmapper too old, upgrade the dmsetup package"
                ) from e
            fn.argtypes = argtypes
            fn.restype = restype
        self.lib = lib
        self.soname = soname
        self._log_cb = _LOG_FN(_on_libdm_log)  # kept alive as long as the process
        lib.dm_log_init(ctypes.cast(self._log_cb, c_void_p))
        lib.dm_log_init_verbose(0)
        atexit.register(self._detach_log)

    def _detach_log(self) -> None:
        # libdm's destructor may log after the interpreter is gone.
        try:
            self.lib.dm_log_init(None)
        except Exception:  # noqa: BLE001
            pass


def _load(soname: str) -> _LibDM:
    with _LOAD_LOCK:
        lib = _LOADED.get(soname)
        if lib is None:
            lib = _LOADED[soname] = _LibDM(soname)
        return lib


# --- the API -------------------------------------------------------------------


class DeviceMapper:
    """Device-mapper operations by device name.

    Every state-changing call returns the DmInfo the kernel replied with.
    Nodes: /dev/mapper/NAME is made sure to exist (as a block node of the
    device) after create-with-table and resume, and to be gone after remove,
    with or without udev.
    """

    def __init__(
        self,
        *,
        soname: str = LIBDM_SONAME,
        dev_dir: str = "/dev",
        udev_timeout: float = DEFAULT_UDEV_TIMEOUT,
    ) -> None:
        self._libdm = _load(soname)
        self._lib = self._libdm.lib
        self.dev_dir = dev_dir.rstrip("/") or "/"
        self.mapper_dir = os.path.join(self.dev_dir, "mapper")
        self.udev_timeout = udev_timeout
        if not self._lib.dm_set_dev_dir(self.dev_dir.encode()):
            raise DeviceMapperError(f"libdevmapper refused device directory {self.dev_dir}")

    # -- low level ------------------------------------------------------------

    def _last_error(self) -> str:
        msgs = _messages()
        for lvl, text in reversed(msgs):
            if lvl <= _LOG_ERR:
                return text
        return msgs[-1][1] if msgs else ""

    def _run(
        self,
        ttype: int,
        op: str,
        name: str | None,
        *,
        setup: Callable[[int], None] | None = None,
        cookie_flags: int | None = None,
        result: Callable[[int], object] | None = None,
        locked: bool = True,
        raise_on_error: bool = True,
    ):
        """Create, set up, run and destroy one task.

        Returns ``result(dmt)`` (default: the DmInfo of the reply), or, when
        ``raise_on_error`` is false, ``(errno, detail)`` on failure.
        """
        lib = self._lib
        raw_name = check_name(name) if name is not None else None
        lock = _LIBDM_LOCK if locked else contextlib.nullcontext()
        with lock:
            _messages().clear()
            dmt = lib.dm_task_create(ttype)
            if not dmt:
                raise dm_error(
                    op,
                    name,
                    0,
                    (self._last_error() or "cannot create a libdevmapper task")
                    + " (is the dm-mod module loaded, and are you root?)",
                )
            cookie = c_uint32(0)
            cookie_set = False
            try:
                if raw_name is not None and not lib.dm_task_set_name(dmt, raw_name):
                    raise dm_error(op, name, 0, self._last_error() or "dm_task_set_name failed")
                if setup is not None:
                    setup(dmt)
                if cookie_flags is not None:
                    if not lib.dm_task_set_cookie(dmt, byref(cookie), c_uint16(cookie_flags)):
                        raise dm_error(op, name, 0, self._last_error() or "dm_task_set_cookie failed")
                    cookie_set = True
                ok = lib.dm_task_run(dmt)
                err = 0 if ok else lib.dm_task_get_errno(dmt)
                if cookie_set:
                    cookie_set = False
                    lib.dm_udev_wait(cookie.value)
                if not ok:
                    detail = self._last_error()
                    if not raise_on_error:
                        return err, detail
                    raise dm_error(op, name, err, detail)
                return (result or self._task_info)(dmt)
            finally:
                if cookie_set:
                    lib.dm_udev_wait(cookie.value)
                lib.dm_task_destroy(dmt)

    def _task_info(self, dmt: int) -> DmInfo:
        buf = ctypes.create_string_buffer(_INFO_BUFFER_SIZE)
        if not self._lib.dm_task_get_info(dmt, buf):
            raise dm_error("info", None, 0, self._last_error() or "dm_task_get_info failed")
        return DmInfo.from_buffer(buf.raw)

    def _setter(self, *calls: Callable[[int], int], what: str, name: str | None) -> Callable[[int], None]:
        def setup(dmt: int) -> None:
            for call in calls:
                if not call(dmt):
                    raise dm_error(what, name, 0, self._last_error() or "setting up the task failed")

        return setup

    def _targets(self, dmt: int) -> list[TargetStatus]:
        lib = self._lib
        out: list[TargetStatus] = []
        start, length = c_uint64(), c_uint64()
        ttype, params = c_char_p(), c_char_p()
        nxt = None
        while True:
            nxt = lib.dm_get_next_target(dmt, nxt, byref(start), byref(length), byref(ttype), byref(params))
            if ttype.value is not None:
                out.append(
                    TargetStatus(
                        int(start.value),
                        int(length.value),
                        ttype.value.decode("utf-8", "replace"),
                        (params.value or b"").decode("utf-8", "replace"),
                    )
                )
            if not nxt:
                return out

    @staticmethod
    def _uevent_flags(udev_flags: int) -> int:
        if not 0 <= udev_flags <= 0xFFFF:
            raise DeviceMapperError(f"invalid udev flags {udev_flags:#x}")
        if not udev_running():
            # Nothing else will make the node: let libdm do it.
            udev_flags &= ~UDEV_DISABLE_LIBRARY_FALLBACK
        return udev_flags

    # -- queries ----------------------------------------------------------------

    def info(self, name: str) -> DmInfo | None:
        """DmInfo of ``name``, or None when no such device exists."""
        di = self._run(DM_DEVICE_INFO, "info", name)
        return di if di.exists else None

    def _info_by_uuid(self, uuid: str) -> DmInfo | None:
        raw = check_uuid(uuid)
        lib = self._lib
        di = self._run(
            DM_DEVICE_INFO,
            "info",
            None,
            setup=self._setter(lambda d: lib.dm_task_set_uuid(d, raw), what="info", name=uuid),
        )
        return di if di.exists else None

    def status(self, name: str) -> list[TargetStatus]:
        """STATUS of the live table: [(start, length, type, params)]."""

        def result(dmt: int) -> list[TargetStatus]:
            # libdm turns ENXIO into success with exists=0 for STATUS.
            if not self._task_info(dmt).exists:
                raise dm_error("status", name, errno_mod.ENXIO, "no such device")
            return self._targets(dmt)

        return self._run(DM_DEVICE_STATUS, "status", name, result=result)

    def table(self, name: str) -> list[DmTarget]:
        """The live table as DmTarget lines (kernel's formatting of params)."""
        lines = self._run(DM_DEVICE_TABLE, "table", name, result=self._targets)
        return [DmTarget(s.start, s.length, s.target_type, s.params.rstrip(" ")) for s in lines]

    def list_devices(self) -> list[DmDevice]:
        """All dm devices: [(name, major, minor)]."""

        def names(dmt: int) -> list[DmDevice]:
            addr = self._lib.dm_task_get_names(dmt)
            if not addr:
                raise dm_error("list", None, 0, "no name list in the reply")
            return _walk_names(*_pointer_readers(addr))

        return self._run(DM_DEVICE_LIST, "list", None, result=names)

    def target_versions(self) -> dict[str, tuple[int, int, int]]:
        """Loaded target types and their versions (LIST_VERSIONS)."""

        def versions(dmt: int) -> dict[str, tuple[int, int, int]]:
            addr = self._lib.dm_task_get_versions(dmt)
            if not addr:
                raise dm_error("list-versions", None, 0, "no version list in the reply")
            return _walk_versions(*_pointer_readers(addr))

        return self._run(DM_DEVICE_LIST_VERSIONS, "list-versions", None, result=versions)

    def driver_version(self) -> str:
        """Kernel dm ioctl interface version, e.g. '4.47.0'."""

        def version(dmt: int) -> str:
            buf = ctypes.create_string_buffer(64)
            if not self._lib.dm_task_get_driver_version(dmt, buf, len(buf)):
                raise dm_error("version", None, 0, "no driver version in the reply")
            return buf.value.decode()

        return self._run(DM_DEVICE_VERSION, "version", None, result=version)

    def library_version(self) -> str:
        buf = ctypes.create_string_buffer(64)
        self._lib.dm_get_library_version(buf, len(buf))
        return buf.value.decode()

    # -- state changes ----------------------------------------------------------

    def create(
        self,
        name: str,
        *,
        uuid: str | None = None,
        targets: Sequence[DmTarget] | None = None,
        read_only: bool = False,
        udev_flags: int = 0,
    ) -> DmInfo:
        """Create ``name``.

        With targets: create, load and resume (the device is live and its node
        exists on return); if load or resume fails the device is removed again.
        Without targets: an empty device with no table and no node, so the
        caller controls when to load and resume.
        """
        raw_uuid = check_uuid(uuid) if uuid is not None else None
        check_name(name)
        if targets is not None and not targets:
            raise DeviceMapperError(f"device-mapper create {name}: empty table given")
        lib = self._lib
        calls = []
        if raw_uuid is not None:
            calls.append(lambda d: lib.dm_task_set_uuid(d, raw_uuid))
        res = self._run(
            DM_DEVICE_CREATE,
            "create",
            name,
            setup=self._setter(*calls, what="create", name=name),
            raise_on_error=False,
        )
        if isinstance(res, tuple):
            err, detail = res
            raise self._create_error(name, uuid, err, detail)
        if targets is None:
            return res
        try:
            self.load(name, targets, read_only=read_only)
            return self.resume(name, udev_flags=udev_flags)
        except DeviceMapperError as e:
            try:
                self.remove(name, retries=3)
            except DeviceMapperError as e2:
                raise DeviceMapperError(f"{e}; removing the half-made device also failed: {e2}") from e
            raise

    def _create_error(self, name: str, uuid: str | None, err: int, detail: str) -> DeviceMapperError:
        # The kernel says EBUSY for a name or uuid already in use.
        if err == errno_mod.EBUSY:
            try:
                if self.info(name) is not None:
                    return dm_error("create", name, errno_mod.EEXIST, f"a device named {name} already exists")
                if uuid is not None and self._info_by_uuid(uuid) is not None:
                    return dm_error("create", name, errno_mod.EEXIST, f"a device with uuid {uuid} already exists")
            except DeviceMapperError:
                pass
        return dm_error("create", name, err, detail)

    def load(self, name: str, targets: Sequence[DmTarget], *, read_only: bool = False) -> DmInfo:
        """Load ``targets`` as the inactive table of ``name`` (RELOAD)."""
        if not targets:
            raise DeviceMapperError(f"device-mapper reload {name}: empty table given")
        lib = self._lib
        checked = [_check_target(t) for t in targets]

        def setup(dmt: int) -> None:
            if read_only and not lib.dm_task_set_ro(dmt):
                raise dm_error("reload", name, 0, self._last_error())
            for start, length, ttype, params in checked:
                if not lib.dm_task_add_target(dmt, start, length, ttype, params):
                    raise dm_error("reload", name, 0, self._last_error() or "cannot add table line")

        return self._run(DM_DEVICE_RELOAD, "reload", name, setup=setup)

    def clear(self, name: str) -> DmInfo:
        """Drop the inactive table of ``name`` (CLEAR)."""
        return self._run(DM_DEVICE_CLEAR, "clear", name)

    def suspend(self, name: str, *, lockfs: bool = True, noflush: bool = False) -> DmInfo:
        """Suspend ``name``; with lockfs a mounted filesystem is frozen first."""
        lib = self._lib
        calls = []
        if not lockfs:
            calls.append(lib.dm_task_skip_lockfs)
        if noflush:
            calls.append(lib.dm_task_no_flush)
        return self._run(DM_DEVICE_SUSPEND, "suspend", name, setup=self._setter(*calls, what="suspend", name=name))

    def resume(self, name: str, *, udev_flags: int = 0) -> DmInfo:
        """Resume ``name`` (swapping in the inactive table if there is one)."""
        flags = self._uevent_flags(udev_flags)
        di = self._run(DM_DEVICE_RESUME, "resume", name, cookie_flags=flags)
        if not di.exists:  # pragma: no cover - the kernel answers ENXIO instead
            raise dm_error("resume", name, errno_mod.ENXIO)
        self.ensure_node(name, di.major, di.minor)
        return di

    def remove(
        self,
        name: str,
        *,
        retries: int = DEFAULT_REMOVE_RETRIES,
        deferred: bool = False,
        udev_flags: int = 0,
    ) -> None:
        """Remove ``name``, retrying with backoff while it is busy (EBUSY).

        With ``deferred`` the kernel removes it on last close if it is open.
        """
        before = self.info(name)
        if before is None:
            raise dm_error("remove", name, errno_mod.ENXIO, "no such device")
        lib = self._lib
        flags = self._uevent_flags(udev_flags)
        setup = self._setter(*([lib.dm_task_deferred_remove] if deferred else []), what="remove", name=name)
        delay = 0.05
        attempt = 0
        while True:
            res = self._run(DM_DEVICE_REMOVE, "remove", name, setup=setup, cookie_flags=flags, raise_on_error=False)
            if not isinstance(res, tuple):
                break
            err, detail = res
            if err != errno_mod.EBUSY or attempt >= retries:
                if err == errno_mod.EBUSY:
                    now = self.info(name)
                    opens = now.open_count if now is not None else 0
                    raise dm_error(
                        "remove",
                        name,
                        err,
                        f"still in use (open count {opens}) after {attempt + 1} attempts; "
                        "unmount or close it, or remove what is stacked on it",
                    )
                raise dm_error("remove", name, err, detail)
            attempt += 1
            log.debug("remove %s: busy, retry %d/%d in %.2fs", name, attempt, retries, delay)
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
        if deferred and self.info(name) is not None:
            return  # still open: the kernel removes it on last close
        self._ensure_node_gone(name, before.major, before.minor)

    def message(self, name: str, sector: int, msg: str) -> str:
        """Send ``msg`` to the target at ``sector`` (TARGET_MSG); the reply."""
        lib = self._lib
        raw = msg.encode("utf-8")

        def response(dmt: int) -> str:
            r = lib.dm_task_get_message_response(dmt)
            return r.decode("utf-8", "replace") if r else ""

        return self._run(
            DM_DEVICE_TARGET_MSG,
            "message",
            name,
            setup=self._setter(
                lambda d: lib.dm_task_set_sector(d, c_uint64(sector)),
                lambda d: lib.dm_task_set_message(d, raw),
                what="message",
                name=name,
            ),
            result=response,
        )

    def wait_event(self, name: str, event_nr: int) -> int:
        """Block until the event counter of ``name`` differs from ``event_nr``;
        return the new counter. Runs outside the library lock: use a thread
        (or process) of its own for it."""
        lib = self._lib
        di = self._run(
            DM_DEVICE_WAITEVENT,
            "waitevent",
            name,
            setup=self._setter(lambda d: lib.dm_task_set_event_nr(d, c_uint32(event_nr)), what="waitevent", name=name),
            locked=False,
        )
        return di.event_nr

    # -- nodes --------------------------------------------------------------------

    def node_path(self, name: str) -> str:
        """/dev/mapper/NAME (the name is validated, never a path)."""
        check_name(name)
        return os.path.join(self.mapper_dir, name)

    def _node_state(self, path: str, devno: int) -> str:
        """'ok', 'missing', 'stale' (block node or link to another device),
        or 'foreign' (anything that is not a block node)."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            try:
                os.lstat(path)
            except FileNotFoundError:
                return "missing"
            return "stale"  # dangling symlink
        if not stat.S_ISBLK(st.st_mode):
            return "foreign"
        return "ok" if st.st_rdev == devno else "stale"

    def ensure_node(self, name: str, major: int, minor: int) -> str:
        """Make sure /dev/mapper/NAME is a block node of major:minor; return it.

        With udev running, waits (bounded) for udev to make it; then asks
        libdm (MKNODES) and last makes it itself. Refuses to touch anything
        at that path that is not a block node or a symlink.
        """
        path = self.node_path(name)
        devno = os.makedev(major, minor)
        state = self._node_state(path, devno)
        if state == "ok":
            return path
        if state == "foreign":
            raise DeviceMapperError(
                f"{path} exists but is not a block device node; remove it by hand "
                "(a write to a missing node creates a regular file)"
            )
        log.debug("%s: %s after libdm's node handling", path, state)
        if udev_running() and self._wait_node(path, lambda: self._node_state(path, devno) != "missing"):
            state = self._node_state(path, devno)
            if state == "ok":
                return path
        state = self._node_state(path, devno)
        if state == "foreign":
            raise DeviceMapperError(f"{path} appeared but is not a block device node: left alone")
        if state == "stale":
            self._unlink_if_ours(path, devno=None)
        if self._node_state(path, devno) == "missing":
            self._mknodes(name)  # libdm's way first
        if self._node_state(path, devno) == "stale":
            self._unlink_if_ours(path, devno=None)
        if self._node_state(path, devno) == "missing":
            log.debug("%s: making the node %d:%d", path, major, minor)
            os.makedirs(self.mapper_dir, mode=0o755, exist_ok=True)
            old = os.umask(0)
            try:
                os.mknod(path, stat.S_IFBLK | 0o600, devno)
            except FileExistsError:
                pass
            finally:
                os.umask(old)
        state = self._node_state(path, devno)
        if state != "ok":
            raise DeviceMapperError(f"cannot make {path} a block node of {major}:{minor} (found: {state})")
        return path

    def _mknodes(self, name: str) -> None:
        """libdm's own node creation for one device (DM_DEVICE_MKNODES)."""
        lib = self._lib
        try:
            with _LIBDM_LOCK:
                self._run(
                    DM_DEVICE_MKNODES,
                    "mknodes",
                    name,
                    setup=self._setter(lib.dm_task_no_open_count, what="mknodes", name=name),
                    result=lambda dmt: None,
                )
                lib.dm_task_update_nodes()  # run the stacked node operation now
        except DeviceMapperError as e:
            log.debug("mknodes %s: %s", name, e)

    def _unlink_if_ours(self, path: str, devno: int | None) -> None:
        """Unlink ``path`` if it is a block node (of ``devno`` when given) or a
        symlink that is dangling or leads to such a node. Nothing else."""
        try:
            lst = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(lst.st_mode):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                os.unlink(path)  # dangling
                return
            if stat.S_ISBLK(st.st_mode) and (devno is None or st.st_rdev == devno):
                os.unlink(path)
            return
        if stat.S_ISBLK(lst.st_mode) and (devno is None or lst.st_rdev == devno):
            os.unlink(path)

    def _ensure_node_gone(self, name: str, major: int, minor: int) -> None:
        path = self.node_path(name)
        devno = os.makedev(major, minor)

        def gone() -> bool:
            try:
                os.lstat(path)
            except FileNotFoundError:
                return True
            return False

        if gone():
            return
        if udev_running() and self._wait_node(path, gone):
            return
        self._unlink_if_ours(path, devno)
        if not gone():
            log.warning("%s is still there after removing %s and is not its node: left alone", path, name)

    def _wait_node(self, path: str, done: Callable[[], bool]) -> bool:
        """Wait up to udev_timeout for ``done()``, woken by block uevents."""
        deadline = time.monotonic() + self.udev_timeout
        monitor = None
        try:
            if pyudev is None:
                raise RuntimeError("pyudev is not installed")
            monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="udev")
            monitor.filter_by(subsystem="block")
            monitor.start()
        except Exception as e:  # noqa: BLE001 - fall back to polling
            log.debug("no udev monitor (%s): polling %s", e, path)
            monitor = None
        while True:
            if done():
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                log.debug("udev did not settle %s within %.1fs", path, self.udev_timeout)
                return False
            if monitor is not None:
                try:
                    monitor.poll(timeout=min(left, 0.25))
                    continue
                except Exception:  # noqa: BLE001
                    monitor = None
            time.sleep(min(left, 0.05))
