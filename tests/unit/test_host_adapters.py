"""The file/filesystem/block-device adapters against real loop devices on this host.

Host tests need root, working loop devices and mkfs.ext4/mkfs.xfs; they skip
cleanly otherwise. Each test gets fresh, sparse images; every loop device and
mount made here is torn down afterwards. The pure parsers at the top run
anywhere.
"""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import stat
import struct
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from fiesnap.kernel import fiemap
from fiesnap.kernel import mounts
from fiesnap.services import storefile
from fiesnap.kernel.blockdev import dev_string, holders, mounts_of, open_block_device, parse_mount_source, parse_mountinfo
from fiesnap.errors import DeviceError, FilesystemError, RefusedError, UsageError
from fiesnap.model.extents import Extent
from fiesnap.kernel.fiemap import FIEMAP_EXTENT_LAST, FIEMAP_EXTENT_UNWRITTEN, file_extents
from fiesnap.kernel.fsmap import free_space, merge_ranges
from fiesnap.kernel.fsprobe import check_statfs, probe_device, probe_superblock
from fiesnap.kernel.mounts import private_mount
from fiesnap.kernel.fileflags import is_immutable
from fiesnap.services.storefile import (
    StoreFile,
    create_store_file,
    remove_store_file,
    store_extents,
)

MiB = 1 << 20

# --------------------------------------------------------------------------
# Pure parsing (no root needed)
# --------------------------------------------------------------------------


def test_parse_mountinfo_matches_device_and_unescapes() -> None:
    text = (
        "36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n"
        "37 35 7:3 / /mnt/with\\040space rw - ext4 /dev/loop3 rw\n"
        "38 35 7:3 /sub /srv/bind rw - ext4 /dev/loop3 rw\n"
        "39 35 7:30 / /other rw - ext4 /dev/loop30 rw\n"
    )
    assert parse_mountinfo(text, 7, 3) == ["/mnt/with space", "/srv/bind"]
    assert parse_mountinfo(text, 7, 4) == []


def test_parse_mount_source_takes_the_top_mount_and_unescapes() -> None:
    text = (
        "36 35 98:0 / /srv rw - ext4 /dev/sda1 rw\n"
        "37 35 7:3 / /mnt/with\\040space rw - ext4 /dev/loop3 rw\n"
        "38 36 8:17 /sub /srv rw - ext4 /dev/sdb1 rw\n"  # mounted over /srv later
    )
    assert parse_mount_source(text, "/srv") == (8, 17)
    assert parse_mount_source(text, "/mnt/with space") == (7, 3)
    assert parse_mount_source(text, "/mnt") is None


def test_merge_ranges() -> None:
    assert merge_ranges([(10, 5), (0, 10), (20, 1), (21, 0), (18, 3)]) == [(0, 15), (18, 3)]
    assert merge_ranges([(0, 10), (2, 3)]) == [(0, 10)]
    assert merge_ranges([]) == []


def _ext4_head(*, blocks: int, log_block: int, incompat: int = 0, hi: int = 0) -> bytes:
    sb = bytearray(1024)
    struct.pack_into("<I", sb, 0x04, blocks)
    struct.pack_into("<I", sb, 0x18, log_block)
    struct.pack_into("<H", sb, 0x38, 0xEF53)
    struct.pack_into("<I", sb, 0x60, incompat)
    sb[0x68:0x78] = uuid.UUID(int=1).bytes
    struct.pack_into("<I", sb, 0x150, hi)
    return bytes(1024) + bytes(sb)


def test_probe_superblock_ext4_64bit_counts_high_word() -> None:
    info = probe_superblock(_ext4_head(blocks=5, log_block=2, incompat=0x80, hi=1), "/dev/x")
    assert info.fstype == "ext4"
    assert info.block_size == 4096
    assert info.fs_bytes == ((1 << 32) + 5) * 4096
    assert info.uuid == str(uuid.UUID(int=1))
    # Without the 64bit feature the high word is not part of the count.
    assert probe_superblock(_ext4_head(blocks=5, log_block=0, hi=1), "/dev/x").fs_bytes == 5 * 1024


