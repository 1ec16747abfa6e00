"""Byte-addressed access to the device image dm-bow works on.

Everything in bow_compat (the backup-on-write model, restore, inspect) reads and writes through
this one small interface, so the same code runs over an image file, a block device, or a
bytearray in property tests, and tests can cut power after the N-th write.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Protocol

from bow_compat.errors import BowUsageError


class Image(Protocol):
    """A device image: reads and writes at byte offsets, and a durability barrier."""

    size: int

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...

    def sync(self) -> None:
        """Everything written so far is durable when this returns (fsync)."""


class MemoryImage:
    """An image held in memory (tests, property tests)."""

    def __init__(self, data: bytes | bytearray) -> None:
        self.buf = bytearray(data)
        self.size = len(self.buf)

    def read(self, offset: int, length: int) -> bytes:
        _check(offset, length, self.size)
        return bytes(self.buf[offset:offset + length])

    def write(self, offset: int, data: bytes) -> None:
        _check(offset, len(data), self.size)
        self.buf[offset:offset + len(data)] = data

    def sync(self) -> None:
        pass


NOT_REGULAR = ((stat.S_ISBLK, "a block device"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe"),
               (stat.S_ISSOCK, "a socket"))


def kind_of(mode: int) -> str:
    """What a non-regular file is, for messages: "a directory", "a block device" ..."""
    return next((name for test, name in NOT_REGULAR if test(mode)), "not a regular file")


class FileImage:
    """An image file or block device opened read-write (or read-only for inspect).

    Anything else (a directory, a fifo ...) is refused with BowUsageError naming the path:
    a directory opens read-only and "has" a size, which would only lead to a confusing error."""

    def __init__(self, path: str | os.PathLike, *, writable: bool = True) -> None:
        self.path = os.fspath(path)
        try:
            self.fd = os.open(self.path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
                              | os.O_NONBLOCK)  # a fifo must be refused, not waited on
        except IsADirectoryError:
            raise _wrong_kind(self.path, stat.S_IFDIR) from None
        try:
            mode = os.fstat(self.fd).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                raise _wrong_kind(self.path, mode)
            os.set_blocking(self.fd, True)
            self.size = os.lseek(self.fd, 0, os.SEEK_END)  # also right for block devices
        except BaseException:
            os.close(self.fd)
            raise

    def read(self, offset: int, length: int) -> bytes:
        _check(offset, length, self.size)
        out = bytearray()
        while len(out) < length:
            chunk = os.pread(self.fd, length - len(out), offset + len(out))
            if not chunk:
                raise OSError(f"{self.path}: short read at byte {offset + len(out)}")
            out += chunk
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        _check(offset, len(data), self.size)
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], offset + done)

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> "FileImage":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _wrong_kind(path: str, mode: int) -> BowUsageError:
    return BowUsageError(f"{path} is {kind_of(mode)}: give an image file or a block device")


def copy_prefix(src: str | os.PathLike, dst: str | os.PathLike, size: int) -> None:
    """Copy the first `size` bytes of `src` to `dst` (a file it creates, or an existing block
    device it overwrites in place) and fsync; an image is often a prefix of a larger disk."""
    dst_is_dev = os.path.exists(dst) and stat.S_ISBLK(os.stat(dst).st_mode)
    with open(src, "rb") as fi, open(dst, "r+b" if dst_is_dev else "wb") as fo:
        left = size
        while left:
            buf = fi.read(min(1 << 22, left))
            if not buf:
                raise OSError(errno.EIO, f"{os.fspath(src)} ended {left} bytes short of {size}")
            fo.write(buf)
            left -= len(buf)
        fo.flush()
        os.fsync(fo.fileno())


def _check(offset: int, length: int, size: int) -> None:
    if offset < 0 or length < 0 or offset + length > size:
        raise ValueError(f"I/O of {length} bytes at {offset} is outside the {size}-byte image")
