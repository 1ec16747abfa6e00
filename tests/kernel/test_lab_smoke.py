"""Proves the lab harness itself: scratch disks, dmsetup, dm-linear and dm-snapshot."""

from __future__ import annotations

import os
import random

from . import helpers as h

MiB = h.MiB


def test_scratch_disk_is_a_wiped_block_device(scratch_disk):
    assert scratch_disk.startswith("/dev/vd")
    assert h.dev_size(scratch_disk) >= 64 * MiB
    size = h.dev_size(scratch_disk)
    assert h.read_direct(scratch_disk, 0, MiB) == bytes(MiB)
    assert h.read_direct(scratch_disk, size - MiB, MiB) == bytes(MiB)


def test_dm_linear_roundtrip(scratch_disk, dm_prefix):
    name = f"{dm_prefix}lin"
    offset_sectors = 2048  # map the disk from 1 MiB on
    length = 16 * MiB // 512
    dev = h.dm_create(name, f"0 {length} linear {h.dev_majmin(scratch_disk)} {offset_sectors}")
    assert name in h.dm_names()
    assert h.dev_size(dev) == 16 * MiB
    data = random.Random(1).randbytes(4 * MiB)
    with open(dev, "r+b") as f:  # buffered, through the dm device
        f.seek(3 * MiB)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    # The bytes land on the disk, shifted by the table's offset.
    assert h.read_direct(scratch_disk, offset_sectors * 512 + 3 * MiB, len(data)) == data
    assert h.read_direct(dev, 3 * MiB, len(data)) == data
    h.dm_remove(name)
    assert name not in h.dm_names()
    assert not os.path.exists(dev)


def test_dm_snapshot_sanity(scratch_disk, dm_prefix):
    """origin = first 64 MiB, cow = next 16 MiB; writes through the origin fill the cow."""
    mm = h.dev_majmin(scratch_disk)
    org, cow = 64 * MiB // 512, 16 * MiB // 512
    h.write_direct(scratch_disk, 64 * MiB, bytes(MiB))  # zero the cow header area: a new store
    base = h.dm_create(f"{dm_prefix}base", f"0 {org} linear {mm} 0")
    cowdev = h.dm_create(f"{dm_prefix}cow", f"0 {cow} linear {mm} {org}")
    before = random.Random(2).randbytes(2 * MiB)
    h.write_direct(base, 8 * MiB, before)
    # The snapshot is loaded first, then the origin is stacked on the same base.
    snap = h.dm_create(f"{dm_prefix}snap",
                       f"0 {org} snapshot {h.dev_majmin(base)} {h.dev_majmin(cowdev)} P 8")
    origin = h.dm_create(f"{dm_prefix}origin", f"0 {org} snapshot-origin {h.dev_majmin(base)}")
    st = h.dm_status(f"{dm_prefix}snap").split()
    assert st[2] == "snapshot", st
    used0, total = (int(x) for x in st[3].split("/"))
    assert total == cow
    after = random.Random(3).randbytes(2 * MiB)
    h.write_direct(origin, 8 * MiB, after)
    st = h.dm_status(f"{dm_prefix}snap").split()
    used1 = int(st[3].split("/")[0])
    # header + metadata area + 2 MiB of saved chunks
    assert used1 > used0 and used1 >= used0 + 2 * MiB // 512, (used0, used1)
    assert h.read_direct(origin, 8 * MiB, len(after)) == after
    assert h.read_direct(snap, 8 * MiB, len(before)) == before  # the snapshot keeps the old bytes
    for n in ("origin", "snap", "cow", "base"):
        h.dm_remove(f"{dm_prefix}{n}")
    assert not [n for n in h.dm_names() if n.startswith(dm_prefix)]


def test_leftovers_are_cleaned(scratch_disk, dm_prefix, tmp_path):
    """What the autouse guard does after each test: mounted fs on a dm stack, suspended
    device, unprefixed device -> all gone, the disk free again."""
    before = h.system_state()
    mm = h.dev_majmin(scratch_disk)
    dev = h.dm_create(f"{dm_prefix}left", f"0 {h.dev_sectors(scratch_disk)} linear {mm} 0")
    top = h.dm_create("unprefixed-leftover", f"0 {h.dev_sectors(dev)} linear {h.dev_majmin(dev)} 0")
    h.make_fs(top, "ext4-4k")
    h.mount_at(top, tmp_path / "mnt")
    h.sh("fsfreeze", "--freeze", tmp_path / "mnt")
    h.sh("dmsetup", "create", "unrelated-leftover", "--table", "0 8 zero")
    cleaned, problems = h.cleanup_leftovers(before, prefix=dm_prefix, disks=[scratch_disk])
    assert problems == []
    assert len(cleaned) == 4, cleaned  # 1 mount + 3 dm devices
    assert not [n for n in h.dm_names() if n.endswith("-left") or n.endswith("-leftover")]
    assert not [m for m in h.mounts() if m.mountpoint == str(tmp_path / "mnt")]
    assert not os.listdir(f"/sys/block/{os.path.basename(os.path.realpath(scratch_disk))}/holders")
    assert set(os.listdir("/dev/mapper")) == {"control", *h.dm_names()}  # no stale nodes


def test_filesystems_and_digests(scratch_disk, tmp_path):
    for kind in h.FS_KINDS:
        h.make_fs(scratch_disk, kind)
        mnt = h.mount_at(scratch_disk, tmp_path / kind)
        os.makedirs(f"{mnt}/d/e")
        with open(f"{mnt}/d/e/f.bin", "wb") as f:
            f.write(b"x" * 5000)
        os.symlink("d/e/f.bin", f"{mnt}/link")
        os.makedirs(f"{mnt}/.fiesnap")
        with open(f"{mnt}/.fiesnap/store", "wb") as f:
            f.write(b"ignored")
        tree = h.tree_digest(mnt)
        assert tree["link"][1] == "d/e/f.bin"
        assert not any(k.startswith(".fiesnap") for k in tree)
        h.umount(mnt)
        ok, log = h.fsck_clean(scratch_disk, kind)
        assert ok, log
        d1 = h.device_digest(scratch_disk)
        assert len(d1) == h.dev_size(scratch_disk) // MiB
        h.write_direct(scratch_disk, 100 * MiB + 4096, b"\xff" * 4096)
        d2 = h.device_digest(scratch_disk)
        assert h.differing_mib(d1, d2) == [100]
        hole = [(100 * MiB + 4096, 4096)]
        d3 = h.device_digest(scratch_disk, hole)
        h.write_direct(scratch_disk, 100 * MiB + 4096, bytes(4096))
        assert h.device_digest(scratch_disk, hole) == d3, "excluded bytes must not count"