def test_probe_superblock_refusals() -> None:
    with pytest.raises(FilesystemError, match="no ext4 or XFS filesystem found on /dev/x"):
        probe_superblock(bytes(2048), "/dev/x")
    with pytest.raises(FilesystemError, match="external ext4 journal"):
        probe_superblock(_ext4_head(blocks=5, log_block=2, incompat=0x8), "/dev/x")
    both = bytearray(_ext4_head(blocks=5, log_block=2))
    both[0:4] = b"XFSB"
    struct.pack_into(">IQ", both, 4, 4096, 10)
    with pytest.raises(FilesystemError, match="both ext4 and XFS"):
        probe_superblock(bytes(both), "/dev/x")


# --------------------------------------------------------------------------
# Host fixtures
# --------------------------------------------------------------------------


def _host_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("losetup", "mkfs.ext4", "mkfs.xfs", "blkid"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    if not os.path.exists("/dev/loop-control"):
        return "no loop devices"
    return None


@dataclass(frozen=True)
class Fs:
    kind: str  # "ext4-4k", "ext4-1k", "xfs"
    fstype: str
    dev: str
    image: Path
    size: int


MKFS = {
    "ext4-4k": (64 * MiB, ["mkfs.ext4", "-q", "-F", "-b", "4096"]),
    "ext4-1k": (64 * MiB, ["mkfs.ext4", "-q", "-F", "-b", "1024"]),
    "xfs": (320 * MiB, ["mkfs.xfs", "-q", "-f"]),  # mkfs.xfs refuses below 300 MB
}


def _losetup(image: Path) -> str:
    for _ in range(5):  # another process may grab the same free device first
        r = subprocess.run(["losetup", "-f", "--show", str(image)], capture_output=True, text=True)
        if r.returncode == 0:
            return r.stdout.strip()
        time.sleep(0.1)
    pytest.skip(f"losetup failed: {r.stderr.strip()}")


def _unmount_all(dev: str) -> None:
    st = os.stat(dev)
    for point in reversed(mounts_of(os.major(st.st_rdev), os.minor(st.st_rdev))):
        subprocess.run(["umount", point], capture_output=True)
        if os.path.ismount(point):
            subprocess.run(["umount", "-l", point], capture_output=True)
        if point.startswith(mounts.RUN_DIR + "/") and os.path.isdir(point):
            os.rmdir(point)


@contextmanager
def loop_image(tmp: Path, name: str, size: int, mkfs: list[str] | None) -> Iterator[str]:
    image = tmp / f"{name}.img"
    with open(image, "wb") as f:
        f.truncate(size)
    if mkfs:
        subprocess.run([*mkfs, str(image)], check=True, capture_output=True)
    dev = _losetup(image)
    try:
        yield dev
    finally:
        _unmount_all(dev)
        subprocess.run(["losetup", "-d", dev], capture_output=True)
        image.unlink()


@pytest.fixture(scope="module")
def host() -> Iterator[None]:
    problem = _host_problem()
    if problem:
        pytest.skip(problem)
    run_existed = os.path.exists(mounts.RUN_DIR)
    yield
    if not run_existed:
        try:
            os.rmdir(mounts.RUN_DIR)
        except OSError:
            pass  # someone else is using it now


@pytest.fixture(params=list(MKFS))
def fs(request: pytest.FixtureRequest, host: None, tmp_path: Path) -> Iterator[Fs]:
    kind = request.param
    size, mkfs = MKFS[kind]
    with loop_image(tmp_path, kind, size, mkfs) as dev:
        yield Fs(kind, "xfs" if kind == "xfs" else "ext4", dev, tmp_path / f"{kind}.img", size)


@pytest.fixture
def mounted(fs: Fs) -> Iterator[tuple[Fs, str]]:
    with private_mount(fs.dev, fs.fstype) as mp:
        yield fs, mp


def _devnum(dev: str) -> tuple[int, int]:
    st = os.stat(dev)
    return os.major(st.st_rdev), os.minor(st.st_rdev)


def _read_raw(dev: str, offset: int, length: int) -> bytes:
    """Read the device with O_DIRECT: what is really on it, not what a cache remembers."""
    start = offset - offset % 4096
    span = -(-(offset + length - start) // 4096) * 4096
    buf = mmap.mmap(-1, span)
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    try:
        assert os.preadv(fd, [buf], start) == span
    finally:
        os.close(fd)
    return bytes(buf[offset - start : offset - start + length])


def _overlaps(a_start: int, a_len: int, b_start: int, b_len: int) -> bool:
    return a_start < b_start + b_len and b_start < a_start + a_len


# --------------------------------------------------------------------------
# fsprobe
# --------------------------------------------------------------------------

@pytest.mark.root
def test_probe_device(fs: Fs) -> None:
    info = probe_device(fs.dev)
    blkid = subprocess.run(["blkid", "-p", "-s", "UUID", "-o", "value", fs.dev], capture_output=True, text=True)
    assert info.fstype == fs.fstype
    assert info.uuid == blkid.stdout.strip()
    assert info.block_size == {"ext4-4k": 4096, "ext4-1k": 1024, "xfs": 4096}[fs.kind]
    assert info.fs_bytes == fs.size
    assert probe_device(str(fs.image)) == info  # works on an image file too


@pytest.mark.root
def test_probe_device_ext4_without_64bit(host: None, tmp_path: Path) -> None:
    with loop_image(tmp_path, "no64", 32 * MiB, ["mkfs.ext4", "-q", "-F", "-O", "^64bit"]) as dev:
        info = probe_device(dev)
    assert (info.fstype, info.fs_bytes) == ("ext4", 32 * MiB)


@pytest.mark.root
def test_probe_device_refuses_blank_and_missing(host: None, tmp_path: Path) -> None:
    with loop_image(tmp_path, "blank", 8 * MiB, None) as dev:
        with pytest.raises(FilesystemError, match=f"no ext4 or XFS filesystem found on {dev}: .*mkfs"):
            probe_device(dev)
    with pytest.raises(DeviceError, match="cannot open /dev/nonexistent-fiesnap"):
        probe_device("/dev/nonexistent-fiesnap")


@pytest.mark.root
def test_check_statfs(mounted: tuple[Fs, str]) -> None:
    fs, mp = mounted
    assert check_statfs(mp) == fs.fstype
    with pytest.raises(FilesystemError, match=r"/proc is on a filesystem of type 0x9fa0, not ext4 or XFS"):
        check_statfs("/proc")


# --------------------------------------------------------------------------
# blockdev
# --------------------------------------------------------------------------


@pytest.mark.root
def test_open_block_device(fs: Fs) -> None:
    bd = open_block_device(fs.dev)
    assert (bd.major, bd.minor) == _devnum(fs.dev)
    assert bd.size_bytes == fs.size
    assert bd.logical_block_size == 512
    assert bd.dev == dev_string(bd.major, bd.minor) == f"{bd.major}:{bd.minor}"
    assert holders(bd.major, bd.minor) == []


@pytest.mark.root
def test_open_block_device_refusals(host: None, tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match="does not exist"):
        open_block_device(str(tmp_path / "nope"))
    regular = tmp_path / "file"
    regular.write_bytes(b"x")
    with pytest.raises(DeviceError, match="is not a block device"):
        open_block_device(str(regular))
    with pytest.raises(DeviceError, match="/dev/null is not a block device"):
        open_block_device("/dev/null")
    with pytest.raises(DeviceError, match="no block device 4095:1048575"):
        holders(4095, 1048575)


@pytest.mark.root
def test_mounts_of(fs: Fs) -> None:
    major, minor = _devnum(fs.dev)
    assert mounts_of(major, minor) == []
    with private_mount(fs.dev, fs.fstype) as mp:
        assert mounts_of(major, minor) == [mp]
    assert mounts_of(major, minor) == []


# --------------------------------------------------------------------------
# mounts
# --------------------------------------------------------------------------


def _mount_options(mp: str) -> set[str]:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == mp:
                return set(fields[5].split(","))
    raise AssertionError(f"{mp} not mounted")


@pytest.mark.root
def test_private_mount_lifecycle(fs: Fs) -> None:
    with private_mount(fs.dev, fs.fstype) as mp:
        assert os.path.dirname(mp) == mounts.RUN_DIR
        assert stat.S_IMODE(os.stat(mounts.RUN_DIR).st_mode) == 0o700
        assert os.path.ismount(mp)
        assert {"rw", "nosuid", "nodev", "noexec"} <= _mount_options(mp)
        Path(mp, "hello").write_text("kept")
    assert not os.path.exists(mp)
    with private_mount(fs.dev, fs.fstype, readonly=True) as mp2:
        assert "ro" in _mount_options(mp2)
        assert Path(mp2, "hello").read_text() == "kept"
        with pytest.raises(OSError) as e:
            Path(mp2, "other").write_text("no")
        assert e.value.errno == errno.EROFS
    assert not os.path.exists(mp2)


@pytest.mark.root
def test_private_mount_cleans_up_on_exception(fs: Fs) -> None:
    seen = []
    with pytest.raises(ZeroDivisionError):
        with private_mount(fs.dev, fs.fstype) as mp:
            seen.append(mp)
            1 / 0
    assert not os.path.exists(seen[0])
    assert mounts_of(*_devnum(fs.dev)) == []


@pytest.mark.root
def test_private_mount_busy_keeps_first_error(fs: Fs) -> None:
    with ExitStack() as stack:
        with pytest.raises(ZeroDivisionError) as e:
            with private_mount(fs.dev, fs.fstype) as mp:
                f = open(os.path.join(mp, "busy"), "w")
                stack.callback(f.close)
                1 / 0
        assert any("cannot unmount" in note for note in e.value.__notes__)
        # Detached, and gone with fiesnap's own mount namespace: nothing left to unmount by hand.
        assert not os.path.exists(mp)
    assert mounts_of(*_devnum(fs.dev)) == []


@pytest.mark.root
def test_private_mount_failure_leaves_no_directory(fs: Fs, tmp_path: Path) -> None:
    run = tmp_path / "run"
    other = "ext4" if fs.fstype == "xfs" else "xfs"
    with pytest.raises(FilesystemError, match="cannot mount"):
        with private_mount(fs.dev, other, readonly=True, run_dir=str(run)):
            pass
    assert os.listdir(run) == []
    assert stat.S_IMODE(os.stat(run).st_mode) == 0o700


@pytest.mark.root
def test_mount_error_names_errno(fs: Fs, tmp_path: Path) -> None:
    other = "ext4" if fs.fstype == "xfs" else "xfs"
    with pytest.raises(FilesystemError, match=f"cannot mount {fs.dev} \\({other}\\) on .*: "):
        mounts.mount(fs.dev, str(tmp_path), other, mounts.MS_RDONLY)
    with pytest.raises(DeviceError, match="cannot unmount .*: Invalid argument"):
        mounts.umount(str(tmp_path))


# --------------------------------------------------------------------------
# fiemap
# --------------------------------------------------------------------------


@pytest.mark.root
def test_file_extents_fallocated_are_unwritten(mounted: tuple[Fs, str]) -> None:
    _, mp = mounted
    fd = os.open(os.path.join(mp, "prealloc"), os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.posix_fallocate(fd, 0, 3 * MiB)
        exts = file_extents(fd)
    finally:
        os.close(fd)
    assert sum(e.length for e in exts) == 3 * MiB
    assert all(e.flags & FIEMAP_EXTENT_UNWRITTEN for e in exts)
    assert exts[-1].flags & FIEMAP_EXTENT_LAST


@pytest.mark.root
def test_file_extents_point_at_the_data(mounted: tuple[Fs, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Write a pattern, then read the raw device where FIEMAP says it is."""
    fs, mp = mounted
    size = 16 * 64 * 1024 + 1000  # unaligned tail
    content = os.urandom(size)
    a = os.open(os.path.join(mp, "a"), os.O_CREAT | os.O_RDWR, 0o600)
    b = os.open(os.path.join(mp, "b"), os.O_CREAT | os.O_RDWR, 0o600)
    try:
        # Interleaved, synced appends fragment "a" so there are several extents to check.
        for off in range(0, size, 64 * 1024):
            os.write(a, content[off : off + 64 * 1024])
            os.fsync(a)
            os.write(b, os.urandom(64 * 1024))
            os.fsync(b)
        exts = file_extents(a)
        monkeypatch.setattr(fiemap, "BATCH_EXTENTS", 2)
        assert file_extents(a) == exts  # the LAST-driven batching gives the same map
    finally:
        os.close(a)
        os.close(b)
    assert len(exts) > 1
    assert exts[0].logical == 0 and sum(e.length for e in exts) >= size
    for e in exts:
        want = content[e.logical : e.logical + e.length]
        assert _read_raw(fs.dev, e.physical, len(want)) == want, e


# --------------------------------------------------------------------------
# storefile + fsmap
# --------------------------------------------------------------------------


def _assert_covers(sf: StoreFile) -> None:
    pos = 0
    for e in sf.extents:
        assert e.logical == pos
        pos += e.length
    assert pos == sf.size


@pytest.mark.root
def test_create_store_file(mounted: tuple[Fs, str]) -> None:
    fs, mp = mounted
    sf = create_store_file(mp, "cp1", 8 * MiB)
    assert sf.relpath == ".fiesnap/cp1"
    _assert_covers(sf)
    path = os.path.join(mp, sf.relpath)
    dst = os.lstat(os.path.join(mp, ".fiesnap"))
    assert stat.S_ISDIR(dst.st_mode) and dst.st_uid == 0 and stat.S_IMODE(dst.st_mode) == 0o700
    fst = os.lstat(path)
    assert stat.S_ISREG(fst.st_mode) and stat.S_IMODE(fst.st_mode) == 0o600 and fst.st_size == 8 * MiB
    fd = os.open(path, os.O_RDONLY)
    try:
        assert is_immutable(fd)
    finally:
        os.close(fd)
    for attempt in (lambda: os.unlink(path), lambda: os.open(path, os.O_WRONLY), lambda: os.truncate(path, 0)):
        with pytest.raises(PermissionError) as e:
            attempt()
        assert e.value.errno == errno.EPERM
    assert store_extents(mp, sf.relpath) == sf.extents
    for e in sf.extents:
        assert 0 < e.physical and e.physical + e.length <= fs.size

    # The filesystem's free space never includes the store's blocks.
    free = free_space(mp)
    assert free == free_space(mp, batch=2)
    for (s1, l1), (s2, _) in zip(free, free[1:]):
        assert s1 + l1 < s2
    for start, length in free:
        for e in sf.extents:
            assert not _overlaps(start, length, e.physical, e.length), (start, length, e)
    os.sync()
    sv = os.statvfs(mp)
    total = sum(length for _, length in free)
    bfree = sv.f_bfree * sv.f_frsize
    # ext4: identical. XFS: statfs hides blocks set aside for btree reservations.
    assert bfree <= total <= bfree + fs.size // 10


@pytest.mark.root
def test_create_store_file_refuses_existing(mounted: tuple[Fs, str]) -> None:
    _, mp = mounted
    sf = create_store_file(mp, "cp1", 4 * MiB)
    with pytest.raises(RefusedError, match="already exists"):
        create_store_file(mp, "cp1", 4 * MiB)
    assert store_extents(mp, sf.relpath) == sf.extents  # the original is untouched
    with pytest.raises(UsageError):
        create_store_file(mp, "../escape", 4 * MiB)
    with pytest.raises(UsageError):
        create_store_file(mp, "odd", 4 * MiB + 1)


def _tree(mp: str) -> list[str]:
    return sorted(str(p.relative_to(mp)) for p in Path(mp).rglob("*") if "lost+found" not in p.parts)


@pytest.mark.root
def test_create_store_file_refuses_too_big(mounted: tuple[Fs, str]) -> None:
    fs, mp = mounted
    before = _tree(mp)
    with pytest.raises(FilesystemError, match=f"not enough free space on {mp}: need .*; choose a smaller --size"):
        create_store_file(mp, "huge", fs.size)
    assert _tree(mp) == before  # not even .fiesnap
    create_store_file(mp, "small", 1 * MiB)
    before = _tree(mp)
    with pytest.raises(FilesystemError, match="not enough free space"):
        create_store_file(mp, "huge", fs.size)
    assert _tree(mp) == before


@pytest.mark.root
def test_create_store_file_enospc_leaves_nothing(mounted: tuple[Fs, str], monkeypatch: pytest.MonkeyPatch) -> None:
    fs, mp = mounted
    monkeypatch.setattr(storefile, "_check_space", lambda *a: fs.size)
    before = _tree(mp)
    with pytest.raises(FilesystemError, match="not enough free space"):
        create_store_file(mp, "huge", fs.size - 1 * MiB)
    assert _tree(mp) == before


@pytest.mark.root
def test_create_store_file_removes_immutable_partial(mounted: tuple[Fs, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure after the immutable flag is set must still leave nothing behind."""
    _, mp = mounted
    calls = []

    def drifting(fd: int) -> list[Extent]:
        calls.append(fd)
        exts = file_extents(fd)
        if len(calls) == 2:
            e = exts[0]
            exts[0] = Extent(e.logical, e.physical + 4096, e.length, e.flags)
        return exts

    monkeypatch.setattr(storefile, "file_extents", drifting)
    before = _tree(mp)
    with pytest.raises(FilesystemError, match="changed while it was being created"):
        create_store_file(mp, "drift", 2 * MiB)
    assert _tree(mp) == before


@pytest.mark.root
@pytest.mark.parametrize("bad", ["symlink", "mode", "file"])
def test_create_store_file_refuses_unsafe_dir(mounted: tuple[Fs, str], bad: str) -> None:
    _, mp = mounted
    target = os.path.join(mp, ".fiesnap")
    if bad == "symlink":
        os.mkdir(os.path.join(mp, "elsewhere"), 0o700)
        os.symlink("elsewhere", target)
    elif bad == "mode":
        os.mkdir(target)
        os.chmod(target, 0o755)
    else:
        Path(target).write_text("")
    with pytest.raises(RefusedError, match=".fiesnap is not"):
        create_store_file(mp, "cp", 1 * MiB)
    with pytest.raises(RefusedError):
        remove_store_file(mp, ".fiesnap/cp")
    if bad == "symlink":
        assert os.listdir(os.path.join(mp, "elsewhere")) == []


@pytest.mark.root
def test_remove_store_file_idempotent(mounted: tuple[Fs, str]) -> None:
    _, mp = mounted
    remove_store_file(mp, ".fiesnap/never")  # no .fiesnap at all
    a = create_store_file(mp, "a", 1 * MiB)
    b = create_store_file(mp, "b", 1 * MiB)
    remove_store_file(mp, a.relpath)
    remove_store_file(mp, a.relpath)  # again: already gone is fine
    assert os.listdir(os.path.join(mp, ".fiesnap")) == ["b"]
    with pytest.raises(RefusedError, match="missing"):
        store_extents(mp, a.relpath)
    remove_store_file(mp, b.relpath)
    assert not os.path.exists(os.path.join(mp, ".fiesnap"))
    with pytest.raises(RefusedError, match="not inside .fiesnap/"):
        remove_store_file(mp, "etc/passwd")


@pytest.mark.root
def test_store_blocks_return_to_free_space(mounted: tuple[Fs, str]) -> None:
    _, mp = mounted
    sf = create_store_file(mp, "cp", 4 * MiB)
    remove_store_file(mp, sf.relpath)

    def all_freed() -> bool:
        free = free_space(mp)
        return all(any(s <= e.physical and e.physical + e.length <= s + n for s, n in free) for e in sf.extents)

    # XFS inactivates unlinked inodes in the background (even syncfs doesn't wait), so poll.
    deadline = time.monotonic() + 5
    while not all_freed():
        assert time.monotonic() < deadline, "store blocks never became free"
        time.sleep(0.02)
