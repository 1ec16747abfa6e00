"""Real-kernel acceptance tests for start / status / commit / merge.

Each test builds a filesystem on a scratch virtio disk, checkpoints it with the
real fiesnap CLI on real device-mapper, changes it, and checks the result byte
for byte.
"""

from __future__ import annotations

import json
import os
import struct

import pytest

from . import scenario as sc
from .helpers import MiB, device_digest, differing_mib, fsck_clean, read_direct, sh, tree_digest


@pytest.mark.parametrize("kind", ["ext4-4k", "ext4-1k", "xfs"])
def test_rollback_is_exact(lab, kind):
    before, rec, image = sc.prepare(lab, kind)
    st = lab.status("cp")
    assert st["state"] == "active" and st["chunk_bytes"] == 4096
    assert st["used_bytes"] == 2 * 4096, "a fresh store holds only the header and one metadata area"

    assert sc.churn_through(lab) != before
    used = lab.status("cp")["used_bytes"]
    assert used > 3 * MiB, f"the churn rewrote >3 MiB of checkpoint data, store used only {used}"

    out = json.loads(lab.fiesnap("merge", "cp", "--keep-store", "--json").stdout)
    assert out["chunks"] > 0 and out["bytes_copied"] == out["chunks"] * 4096
    # Byte level: the whole device equals its checkpoint-time image outside the store's blocks.
    assert differing_mib(device_digest(lab.disk, rec.store_ranges), image) == []
    ok, log = fsck_clean(lab.disk, kind)
    assert ok, log
    lab.mount(lab.disk, ro=True)
    assert tree_digest(lab.mnt) == before
    assert os.path.exists(os.path.join(lab.mnt, rec.raw["store_relpath"])), "--keep-store keeps the file"
    lab.umount()
    assert not os.path.exists("/dev/mapper/cp") and not os.path.exists("/dev/mapper/cp-cow")
    assert json.loads(lab.fiesnap("status", "--json").stdout)["checkpoints"] == []


def test_merge_removes_store_file_and_fsck_clean(lab):
    before, rec, _ = sc.prepare(lab, "ext4-4k")
    sc.churn_through(lab)
    lab.fiesnap("rollback", "cp")  # alias of merge
    ok, log = fsck_clean(lab.disk, "ext4-4k")
    assert ok, log
    lab.mount(lab.disk, ro=True)
    assert tree_digest(lab.mnt) == before
    assert not os.path.exists(os.path.join(lab.mnt, rec.raw["store_relpath"]))
    lab.umount()


def test_stale_store_header_is_never_loaded(lab):
    """Stale COW header: a second checkpoint on the blocks of an earlier store must start empty."""
    _, first, _ = sc.prepare(lab, "ext4-4k", name="one")
    sc.churn_through(lab, "one")
    lab.fiesnap("commit", "one")  # frees the store file; its blocks keep a valid header
    magic, valid = struct.unpack("<II", read_direct(lab.disk, first.first_cow_chunk_offset, 8))
    assert (magic, valid) == (0x70416E53, 1), "precondition: a valid stale header is left on disk"

    lab.mount(lab.disk)
    before = tree_digest(lab.mnt)
    lab.umount()
    lab.fiesnap("start", lab.disk, "--size", "48M", "--name", "two")
    second = sc.load_record(lab.state, "two")
    assert second.first_cow_chunk_offset == first.first_cow_chunk_offset, (
        "precondition: the new store reuses the old store's blocks")
    assert lab.status("two")["used_bytes"] == 2 * 4096, "stale exceptions were loaded"
    image = device_digest(lab.disk, second.store_ranges)
    sc.churn_through(lab, "two", seed=9)
    lab.fiesnap("merge", "two", "--keep-store")
    assert differing_mib(device_digest(lab.disk, second.store_ranges), image) == []
    lab.mount(lab.disk, ro=True)
    assert tree_digest(lab.mnt) == before
    lab.umount()


