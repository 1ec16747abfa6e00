"""What stands between a merge and a wrong write: the store's identity on the device
(any generation of this checkpoint), the opened node checked by its number, the device
free in every mount namespace."""

from __future__ import annotations

import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from test_host_adapters import MKFS, host, loop_image  # noqa: F401  (host: fixture)

from fiesnap.errors import DeviceError, RefusedError
from fiesnap.kernel import blockdev
from fiesnap.kernel.directio import DirectDevice, probe_exclusive, zero_range
from fiesnap.model.cowtable import CowTable
from fiesnap.model.extents import ChunkRun, Extent
from fiesnap.model.identity import encode_identity
from fiesnap.model.record import CheckpointRecord
from fiesnap.services import storeid

MiB = 1 << 20


def _record() -> CheckpointRecord:
    return CheckpointRecord(
        name="cp", device="/dev/vdb", device_major=254, device_minor=16, device_bytes=64 * MiB,
        fstype="ext4", fs_uuid="u-1", checkpoint_id="c" * 32, chunk_bytes=4096, store_type="PO",
        store_relpath=".fiesnap/s", store_file_bytes=80 * 4096,
        store_extents=(Extent(0, 4096 * 99, 80 * 4096, 0),),
        cow_table=CowTable.from_runs([ChunkRun(100, 50)], 4096), created="now", phase="merging",
        identity_offset=4096 * 99)


def _on_disk(monkeypatch, ident) -> None:
    monkeypatch.setattr(storeid, "read_identity_block", lambda dev, off: encode_identity(ident))


def test_a_merge_accepts_an_earlier_generation_of_its_own_checkpoint(monkeypatch):
    """extend rewrote the block through the origin; the merge brings the first one back."""
    first = _record()
    grown = first.grown(first.cow.append_runs([ChunkRun(300, 20)])).identity_rewritten()
    _on_disk(monkeypatch, first.expected_identity())
    storeid.check_store_identity(grown, "/dev/vdb", any_generation=True)
    with pytest.raises(RefusedError, match="store map checksum"):
        storeid.check_store_identity(grown, "/dev/vdb")  # activate: only the current map


@pytest.mark.parametrize("change", [
    {"checkpoint_id": "d" * 32}, {"fs_uuid": "u-2"}, {"device_bytes": 32 * MiB}, {"chunk_bytes": 8192},
    {"generation": 3},  # newer than the record: not something this record ever wrote
])
def test_a_merge_refuses_another_checkpoints_store(monkeypatch, change):
    rec = _record()
    _on_disk(monkeypatch, replace(rec.expected_identity(), **change))
    with pytest.raises(RefusedError, match="refusing to map the store"):
        storeid.check_store_identity(rec, "/dev/vdb", any_generation=True)


@pytest.mark.root
def test_an_opened_node_is_checked_by_its_number(host, tmp_path: Path):
    size, _ = MKFS["ext4-4k"]
    with loop_image(tmp_path, "plain", size, None) as dev:
        with open(dev, "r+b") as f:
            f.write(b"x" * 4096)
        real = os.stat(dev).st_rdev
        with pytest.raises(DeviceError, match=r"is block device \d+:\d+, not 254:16 as expected"):
            DirectDevice.open(dev, write=True, expect_rdev=os.makedev(254, 16))
        with pytest.raises(DeviceError, match="nothing was written"):
            zero_range(dev, 0, 4096, expect_rdev=os.makedev(254, 16))
        with open(dev, "rb") as f:
            assert f.read(4096) == b"x" * 4096
        zero_range(dev, 0, 4096, expect_rdev=real)
        with open(dev, "rb") as f:
            assert f.read(4096) == bytes(4096)


def test_mounts_in_other_namespaces_are_named(tmp_path):
    proc = tmp_path / "proc"
    line = "36 35 254:16 / {mp} rw,relatime shared:1 - ext4 /dev/vdb rw\n"
    for pid, ns, mp in (("1", "mnt:[1]", "/srv/data"), ("77", "mnt:[2]", "/in/container"),
                        ("78", "mnt:[2]", "/in/container"), ("99", "mnt:[3]", "/elsewhere")):
        (proc / pid / "ns").mkdir(parents=True)
        os.symlink(ns, proc / pid / "ns" / "mnt")
        (proc / pid / "mountinfo").write_text(line.format(mp=mp) if pid != "99" else "")
    (proc / "self").symlink_to(proc / "1")
    assert blockdev.mounts_anywhere(254, 16, proc=str(proc)) == [
        "/srv/data", "/in/container (mount namespace of pid 77)"]
    assert blockdev.mounts_anywhere(254, 17, proc=str(proc)) == []


@pytest.mark.root
def test_probe_exclusive_sees_a_mount_in_another_namespace(host, tmp_path: Path):
    size, mkfs = MKFS["ext4-4k"]
    with loop_image(tmp_path, "ext4", size, mkfs) as dev:
        assert probe_exclusive(dev)
        other = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c",
             f"mkdir -p {tmp_path}/ns && mount {dev} {tmp_path}/ns && echo mounted && exec sleep 60"],
            stdout=subprocess.PIPE, text=True)
        try:
            assert other.stdout.readline().strip() == "mounted"
            assert blockdev.mounts_of(*divmod_dev(dev)) == []  # invisible here ...
            assert not probe_exclusive(dev)  # ... but the device is held
            assert any("mount namespace of pid" in m for m in blockdev.mounts_anywhere(*divmod_dev(dev)))
        finally:
            other.kill()
            other.wait()
        assert probe_exclusive(dev)


def divmod_dev(dev: str) -> tuple[int, int]:
    st = os.stat(dev)
    return os.major(st.st_rdev), os.minor(st.st_rdev)
