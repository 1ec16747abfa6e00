"""The inode immutable flag (FS_IOC_GETFLAGS / FS_IOC_SETFLAGS).

A store file is made immutable while its blocks are mapped by device-mapper:
nobody, root included, can write, truncate or delete it through the
filesystem without first clearing the flag on purpose.

FS_IOC_GETFLAGS/SETFLAGS = _IOR/_IOW('f', 1/2, long) = 0x80086601/0x40086602
(include/uapi/linux/fs.h), but the kernel reads and writes an unsigned int
(fs/ioctl.c ioctl_getflags/ioctl_setflags), so the buffer is 4 bytes.
FS_IMMUTABLE_FL = 0x10.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from fiesnap.errors import FiesnapError, FilesystemError, NotRootError

FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IMMUTABLE_FL = 0x00000010


def _flags_error(e: OSError) -> FiesnapError:
    if e.errno == errno.EPERM:
        return NotRootError("changing the immutable flag needs CAP_LINUX_IMMUTABLE: run fiesnap as root")
    if e.errno in (errno.ENOTTY, errno.EOPNOTSUPP):
        return FilesystemError("the filesystem has no immutable flag: fiesnap needs ext4 or XFS")
    return FilesystemError(f"cannot read or change inode flags: {os.strerror(e.errno or 0)}; check dmesg")


def _get_flags(fd: int) -> int:
    try:
        return struct.unpack("=I", fcntl.ioctl(fd, FS_IOC_GETFLAGS, bytes(4)))[0]
    except OSError as e:
        raise _flags_error(e) from e


def set_immutable(fd: int, on: bool) -> None:
    """Set or clear FS_IMMUTABLE_FL on the open file `fd`, keeping its other flags."""
    flags = _get_flags(fd)
    new = flags | FS_IMMUTABLE_FL if on else flags & ~FS_IMMUTABLE_FL
    if new != flags:
        try:
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("=I", new))
        except OSError as e:
            raise _flags_error(e) from e


def is_immutable(fd: int) -> bool:
    """Whether FS_IMMUTABLE_FL is set on the open file `fd`."""
    return bool(_get_flags(fd) & FS_IMMUTABLE_FL)
