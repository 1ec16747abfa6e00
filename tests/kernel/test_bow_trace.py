"""Real-kernel test: a real ext4 block trace, captured with dm-log-writes the way
Android takes a dm-bow checkpoint (mount, fstrim, mark checkpoint with the filesystem frozen,
workload), replayed through bow_compat's dm-bow model, then rolled back with `bow-compat
restore`: the device must equal its checkpoint image in every block that was not free at the
checkpoint, fsck clean, every file identical."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bow_compat.capture import capture
from bow_compat.image import copy_prefix
from bow_compat.logwrites import read_log

from . import scenario as sc
from .helpers import MiB, sh, tree_digest

FS_BYTES = 128 * MiB  # the traced filesystem: base, checkpoint and replayed images are this big


def _free_at_mark(log_path: str, mark: str, blocks: int, block: int) -> bytearray:
    """1 per block wholly discarded (and not rewritten) before the mark: dm-bow's free space,
    which a rollback does not give back. Block 0 is never free."""
    free = bytearray(blocks)
    with read_log(log_path) as log:
        for e in log.entries(with_data=False):
            if e.is_mark and e.mark == mark:
                break
            if e.is_discard:
                first = -(-e.offset // block)
                for b in range(first, (e.offset + e.length) // block):
                    free[b] = 1
            elif e.is_write:
                for b in range(e.offset // block, -(-(e.offset + e.length) // block)):
                    free[b] = 0
    free[0] = 0
    return free


def _bow(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bow_compat", *map(str, args)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("block", [4096, 1024], ids=["ext4-4k", "ext4-1k"])
def test_bow_replay_and_restore_of_a_real_ext4_trace(scratch_disks, tmp_path, block):
    """dm-bow's block size = the filesystem's; 1 KiB blocks are where the RFC had its
    page-alignment defect."""
    data, logdev, work = scratch_disks(3)
    wdir, mnt = str(tmp_path / "work"), str(tmp_path / "mnt")
    os.makedirs(wdir)
    os.makedirs(mnt)
    sh("mkfs.ext4", "-F", "-q", work)
    sh("mount", work, wdir)
    try:
        sh("mkfs.ext4", "-F", "-q", "-b", str(block), "-E",
           "lazy_itable_init=0,lazy_journal_init=0,nodiscard", data, str(FS_BYTES // block))
        sh("mount", data, mnt)
        sc.populate(mnt)
        sh("umount", mnt)
        sh("mount", "-o", "ro", data, mnt)
        before = tree_digest(mnt)
        sh("umount", mnt)
        base, cp_img, out = f"{wdir}/base.img", f"{wdir}/checkpoint.img", f"{wdir}/out.img"
        copy_prefix(data, base, FS_BYTES)

        def workload(root: str) -> None:
            sc.churn(root)
            with open(f"{root}/after.bin", "wb") as f:  # new data into free space: no backup
                f.write(os.urandom(8 * MiB))

        capture(data, logdev, mnt, workload, sectors=FS_BYTES // 512,
                at_checkpoint=lambda _m: copy_prefix(data, cp_img, FS_BYTES))  # frozen: the exact image

        p = _bow("replay", logdev, "--base", base, "--out", out, "--block-size", block, "--json")
        assert p.returncode == 0, p.stderr
        rep = json.loads(p.stdout)
        print(rep)
        assert rep["enospc"] is None and rep["backup_bytes"] > MiB and rep["log_sectors"] >= 1, rep

        p = _bow("inspect", out, "--json")
        assert p.returncode == 0, p.stderr
        log = json.loads(p.stdout)
        assert log["valid"] and log["entries"] == rep["log_entries"], log

        copy_prefix(out, data, FS_BYTES)  # the device as dm-bow left it: restore it in place
        p = _bow("restore", data, "--json")
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["bytes_copied"] == log["bytes_to_copy"]
        assert _bow("restore", data).returncode == 7  # nothing left to restore

        free = _free_at_mark(logdev, "checkpoint", FS_BYTES // block, block)
        assert sum(free) > (FS_BYTES // block) // 4, "precondition: fstrim reported free space"
        differ = []
        with open(data, "rb") as a, open(cp_img, "rb") as b:
            for blk in range(FS_BYTES // block):
                x, y = a.read(block), b.read(block)
                if x != y and not free[blk]:
                    differ.append(blk)
        assert differ == [], f"{len(differ)} blocks differ from the checkpoint, first {differ[:10]}"

        sh("e2fsck", "-fn", data)
        sh("mount", "-o", "ro", data, mnt)
        try:
            assert tree_digest(mnt) == before
        finally:
            sh("umount", mnt)
    finally:
        subprocess.run(["umount", wdir], capture_output=True)