def test_large_write_saves_every_chunk(lab):
    """Resume order: a 1 MiB direct write through the origin must save all 256 chunks."""
    before, rec, image = sc.prepare(lab, "ext4-4k")
    lab.mount("/dev/mapper/cp")
    used0 = lab.status("cp")["used_bytes"]
    path = os.path.join(lab.mnt, "data/big4.bin")
    sh("dd", "if=/dev/urandom", f"of={path}", "bs=1M", "count=1", "seek=1", "conv=notrunc",
          "oflag=direct")
    lab.umount()
    grown = lab.status("cp")["used_bytes"] - used0
    assert grown >= MiB, f"only {grown} bytes saved for a 1 MiB overwrite"
    lab.fiesnap("merge", "cp", "--keep-store")
    assert differing_mib(device_digest(lab.disk, rec.store_ranges), image) == []


def test_killed_merge_rerun_is_exact(lab):
    before, rec, image = sc.prepare(lab, "ext4-4k")
    sc.churn_through(lab)
    env = dict(os.environ, FIESNAP_TEST_KILL_AFTER_RUNS="3")
    p = lab.fiesnap("merge", "cp", "--keep-store", check=False, env=env)
    assert p.returncode == -9, (p.returncode, p.stderr)
    assert sc.load_record(lab.state, "cp").raw["phase"] == "merging"
    assert differing_mib(device_digest(lab.disk, rec.store_ranges), image) != [], (
        "the kill came part-way: the device is not yet the checkpoint")
    lab.fiesnap("merge", "cp", "--keep-store")
    assert differing_mib(device_digest(lab.disk, rec.store_ranges), image) == []
    ok, log = fsck_clean(lab.disk, "ext4-4k")
    assert ok, log
    lab.mount(lab.disk, ro=True)
    assert tree_digest(lab.mnt) == before
    lab.umount()


def test_commit_unmounted_keeps_changes(lab):
    _, rec, _ = sc.prepare(lab, "xfs", size="32M")
    after = sc.churn_through(lab)
    assert json.loads(lab.fiesnap("commit", "cp", "--json").stdout) == {"name": "cp", "result": "removed"}
    assert not any(os.path.exists(f"/dev/mapper/{n}") for n in ("cp", "cp-snap", "cp-cow"))
    ok, log = fsck_clean(lab.disk, "xfs")
    assert ok, log
    lab.mount(lab.disk)
    assert tree_digest(lab.mnt) == after
    assert not os.path.exists(os.path.join(lab.mnt, rec.raw["store_relpath"]))
    lab.umount()


def test_commit_while_mounted_stays_mounted(lab):
    _, rec, _ = sc.prepare(lab, "ext4-4k", size="32M")
    lab.mount("/dev/mapper/cp")
    sc.churn(lab.mnt)
    assert json.loads(lab.fiesnap("commit", "cp", "--json").stdout)["result"] == "passthrough"
    table = sh("dmsetup", "table", "cp").stdout.split()
    assert table[2] == "linear"
    assert not os.path.exists("/dev/mapper/cp-snap") and not os.path.exists("/dev/mapper/cp-cow")
    with open(os.path.join(lab.mnt, "after-commit.txt"), "w") as f:
        f.write("still writable\n")
    assert not os.path.exists(os.path.join(lab.mnt, rec.raw["store_relpath"]))
    after = tree_digest(lab.mnt)
    lab.umount()
    assert lab.status("cp")["state"] == "passthrough"
    lab.fiesnap("commit", "cp")  # unmounted pass-through: removed
    assert not os.path.exists("/dev/mapper/cp")
    ok, log = fsck_clean(lab.disk, "ext4-4k")
    assert ok, log
    lab.mount(lab.disk, ro=True)
    assert tree_digest(lab.mnt) == after
    lab.umount()


def test_status_table_and_json(lab):
    sc.prepare(lab, "ext4-4k")
    st = lab.status("cp")
    for key in ("store_bytes", "used_bytes", "metadata_bytes", "percent_used", "chunk_bytes",
                "extents", "device", "start_time", "state"):
        assert key in st
    assert isinstance(st["store_bytes"], int) and st["store_bytes"] <= 48 * MiB
    assert st["store_bytes"] >= 47 * MiB
    human = lab.fiesnap("status").stdout
    assert "cp" in human and "active" in human
    lab.fiesnap("commit", "cp")
