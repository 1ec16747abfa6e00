"""The device seal against real ext4 and XFS superblocks (host loop devices, no dm needed):
a read-write mount changes the stamp, and the change is explained. A read-only mount leaves
ext4 alone, but XFS writes its log and superblock even then: for XFS it counts as a write."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from test_host_adapters import MKFS, host, loop_image  # noqa: F401  (host: fixture)

from fiesnap.kernel.fsprobe import read_head
from fiesnap.model.seal import SuperblockStamp, explain_change, mounted_since, stamp_of


def _mount_cycle(dev: str, where: Path, *opts: str, write: bool = False) -> None:
    where.mkdir(exist_ok=True)
    subprocess.run(["mount", *opts, dev, str(where)], check=True, capture_output=True)
    try:
        if write:
            (where / "f").write_bytes(b"x" * 65536)
    finally:
        subprocess.run(["umount", str(where)], check=True, capture_output=True)


@pytest.mark.root
@pytest.mark.parametrize("kind", ["ext4-4k", "xfs"])
def test_a_read_write_mount_breaks_the_seal(host, tmp_path, kind):
    size, mkfs = MKFS[kind]
    fstype = kind.split("-")[0]
    with loop_image(tmp_path, "sealed", size, mkfs) as dev:
        # A fresh XFS writes its superblock at its first mount, even read-only: seal a
        # filesystem that has been in use, as deactivate does.
        _mount_cycle(dev, tmp_path / "m", write=True)
        sealed = stamp_of(read_head(dev), fstype)
        _mount_cycle(dev, tmp_path / "m", "-o", "ro")
        after_ro = explain_change(sealed, stamp_of(read_head(dev), fstype))
        if fstype == "ext4":
            assert after_ro is None
        else:
            assert after_ro is not None and after_ro.startswith("its superblock was rewritten")
            sealed = stamp_of(read_head(dev), fstype)
        _mount_cycle(dev, tmp_path / "m", write=True)
        now = stamp_of(read_head(dev), fstype)
        why = explain_change(sealed, now)
        if fstype == "ext4":
            assert why.startswith("mounted read-write 1 time(s), last at ")
            assert mounted_since(now, now.mount_time) and not mounted_since(now, now.mount_time + 1)
        else:
            assert why.startswith("its superblock was rewritten (log sequence ")
            assert now.lsn != sealed.lsn and not mounted_since(now, 0)  # XFS keeps no mount time


def test_a_stamp_survives_the_record_and_a_damaged_one_is_named():
    head = bytearray(2048)
    head[1024 + 0x38:1024 + 0x3A] = (0xEF53).to_bytes(2, "little")
    head[1024 + 0x34:1024 + 0x36] = (9).to_bytes(2, "little")
    stamp = stamp_of(bytes(head), "ext4")
    assert stamp.mount_count == 9 and SuperblockStamp.from_dict(stamp.to_dict()) == stamp
    for bad, why in [({"fstype": "btrfs", "sha256": stamp.sha256}, "file system type"),
                     ({"fstype": "ext4", "sha256": "zz"}, "no valid sha256"),
                     ({**stamp.to_dict(), "mount_count": -1}, "invalid mount_count"),
                     ([], "not an object")]:
        with pytest.raises(ValueError, match=why):
            SuperblockStamp.from_dict(bad)
    with pytest.raises(ValueError, match="short XFS superblock"):
        stamp_of(b"XFSB", "xfs")
