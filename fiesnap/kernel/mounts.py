"""mount(2)/umount2(2) via libc, and a private scratch mount.

Direct syscalls instead of mount(8): no helper binaries, no /etc/fstab or
utab side effects, and errno comes back intact.

The private mount lives in a fresh 0700 directory under /run/fiesnap so no
other user can reach into the filesystem while fiesnap works on it, and it
is mounted nosuid,nodev,noexec because the filesystem's contents are not
fiesnap's to trust.

It is also invisible outside fiesnap: it is made in a mount namespace of its
own, entered just before the mount and left right after the unmount. Why,
from the kernel's Documentation/filesystems/sharedsubtree.rst: a mount made
under a *shared* mount is copied to every mount of its peer group and to
their slaves ("mount device B/b" is a bind of a private mount: section 5b,
cases 2 and 5); on a systemd machine / and /run are shared, and containers
and services with private namespaces (PrivateTmp=, ProtectSystem=, ...) hold
peers or slaves of them, so a scratch mount in the caller's namespace shows
up there and can be held busy there. And a namespace cloned while the mount
exists gets its own copy of it (5g), whatever its propagation type, which
keeps the filesystem busy until that namespace ends.

Two ways out were weighed:

- make /run/fiesnap a private bind mount of itself (mount --bind, then
  MS_PRIVATE): scratch mounts below a private mount propagate nowhere (5b,
  case 5). But that leaves a permanent mount behind, its bind is itself
  copied into every peer of /run on the way, and a namespace cloned during a
  scratch mount still gets a copy (5g).
- unshare(CLONE_NEWNS), then MS_REC|MS_SLAVE on /: the copy of the caller's
  mounts now receives the caller's mount and unmount events (so mounts_of
  still sees the user's mounts, also one made meanwhile on a shared mount)
  but sends none back, and a namespace cloned from anywhere else never
  contains the scratch mount (5a "slave mount", 5g). Nothing stays behind:
  if fiesnap dies, the kernel tears the namespace and its mount down.

The second is taken. A namespace is per thread, so the body runs on the main
thread (as freeze.frozen already requires: /proc/self/mountinfo is the main
thread's view), and afterwards setns(2) returns the thread to the caller's
namespace, restoring its root and working directory (setns resets both;
and as unshare(CLONE_NEWNS) implies CLONE_FS, the thread no longer shares its
working directory and umask with other threads: fiesnap has none that care).
That keeps in-process callers (the lab's tests) in the namespace they
started in: their own mounts and unmounts stay where they expect them.
Freezing through the scratch mount still freezes the user's mount: any
mount of the device, in any namespace, shares its superblock. One caveat:
where the caller's mounts are private (no systemd), a filesystem the user
unmounts while a scratch mount is up stays alive in fiesnap's copy until the
scratch mount ends (a moment: the body is one fiesnap step).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import stat
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from fiesnap.errors import DeviceError, FiesnapError, FilesystemError, RefusedError

# include/uapi/linux/mount.h
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REC = 0x4000
MS_SLAVE = 1 << 19

# include/uapi/linux/sched.h
CLONE_NEWNS = 0x00020000

# include/linux/fs.h (umount2 flags)
MNT_DETACH = 0x2

RUN_DIR = "/run/fiesnap"


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _sys_mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> int:
    """mount(2); 0 or the errno."""
    libc = _libc()
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    rc = libc.mount(
        os.fsencode(source) if source is not None else None, os.fsencode(target),
        fstype.encode() if fstype is not None else None, flags, data.encode() if data else None,
    )
    return ctypes.get_errno() if rc != 0 else 0


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    """mount(2); failure -> FilesystemError naming the errno."""
    err = _sys_mount(source, target, fstype, flags, data)
    if err:
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
def own_mount_namespace() -> Iterator[None]:
    """Run the body in a new mount namespace, a slave copy of the caller's; come back after.

    Main thread only (see the module docstring). A failure to leave raises
    after the body, so the caller knows its later mounts would stay hidden.
    """
    if threading.current_thread() is not threading.main_thread():
        raise FiesnapError("a private mount must be made from the main thread (fiesnap bug)")
    libc = _libc()
    libc.unshare.argtypes = [ctypes.c_int]
    libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
    fds: list[int] = []
    try:
        for path, flags in (("/proc/thread-self/ns/mnt", os.O_RDONLY), ("/", os.O_PATH | os.O_DIRECTORY),
                            (".", os.O_PATH | os.O_DIRECTORY)):
            fds.append(os.open(path, flags | os.O_CLOEXEC))
    except OSError as e:
        for fd in fds:
            os.close(fd)
        raise _namespace_error(f"opening {path}", e.errno or 0) from None
    back, root, cwd = fds
    try:
        if libc.unshare(CLONE_NEWNS) != 0:
            raise _namespace_error("unshare", ctypes.get_errno())
        try:
            err = _sys_mount(None, "/", None, MS_REC | MS_SLAVE)
            if err:
                raise _namespace_error("making / a slave", err)
            yield
        finally:
            if libc.setns(back, CLONE_NEWNS) != 0:
                raise _namespace_error("setns back", ctypes.get_errno())
            try:  # setns moved root and cwd to the namespace's root: put them back
                os.fchdir(root)
                os.chroot(".")
                os.fchdir(cwd)
            except OSError as e:
                raise _namespace_error("restoring the root and working directory", e.errno or 0) from None
    finally:
        for fd in fds:
            os.close(fd)


def _namespace_error(step: str, err: int) -> RefusedError:
    return RefusedError(
        f"cannot keep the scratch mount out of other mount namespaces ({step}: {os.strerror(err)}): "
        "run fiesnap as root on the host, not in a restricted container"
    )


@contextmanager
def private_mount(
    device_path: str, fstype: str, *, readonly: bool = False, data: str = "", run_dir: str = RUN_DIR
) -> Iterator[str]:
    """Mount the device at a fresh private directory; yield its path; sync, unmount and remove it.

    The mount exists only in a mount namespace of its own (own_mount_namespace),
    which the calling thread is in for the body and leaves afterwards.

    Cleanup runs even if the body raises. If cleanup itself fails while an
    exception is already on its way out, the original exception is kept and
    the cleanup failure added as a note, so the first cause stays visible. A
    mount that cannot be unmounted (busy) is reported and detached: it is
    unreachable once the namespace is left anyway.

    Note that a read-only mount still replays the journal on ext4 and XFS;
    pass data="noload" (ext4) or "norecovery" (XFS) if the device must not
    be written at all.
    """
    _ensure_run_dir(run_dir)
    target = tempfile.mkdtemp(prefix="mnt-", dir=run_dir)  # mode 0700
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC | (MS_RDONLY if readonly else 0)
    failed: BaseException | None = None
    errors: list[Exception] = []
    try:
        with own_mount_namespace():
            mount(device_path, target, fstype, flags, data)
            try:
                yield target
            finally:
                errors = _teardown(target, sync=not readonly)
    except BaseException as e:
        failed = e
        raise
    finally:
        try:
            os.rmdir(target)  # back in the caller's namespace: never a mount point here
        except OSError as e:
            errors.append(FilesystemError(f"cannot remove {target}: {os.strerror(e.errno or 0)}; remove it by hand"))
        if errors:
            if failed is None:
                raise errors[0]
            for err in errors:
                failed.add_note(f"while cleaning up the mount at {target}: {err}")


def _teardown(target: str, *, sync: bool) -> list[Exception]:
    """Sync and unmount `target`, carrying on past failures; return them."""
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
        try:
            umount(target, MNT_DETACH)  # whatever holds it keeps the filesystem, not the mount point
        except Exception:
            pass
    return errors
