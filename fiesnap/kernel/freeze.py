"""Freeze a mounted filesystem for a short window (FIFREEZE/FITHAW).

An online checkpoint must capture a consistent filesystem: freezing flushes
dirty data and the journal and holds every new write until the thaw. A
filesystem left frozen hangs every writer on it, so the window blocks the
terminal signals (Ctrl-C, kill, hangup, Ctrl-\\, Ctrl-Z) and always thaws
before they are delivered. SIGKILL cannot be blocked: `fsfreeze -u` is the
way out then.

Use it from the main thread (the signal mask is per thread, and Python runs
handlers there), and never write to the frozen filesystem inside the
window: that write would wait for a thaw that never comes.

FIFREEZE = _IOWR('X', 119, int) = 0xC0045877,
FITHAW = _IOWR('X', 120, int) = 0xC0045878 (include/uapi/linux/fs.h).
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

from fiesnap.errors import FilesystemError, NotRootError, UsageError

FIFREEZE = 0xC0045877
FITHAW = 0xC0045878

#: Signals held back for the whole window; pending ones arrive after the thaw.
BLOCKED_SIGNALS = frozenset(
    {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGTSTP}
)


def _freeze(fd: int, mountpoint: str) -> None:
    try:
        fcntl.ioctl(fd, FIFREEZE, 0)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise FilesystemError(
                f"{mountpoint} is already frozen (by another tool?): "
                f"thaw it with 'fsfreeze -u {mountpoint}' and retry"
            ) from e
        if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY):
            raise FilesystemError(
                f"the filesystem at {mountpoint} cannot be frozen: fiesnap needs ext4 or XFS"
            ) from e
        if e.errno == errno.EPERM:
            raise NotRootError(f"freezing {mountpoint} needs CAP_SYS_ADMIN: run fiesnap as root") from e
        raise FilesystemError(f"cannot freeze {mountpoint}: {os.strerror(e.errno or 0)}; check dmesg") from e


def _thaw(fd: int, mountpoint: str) -> None:
    while True:
        try:
            fcntl.ioctl(fd, FITHAW, 0)
            return
        except InterruptedError:
            continue
        except OSError as e:
            raise FilesystemError(
                f"cannot thaw {mountpoint}: {os.strerror(e.errno or 0)}; run 'fsfreeze -u {mountpoint}' now"
            ) from e


@contextmanager
def signals_held() -> Iterator[None]:
    """Hold the signals in BLOCKED_SIGNALS back for the body; pending ones arrive after it."""
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, BLOCKED_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


@contextmanager
def frozen(mountpoint: str) -> Iterator[None]:
    """Hold `mountpoint`'s filesystem frozen for the body of the with-block.

    Always thaws on exit, also on exceptions; signals in BLOCKED_SIGNALS
    sent meanwhile are delivered after the thaw.
    """
    if not os.path.ismount(mountpoint):
        raise UsageError(f"{mountpoint} is not a mount point: give the root of the filesystem")
    with signals_held():
        try:
            fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise FilesystemError(f"cannot open {mountpoint}: {os.strerror(e.errno or 0)}; check the path") from e
        try:
            _freeze(fd, mountpoint)
            try:
                yield
            finally:
                _thaw(fd, mountpoint)
        finally:
            os.close(fd)


def refuse_frozen(mountpoints: list[str], dev: int) -> None:
    """Raise FilesystemError if another tool holds the filesystem on `dev` frozen.

    Nothing tells whether a filesystem is frozen but a freeze of one's own:
    FIFREEZE refuses a frozen filesystem with EBUSY on every kernel, and is
    thawed at once. It goes through the first of `mountpoints` (a mount root,
    a bind mount of a folder or a file) that is still the filesystem on `dev`
    (something may be mounted over another); none is, nothing is checked.
    """
    for path in mountpoints:
        with signals_held():
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                if os.fstat(fd).st_dev != dev:
                    continue
                _freeze(fd, path)
                _thaw(fd, path)
                return
            finally:
                os.close(fd)
