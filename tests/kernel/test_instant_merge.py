"""Instant rollback on a real kernel: `merge --instant` hands the store to snapshot-merge.

The device shows the checkpoint at once and is mounted while the kernel merges; `merge` run
again waits and finishes. Byte level: with the filesystem only read during the merge, the
device ends equal to its checkpoint image (outside the store file and, for a free-aware store,
the chunks that were free at the checkpoint). With files written during the merge: fsck clean,
those files as written, every other checkpoint file unchanged. A grown store is refused.
"""

from __future__ import annotations

import json
import os

import pytest

from . import scenario as sc
from .helpers import MiB, device_digest, differing_mib, dm_status, fsck_clean, make_fs, sh, tree_digest

RO = {"ext4-4k": "ro,noload", "xfs": "ro,norecovery"}


def _instant(lab, name="cp") -> dict:
    out = json.loads(lab.fiesnap("merge", name, "--instant", "--json").stdout)
    assert out["result"] == "merging" and out["entries"] > 0, out
    return out


def _merge_left(name="cp") -> int:
    """Entries the kernel has still to merge, from `dmsetup status` (allocated - metadata)."""
    _start, _len, target, ratio, meta = dm_status(name).split()
    assert target == "snapshot-merge"
    return (int(ratio.split("/")[0]) - int(meta)) // 8


def _prepare(lab, kind, store=None):
    """As scenario.prepare, with the scatter file in the checkpoint."""
    make_fs(lab.disk, kind)
    lab.mount(lab.disk)
    sc.populate(lab.mnt)
    sc.add_scatter_file(lab.mnt)
    before = tree_digest(lab.mnt)
    lab.umount()
    lab.fiesnap("start", lab.disk, "--size", "48M", "--name", "cp", *([store] if store else []))
    rec = sc.load_record(lab.state, "cp")
    return before, rec, device_digest(lab.disk, rec.outside_checkpoint)


def _churn(lab) -> None:
    """The usual churn, then one chunk in two of the scatter file: thousands of one-chunk runs
    for the kernel to merge, one table commit each, so that it is still merging when we look."""
    sc.churn_through(lab)
    lab.mount("/dev/mapper/cp")
    sc.scatter(lab.mnt)
    lab.umount()


@pytest.mark.parametrize("kind", ["ext4-4k", "xfs"])
@pytest.mark.parametrize("store", sc.BOTH_STORES)
def test_instant_rollback_reads_the_checkpoint_at_once_and_ends_exact(lab, kind, store):
    before, rec, image = _prepare(lab, kind, store=store)
    _churn(lab)
    out = _instant(lab)
    left = _merge_left()
    assert left > 0, "the kernel finished before anything could read: the test proves nothing"
    lab.mount("/dev/mapper/cp", ro=RO[kind])
    assert tree_digest(lab.mnt) == before, "the merging device does not show the checkpoint"
    print(f"read the whole checkpoint while {left} of {out['entries']} entries were left to merge; "
          f"{_merge_left()} left after")
    lab.umount()
    st = lab.status("cp")
    assert st["phase"] == "kernel-merging" and st["kernel_merge"]["entries"] == out["entries"], st
    assert not os.path.exists("/dev/mapper/cp-snap")
    assert sh("dmsetup", "table", "cp").stdout.split()[2] == "snapshot-merge"
    done = json.loads(lab.fiesnap("merge", "cp", "--keep-store", "--json").stdout)
    assert done["result"] == "finished", done
    assert differing_mib(device_digest(lab.disk, rec.outside_checkpoint), image) == []
    ok, log = fsck_clean(lab.disk, kind)
    assert ok, log
    assert not os.path.exists("/dev/mapper/cp") and not os.path.exists("/dev/mapper/cp-cow")
    assert json.loads(lab.fiesnap("status", "--json").stdout)["checkpoints"] == []


@pytest.mark.parametrize("kind", ["ext4-4k", "xfs"])
def test_files_written_during_the_kernel_merge_are_kept(lab, kind):
    before, rec, _ = _prepare(lab, kind)
    _churn(lab)
    _instant(lab)
    lab.mount("/dev/mapper/cp")
    assert _merge_left() > 0
    assert tree_digest(lab.mnt) == before
    written = {}
    for i in range(8):  # new files, into space that was free at the checkpoint
        data = os.urandom(MiB + 4099 * i)
        with open(f"{lab.mnt}/during-merge-{i}.bin", "wb") as f:
            f.write(data)
        written[f"during-merge-{i}.bin"] = data
    with open(f"{lab.mnt}/data/big0.bin", "r+b") as f:  # and over checkpoint data not merged yet
        f.seek(5000)
        f.write(b"written while the kernel merged")
    os.sync()
    # finishing with the filesystem mounted: NAME becomes the pass-through under it
    lab.fiesnap("merge", "cp")
    assert "linear" in sh("dmsetup", "table", "cp").stdout
    lab.umount()
    lab.fiesnap("commit", "cp")  # the record is a pass-through; commit removes the unmounted device
    ok, log = fsck_clean(lab.disk, kind)
    assert ok, log
    # read back from the disk, not the page cache: a write the merge lost would show only here
    lab.mount(lab.disk, ro=True)
    for fname, data in written.items():
        with open(f"{lab.mnt}/{fname}", "rb") as f:
            assert f.read() == data, f"{fname}: written during the kernel merge, not on the disk"
    after = tree_digest(lab.mnt)
    lab.umount()
    changed = {"data/big0.bin", *written, "."}
    assert {k: v for k, v in after.items() if k not in changed} == {
        k: v for k, v in before.items() if k not in changed}
    assert after["data/big0.bin"] != before["data/big0.bin"]


def test_a_grown_store_is_refused_and_left_as_it_was(lab):
    before, rec, image = sc.prepare(lab, "ext4-4k", size="16M")
    lab.fiesnap("extend", "cp", "--by", "16M")
    sc.churn_through(lab)
    p = lab.fiesnap("merge", "cp", "--instant", check=False)
    assert p.returncode == 7 and "grew after the checkpoint" in p.stderr, (p.returncode, p.stderr)
    assert "'fiesnap merge cp' rolls it back offline" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    st = lab.status("cp")
    assert st["phase"] == "active" and st["state"] == "active", st
    assert os.path.exists("/dev/mapper/cp-snap")
    grown = sc.load_record(lab.state, "cp")
    lab.fiesnap("merge", "cp", "--keep-store")
    assert differing_mib(device_digest(lab.disk, grown.outside_checkpoint), image) == []
