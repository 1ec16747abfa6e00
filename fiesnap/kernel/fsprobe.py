"""Which filesystem is on a device or under a path, read from the source.

Reading the superblock directly (rather than asking blkid/udev) works on an
unmounted device, needs no helper binaries, and can't be fooled by a stale
udev database.

Superblock layouts (fs/ext4/ext4.h struct ext4_super_block at byte 1024,
little-endian; fs/xfs/libxfs/xfs_format.h struct xfs_dsb at byte 0,
big-endian):
  ext4: s_blocks_count_lo @0x04 u32, s_log_block_size @0x18 u32,
        s_magic @0x38 u16 = 0xEF53, s_feature_incompat @0x60 u32,
        s_uuid @0x68 [16], s_blocks_count_hi @0x150 u32 (if INCOMPAT_64BIT 0x80)
  XFS:  sb_magicnum @0 "XFSB", sb_blocksize @4 u32, sb_dblocks @8 u64,
        sb_rblocks @16 u64, sb_rextents @24 u64, sb_uuid @32 [16]

XFS with a realtime section is refused: a file with the realtime flag
(FS_XFLAG_REALTIME, possibly inherited from its folder) has its blocks on the
realtime device, and FIEMAP gives addresses there, not on the data device a
store is mapped onto. Checked twice: sb_rblocks/sb_rextents here, and the
flag of the store file itself once created (`is_realtime`, FS_IOC_FSGETXATTR
= _IOR('X', 31, struct fsxattr), 28 bytes, fsx_xflags first;
include/uapi/linux/fs.h).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import struct
import uuid
from dataclasses import dataclass

from fiesnap.kernel.directio import AlignedBuffer, DirectDevice
from fiesnap.errors import DeviceError, FilesystemError

EXT4_SUPER_MAGIC = 0xEF53
XFS_SUPER_MAGIC = 0x58465342  # "XFSB", also statfs f_type

EXT4_SB_OFFSET = 1024
EXT4_FEATURE_INCOMPAT_JOURNAL_DEV = 0x0008
EXT4_FEATURE_INCOMPAT_64BIT = 0x0080

FS_IOC_FSGETXATTR = 0x801C581F
FSXATTR_BYTES = 28
FS_XFLAG_REALTIME = 0x00000001

_STATFS_TYPES = {EXT4_SUPER_MAGIC: "ext4", XFS_SUPER_MAGIC: "xfs"}


@dataclass(frozen=True)
class FsInfo:
    """What the superblock says. `fstype` is the kernel driver name to mount it with."""

    fstype: str
    uuid: str
    block_size: int
    fs_bytes: int


def _read_at(fd: int, offset: int, length: int) -> bytes:
    data = b""
    while len(data) < length:
        chunk = os.pread(fd, length - len(data), offset + len(data))
        if not chunk:
            break
        data += chunk
    return data


def _parse_ext4(sb: bytes, path: str) -> FsInfo | None:
    if len(sb) < 0x154 or struct.unpack_from("<H", sb, 0x38)[0] != EXT4_SUPER_MAGIC:
        return None
    incompat = struct.unpack_from("<I", sb, 0x60)[0]
    if incompat & EXT4_FEATURE_INCOMPAT_JOURNAL_DEV:
        raise FilesystemError(
            f"{path} is an external ext4 journal, not a filesystem: give the device holding the filesystem"
        )
    log_block = struct.unpack_from("<I", sb, 0x18)[0]
    if log_block > 6:  # 1 KiB << 6 = 64 KiB, the largest ext4 block size
        raise FilesystemError(f"ext4 superblock on {path} has a bad block size: run e2fsck")
    blocks = struct.unpack_from("<I", sb, 0x04)[0]
    if incompat & EXT4_FEATURE_INCOMPAT_64BIT:
        blocks |= struct.unpack_from("<I", sb, 0x150)[0] << 32
    block_size = 1024 << log_block
    return FsInfo("ext4", str(uuid.UUID(bytes=sb[0x68:0x78])), block_size, blocks * block_size)


def _parse_xfs(sb: bytes, path: str) -> FsInfo | None:
    if len(sb) < 48 or sb[:4] != b"XFSB":
        return None
    block_size, dblocks, rblocks, rextents = struct.unpack_from(">IQQQ", sb, 4)
    if block_size < 512 or block_size > 65536 or block_size & (block_size - 1):
        raise FilesystemError(f"XFS superblock on {path} has a bad block size: run xfs_repair -n")
    if rblocks or rextents:
        raise FilesystemError(
            f"the XFS filesystem on {path} has a realtime section ({rblocks} blocks): FIEMAP addresses of "
            "realtime files are not on this device; fiesnap supports XFS without a realtime section only"
        )
    return FsInfo("xfs", str(uuid.UUID(bytes=sb[32:48])), block_size, dblocks * block_size)


def probe_superblock(head: bytes, path: str) -> FsInfo:
    """Parse the first 2 KiB of a device (pure, for tests)."""
    xfs = _parse_xfs(head[:512], path)
    ext4 = _parse_ext4(head[EXT4_SB_OFFSET : EXT4_SB_OFFSET + 1024], path)
    if xfs and ext4:
        # A stale signature from an earlier mkfs: mounting the wrong one is not an option.
        raise FilesystemError(
            f"both ext4 and XFS signatures found on {path}: remove the stale one with wipefs before using fiesnap"
        )
    info = xfs or ext4
    if info is None:
        raise FilesystemError(
            f"no ext4 or XFS filesystem found on {path}: fiesnap supports ext4 and XFS; "
            "create one with mkfs.ext4 or mkfs.xfs"
        )
    return info


def probe_device(path: str) -> FsInfo:
    """Identify the filesystem on the block device (or image file) at `path`."""
    try:
        head = read_head(path)
    except OSError:
        # Not O_DIRECT-capable (an image file on tmpfs, say): a buffered read will do.
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise DeviceError(f"cannot open {path}: {os.strerror(e.errno or 0)}; check the device path") from e
        try:
            head = _read_at(fd, 0, 2048)
        except OSError as e:
            raise DeviceError(f"cannot read {path}: {os.strerror(e.errno or 0)}; check the device") from e
        finally:
            os.close(fd)
    return probe_superblock(head, path)


def read_head(path: str) -> bytes:
    """The first 2 KiB, read around the page cache: dm devices stacked on the
    device write beneath it, so cached pages of the raw device can be stale."""
    with AlignedBuffer(4096) as buf, DirectDevice.open(path, write=False) as dev:
        return bytes(dev.read_into(buf, 0, 4096))[:2048]


def is_realtime(fd: int) -> bool:
    """Whether the open file `fd` has FS_XFLAG_REALTIME (its data on an XFS realtime device).

    A filesystem that answers no FS_IOC_FSGETXATTR has no realtime files."""
    try:
        raw = fcntl.ioctl(fd, FS_IOC_FSGETXATTR, bytes(FSXATTR_BYTES))
    except OSError as e:
        if e.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL):
            return False
        raise FilesystemError(f"cannot read the file's XFS flags: {os.strerror(e.errno or 0)}; check dmesg") from e
    return bool(struct.unpack_from("=I", raw, 0)[0] & FS_XFLAG_REALTIME)


class _Statfs(ctypes.Structure):
    # struct statfs on 64-bit Linux: f_type is __fsword_t (long) and comes
    # first; the rest is padding large enough for every architecture.
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 256)]


def statfs_type(path: str) -> int:
    """statfs(2) f_type of the filesystem holding `path` (os.statvfs lacks it)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    buf = _Statfs()
    if libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise FilesystemError(f"cannot statfs {path}: {os.strerror(err)}; check the path")
    return buf.f_type & 0xFFFF_FFFF


def check_statfs(path: str) -> str:
    """"ext4" or "xfs" for the filesystem holding `path`; anything else is refused."""
    f_type = statfs_type(path)
    try:
        return _STATFS_TYPES[f_type]
    except KeyError:
        raise FilesystemError(
            f"{path} is on a filesystem of type {f_type:#x}, not ext4 or XFS: fiesnap supports only ext4 and XFS"
        ) from None
