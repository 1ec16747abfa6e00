"""O_DIRECT block I/O with aligned buffers.

The `-cow` device's page cache is not kept coherent with dm-snapshot's own
writes, so anything fiesnap reads from or writes to the store goes around the
page cache. mmap gives page-aligned buffers, which O_DIRECT needs.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
from dataclasses import dataclass

from fiesnap.errors import DeviceError


class AlignedBuffer:
    """A page-aligned, zero-filled buffer of `size` bytes (a multiple of 4096)."""

    def __init__(self, size: int) -> None:
        if size <= 0 or size % mmap.PAGESIZE:
            raise ValueError(f"buffer size {size} is not a positive multiple of {mmap.PAGESIZE}")
        self.size = size
        self.map = mmap.mmap(-1, size)
        self.view = memoryview(self.map)

    def close(self) -> None:
        try:
            self.view.release()
            self.map.close()
        except BufferError:
            pass  # a caller still holds a slice; the mapping is freed with it

    def __enter__(self) -> "AlignedBuffer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class DirectDevice:
    """A block device opened with O_DIRECT for exact, uncached reads and writes."""

    path: str
    fd: int

    @classmethod
    def open(cls, path: str, *, write: bool, expect_rdev: int | None = None,
             exclusive: bool = False) -> "DirectDevice":
        """Open `path`; with `expect_rdev`, refuse unless the opened file is that block
        device (checked on the descriptor, so a node swapped after a check cannot
        redirect the I/O); with `exclusive`, O_EXCL: EBUSY while the device is mounted
        anywhere or held by another device or program."""
        flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_DIRECT | os.O_CLOEXEC
        if exclusive:
            flags |= os.O_EXCL
        fd = os.open(path, flags)
        if expect_rdev is not None:
            st = os.fstat(fd)
            if not stat.S_ISBLK(st.st_mode) or st.st_rdev != expect_rdev:
                os.close(fd)
                what = f"block device {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}" \
                    if stat.S_ISBLK(st.st_mode) else "not a block device"
                raise DeviceError(
                    f"{path} is {what}, not {os.major(expect_rdev)}:{os.minor(expect_rdev)} as expected: "
                    "refusing to use it (nothing was written)")
        return cls(path, fd)

    def read_into(self, buf: AlignedBuffer, offset: int, length: int) -> memoryview:
        """Read exactly `length` bytes at `offset` into the start of `buf`."""
        done = 0
        while done < length:
            n = os.preadv(self.fd, [buf.view[done:length]], offset + done)
            if n <= 0:
                raise OSError(f"short read from {self.path} at byte {offset + done}")
            done += n
        return buf.view[:length]

    def write_from(self, buf: AlignedBuffer, offset: int, length: int, *, start: int = 0) -> None:
        """Write exactly `length` bytes of `buf`, from its byte `start`, at `offset`."""
        done = 0
        while done < length:
            n = os.pwritev(self.fd, [buf.view[start + done:start + length]], offset + done)
            if n <= 0:
                raise OSError(f"short write to {self.path} at byte {offset + done}")
            done += n

    def fsync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> "DirectDevice":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def zero_range(path: str, offset: int, length: int, *, expect_rdev: int | None = None) -> None:
    """Write zeros over [offset, offset+length) with O_DIRECT, fsync, and read back to prove it."""
    size = max(mmap.PAGESIZE, -(-length // mmap.PAGESIZE) * mmap.PAGESIZE)
    with AlignedBuffer(size) as buf, DirectDevice.open(path, write=True, expect_rdev=expect_rdev) as dev:
        dev.write_from(buf, offset, length)
        dev.fsync()
        if any(bytes(dev.read_into(buf, offset, length))):
            raise OSError(f"{path}: bytes {offset}..{offset + length} did not read back as zeros")


def write_chunks(path: str, chunks: dict[int, bytes], chunk_bytes: int, *,
                 expect_rdev: int | None = None) -> None:
    """Write whole chunks {chunk number: bytes} with O_DIRECT, fsync, and read each back."""
    with AlignedBuffer(chunk_bytes) as buf, DirectDevice.open(path, write=True, expect_rdev=expect_rdev) as dev:
        for n in sorted(chunks):
            data = chunks[n]
            if len(data) != chunk_bytes:
                raise ValueError(f"chunk {n} is {len(data)} bytes, not {chunk_bytes}")
            buf.view[:chunk_bytes] = data
            dev.write_from(buf, n * chunk_bytes, chunk_bytes)
        dev.fsync()
        for n in sorted(chunks):
            if bytes(dev.read_into(buf, n * chunk_bytes, chunk_bytes)) != chunks[n]:
                raise OSError(f"{path}: chunk {n} did not read back as written")


def probe_exclusive(path: str) -> bool:
    """True if nothing holds the block device: not mounted in any mount namespace, not
    under another device, not opened exclusively by a program (an O_EXCL open succeeds)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EBUSY:
            return False
        raise
    os.close(fd)
    return True
