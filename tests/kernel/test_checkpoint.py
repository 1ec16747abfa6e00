"""Real-kernel acceptance tests for start / status / commit / merge.

Each test builds a filesystem on a scratch virtio disk, checkpoints it with the
real fiesnap CLI on real device-mapper, changes it, and checks the result byte
for byte.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib

import pytest

from . import scenario as sc
from .helpers import (
    MiB,
    dev_majmin,
    device_digest,
    dm_remove,
    differing_mib,
    fsck_clean,
    read_direct,
    sh,
    tree_digest,
    write_direct,
)


@pytest.mark.every_kernel
@pytest.mark.parametrize("kind", ["ext4-4k", "ext4-1k", "xfs"])
def test_rollback_is_exact(lab, kind):
    before, rec, image = sc.prepare(lab, kind)
    st = lab.status("cp")
    assert st["state"] == "active" and st["chunk_bytes"] == 4096
    assert st["used_bytes"] == rec.fresh_used_bytes, "a fresh store holds only its header and metadata"

    assert sc.churn_through(lab) != before
    used = lab.status("cp")["used_bytes"]
    assert used > 3 * MiB, f"the churn rewrote >3 MiB of checkpoint data, store used only {used}"

    out = json.loads(lab.fiesnap("merge", "cp", "--keep-store", "--json").stdout)
    assert out["chunks"] > 0 and out["bytes_copied"] == out["chunks"] * 4096
    # Byte level: the whole device equals its checkpoint-time image outside the store's blocks.
    assert differing_mib(device_digest(lab.disk, rec.outside_checkpoint), image) == []
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


@pytest.mark.every_kernel
@pytest.mark.parametrize("store", sc.BOTH_STORES)
def test_stale_store_header_is_never_loaded(lab, store):
    """Stale COW header: a second checkpoint on the blocks of an earlier store must start empty."""
    _, first, _ = sc.prepare(lab, "ext4-4k", name="one", store=store)
    sc.churn_through(lab, "one")
    lab.fiesnap("commit", "one")  # frees the store file; its blocks keep a valid header
    magic, valid = struct.unpack("<II", read_direct(lab.disk, first.first_cow_chunk_offset, 8))
    assert (magic, valid) == (0x70416E53, 1), "precondition: a valid stale header is left on disk"

    lab.mount(lab.disk)
    before = tree_digest(lab.mnt)
    lab.umount()
    lab.fiesnap("start", lab.disk, "--size", "48M", "--name", "two", store)
    second = sc.load_record(lab.state, "two")
    assert second.first_cow_chunk_offset == first.first_cow_chunk_offset, (
        "precondition: the new store reuses the old store's blocks")
    assert lab.status("two")["used_bytes"] == second.fresh_used_bytes, "stale exceptions were loaded"
    image = device_digest(lab.disk, second.outside_checkpoint)
    sc.churn_through(lab, "two", seed=9)
    lab.fiesnap("merge", "two", "--keep-store")
    assert differing_mib(device_digest(lab.disk, second.outside_checkpoint), image) == []
    lab.mount(lab.disk, ro=True)
    assert tree_digest(lab.mnt) == before
    lab.umount()


@pytest.mark.every_kernel
@pytest.mark.parametrize("store", sc.BOTH_STORES)
def test_large_write_saves_every_chunk(lab, store):
    """Resume order: a 1 MiB direct write through the origin must save all 256 chunks."""
    before, rec, image = sc.prepare(lab, "ext4-4k", store=store)
    lab.mount("/dev/mapper/cp")
    used0 = lab.status("cp")["used_bytes"]
    path = os.path.join(lab.mnt, "data/big4.bin")
    sh("dd", "if=/dev/urandom", f"of={path}", "bs=1M", "count=1", "seek=1", "conv=notrunc",
          "oflag=direct")
    lab.umount()
    grown = lab.status("cp")["used_bytes"] - used0
    assert grown >= MiB, f"only {grown} bytes saved for a 1 MiB overwrite"
    lab.fiesnap("merge", "cp", "--keep-store")
    assert differing_mib(device_digest(lab.disk, rec.outside_checkpoint), image) == []


@pytest.mark.every_kernel
def test_killed_merge_rerun_is_exact(lab):
    before, rec, image = sc.prepare(lab, "ext4-4k")
    sc.churn_through(lab)
    p = lab.fiesnap("merge", "cp", "--keep-store", check=False, kill_after_writes=3)
    assert p.returncode == -9, (p.returncode, p.stderr)
    assert sc.load_record(lab.state, "cp").raw["phase"] == "merging"
    assert differing_mib(device_digest(lab.disk, rec.outside_checkpoint), image) != [], (
        "the kill came part-way: the device is not yet the checkpoint")
    lab.fiesnap("merge", "cp", "--keep-store")
    assert differing_mib(device_digest(lab.disk, rec.outside_checkpoint), image) == []
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


@pytest.mark.every_kernel
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


def test_merge_refuses_a_mount_in_another_mount_namespace(lab):
    """A mount made in another mount namespace (a container, a service with a private /tmp)
    is invisible in fiesnap's own mountinfo: merge must see it, refuse, and change nothing."""
    before, rec, image = sc.prepare(lab, "ext4-4k")
    sc.churn_through(lab)
    other = subprocess.Popen(  # read-only: the other mount itself writes nothing
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         "mkdir -p /tmp/other-ns && mount -o ro /dev/mapper/cp /tmp/other-ns && echo mounted && exec sleep 600"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "mounted"
        changed = device_digest(lab.disk, rec.outside_checkpoint)
        p = lab.fiesnap("merge", "cp", check=False)
        assert p.returncode == 7 and "mount namespace of pid" in p.stderr, (p.returncode, p.stderr)
        assert p.stderr.count("\n") == 1, p.stderr
        assert sc.load_record(lab.state, "cp").raw["phase"] == "active"
        assert lab.status("cp")["state"] == "active"
        assert device_digest(lab.disk, rec.outside_checkpoint) == changed, "a refused merge wrote to the device"
    finally:
        other.kill()
        other.wait()
    lab.fiesnap("merge", "cp", "--keep-store")
    assert differing_mib(device_digest(lab.disk, rec.outside_checkpoint), image) == []


def test_a_resumed_merge_refuses_a_disk_with_another_checkpoints_store(lab, scratch_disks):
    """After a reboot that renumbered disks, the record's major:minor may name another disk.
    A resumed merge skips the filesystem UUID check (the superblock may be half restored), so
    the store's identity block must be checked before the store is mapped and copied."""
    (other_disk,) = scratch_disks(1)
    _, rec, image = sc.prepare(lab, "ext4-4k")
    sc.churn_through(lab)
    p = lab.fiesnap("merge", "cp", "--keep-store", check=False, kill_after_writes=3)
    assert p.returncode == -9 and sc.load_record(lab.state, "cp").raw["phase"] == "merging"
    dm_remove("cp-cow")  # a reboot: nothing is mapped any more
    # another disk with a checkpoint of its own, laid out the same way
    sh("dd", f"if={lab.disk}", f"of={other_disk}", "bs=1M", "oflag=direct", "status=none")
    path = os.path.join(lab.state, "cp.json")
    with open(path) as f:
        good = f.read()
    forged = json.loads(good)
    major, minor = (int(x) for x in dev_majmin(other_disk).split(":"))
    forged.update(device=other_disk, device_major=major, device_minor=minor)
    # the other disk's store identity names another checkpoint
    ident_at = rec.raw["identity_offset"]
    block = bytearray(read_direct(other_disk, ident_at, 4096))
    block[16:32] = bytes(16)  # another checkpoint id; the checksum the format asks for
    block[152:156] = struct.pack("<I", zlib.crc32(bytes(block[:152])))
    write_direct(other_disk, ident_at, bytes(block))
    other_before = device_digest(other_disk)
    with open(path, "w") as f:
        json.dump(forged, f)
    try:
        p = lab.fiesnap("merge", "cp", "--keep-store", check=False)
        assert p.returncode == 7 and "is for checkpoint" in p.stderr, (p.returncode, p.stderr)
        assert device_digest(other_disk) == other_before, "a refused merge wrote to the other disk"
    finally:
        with open(path, "w") as f:
            f.write(good)
    lab.fiesnap("merge", "cp", "--keep-store")
    assert differing_mib(device_digest(lab.disk, rec.outside_checkpoint), image) == []


_SECOND_READ_REFUSED = """
import sys
import fiesnap.commands.merge as merge
from fiesnap.errors import StoreFormatError
real, calls = merge.read_table, []
def read_table(node, record):
    calls.append(node)
    if len(calls) == 2:
        raise StoreFormatError("store header changed: injected on the second read")
    return real(node, record)
merge.read_table = read_table
from fiesnap.cli import main
sys.argv = ["fiesnap", *sys.argv[1:]]
main()
"""


def test_a_merge_refused_before_its_first_write_leaves_a_checkpoint_that_can_be_taken_again(lab):
    """The exception table is read twice; if the second read is refused, nothing was copied:
    the record must not say `merging` (which only a merge may finish), and activate brings the
    checkpoint back."""
    before, rec, image = sc.prepare(lab, "ext4-4k")
    sc.churn_through(lab)
    changed = device_digest(lab.disk, rec.outside_checkpoint)
    p = subprocess.run([sys.executable, "-c", _SECOND_READ_REFUSED, "merge", "cp"],
                       capture_output=True, text=True, env=dict(os.environ, FIESNAP_STATE_DIR=lab.state))
    assert p.returncode == 8 and "injected on the second read" in p.stderr, (p.returncode, p.stderr)
    assert "fiesnap activate cp" in p.stderr, p.stderr
    assert sc.load_record(lab.state, "cp").raw["phase"] == "active"
    assert device_digest(lab.disk, rec.outside_checkpoint) == changed
    lab.fiesnap("activate", "cp")
    assert lab.status("cp")["state"] == "active"
    lab.fiesnap("merge", "cp", "--keep-store")
    assert differing_mib(device_digest(lab.disk, rec.outside_checkpoint), image) == []


@pytest.mark.every_kernel
def test_commit_refuses_a_filesystem_another_tool_froze(lab):
    """A mounted checkpoint whose filesystem another tool froze (fsfreeze, a backup agent) is
    refused alike on every kernel, with nothing changed. dm's own freeze (a lockfs suspend)
    fails with EBUSY before 6.8 and nests in the other freeze from 6.8 on (bdev_freeze with
    FREEZE_MAY_NEST): there the switch went ahead and the commit then waited forever to
    delete the store file on the still-frozen filesystem; before, the failed suspend left the
    pass-through table loaded, inactive, for the next resume to swap in."""
    sc.prepare(lab, "ext4-4k", size="32M")
    lab.mount("/dev/mapper/cp")
    sc.churn(lab.mnt)
    table = sh("dmsetup", "table", "cp").stdout
    sh("fsfreeze", "--freeze", lab.mnt)
    try:
        p = subprocess.Popen([sys.executable, "-m", "fiesnap", "commit", "cp"], text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                             env={**os.environ, "FIESNAP_STATE_DIR": str(lab.state)})
        try:
            _, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            sh("fsfreeze", "--unfreeze", lab.mnt, check=False)
            p.communicate()
            pytest.fail("commit waited on the filesystem another tool froze")
        info = sh("dmsetup", "info", "cp").stdout
        assert p.returncode == 5, err
        assert len(err.strip().splitlines()) == 1 and "already frozen" in err and "fsfreeze -u" in err, err
        assert sh("dmsetup", "table", "cp").stdout == table
        assert "Tables present:    LIVE\n" in info, info  # no pass-through table left loaded
        assert lab.status("cp")["state"] == "active"
    finally:
        sh("fsfreeze", "--unfreeze", lab.mnt, check=False)
    lab.fiesnap("commit", "cp")  # thawed: the commit goes through
    assert sh("dmsetup", "table", "cp").stdout.split()[2] == "linear"
    lab.umount()
