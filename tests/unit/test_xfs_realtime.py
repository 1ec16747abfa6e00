"""XFS with a realtime section is refused: FIEMAP addresses of realtime files are on the rt device.

Pure superblock parsing runs anywhere; the mkfs.xfs case needs only mkfs.xfs (the
probe reads the image file); the store-file case needs root and loop devices. A
real realtime file needs a kernel with CONFIG_XFS_RT: tests/kernel/test_hardening.py.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import uuid
from pathlib import Path

import pytest
from test_host_adapters import Fs, fs, host, mounted  # noqa: F401  (fixtures)

from fiesnap.errors import FilesystemError
from fiesnap.kernel import fsprobe
from fiesnap.kernel.fsprobe import is_realtime, probe_device, probe_superblock
from fiesnap.services import storefile

MiB = 1 << 20


def _xfs_head(*, rblocks: int = 0, rextents: int = 0) -> bytes:
    """struct xfs_dsb (fs/xfs/libxfs/xfs_format.h): magic, blocksize, dblocks, rblocks, rextents, uuid."""
    sb = bytearray(2048)
    struct.pack_into(">4sIQQQ16s", sb, 0, b"XFSB", 4096, 81920, rblocks, rextents, uuid.UUID(int=7).bytes)
    return bytes(sb)


def test_probe_reads_an_xfs_superblock_without_realtime_section() -> None:
    info = probe_superblock(_xfs_head(), "/dev/x")
    assert (info.fstype, info.fs_bytes, info.uuid) == ("xfs", 81920 * 4096, str(uuid.UUID(int=7)))


@pytest.mark.parametrize("rt", [dict(rblocks=16384, rextents=16384), dict(rblocks=1), dict(rextents=1)])
def test_probe_refuses_an_xfs_superblock_with_a_realtime_section(rt: dict) -> None:
    with pytest.raises(FilesystemError, match=r"XFS filesystem on /dev/x has a realtime section") as e:
        probe_superblock(_xfs_head(**rt), "/dev/x")
    assert "\n" not in str(e.value) and e.value.exit_code == 5


@pytest.mark.skipif(shutil.which("mkfs.xfs") is None, reason="mkfs.xfs not installed")
def test_probe_refuses_a_real_xfs_made_with_a_realtime_device(tmp_path: Path) -> None:
    data, rt = tmp_path / "data.img", tmp_path / "rt.img"
    for image, size in ((data, 320 * MiB), (rt, 64 * MiB)):
        with open(image, "wb") as f:
            f.truncate(size)
    subprocess.run(["mkfs.xfs", "-q", "-f", "-r", f"rtdev={rt}", str(data)], check=True, capture_output=True)
    with pytest.raises(FilesystemError, match=r"has a realtime section \(16384 blocks\)"):
        probe_device(str(data))
    subprocess.run(["mkfs.xfs", "-q", "-f", str(data)], check=True, capture_output=True)
    assert probe_device(str(data)).fstype == "xfs"


@pytest.mark.root
def test_a_store_file_on_the_realtime_device_is_refused_and_removed(mounted: tuple[Fs, str], monkeypatch) -> None:
    fs, mp = mounted
    probe = os.open(os.path.join(mp, "probe"), os.O_CREAT | os.O_RDWR, 0o600)
    try:
        assert is_realtime(probe) is False  # ext4 and XFS both answer FS_IOC_FSGETXATTR
    finally:
        os.close(probe)
    seen: list[int] = []
    monkeypatch.setattr(storefile, "is_realtime", lambda fd: seen.append(fd) or True)
    with pytest.raises(FilesystemError, match=r"\.fiesnap/s is a realtime file of XFS"):
        storefile.create_store_file(mp, "s", 8 * MiB)
    assert seen and not os.path.exists(os.path.join(mp, storefile.STORE_DIR))


def test_ioctl_number_matches_the_uapi_header() -> None:
    # _IOR('X', 31, struct fsxattr): read, 28-byte struct, type 'X', number 31
    assert fsprobe.FS_IOC_FSGETXATTR == (2 << 30) | (fsprobe.FSXATTR_BYTES << 16) | (ord("X") << 8) | 31
