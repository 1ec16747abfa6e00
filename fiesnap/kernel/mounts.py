"""mount(2)/umount2(2) via libc, and a private scratch mount.

Direct syscalls instead of mount(8): no helper binaries, no /etc/fstab or
utab side effects, and errno comes back intact.

The private mount lives in a fresh 0700 directory under /run/fiesnap so no
other user can reach into the filesystem while fiesnap works on it, and it
is mounted nosuid,nodev,noexec because the filesystem's contents are not
fiesnap's to trust.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from fiesnap.errors import DeviceError, FilesystemError, RefusedError

# include/uapi/linux/mount.h
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8

# include/linux/fs.h (umount2 flags)
MNT_DETACH = 0x2

RUN_DIR = "/run/fiesnap"


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    """mount(2); failure -> FilesystemError naming the errno."""
    libc = _libc()
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    rc = libc.mount(
        os.fsencode(source), os.fsencode(target), fstype.encode(), flags, data.encode() if data else None
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise FilesystemError(
            f"cannot mount {source} ({fstype}) on {target}: {os.strerror(err)}; check dmesg and run fsck"
        )


def umount(target: str, flags: int = 0) -> None:
    """umount2(2); failure (typically EBUSY) -> DeviceError naming the errno."""
    libc = _libc()
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    if libc.umount2(os.fsencode(target), flags) != 0:
        err = ctypes.get_errno()
        raise DeviceError(f"cannot unmount {target}: {os.strerror(err)}; close any programs using it and retry")


def syncfs(path: str) -> None:
    """Flush the one filesystem holding `path` (not every filesystem, as sync(2) would)."""
    libc = _libc()
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise FilesystemError(f"syncfs {path} failed: {os.strerror(err)}; check dmesg for I/O errors")
    finally:
        os.close(fd)


def _ensure_run_dir(path: str) -> None:
    """Create `path` 0700, or accept it only if it is a root-owned directory, not a symlink."""
    parent = os.path.dirname(path)
    os.makedirs(parent, mode=0o755, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0:
        raise RefusedError(f"{path} is not a root-owned directory: remove it and retry")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700, follow_symlinks=False)


@contextmanager
def private_mount(
    device_path: str, fstype: str, *, readonly: bool = False, data: str = "", run_dir: str = RUN_DIR
) -> Iterator[str]:
    """Mount the device at a fresh private directory; yield its path; sync, unmount and remove it.

    Cleanup runs even if the body raises. If cleanup itself fails while an
    exception is already on its way out, the original exception is kept and
    the cleanup failure added as a note, so the first cause stays visible.

    Note that a read-only mount still replays the journal on ext4 and XFS;
    pass data="noload" (ext4) or "norecovery" (XFS) if the device must not
    be written at all.
    """
    _ensure_run_dir(run_dir)
    target = tempfile.mkdtemp(prefix="mnt-", dir=run_dir)  # mode 0700
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC | (MS_RDONLY if readonly else 0)
    try:
        mount(device_path, target, fstype, flags, data)
    except BaseException:
        os.rmdir(target)
        raise
    failed: BaseException | None = None
    try:
        yield target
    except BaseException as e:
        failed = e
        raise
    finally:
        errors = _teardown(target, sync=not readonly)
        if errors:
            if failed is None:
                raise errors[0]
            for err in errors:
                failed.add_note(f"while cleaning up the mount at {target}: {err}")


def _teardown(target: str, *, sync: bool) -> list[Exception]:
    """Sync, unmount and remove `target`, carrying on past failures; return them."""
    errors: list[Exception] = []
    if sync:
        try:
            syncfs(target)
        except Exception as e:  # still unmount: that flushes too, and leaving it mounted helps nobody
            errors.append(e)
    try:
        umount(target)
    except Exception as e:
        errors.append(e)
        return errors  # still mounted: the directory must stay
    try:
        os.rmdir(target)
    except OSError as e:
        errors.append(FilesystemError(f"cannot remove {target}: {os.strerror(e.errno or 0)}; remove it by hand"))
    return errors
