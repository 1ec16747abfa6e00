"""A mounted filesystem's free space as physical byte ranges, via FS_IOC_GETFSMAP.

Only the filesystem knows which blocks of its device hold nothing; GETFSMAP
asks it directly instead of parsing on-disk bitmaps.

Exactness: on ext4 the answer reflects the allocator at the moment of each
ioctl call, and a batched walk spans several calls, so it is only exact while
the filesystem is frozen (FIFREEZE) or not mounted for writing. XFS walks its
free-space btrees the same way. Freezing is the caller's job.

Layouts from include/uapi/linux/fsmap.h (checked against the kernel headers):
struct fsmap is 64 bytes (u32 fmr_device, u32 fmr_flags, u64 fmr_physical,
u64 fmr_owner, u64 fmr_offset, u64 fmr_length, u64 reserved[3]); struct
fsmap_head is 64 bytes of header (u32 iflags, u32 oflags, u32 count,
u32 entries, u64 reserved[6]) then fmh_keys[2] then the records, so
sizeof(struct fsmap_head) == 192 and FS_IOC_GETFSMAP =
_IOWR('X', 59, struct fsmap_head) = 0xC0C0583B.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from fiesnap.errors import FilesystemError, NotRootError

FS_IOC_GETFSMAP = 0xC0C0583B

FMH_OF_DEV_T = 0x1
FMR_OF_SPECIAL_OWNER = 0x10
FMR_OF_LAST = 0x20
FMR_OWN_FREE = 1  # FMR_OWNER(0, 1)

_U32_MAX = 0xFFFF_FFFF
_U64_MAX = 0xFFFF_FFFF_FFFF_FFFF

_HEAD = struct.Struct("=IIII48x")  # fsmap_head without its keys, 64 bytes
_REC = struct.Struct("=IIQQQQ24x")  # struct fsmap, 64 bytes
assert _HEAD.size == 64 and _REC.size == 64
_KEYS_AT = _HEAD.size
_RECS_AT = _HEAD.size + 2 * _REC.size  # == sizeof(struct fsmap_head) == 192

DEFAULT_BATCH = 128


def _encode_dev(major: int, minor: int) -> int:
    """The kernel's new_encode_dev(): how fmr_device spells a dev_t."""
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def _records(fd: int, batch: int) -> tuple[int, list[tuple[int, int, int, int, int]]]:
    """All (device, flags, physical, owner, length) records and the header oflags."""
    buf = bytearray(_RECS_AT + batch * _REC.size)
    _REC.pack_into(buf, _KEYS_AT, 0, 0, 0, 0, 0, 0)  # low key: from the start
    # High key: everything all-ones except fmr_length, which must be 0 (XFS
    # on Linux 6.x returns EINVAL for an all-ones length in the high key).
    _REC.pack_into(buf, _KEYS_AT + _REC.size, _U32_MAX, _U32_MAX, _U64_MAX, _U64_MAX, _U64_MAX, 0)
    records: list[tuple[int, int, int, int, int]] = []
    oflags = 0
    while True:
        _HEAD.pack_into(buf, 0, 0, 0, batch, 0)
        try:
            fcntl.ioctl(fd, FS_IOC_GETFSMAP, buf, True)
        except OSError as e:
            if e.errno == errno.EPERM:
                raise NotRootError("reading the free-space map needs CAP_SYS_ADMIN: run fiesnap as root") from e
            if e.errno in (errno.ENOTTY, errno.EOPNOTSUPP):
                raise FilesystemError(
                    "the filesystem cannot report its free space (GETFSMAP unsupported): "
                    "fiesnap needs ext4 or XFS on Linux 4.12 or later"
                ) from e
            raise FilesystemError(f"GETFSMAP failed: {os.strerror(e.errno or 0)}; check dmesg") from e
        _, oflags, _, entries = _HEAD.unpack_from(buf, 0)
        if entries > batch:
            raise FilesystemError(f"GETFSMAP returned {entries} records for a buffer of {batch}: kernel bug?")
        if entries == 0:
            return oflags, records
        for i in range(entries):
            device, flags, physical, owner, _offset, length = _REC.unpack_from(buf, _RECS_AT + i * _REC.size)
            records.append((device, flags, physical, owner, length))
        last_at = _RECS_AT + (entries - 1) * _REC.size
        if _REC.unpack_from(buf, last_at)[1] & FMR_OF_LAST:
            return oflags, records
        # Continue after the last record: the kernel resumes past low key + length.
        buf[_KEYS_AT : _KEYS_AT + _REC.size] = buf[last_at : last_at + _REC.size]


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sort (start, length) ranges and merge overlapping or touching ones; drop empty ones."""
    out: list[tuple[int, int]] = []
    for start, length in sorted(r for r in ranges if r[1] > 0):
        if out and start <= out[-1][0] + out[-1][1]:
            prev_start, prev_len = out[-1]
            out[-1] = (prev_start, max(prev_len, start + length - prev_start))
        else:
            out.append((start, length))
    return out


def free_space(mountpoint: str, *, batch: int = DEFAULT_BATCH) -> list[tuple[int, int]]:
    """Free (start_byte, length_bytes) ranges of the filesystem's data device, sorted and merged.

    Byte offsets are from the start of the block device the filesystem is on
    (on XFS: the data device; log and realtime devices are left out).
    """
    if batch < 2:
        raise ValueError("batch must be at least 2")
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        oflags, records = _records(fd, batch)
    finally:
        os.close(fd)
    if oflags & FMH_OF_DEV_T:
        data_dev = _encode_dev(os.major(st.st_dev), os.minor(st.st_dev))
        devices = {data_dev}
    else:
        # Opaque device cookies: only safe to interpret when there is just one device.
        devices = {r[0] for r in records}
        if len(devices) > 1:
            raise FilesystemError(
                f"{mountpoint} spans several devices and GETFSMAP did not say which is which: unsupported"
            )
    free = [
        (physical, length)
        for device, flags, physical, owner, length in records
        if device in devices and flags & FMR_OF_SPECIAL_OWNER and owner == FMR_OWN_FREE
    ]
    return merge_ranges(free)
