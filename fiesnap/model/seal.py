"""The device's seal: what its superblock says about writes that bypassed the origin (pure).

While a checkpoint's stack is up, every write reaches the device through
snapshot-origin, which saves the old data first; nothing else can write it
(dm opens the device exclusively). While the stack is down -- after
`deactivate`, or between a shutdown and the next `activate` -- the raw device
can be mounted directly. Those writes have no exceptions, and a later merge
would then build a filesystem that never existed (saved old chunks over new
neighbours).

A mounted-and-written filesystem leaves marks in its superblock:
- ext4 writes it at every read-write mount (s_mnt_count + 1, s_mtime) and at
  unmount (s_wtime, s_kbytes_written);
- XFS rewrites it at unmount (sb_lsn, the counters), and a read-write mount
  replays or writes its log.

So `deactivate` seals the device: it keeps a digest of the superblock sector
as the stack left it; `activate` and `merge` compare. With no seal (a reboot
without deactivate) an ext4 mounted read-write during the current boot before
the stack was built is caught by its mount time. What this cannot see (an
XFS mounted read-write and never cleanly unmounted, a raw write that misses
the superblock) is listed in docs/reliability.md.

Layouts (little-endian ext4 superblock at byte 1024; big-endian XFS at 0):
  ext4: s_mtime @0x2C u32, s_wtime @0x30 u32, s_mnt_count @0x34 u16,
        s_kbytes_written @0x178 u64
  XFS:  sb_lsn @240 u64 (cycle << 32 | block), v5 superblocks
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone

EXT4_SB_OFFSET = 1024
EXT4_SB_BYTES = 1024
XFS_SB_BYTES = 512
#: bytes of the device head a seal needs.
SEAL_HEAD_BYTES = EXT4_SB_OFFSET + EXT4_SB_BYTES

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class SuperblockStamp:
    """A superblock's digest and the fields that explain a change."""

    fstype: str
    sha256: str
    mount_count: int | None = None  # ext4
    mount_time: int | None = None  # ext4, seconds since the epoch
    write_time: int | None = None  # ext4
    kbytes_written: int | None = None  # ext4
    lsn: int | None = None  # XFS

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    @classmethod
    def from_dict(cls, data: object) -> SuperblockStamp:
        """Parse a stored stamp; ValueError names what is wrong."""
        if not isinstance(data, Mapping):
            raise ValueError("is not an object")
        fstype, digest = data.get("fstype"), data.get("sha256")
        if fstype not in ("ext4", "xfs"):
            raise ValueError(f"has file system type {fstype!r}")
        if not (isinstance(digest, str) and _HEX64.match(digest)):
            raise ValueError("has no valid sha256")
        fields = {}
        for key in ("mount_count", "mount_time", "write_time", "kbytes_written", "lsn"):
            v = data.get(key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise ValueError(f"has an invalid {key} {v!r}")
            fields[key] = v
        return cls(fstype, digest, **fields)


def stamp_of(head: bytes, fstype: str) -> SuperblockStamp:
    """The stamp of a device head (at least SEAL_HEAD_BYTES for ext4, 512 for XFS)."""
    if fstype == "ext4":
        sb = head[EXT4_SB_OFFSET:EXT4_SB_OFFSET + EXT4_SB_BYTES]
        if len(sb) < EXT4_SB_BYTES:
            raise ValueError("short ext4 superblock")
        mtime, wtime, count = struct.unpack_from("<IIH", sb, 0x2C)
        (kbytes,) = struct.unpack_from("<Q", sb, 0x178)
        return SuperblockStamp("ext4", hashlib.sha256(sb).hexdigest(), mount_count=count,
                               mount_time=mtime, write_time=wtime, kbytes_written=kbytes)
    if fstype == "xfs":
        sb = head[:XFS_SB_BYTES]
        if len(sb) < XFS_SB_BYTES:
            raise ValueError("short XFS superblock")
        (lsn,) = struct.unpack_from(">Q", sb, 240)
        return SuperblockStamp("xfs", hashlib.sha256(sb).hexdigest(), lsn=lsn)
    raise ValueError(f"no superblock stamp for {fstype!r}")


def _when(seconds: int | None) -> str:
    if not seconds:
        return "never"
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def explain_change(sealed: SuperblockStamp, now: SuperblockStamp) -> str | None:
    """None when the superblock is as sealed; else what changed, in words."""
    if sealed.sha256 == now.sha256:
        return None
    if sealed.fstype != now.fstype:
        return f"it now holds {now.fstype}, sealed as {sealed.fstype}"
    if now.fstype == "ext4":
        mounts = (now.mount_count or 0) - (sealed.mount_count or 0)
        written = (now.kbytes_written or 0) - (sealed.kbytes_written or 0)
        if mounts > 0:
            what = f"mounted read-write {mounts} time(s), last at {_when(now.mount_time)}"
        else:
            what = f"its superblock was rewritten (last write {_when(now.write_time)})"
        return what + (f", {written} KiB written" if written > 0 else "")
    return f"its superblock was rewritten (log sequence {sealed.lsn:#x} -> {now.lsn:#x})"


def mounted_since(now: SuperblockStamp, since: float) -> bool:
    """Whether an ext4 was mounted read-write at or after `since` (epoch seconds).

    XFS keeps no mount time: always False for it."""
    return now.fstype == "ext4" and bool(now.mount_time) and now.mount_time >= int(since)
