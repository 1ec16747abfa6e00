"""Real-kernel acceptance tests for start / status / commit / merge (issue 2).

Each test builds a filesystem on a scratch virtio disk, checkpoints it with the
real fiesnap CLI on real device-mapper, changes it, and checks the result byte
for byte.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess

import pytest

from . import scenario as sc
from .helpers import fsck_clean, make_fs, run_fiesnap

MiB = sc.MiB


@pytest.fixture
def lab(scratch_disk, tmp_path):
    """A scratch disk, a private state folder and mount point, and a fiesnap runner."""

    class Lab:
        disk = scratch_disk
        state = str(tmp_path / "state")
        mnt = str(tmp_path / "mnt")

        def fiesnap(self, *args, check=True, env=None):
            p = run_fiesnap(*args, state_dir=self.state, env=env)
            if check and p.returncode != 0:
                raise AssertionError(f"fiesnap {' '.join(args)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
            return p

        def mount(self, dev, ro=False):
            os.makedirs(self.mnt, exist_ok=True)
            sc.sh("mount", *(["-o", "ro"] if ro else []), dev, self.mnt)

        def umount(self):
            sc.sh("umount", self.mnt)

        def status(self, name):
            return json.loads(self.fiesnap("status", name, "--json").stdout)["checkpoints"][0]

    os.makedirs(Lab.mnt, exist_ok=True)
    yield Lab()
    subprocess.run(["umount", Lab.mnt], capture_output=True)


def _prepare(lab, kind, name="cp"):
    make_fs(lab.disk, kind)
    lab.mount(lab.disk)
    sc.populate(lab.mnt)
    before = sc.tree_digest(lab.mnt)
    lab.umount()
    lab.fiesnap("start", lab.disk, "--size", "48M", "--name", name)
    rec = sc.load_record(lab.state, name)
    image = sc.device_image_digest(lab.disk, rec.store_ranges)
    return before, rec, image


@pytest.mark.parametrize("kind", ["ext4-4k", "ext4-1k", "xfs"])
def test_rollback_is_exact(lab, kind):
    before, rec, image = _prepare(lab, kind)
    st = lab.status("cp")
    assert st["state"] == "active" and st["chunk_bytes"] == 4096
    assert st["used_bytes"] == 2 * 4096, "a fresh store holds only the header and one metadata area"

    lab.mount("/dev/mapper/cp")
    sc.churn(lab.mnt)
    assert sc.tree_digest(lab.mnt) != before
    lab.umount()
    used = lab.status("cp")["used_bytes"]
    assert used > 3 * MiB, f"the churn rewrote >3 MiB of checkpoint data, store used only {used}"

    out = json.loads(lab.fiesnap("merge", "cp", "--keep-store", "--json").stdout)
    assert out["chunks"] > 0 and out["bytes_copied"] == out["chunks"] * 4096
    # Byte level: the whole device equals its checkpoint-time image outside the store's blocks.
    assert sc.differing_mib(sc.device_image_digest(lab.disk, rec.store_ranges), image) == []
    ok, log = fsck_clean(lab.disk, kind)
    assert ok, log
    lab.mount(lab.disk, ro=True)
    assert sc.tree_digest(lab.mnt) == before
    assert os.path.exists(os.path.join(lab.mnt, rec.raw["store_relpath"])), "--keep-store keeps the file"
    lab.umount()
    assert not os.path.exists("/dev/mapper/cp") and not os.path.exists("/dev/mapper/cp-cow")
    assert json.loads(lab.fiesnap("status", "--json").stdout)["checkpoints"] == []


def test_merge_removes_store_file_and_fsck_clean(lab):
    before, rec, _ = _prepare(lab, "ext4-4k")
    lab.mount("/dev/mapper/cp")
    sc.churn(lab.mnt)
    lab.umount()
    lab.fiesnap("rollback", "cp")  # alias of merge
    ok, log = fsck_clean(lab.disk, "ext4-4k")
    assert ok, log
    lab.mount(lab.disk, ro=True)
    assert sc.tree_digest(lab.mnt) == before
    assert not os.path.exists(os.path.join(lab.mnt, rec.raw["store_relpath"]))
    lab.umount()


def test_stale_store_header_is_never_loaded(lab):
    """Trap 1: a second checkpoint on the blocks of an earlier store must start empty."""
    make_fs(lab.disk, "ext4-4k")
    lab.mount(lab.disk)
    sc.populate(lab.mnt)
    lab.umount()
    lab.fiesnap("start", lab.disk, "--size", "48M", "--name", "one")
    first = sc.load_record(lab.state, "one")
    lab.mount("/dev/mapper/one")
    sc.churn(lab.mnt)
    lab.umount()
    lab.fiesnap("commit", "one")  # frees the store file; its blocks keep a valid header
    magic, valid = struct.unpack("<II", sc.read_raw(lab.disk, first.first_cow_chunk_offset, 8))
    assert (magic, valid) == (0x70416E53, 1), "precondition: a valid stale header is left on disk"

    lab.mount(lab.disk)
    before = sc.tree_digest(lab.mnt)
    lab.umount()
    lab.fiesnap("start", lab.disk, "--size", "48M", "--name", "two")
    second = sc.load_record(lab.state, "two")
    assert second.first_cow_chunk_offset == first.first_cow_chunk_offset, (
        "precondition: the new store reuses the old store's blocks")
    assert lab.status("two")["used_bytes"] == 2 * 4096, "stale exceptions were loaded"
    image = sc.device_image_digest(lab.disk, second.store_ranges)
    lab.mount("/dev/mapper/two")
    sc.churn(lab.mnt, seed=9)
    lab.umount()
    lab.fiesnap("merge", "two", "--keep-store")
    assert sc.differing_mib(sc.device_image_digest(lab.disk, second.store_ranges), image) == []
    lab.mount(lab.disk, ro=True)
    assert sc.tree_digest(lab.mnt) == before
    lab.umount()


def test_large_write_saves_every_chunk(lab):
    """Trap 2: a 1 MiB direct write through the origin must save all 256 chunks."""
    before, rec, image = _prepare(lab, "ext4-4k")
    lab.mount("/dev/mapper/cp")
    used0 = lab.status("cp")["used_bytes"]
    path = os.path.join(lab.mnt, "data/big4.bin")
    sc.sh("dd", "if=/dev/urandom", f"of={path}", "bs=1M", "count=1", "seek=1", "conv=notrunc",
          "oflag=direct")
    lab.umount()
    grown = lab.status("cp")["used_bytes"] - used0
    assert grown >= MiB, f"only {grown} bytes saved for a 1 MiB overwrite"
    lab.fiesnap("merge", "cp", "--keep-store")
    assert sc.differing_mib(sc.device_image_digest(lab.disk, rec.store_ranges), image) == []


def test_killed_merge_rerun_is_exact(lab):
    before, rec, image = _prepare(lab, "ext4-4k")
    lab.mount("/dev/mapper/cp")
    sc.churn(lab.mnt)
    lab.umount()
    env = dict(os.environ, FIESNAP_TEST_KILL_AFTER_RUNS="3")
    p = lab.fiesnap("merge", "cp", "--keep-store", check=False, env=env)
    assert p.returncode == -9, (p.returncode, p.stderr)
    assert sc.load_record(lab.state, "cp").raw["phase"] == "merging"
    assert sc.differing_mib(sc.device_image_digest(lab.disk, rec.store_ranges), image) != [], (
        "the kill came part-way: the device is not yet the checkpoint")
    lab.fiesnap("merge", "cp", "--keep-store")
    assert sc.differing_mib(sc.device_image_digest(lab.disk, rec.store_ranges), image) == []
    ok, log = fsck_clean(lab.disk, "ext4-4k")
    assert ok, log
    lab.mount(lab.disk, ro=True)
    assert sc.tree_digest(lab.mnt) == before
    lab.umount()


def test_commit_unmounted_keeps_changes(lab):
    make_fs(lab.disk, "xfs")
    lab.mount(lab.disk)
    sc.populate(lab.mnt)
    lab.umount()
    lab.fiesnap("start", lab.disk, "--size", "32M", "--name", "cp")
    rec = sc.load_record(lab.state, "cp")
    lab.mount("/dev/mapper/cp")
    sc.churn(lab.mnt)
    after = sc.tree_digest(lab.mnt)
    lab.umount()
    assert json.loads(lab.fiesnap("commit", "cp", "--json").stdout) == {"name": "cp", "result": "removed"}
    assert not any(os.path.exists(f"/dev/mapper/{n}") for n in ("cp", "cp-snap", "cp-cow"))
    ok, log = fsck_clean(lab.disk, "xfs")
    assert ok, log
    lab.mount(lab.disk)
    assert sc.tree_digest(lab.mnt) == after
    assert not os.path.exists(os.path.join(lab.mnt, rec.raw["store_relpath"]))
    lab.umount()


def test_commit_while_mounted_stays_mounted(lab):
    make_fs(lab.disk, "ext4-4k")
    lab.mount(lab.disk)
    sc.populate(lab.mnt)
    lab.umount()
    lab.fiesnap("start", lab.disk, "--size", "32M", "--name", "cp")
    rec = sc.load_record(lab.state, "cp")
    lab.mount("/dev/mapper/cp")
    sc.churn(lab.mnt)
    assert json.loads(lab.fiesnap("commit", "cp", "--json").stdout)["result"] == "passthrough"
    table = sc.sh("dmsetup", "table", "cp").stdout.split()
    assert table[2] == "linear"
    assert not os.path.exists("/dev/mapper/cp-snap") and not os.path.exists("/dev/mapper/cp-cow")
    with open(os.path.join(lab.mnt, "after-commit.txt"), "w") as f:
        f.write("still writable\n")
    assert not os.path.exists(os.path.join(lab.mnt, rec.raw["store_relpath"]))
    after = sc.tree_digest(lab.mnt)
    lab.umount()
    assert lab.status("cp")["state"] == "passthrough"
    lab.fiesnap("commit", "cp")  # unmounted pass-through: removed
    assert not os.path.exists("/dev/mapper/cp")
    ok, log = fsck_clean(lab.disk, "ext4-4k")
    assert ok, log
    lab.mount(lab.disk, ro=True)
    assert sc.tree_digest(lab.mnt) == after
    lab.umount()


def test_status_table_and_json(lab):
    _prepare(lab, "ext4-4k")
    st = lab.status("cp")
    for key in ("store_bytes", "used_bytes", "metadata_bytes", "percent_used", "chunk_bytes",
                "extents", "device", "start_time", "state"):
        assert key in st
    assert isinstance(st["store_bytes"], int) and st["store_bytes"] <= 48 * MiB
    assert st["store_bytes"] >= 47 * MiB
    human = lab.fiesnap("status").stdout
    assert "cp" in human and "active" in human
    lab.fiesnap("commit", "cp")
