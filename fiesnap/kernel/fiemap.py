"""A file's physical extents via FS_IOC_FIEMAP, and the checks that make them safe to use.

The COW store is mapped onto the file's blocks through a dm-linear device, so
every byte fiesnap believes belongs to the store must really belong to it and
nothing else. Anything the kernel can't vouch for (delayed allocation, inline
or tail data, encryption, shared or merged extents, holes) is refused rather
than guessed at.

Layouts from include/uapi/linux/fiemap.h and fs.h (checked against the
kernel headers): struct fiemap is 32 bytes (u64 fm_start, u64 fm_length,
u32 fm_flags, u32 fm_mapped_extents, u32 fm_extent_count, u32 fm_reserved),
each struct fiemap_extent 56 bytes (u64 logical, u64 physical, u64 length,
u64 reserved[2], u32 flags, u32 reserved[3]);
FS_IOC_FIEMAP = _IOWR('f', 11, struct fiemap) = 0xC020660B.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from fiesnap.errors import FilesystemError
from fiesnap.model.extents import Extent

FS_IOC_FIEMAP = 0xC020660B
FIEMAP_MAX_OFFSET = 0xFFFF_FFFF_FFFF_FFFF
FIEMAP_FLAG_SYNC = 0x0001

FIEMAP_EXTENT_LAST = 0x0001
FIEMAP_EXTENT_UNKNOWN = 0x0002
FIEMAP_EXTENT_DELALLOC = 0x0004
FIEMAP_EXTENT_ENCODED = 0x0008
FIEMAP_EXTENT_DATA_ENCRYPTED = 0x0080
FIEMAP_EXTENT_NOT_ALIGNED = 0x0100
FIEMAP_EXTENT_DATA_INLINE = 0x0200
FIEMAP_EXTENT_DATA_TAIL = 0x0400
FIEMAP_EXTENT_UNWRITTEN = 0x0800
FIEMAP_EXTENT_MERGED = 0x1000
FIEMAP_EXTENT_SHARED = 0x2000

# Only these may appear. UNWRITTEN is fine: fiesnap reads and writes the
# store through the block device, never through the file, so the
# filesystem's "reads as zeros" marker never matters. Every other flag,
# including ones newer kernels may add, is refused.
ALLOWED_FLAGS = FIEMAP_EXTENT_LAST | FIEMAP_EXTENT_UNWRITTEN

_FLAG_NAMES = {
    FIEMAP_EXTENT_LAST: "LAST",
    FIEMAP_EXTENT_UNKNOWN: "UNKNOWN",
    FIEMAP_EXTENT_DELALLOC: "DELALLOC",
    FIEMAP_EXTENT_ENCODED: "ENCODED",
    FIEMAP_EXTENT_DATA_ENCRYPTED: "DATA_ENCRYPTED",
    FIEMAP_EXTENT_NOT_ALIGNED: "NOT_ALIGNED",
    FIEMAP_EXTENT_DATA_INLINE: "DATA_INLINE",
    FIEMAP_EXTENT_DATA_TAIL: "DATA_TAIL",
    FIEMAP_EXTENT_UNWRITTEN: "UNWRITTEN",
    FIEMAP_EXTENT_MERGED: "MERGED",
    FIEMAP_EXTENT_SHARED: "SHARED",
}

from fiesnap.model.units import SECTOR_BYTES as SECTOR

_HEAD = struct.Struct("=QQIIII")  # struct fiemap, 32 bytes
_EXTENT = struct.Struct("=QQQ16xI12x")  # struct fiemap_extent, 56 bytes
assert _HEAD.size == 32 and _EXTENT.size == 56

# Extents fetched per ioctl; a fixed buffer keeps memory bounded for
# fragmented files (the loop continues until an extent flagged LAST).
BATCH_EXTENTS = 256


def flag_names(flags: int) -> str:
    """`flags` as "A|B|0x...": for error messages."""
    names = [name for bit, name in _FLAG_NAMES.items() if flags & bit]
    unknown = flags & ~sum(_FLAG_NAMES)
    if unknown:
        names.append(hex(unknown))
    return "|".join(names) or "0"


def _fiemap_batch(fd: int, start: int) -> list[Extent]:
    buf = bytearray(_HEAD.size + BATCH_EXTENTS * _EXTENT.size)
    _HEAD.pack_into(buf, 0, start, FIEMAP_MAX_OFFSET - start, FIEMAP_FLAG_SYNC, 0, BATCH_EXTENTS, 0)
    try:
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf, True)
    except OSError as e:
        if e.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL):
            raise FilesystemError(
                f"the filesystem cannot report file extents (FIEMAP: {os.strerror(e.errno)}): "
                "fiesnap needs ext4 or XFS"
            ) from e
        if e.errno == errno.EBADR:
            raise FilesystemError(
                "the filesystem refused FIEMAP_FLAG_SYNC: fiesnap needs ext4 or XFS"
            ) from e
        raise FilesystemError(f"FIEMAP failed: {os.strerror(e.errno or 0)}; check dmesg") from e
    mapped = _HEAD.unpack_from(buf, 0)[3]
    if mapped > BATCH_EXTENTS:
        raise FilesystemError(f"FIEMAP returned {mapped} extents for a buffer of {BATCH_EXTENTS}: kernel bug?")
    out = []
    for i in range(mapped):
        logical, physical, length, flags = _EXTENT.unpack_from(buf, _HEAD.size + i * _EXTENT.size)
        out.append(Extent(logical, physical, length, flags))
    return out


def raw_file_extents(fd: int) -> list[Extent]:
    """Every extent FIEMAP reports for `fd`, unvalidated, in logical order."""
    extents: list[Extent] = []
    start = 0
    while True:
        batch = _fiemap_batch(fd, start)
        if not batch:
            return extents  # no (more) extents: validation reports the missing LAST
        extents.extend(batch)
        last = batch[-1]
        if last.flags & FIEMAP_EXTENT_LAST:
            return extents
        nxt = last.logical + last.length
        if nxt <= start or nxt >= FIEMAP_MAX_OFFSET:
            raise FilesystemError(f"FIEMAP made no progress at byte {start}: kernel bug? do not use this file")
        start = nxt


def file_extents(fd: int) -> list[Extent]:
    """The validated physical extents of the open regular file `fd`, in bytes.

    FIEMAP_FLAG_SYNC flushes dirty data first, so delayed allocations get
    real blocks before we look.
    """
    size = os.fstat(fd).st_size
    return validate_extents(raw_file_extents(fd), size)


def validate_extents(extents: list[Extent], file_size: int) -> list[Extent]:
    """Check FIEMAP output is a complete, exclusive, sector-aligned map of [0, file_size).

    Returns the extents in logical order, with anything at or past end of
    file dropped and the extent holding EOF cut back to EOF rounded up to a
    sector: blocks past EOF may be speculative preallocation the filesystem
    frees whenever it likes (XFS does), so they must never be handed out.
    Raises FilesystemError on the first problem.
    """
    if file_size < 0:
        raise FilesystemError(f"negative file size {file_size}: kernel bug?")
    if not extents:
        if file_size == 0:
            return []
        raise FilesystemError(
            f"file of {file_size} bytes has no extents: it is not allocated; recreate it with fallocate"
        )
    ordered = sorted(extents, key=lambda e: e.logical)
    for e in ordered:
        bad = e.flags & ~ALLOWED_FLAGS
        if bad:
            raise FilesystemError(
                f"extent at file byte {e.logical} has flags {flag_names(bad)}: "
                "its blocks are not plainly and exclusively owned; recreate the file on ext4 or XFS "
                "without reflink/encryption/inline data"
            )
        if e.length <= 0:
            raise FilesystemError(f"extent at file byte {e.logical} has length {e.length}: kernel bug?")
        if e.physical % SECTOR or e.length % SECTOR or e.logical % SECTOR:
            raise FilesystemError(
                f"extent at file byte {e.logical} (physical {e.physical}, {e.length} bytes) "
                "is not 512-byte aligned: this file cannot be mapped by device-mapper"
            )
        if e.physical == 0:
            raise FilesystemError(
                f"extent at file byte {e.logical} claims physical byte 0 (the superblock): kernel bug?"
            )
    if not ordered[-1].flags & FIEMAP_EXTENT_LAST:
        raise FilesystemError("FIEMAP did not report the file's last extent: the map is incomplete; retry")
    for e in ordered[:-1]:
        if e.flags & FIEMAP_EXTENT_LAST:
            raise FilesystemError(f"extent at file byte {e.logical} is flagged LAST but is not last: kernel bug?")

    pos = 0
    for e in ordered:
        if e.logical >= file_size:
            break  # past EOF: dropped below, so holes there don't matter
        if e.logical != pos:
            what = "hole" if e.logical > pos else "overlap"
            raise FilesystemError(
                f"file has a {what} at byte {min(pos, e.logical)}: a store must be fully allocated; "
                "recreate it with fallocate"
            )
        pos = e.logical + e.length
    if pos < file_size:
        raise FilesystemError(
            f"file has a hole at byte {pos} (size {file_size}): a store must be fully allocated; "
            "recreate it with fallocate"
        )

    by_physical = sorted(ordered, key=lambda e: e.physical)
    for a, b in zip(by_physical, by_physical[1:]):
        if a.physical + a.length > b.physical:
            raise FilesystemError(
                f"extents at file bytes {a.logical} and {b.logical} share physical blocks: refusing this file"
            )

    eof = -(-file_size // SECTOR) * SECTOR
    out = []
    for e in ordered:
        if e.logical >= eof:
            break
        length = min(e.length, eof - e.logical)
        flags = e.flags if length == e.length else e.flags & ~FIEMAP_EXTENT_LAST
        out.append(Extent(e.logical, e.physical, length, flags))
    if out:
        out[-1] = Extent(out[-1].logical, out[-1].physical, out[-1].length, out[-1].flags | FIEMAP_EXTENT_LAST)
    return out
