"""Device-mapper operations by device name, through libdevmapper's task API.

fiesnap never runs dmsetup: every table change is a libdevmapper task
(``dm_task_create`` / ``dm_task_run``, bound in :mod:`fiesnap.kernel.libdm`);
/dev/mapper nodes and udev are :mod:`fiesnap.kernel.dmnodes`' job.

Facts this module relies on (lvm2 source, libdm/):

* ``ioctl/libdm-iface.c``: ``dm_task_get_info`` clears the whole struct and
  fills ``exists`` from the ioctl flags; an INFO on a missing name succeeds
  with ``exists == 0`` (ENXIO is swallowed for INFO/MKNODES/STATUS).
  ``_create_and_load_v4`` (CREATE with a table) runs CREATE, RELOAD and
  RESUME as inner tasks and does not copy their errno to the caller's task,
  so fiesnap runs those three steps itself to report the errno of the step
  that failed, and removes the half-made device like libdm does.
* The kernel answers CREATE of a name (or uuid) already in use with EBUSY;
  fiesnap reports that as EEXIST after checking the name really exists.
* CREATE without a table sends no uevent with a cookie (dmsetup turns udev
  sync off for ``create --notable``), so only RESUME and REMOVE get one.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import logging
import os
import time
from collections.abc import Callable, Sequence
from ctypes import byref, c_char_p, c_uint64
from dataclasses import dataclass
from typing import NamedTuple

from fiesnap.errors import DeviceMapperError
from fiesnap.kernel import dmnodes, libdm
from fiesnap.kernel.dmnodes import check_name
from fiesnap.model.dmtable import DmTarget

log = logging.getLogger(__name__)

UUID_PREFIX = "FIESNAP-"
DEFAULT_REMOVE_RETRIES = 10


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
    def from_struct(cls, s: libdm.DmInfoStruct) -> DmInfo:
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
        size = ctypes.sizeof(libdm.DmInfoStruct)
        if len(buf) < size:
            raise ValueError(f"struct dm_info needs {size} bytes, got {len(buf)}")
        return cls.from_struct(libdm.DmInfoStruct.from_buffer_copy(bytes(buf[:size])))


class TargetStatus(NamedTuple):
    """One line of STATUS (or TABLE) output."""

    start: int
    length: int
    target_type: str
    params: str


def check_uuid(uuid: str) -> bytes:
    """fiesnap only ever creates devices whose uuid starts with FIESNAP-."""
    if not isinstance(uuid, str) or not uuid.startswith(UUID_PREFIX):
        raise AssertionError(f"device-mapper uuid {uuid!r} must start with {UUID_PREFIX!r}")
    raw = uuid.encode("ascii", "replace")
    if libdm.mangled_chars(uuid) or len(raw) >= libdm.DM_UUID_LEN:
        raise AssertionError(f"device-mapper uuid {uuid!r} is malformed or too long")
    return raw


def _check_target(t: DmTarget) -> tuple[int, int, bytes, bytes]:
    if t.start < 0 or t.length <= 0:
        raise DeviceMapperError(f"invalid table line {t}: bad start or length")
    ttype = t.target_type.encode("ascii", "replace")
    if not t.target_type.isascii() or not ttype or len(ttype) >= libdm.DM_MAX_TYPE_NAME or b" " in ttype:
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


def dm_error(op: str, name: str | None, err: int, detail: str = "") -> DeviceMapperError:
    """One-line DeviceMapperError naming the operation, device and errno."""
    what = f"device-mapper {op}" + (f" {name}" if name else "")
    msg = f"{what} failed: {errno_text(err)}" if err else f"{what} failed"
    detail = " ".join(detail.split())
    # libdm's own "device-mapper: X ioctl on NAME failed: <strerror>" adds nothing.
    redundant = bool(err) and detail.startswith("device-mapper:") and detail.endswith(os.strerror(err))
    if detail and not redundant:
        msg += f": {detail}"
    exc = DeviceMapperError(msg)
    exc.errno = err  # type: ignore[attr-defined]
    exc.op = op  # type: ignore[attr-defined]
    exc.device = name  # type: ignore[attr-defined]
    return exc


@dataclass
class UdevPending:
    """A resume whose udev confirmation is still owed (see DeviceMapper.resume_frozen)."""

    dm: DeviceMapper
    name: str
    info: DmInfo
    cookie: int | None
    done: bool = False

    def finish(self) -> bool:
        """Wait (bounded) for udev, then make sure the node is right. Idempotent.
        Returns False when udev did not confirm in time (the node is still checked)."""
        if self.done:
            return True
        self.done = True
        confirmed = True
        if self.cookie is not None:
            confirmed = dmnodes.wait_cookie(self.dm._lib, self.cookie, self.dm.nodes.udev_timeout)
        self.dm.ensure_node(self.name, self.info.major, self.info.minor)
        return confirmed


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
        soname: str = libdm.SONAME,
        dev_dir: str = "/dev",
        udev_timeout: float = dmnodes.DEFAULT_UDEV_TIMEOUT,
    ) -> None:
        self._lib = libdm.load(soname)
        self.nodes = dmnodes.MapperDir(self._lib, dev_dir, udev_timeout)

    # -- one task ---------------------------------------------------------------

    def _run(
        self,
        ttype: int,
        op: str,
        name: str | None,
        *,
        setup: Callable[[libdm.DmTask], object] | None = None,
        cookie_flags: int | None = None,
        result: Callable[[libdm.DmTask], object] | None = None,
        raise_on_error: bool = True,
        deferred: list[int] | None = None,
    ):
        """Create, set up, run and destroy one task, under the library lock.

        Returns ``result(dmt)`` (default: the DmInfo of the reply), or, when
        ``raise_on_error`` is false, ``(errno, detail)`` if the run failed.
        """
        lib = self._lib
        raw_name = check_name(name) if name is not None else None
        with libdm.LOCK:
            libdm.messages().clear()
            try:
                with libdm.task(lib, ttype) as dmt:
                    if raw_name is not None:
                        lib.dm_task_set_name(dmt, raw_name)
                    if setup is not None:
                        setup(dmt)
                    with dmnodes.udev_cookie(lib, dmt, cookie_flags, deferred):
                        ok = lib.dm_task_run(dmt)
                        err = 0 if ok else lib.dm_task_get_errno(dmt)
                    if not ok:
                        detail = libdm.last_error()
                        if not raise_on_error:
                            return err, detail
                        raise dm_error(op, name, err, detail)
                    return (result or self._task_info)(dmt)
            except libdm.CallFailed as e:
                detail = e.detail or f"{e.func} failed"
                if e.func == "dm_task_create":
                    detail += " (is the dm-mod module loaded, and are you root?)"
                raise dm_error(op, name, 0, detail) from e

    def _task_info(self, dmt: libdm.DmTask) -> DmInfo:
        buf = libdm.DmInfoBuffer()
        self._lib.dm_task_get_info(dmt, byref(buf.info))
        return DmInfo.from_struct(buf.info)

    def _targets(self, dmt: libdm.DmTask) -> list[TargetStatus]:
        out: list[TargetStatus] = []
        start, length = c_uint64(), c_uint64()
        ttype, params = c_char_p(), c_char_p()
        nxt = None
        while True:
            nxt = self._lib.dm_get_next_target(dmt, nxt, byref(start), byref(length), byref(ttype), byref(params))
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

    # -- queries ----------------------------------------------------------------

    def info(self, name: str) -> DmInfo | None:
        """DmInfo of ``name``, or None when no such device exists."""
        di = self._run(libdm.DM_DEVICE_INFO, "info", name)
        return di if di.exists else None

    def _info_by_uuid(self, uuid: str) -> DmInfo | None:
        raw = check_uuid(uuid)
        di = self._run(libdm.DM_DEVICE_INFO, "info", None, setup=lambda d: self._lib.dm_task_set_uuid(d, raw))
        return di if di.exists else None

    def status(self, name: str) -> list[TargetStatus]:
        """STATUS of the live table: [(start, length, type, params)]."""

        def result(dmt: libdm.DmTask) -> list[TargetStatus]:
            # libdm turns ENXIO into success with exists=0 for STATUS.
            if not self._task_info(dmt).exists:
                raise dm_error("status", name, errno_mod.ENXIO, "no such device")
            return self._targets(dmt)

        return self._run(libdm.DM_DEVICE_STATUS, "status", name, result=result)

    def table(self, name: str) -> list[DmTarget]:
        """The live table as DmTarget lines (kernel's formatting of params)."""
        lines = self._run(libdm.DM_DEVICE_TABLE, "table", name, result=self._targets)
        return [DmTarget(s.start, s.length, s.target_type, s.params.rstrip(" ")) for s in lines]

    def target_versions(self) -> dict[str, tuple[int, int, int]]:
        """Loaded target types and their versions (LIST_VERSIONS)."""
        return self._run(
            libdm.DM_DEVICE_LIST_VERSIONS,
            "list-versions",
            None,
            result=lambda dmt: libdm.versions_at(self._lib.dm_task_get_versions(dmt)),
        )

    def driver_version(self) -> str:
        """Kernel dm ioctl interface version, e.g. '4.47.0'."""
        buf = ctypes.create_string_buffer(64)
        self._run(
            libdm.DM_DEVICE_VERSION,
            "version",
            None,
            result=lambda dmt: self._lib.dm_task_get_driver_version(dmt, buf, len(buf)),
        )
        return buf.value.decode()

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
        res = self._run(
            libdm.DM_DEVICE_CREATE,
            "create",
            name,
            setup=None if raw_uuid is None else lambda d: self._lib.dm_task_set_uuid(d, raw_uuid),
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

        def setup(dmt: libdm.DmTask) -> None:
            if read_only:
                lib.dm_task_set_ro(dmt)
            for start, length, ttype, params in checked:
                lib.dm_task_add_target(dmt, start, length, ttype, params)

        return self._run(libdm.DM_DEVICE_RELOAD, "reload", name, setup=setup)

    def clear(self, name: str) -> DmInfo:
        """Drop the inactive table of ``name`` (CLEAR)."""
        return self._run(libdm.DM_DEVICE_CLEAR, "clear", name)

    def suspend(self, name: str, *, lockfs: bool = True) -> DmInfo:
        """Suspend ``name``; with lockfs a mounted filesystem is frozen first."""
        setup = None if lockfs else self._lib.dm_task_skip_lockfs
        return self._run(libdm.DM_DEVICE_SUSPEND, "suspend", name, setup=setup)

    def resume(self, name: str, *, udev_flags: int = 0) -> DmInfo:
        """Resume ``name`` (swapping in the inactive table if there is one)."""
        di, cookie = self._resume(name, udev_flags, defer_udev=False)
        return di

    def resume_frozen(self, name: str, *, udev_flags: int = 0) -> UdevPending:
        """Resume ``name`` while a filesystem on it may be frozen: no wait for udev.

        The resume carries a udev cookie as always (without one libdm turns
        off udev's dm rules for the event, which would drop NAME's udev
        links), but nothing waits for it here: a slow udevd must never keep
        a filesystem frozen. The caller thaws, then calls ``finish()`` on the
        result, which waits a bounded time for udev and checks the node.
        """
        di, cookie = self._resume(name, udev_flags, defer_udev=True)
        return UdevPending(self, name, di, cookie)

    def _resume(self, name: str, udev_flags: int, *, defer_udev: bool) -> tuple[DmInfo, int | None]:
        flags = dmnodes.uevent_flags(udev_flags)
        deferred: list[int] | None = [] if defer_udev else None
        di = self._run(libdm.DM_DEVICE_RESUME, "resume", name, cookie_flags=flags, deferred=deferred)
        if not di.exists:  # pragma: no cover - the kernel answers ENXIO instead
            raise dm_error("resume", name, errno_mod.ENXIO)
        if deferred is not None:
            return di, (deferred[0] if deferred else None)
        self.ensure_node(name, di.major, di.minor)
        return di, None

    def remove(self, name: str, *, retries: int = DEFAULT_REMOVE_RETRIES, udev_flags: int = 0) -> None:
        """Remove ``name``, retrying with backoff while it is busy (EBUSY)."""
        before = self.info(name)
        if before is None:
            raise dm_error("remove", name, errno_mod.ENXIO, "no such device")
        flags = dmnodes.uevent_flags(udev_flags)
        delay = 0.05
        attempt = 0
        while True:
            res = self._run(libdm.DM_DEVICE_REMOVE, "remove", name, cookie_flags=flags, raise_on_error=False)
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
        self.nodes.ensure_gone(name, before.major, before.minor)

    def message(self, name: str, sector: int, msg: str) -> str:
        """Send ``msg`` to the target at ``sector`` (TARGET_MSG); the reply."""
        lib = self._lib
        raw = msg.encode("utf-8")

        def setup(dmt: libdm.DmTask) -> None:
            lib.dm_task_set_sector(dmt, c_uint64(sector))
            lib.dm_task_set_message(dmt, raw)

        def response(dmt: libdm.DmTask) -> str:
            r = lib.dm_task_get_message_response(dmt)
            return r.decode("utf-8", "replace") if r else ""

        return self._run(libdm.DM_DEVICE_TARGET_MSG, "message", name, setup=setup, result=response)

    # -- nodes --------------------------------------------------------------------

    def node_path(self, name: str) -> str:
        """/dev/mapper/NAME (the name is validated, never a path)."""
        return self.nodes.path(name)

    def ensure_node(self, name: str, major: int, minor: int) -> str:
        """Make sure /dev/mapper/NAME is a block node of major:minor; return it."""
        return self.nodes.ensure(name, major, minor)
