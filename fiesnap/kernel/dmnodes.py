"""/dev/mapper nodes and udev: a live device has its node, a removed one has none.

With udevd running, udev makes /dev/mapper/NAME (a link to ../dm-N) for the
uevent of a RESUME, and libdm waits for it through the task's cookie.
Without udev, libdm makes and removes nodes itself: ``dm_task_run`` only
stacks the node operation, ``dm_udev_wait`` runs it (``update_devs()``), so
``dm_udev_wait`` must follow every task that had a cookie, failed or not.
Afterwards fiesnap checks the node and, as a last resort, makes or unlinks
it itself, never touching anything at that path that is not a block node or
a symlink: a write to a missing node leaves a regular file, which is refused.

Facts from lvm2 ``libdm/libdm-common.c``: ``dm_task_set_cookie`` sets cookie 0
and no semaphore when udev is not running (libudev: /run/udev/control
missing); ``_add_dev_node`` refuses a non-block file and replaces a block
node with a wrong rdev; ``_rm_dev_node`` unlinks whatever is there.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from ctypes import byref, c_int, c_uint16, c_uint32

try:  # waiting for udev: loaded up front, never while a filesystem is frozen
    import pyudev
except ImportError:  # pragma: no cover - pyudev is a dependency; polling still works
    pyudev = None

from fiesnap.errors import DeviceMapperError
from fiesnap.kernel import libdm

log = logging.getLogger(__name__)

DEFAULT_UDEV_TIMEOUT = 10.0
UDEV_CONTROL = "/run/udev/control"


def udev_running() -> bool:
    """Same test as libudev's udev_queue_get_udev_is_active, plus libdm's
    DM_DISABLE_UDEV override (libdm then manages nodes itself)."""
    if os.environ.get("DM_DISABLE_UDEV"):
        return False
    return os.path.exists(UDEV_CONTROL)


def uevent_flags(udev_flags: int) -> int:
    """The DM_UDEV_* flags to give a task whose uevent carries a cookie."""
    if not 0 <= udev_flags <= 0xFFFF:
        raise DeviceMapperError(f"invalid udev flags {udev_flags:#x}")
    if not udev_running():
        # Nothing else will make the node: let libdm do it.
        udev_flags &= ~libdm.UDEV_DISABLE_LIBRARY_FALLBACK
    return udev_flags


@contextlib.contextmanager
def udev_cookie(lib: ctypes.CDLL, dmt: libdm.DmTask, flags: int | None,
                deferred: list[int] | None = None) -> Iterator[None]:
    """Give the task a cookie (when ``flags`` is not None) and wait for it
    with ``dm_udev_wait`` on leaving the block, whatever happened inside.

    With ``deferred`` (a list), the cookie is appended to it instead and the
    caller owes the wait (`wait_cookie`): for a resume while a filesystem on
    the device is frozen, when nothing may block on udev.
    """
    if flags is None:
        yield
        return
    cookie = c_uint32(0)
    lib.dm_task_set_cookie(dmt, byref(cookie), c_uint16(flags))
    if deferred is not None:
        deferred.append(cookie.value)
        yield
        return
    try:
        yield
    finally:
        lib.dm_udev_wait(cookie.value)


def wait_cookie(lib: ctypes.CDLL, cookie: int, timeout: float) -> bool:
    """Wait at most ``timeout`` seconds for udev to confirm a deferred cookie.

    ``dm_udev_wait`` has no timeout; ``dm_udev_wait_immediate`` only looks, so
    it is polled. It also runs libdm's stacked node operations. False if udev
    did not answer in time: the cookie's semaphore is then left for udev to
    release when it gets to the event (``dmsetup udevcomplete_all`` clears
    leftovers).
    """
    if not cookie:
        # libdm gave no cookie: udev is not synchronised with (not running, or DM_DISABLE_UDEV).
        # dm_udev_wait_immediate would never report ready for it; dm_udev_wait returns at once
        # after running libdm's stacked node operations, which is all there is to do.
        with libdm.LOCK:
            lib.dm_udev_wait(0)
        return True
    deadline = time.monotonic() + timeout
    ready = c_int(0)
    while True:
        with libdm.LOCK:
            ok = lib.dm_udev_wait_immediate(cookie, byref(ready))
        if not ok:
            log.warning("waiting for udev cookie %#x failed: %s", cookie, libdm.last_error())
            return False
        if ready.value:
            return True
        if time.monotonic() >= deadline:
            log.warning("udev did not confirm cookie %#x within %.1fs; left to udev", cookie, timeout)
            return False
        time.sleep(0.02)


def check_name(name: str) -> bytes:
    """Validate a dm device name; return it encoded.

    Only characters libdm does not mangle are allowed, so the kernel name,
    the /dev/mapper node and what we asked for are the same string.
    """
    if not isinstance(name, str) or not name:
        raise DeviceMapperError(f"invalid device-mapper name {name!r}: empty")
    raw = name.encode("ascii", "replace")
    bad = libdm.mangled_chars(name)
    if bad:
        raise DeviceMapperError(f"invalid device-mapper name {name!r}: characters {bad!r} not allowed")
    if name in (".", "..", "control"):
        raise DeviceMapperError(f"invalid device-mapper name {name!r}: reserved")
    if len(raw) >= libdm.DM_NAME_LEN:
        raise DeviceMapperError(f"invalid device-mapper name {name!r}: longer than {libdm.DM_NAME_LEN - 1} bytes")
    return raw


class MapperDir:
    """The nodes under DEV_DIR/mapper (libdm is told the same directory)."""

    def __init__(self, lib: ctypes.CDLL, dev_dir: str = "/dev", udev_timeout: float = DEFAULT_UDEV_TIMEOUT) -> None:
        self._lib = lib
        self.dev_dir = dev_dir.rstrip("/") or "/"
        self.mapper_dir = os.path.join(self.dev_dir, "mapper")
        self.udev_timeout = udev_timeout
        try:
            lib.dm_set_dev_dir(self.dev_dir.encode())
        except libdm.CallFailed as e:
            raise DeviceMapperError(f"libdevmapper refused device directory {self.dev_dir}") from e

    def path(self, name: str) -> str:
        """MAPPER_DIR/NAME (the name is validated, never a path)."""
        check_name(name)
        return os.path.join(self.mapper_dir, name)

    @staticmethod
    def state(path: str, devno: int) -> str:
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

    def ensure(self, name: str, major: int, minor: int) -> str:
        """Make sure the node of ``name`` is a block node of major:minor; return it.

        With udev running, waits (bounded) for udev to make it; then asks
        libdm (MKNODES) and last makes it itself. Refuses to touch anything
        at that path that is not a block node or a symlink.
        """
        path = self.path(name)
        devno = os.makedev(major, minor)
        state = self.state(path, devno)
        if state == "ok":
            return path
        if state == "foreign":
            raise DeviceMapperError(
                f"{path} exists but is not a block device node; remove it by hand "
                "(a write to a missing node creates a regular file)"
            )
        log.debug("%s: %s after libdm's node handling", path, state)
        if udev_running() and self.wait(path, lambda: self.state(path, devno) != "missing"):
            state = self.state(path, devno)
            if state == "ok":
                return path
        state = self.state(path, devno)
        if state == "foreign":
            raise DeviceMapperError(f"{path} appeared but is not a block device node: left alone")
        if state == "stale":
            self.unlink_if_ours(path, devno=None)
        if self.state(path, devno) == "missing":
            self.mknodes(name)  # libdm's way first
        if self.state(path, devno) == "stale":
            self.unlink_if_ours(path, devno=None)
        if self.state(path, devno) == "missing":
            log.debug("%s: making the node %d:%d", path, major, minor)
            os.makedirs(self.mapper_dir, mode=0o755, exist_ok=True)
            old = os.umask(0)
            try:
                os.mknod(path, stat.S_IFBLK | 0o600, devno)
            except FileExistsError:
                pass
            finally:
                os.umask(old)
        state = self.state(path, devno)
        if state != "ok":
            raise DeviceMapperError(f"cannot make {path} a block node of {major}:{minor} (found: {state})")
        return path

    def mknodes(self, name: str) -> None:
        """libdm's own node creation for one device (DM_DEVICE_MKNODES, then
        the stacked node operation right away); failures are only logged."""
        lib = self._lib
        try:
            with libdm.LOCK:
                libdm.messages().clear()
                with libdm.task(lib, libdm.DM_DEVICE_MKNODES) as dmt:
                    lib.dm_task_set_name(dmt, check_name(name))
                    lib.dm_task_no_open_count(dmt)
                    if not lib.dm_task_run(dmt):
                        log.debug("mknodes %s: errno %d %s", name, lib.dm_task_get_errno(dmt), libdm.last_error())
                        return
                lib.dm_task_update_nodes()
        except DeviceMapperError as e:
            log.debug("mknodes %s: %s", name, e)

    @staticmethod
    def unlink_if_ours(path: str, devno: int | None) -> None:
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

    def ensure_gone(self, name: str, major: int, minor: int) -> None:
        """After a remove: the node is gone, or is not ours and left alone."""
        path = self.path(name)
        devno = os.makedev(major, minor)

        def gone() -> bool:
            try:
                os.lstat(path)
            except FileNotFoundError:
                return True
            return False

        if gone():
            return
        if udev_running() and self.wait(path, gone):
            return
        self.unlink_if_ours(path, devno)
        if not gone():
            log.warning("%s is still there after removing %s and is not its node: left alone", path, name)

    def wait(self, path: str, done: Callable[[], bool]) -> bool:
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
