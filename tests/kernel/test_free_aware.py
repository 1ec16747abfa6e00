"""Real-kernel tests for the free-aware store (fiesnap/model/seeding.py).

The reference for every rollback is a copy of the checkpoint taken onto a spare disk at the
checkpoint (offline: the device itself right after start; online: the checkpoint view). Which
chunks need not come back is read from that copy, independently of fiesnap's record: the
whole chunks its own free-space map (GETFSMAP of a read-only mount of the copy) calls free,
plus the store file's blocks. Every other chunk must be byte-identical after the rollback.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct

import pytest

from fiesnap.kernel.fsmap import free_space
from fiesnap.model.extents import free_chunks

from . import scenario as sc
from .helpers import MiB, device_digest, fsck_clean, read_direct, sh, tree_digest, write_direct

CHUNK = 4096


def _copy(src: str, dst: str) -> None:
    """A byte copy of a whole device (the checkpoint image), flushed to the spare disk."""
    sh("dd", f"if={src}", f"of={dst}", "bs=1M", "iflag=direct", "oflag=direct", "status=none", timeout=600)


def _free_at_checkpoint(copy: str, kind: str, tmp_path) -> set[int]:
    """Whole chunks free in the checkpoint copy, by GETFSMAP of a read-only mount of it."""
    where = str(tmp_path / "ckpt")
    os.makedirs(where, exist_ok=True)
    opts = "ro,norecovery,nouuid" if kind == "xfs" else "ro,noload"
    sh("mount", "-o", opts, copy, where)
    try:
        free = free_space(where)
    finally:
        sh("umount", where)
    return set(free_chunks(free, CHUNK))


def _store_chunks(rec: sc.Record) -> set[int]:
    out: set[int] = set()
    for _l, p, n, _f in rec.raw["store_extents"]:
        out.update(range(p // CHUNK, -(-(p + n) // CHUNK)))
    return out


def _differing_chunks(dev: str, copy: str, skip: set[int]) -> list[int]:
    """Chunks of `dev` that differ from `copy`, outside `skip` (O_DIRECT, 1 MiB at a time)."""
    out = []
    fa, fb = os.open(dev, os.O_RDONLY | os.O_DIRECT), os.open(copy, os.O_RDONLY | os.O_DIRECT)
    a, b = mmap.mmap(-1, MiB), mmap.mmap(-1, MiB)
    try:
        size = os.lseek(fa, 0, os.SEEK_END)
        for off in range(0, size, MiB):
            n = os.preadv(fa, [a], off)
            os.preadv(fb, [b], off)
            if a[:n] == b[:n]:
                continue
            for i in range(0, n, CHUNK):
                c = (off + i) // CHUNK
                if c not in skip and a[i:i + CHUNK] != b[i:i + CHUNK]:
                    out.append(c)
    finally:
        a.close(), b.close(), os.close(fa), os.close(fb)
    return out


def _assert_exact(lab, kind, copy, rec, tmp_path, before=None, managed=False):
    skip = _free_at_checkpoint(copy, kind, tmp_path) | _store_chunks(rec)
    assert _differing_chunks(lab.disk, copy, skip) == [], "a chunk live at the checkpoint differs"
    sc.assert_fsck_clean(lab, "/dev/mapper/cp" if managed else lab.disk, kind)
    if before is not None:
        lab.mount("/dev/mapper/cp" if managed else lab.disk, ro=True)
        try:
            assert tree_digest(lab.mnt) == before
        finally:
            lab.umount()


def _seeded(lab) -> dict:
    raw = sc.load_record(lab.state, "cp").raw
    assert raw["seeded_areas"] > 0 and raw["seeded_chunks"] > 0, "not a free-aware store"
    return raw


@pytest.mark.parametrize("kind", ["ext4-4k", "ext4-1k", "xfs"])
def test_offline_free_aware_rollback_is_exact(lab, scratch_disks, tmp_path, kind):
    """Offline start; churn; grow the store under churn; rollback: every live chunk exact."""
    (copy,) = scratch_disks(1)
    sc.make_fs(lab.disk, kind)
    lab.mount(lab.disk)
    sc.populate(lab.mnt)
    before = tree_digest(lab.mnt)
    lab.umount()
    lab.fiesnap("start", lab.disk, "--size", "24M", "--name", "cp", "--free-aware")
    _copy(lab.disk, copy)  # nothing has written since: the device is the checkpoint
    raw = _seeded(lab)
    rec = sc.load_record(lab.state, "cp")
    free = _free_at_checkpoint(copy, kind, tmp_path)
    # The checkpoint view reads zeros where the checkpoint had free space, and is a clean fs.
    some_free = sorted(free - _store_chunks(rec))[len(free) // 2]
    assert read_direct("/dev/mapper/cp-snap", some_free * CHUNK, CHUNK) == bytes(CHUNK)
    ok, log = fsck_clean("/dev/mapper/cp-snap", kind)
    assert ok, log
    st = lab.status("cp")
    assert st["free_aware"] and st["seeded_bytes"] == raw["seeded_chunks"] * CHUNK
    assert st["store_bytes"] < 25 * MiB, "status shows the store's backed bytes, not its address space"

    lab.mount("/dev/mapper/cp")
    sc.churn(lab.mnt)
    for i in range(4):  # new files: into free space, no store cost
        with open(f"{lab.mnt}/data/fresh{i}.bin", "wb") as f:
            f.write(os.urandom(4 * MiB))
    os.sync()
    lab.fiesnap("extend", "cp", "--by", "8M")
    sc.churn(lab.mnt, seed=3)
    lab.umount()
    assert lab.status("cp")["state"] == "active"
    out = json.loads(lab.fiesnap("merge", "cp", "--keep-store", "--json").stdout)
    assert out["chunks"] > 0
    _assert_exact(lab, kind, copy, rec, tmp_path, before)


@pytest.mark.parametrize("kind", ["ext4-4k", "xfs"])
def test_online_free_aware_under_writer_extend_and_reactivate(lab, scratch_disks, tmp_path, kind):
    """Online start under a writer (the table is seeded inside the freeze), extend under churn,
    deactivate + activate (a reboot), rollback: every chunk live at the checkpoint exact."""
    (copy,) = scratch_disks(1)
    sc.online_setup(lab, kind)
    writer = sc.Writer(lab.mnt, str(tmp_path))
    writer.wait_for(10)
    p = lab.fiesnap("start", "cp", "--size", "24M", "--free-aware")
    writer.wait_for(writer.done() + 10)
    finished = writer.stop()
    assert "seeded" in p.stderr and "frozen" in p.stderr
    # The table was written before the freeze: what the writer allocated until then was
    # taken out of it inside the freeze (saved as real exceptions), and must come back too.
    converted = int(re.search(r"(\d+) allocated before the freeze", p.stderr).group(1))
    print(f"{converted} chunks allocated between the prepared table and the freeze")
    assert converted > 0, p.stderr
    raw = _seeded(lab)
    assert raw["notes"]["frozen_seconds"] < 30
    assert sc.writer_files(lab.mnt) == list(range(finished)), "no write was lost"
    _copy("/dev/mapper/cp-snap", copy)  # the checkpoint view, now
    rec = sc.load_record(lab.state, "cp")

    sc.churn(lab.mnt)
    lab.fiesnap("extend", "cp", "--by", "8M")
    sc.churn(lab.mnt, seed=3)
    lab.umount()
    lab.fiesnap("deactivate", "cp")
    lab.fiesnap("activate", "cp")
    assert lab.status("cp")["state"] == "active"
    lab.fiesnap("merge", "cp", "--keep-store")
    _assert_exact(lab, kind, copy, rec, tmp_path, managed=True)


def test_new_files_cost_only_the_overwritten_live_data(lab, scratch_disks, tmp_path):
    """100 MiB of new files and a 10 MiB overwrite of checkpoint data on a 512 MiB ext4: the
    store holds at most 1.1x the live bytes that changed, plus its metadata."""
    (copy,) = scratch_disks(1)
    sc.make_fs(lab.disk, "ext4-4k")
    lab.mount(lab.disk)
    with open(f"{lab.mnt}/old.bin", "wb") as f:
        f.write(os.urandom(12 * MiB))
    lab.umount()
    lab.fiesnap("start", lab.disk, "--size", "48M", "--name", "cp", "--free-aware")
    _copy(lab.disk, copy)
    raw = _seeded(lab)
    lab.mount("/dev/mapper/cp")
    os.makedirs(f"{lab.mnt}/new")
    for i in range(10):
        with open(f"{lab.mnt}/new/n{i}", "wb") as f:
            f.write(os.urandom(10 * MiB))
    fd = os.open(f"{lab.mnt}/old.bin", os.O_WRONLY)
    os.pwrite(fd, os.urandom(10 * MiB), MiB)
    os.fsync(fd)
    os.close(fd)
    os.sync()
    used = lab.status("cp")["used_bytes"]
    lab.umount()
    live = _free_at_checkpoint(copy, "ext4-4k", tmp_path)
    changed = _differing_chunks(lab.disk, copy, live | _store_chunks(sc.load_record(lab.state, "cp")))
    out = json.loads(lab.fiesnap("merge", "cp", "--keep-store", "--json").stdout)
    epa = CHUNK // 16
    metadata = (1 + raw["seeded_areas"] + out["chunks"] // epa + 1) * CHUNK
    data = used - metadata
    print(f"store used {used} = data {data} + metadata {metadata}; live bytes changed {len(changed) * CHUNK}; "
          f"seeded {raw['seeded_chunks'] * CHUNK}")
    assert len(changed) * CHUNK >= 10 * MiB, "the overwrite changed 10 MiB of live data"
    assert data <= 1.1 * len(changed) * CHUNK, (data, len(changed) * CHUNK)
    assert used < 40 * MiB, "100 MiB of new files were not copied"


def test_a_forged_seeded_entry_is_refused_by_activate_and_merge(lab):
    """A seeded entry for a chunk live at the checkpoint: loaded, the kernel would never save
    that chunk; merged, the merge would skip it. activate refuses to load it and merge to use
    it (exit 8); neither writes anything."""
    sc.make_fs(lab.disk, "ext4-4k")
    lab.mount(lab.disk)
    sc.populate(lab.mnt)
    lab.umount()
    lab.fiesnap("start", lab.disk, "--size", "24M", "--name", "cp", "--free-aware")
    sc.churn_through(lab)
    lab.fiesnap("deactivate", "cp")
    raw = _seeded(lab)
    area0 = raw["cow_table"]["segments"][0]["phys_start"] * CHUNK + CHUNK  # COW chunk 1, on disk
    entries = bytearray(read_direct(lab.disk, area0, CHUNK))
    old, new = struct.unpack_from("<QQ", entries, 0)
    assert old > 0 and new > 0, "area 0 opens with a seeded entry"
    struct.pack_into("<QQ", entries, 0, 0, new)  # chunk 0 (the superblock) was live
    write_direct(lab.disk, area0, bytes(entries))
    image = device_digest(lab.disk)
    p = lab.fiesnap("activate", "cp", check=False)
    assert p.returncode == 8, p.stderr
    assert "seeded entry" in p.stderr and "never save" in p.stderr, p.stderr
    assert not [n for n in os.listdir("/dev/mapper") if n == "cp" or n.startswith("cp-")]
    p = lab.fiesnap("merge", "cp", check=False)
    assert p.returncode == 8, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert "seeded entry" in last and "free-space map" in last, p.stderr
    assert device_digest(lab.disk) == image, "a refused merge wrote to the device"
    assert sc.load_record(lab.state, "cp").raw["phase"] == "active"
