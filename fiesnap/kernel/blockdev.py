"""Block devices: identity, size, and who is using them.

Device-mapper tables name devices as "major:minor", so the numbers (not the
path, which udev may rename) are the identity fiesnap carries around.

ioctls from include/uapi/linux/fs.h (checked against the kernel headers):
BLKGETSIZE64 = _IOR(0x12, 114, size_t) = 0x80081272 (u64 bytes),
BLKSSZGET = _IO(0x12, 104) = 0x1268 (int: logical block size).
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct
from dataclasses import dataclass

from fiesnap.errors import DeviceError

BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268

MOUNTINFO = "/proc/self/mountinfo"
SYS_DEV_BLOCK = "/sys/dev/block"


@dataclass(frozen=True)
class BlockDevice:
    """A block device as fiesnap identifies it: numbers for dm tables, sizes in bytes."""

    path: str
    major: int
    minor: int
    size_bytes: int
    logical_block_size: int

    @property
    def dev(self) -> str:
        return dev_string(self.major, self.minor)


def dev_string(major: int, minor: int) -> str:
    """ "major:minor", the form device-mapper tables and sysfs use."""
    return f"{major}:{minor}"


def open_block_device(path: str) -> BlockDevice:
    """Identify and size the block device at `path` (symlinks such as /dev/disk/by-* are followed)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DeviceError(f"{path} does not exist: give the path of a block device, e.g. /dev/sdb1") from None
    except OSError as e:
        raise DeviceError(f"cannot stat {path}: {os.strerror(e.errno or 0)}; check the device path") from e
    if not stat.S_ISBLK(st.st_mode):
        raise DeviceError(f"{path} is not a block device: give the device holding the filesystem, e.g. /dev/sdb1")
    try:
        # O_NONBLOCK: should the path be swapped for a FIFO after the stat, open() must not hang.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise DeviceError(f"cannot open {path}: {os.strerror(e.errno or 0)}; check the device") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISBLK(st.st_mode):
            raise DeviceError(f"{path} is not a block device: give the device holding the filesystem")
        size = struct.unpack("=Q", fcntl.ioctl(fd, BLKGETSIZE64, bytes(8)))[0]
        lbs = struct.unpack("=i", fcntl.ioctl(fd, BLKSSZGET, bytes(4)))[0]
    except OSError as e:
        raise DeviceError(f"cannot query the size of {path}: {os.strerror(e.errno or 0)}; check the device") from e
    finally:
        os.close(fd)
    if size == 0:
        raise DeviceError(f"{path} has size 0 (no medium?): give a device holding a filesystem")
    if lbs < 512 or lbs & (lbs - 1):
        raise DeviceError(f"{path} reports logical block size {lbs}: unsupported device")
    return BlockDevice(path, os.major(st.st_rdev), os.minor(st.st_rdev), size, lbs)


def _unescape_mountinfo(field: str) -> str:
    """Undo the kernel's octal escapes (\\040 for space, etc.) in mountinfo paths."""
    if "\\" not in field:
        return field
    raw = os.fsencode(field)
    out = bytearray()
    i = 0
    while i < len(raw):
        if raw[i] == 0x5C and i + 3 < len(raw) and all(0x30 <= c <= 0x37 for c in raw[i + 1 : i + 4]):
            out.append(int(raw[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return os.fsdecode(bytes(out))


def parse_mountinfo(text: str, major: int, minor: int) -> list[str]:
    """Mount points in mountinfo `text` whose source device is major:minor (pure)."""
    want = dev_string(major, minor)
    points = []
    for line in text.splitlines():
        fields = line.split(" ")
        if len(fields) >= 5 and fields[2] == want:
            points.append(_unescape_mountinfo(fields[4]))
    return points


def parse_mount_source(text: str, path: str) -> tuple[int, int] | None:
    """major:minor of the filesystem mounted last at exactly `path` in mountinfo `text` (pure).

    Bind mounts count (os.path.ismount misses a bind mount from the same filesystem)."""
    found = None
    for line in text.splitlines():
        fields = line.split(" ")
        if len(fields) >= 5 and _unescape_mountinfo(fields[4]) == path:
            major, _, minor = fields[2].partition(":")
            found = (int(major), int(minor))
    return found


def mount_source(path: str) -> tuple[int, int] | None:
    """The device mounted at `path` (resolved), or None if `path` is not a mount point here."""
    with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as f:
        return parse_mount_source(f.read(), os.path.realpath(path))


def mounts_of(major: int, minor: int) -> list[str]:
    """Where the device is mounted in this mount namespace (bind mounts included).

    Mounts in other namespaces are invisible here; holders() and an O_EXCL
    open are the namespace-proof checks.
    """
    with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as f:
        return parse_mountinfo(f.read(), major, minor)


def mounts_anywhere(major: int, minor: int, *, proc: str = "/proc") -> list[str]:
    """Where the device is mounted in any mount namespace of a running process.

    One mountinfo per namespace (the first process seen in it); mounts in
    another namespace are named with that process, e.g. "/data (mount
    namespace of pid 812)". A namespace with no process left is not seen.
    """
    own = _ns_of(os.path.join(proc, "self"))
    seen: set[str] = set()
    found: list[str] = []
    for entry in sorted(os.listdir(proc), key=lambda e: (len(e), e)):
        if not entry.isdigit():
            continue
        ns = _ns_of(os.path.join(proc, entry))
        if ns is None or ns in seen:
            continue
        try:
            with open(os.path.join(proc, entry, "mountinfo"), encoding="utf-8", errors="surrogateescape") as f:
                text = f.read()
        except OSError:
            continue  # the process ended
        seen.add(ns)
        where = "" if ns == own else f" (mount namespace of pid {entry})"
        found += [p + where for p in parse_mountinfo(text, major, minor)]
    return found


def _ns_of(pid_dir: str) -> str | None:
    try:
        return os.readlink(os.path.join(pid_dir, "ns", "mnt"))
    except OSError:
        return None


def holders(major: int, minor: int) -> list[str]:
    """Kernel names (e.g. "dm-3") of devices stacked on this one, from sysfs."""
    base = os.path.join(SYS_DEV_BLOCK, dev_string(major, minor))
    if not os.path.exists(base):
        raise DeviceError(f"no block device {dev_string(major, minor)} in {SYS_DEV_BLOCK}: is /sys mounted?")
    try:
        return sorted(os.listdir(os.path.join(base, "holders")))
    except FileNotFoundError:
        raise DeviceError(
            f"{base}/holders is missing: cannot tell whether {dev_string(major, minor)} is in use"
        ) from None
    except OSError as e:
        raise DeviceError(f"cannot read {base}/holders: {os.strerror(e.errno or 0)}; run fiesnap as root") from e
