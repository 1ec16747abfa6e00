"""Real-kernel tests for `fiesnap extend`: online growth of a live store, and the
freed-then-reused trap (blocks live at the checkpoint, freed later, handed to the store file)."""

from __future__ import annotations

import errno
import json
import mmap
import os
import subprocess
import sys
import time

import pytest

from . import scenario as sc
from .helpers import MiB, device_digest, differing_mib, sh, tree_digest


def _o_direct_overwrite(path: str, nbytes: int, seed: int = 7) -> None:
    """Overwrite the first nbytes of a file in place, 1 MiB O_DIRECT writes (forces COW)."""
    import random
    rnd = random.Random(seed)
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, MiB)
    try:
        for off in range(0, nbytes, MiB):
            buf[:] = rnd.randbytes(MiB)
            os.pwrite(fd, buf, off)
    finally:
        buf.close()
        os.close(fd)


def _write_file(path: str, nbytes: int) -> None:
    with open(path, "wb") as f:
        for _ in range(nbytes // MiB):
            f.write(os.urandom(MiB))
        f.flush()
        os.fsync(f.fileno())


def _store_blocks(first: sc.Record, last: sc.Record) -> list[tuple[int, int]]:
    """What a rollback may leave different: the store file as it was at the checkpoint, and
    every chunk the grown store maps. Blocks the grown file holds but never mapped (skipped)
    are NOT excluded: they must come back with their checkpoint data."""
    chunk = last.raw["chunk_bytes"]
    mapped = [(s["phys_start"] * chunk, s["count"] * chunk)
              for s in last.raw["cow_table"]["segments"] if s.get("kind", "linear") == "linear"]
    return first.outside_checkpoint + mapped


def _rollback_is_exact(lab, first: sc.Record, before: dict, kind: str) -> None:
    """Merge (unmounted) and check: device = checkpoint view outside the store's blocks, fsck
    clean, every file as at the checkpoint."""
    skip = _store_blocks(first, sc.load_record(lab.state, "cp"))
    checkpoint = device_digest("/dev/mapper/cp-snap", skip)  # the checkpoint view
    lab.fiesnap("merge", "cp", "--keep-store")
    assert differing_mib(device_digest(lab.disk, skip), checkpoint) == []
    sc.assert_fsck_clean(lab, "/dev/mapper/cp", kind)
    lab.mount("/dev/mapper/cp", ro=True)
    assert tree_digest(lab.mnt) == before
    lab.umount()


def _avail(path: str) -> int:
    sv = os.statvfs(path)
    return sv.f_bavail * sv.f_frsize


def test_extend_grows_a_live_store_and_rollback_stays_exact(lab):
    sc.online_setup(lab, "ext4-4k")
    before = tree_digest(lab.mnt)
    lab.fiesnap("start", "cp", "--size", "8M")
    first = sc.load_record(lab.state, "cp")
    small = lab.status("cp")["store_bytes"]
    out = json.loads(lab.fiesnap("extend", "cp", "--by", "40M", "--json").stdout)
    assert out["store_bytes_before"] == small and out["store_bytes_after"] > small + 30 * MiB, out
    st = lab.status("cp")
    assert st["store_bytes"] == out["store_bytes_after"] and st["state"] == "active"
    assert sc.load_record(lab.state, "cp").raw["generation"] == 2
    sc.churn(lab.mnt)  # ~12 MiB of COW: more than the first 8 MiB store holds
    st = lab.status("cp")
    assert st["state"] == "active" and st["used_bytes"] > small, st
    lab.umount()

    # The grown store survives a deactivate/activate (identity block rewritten, generation 2).
    lab.fiesnap("deactivate", "cp")
    lab.fiesnap("activate", "cp")
    assert lab.status("cp")["used_bytes"] == st["used_bytes"]

    _rollback_is_exact(lab, first, before, "ext4-4k")


@pytest.mark.parametrize("store", sc.BOTH_STORES)
def test_extend_skips_blocks_freed_since_the_checkpoint(lab, store):
    """Freed-then-reused blocks. A file live at the checkpoint is deleted and the blocks that were free at the
    checkpoint are plugged (fallocate: no data, no COW), so growing the store must take the
    deleted file's blocks. Their checkpoint data was never saved (a delete writes no data):
    mapped into the store and written, the rollback would restore garbage there. extend must
    skip them; the store then fills to 80% of what it offers, so every mapped chunk matters."""
    sc.online_setup(lab, "ext4-4k")
    sh("fallocate", "-l", str(_avail(lab.mnt) - 120 * MiB), f"{lab.mnt}/filler")
    _write_file(f"{lab.mnt}/victim.bin", 48 * MiB)  # live at the checkpoint, deleted after
    _write_file(f"{lab.mnt}/rewrite.bin", 40 * MiB)  # overwritten after: forces COW
    os.sync()
    before = tree_digest(lab.mnt)
    lab.fiesnap("start", "cp", "--size", "8M", store)
    first = sc.load_record(lab.state, "cp")

    sh("fallocate", "-l", str(_avail(lab.mnt) - 10 * MiB), f"{lab.mnt}/plug")
    os.unlink(f"{lab.mnt}/victim.bin")
    os.sync()
    p = lab.fiesnap("extend", "cp", "--by", "40M", "--json", check=False)
    out = json.loads(p.stdout)
    # exit 7 when every new chunk was unsafe: the file grew, the store could not
    assert p.returncode == (0 if out["added_chunks"] else 7), (p.returncode, p.stderr)
    assert out["skipped_live_at_checkpoint"] * 4096 > 24 * MiB, f"precondition: the store got freed blocks: {out}"
    assert out["store_bytes_after"] == out["store_bytes_before"] + out["added_chunks"] * 4096

    _o_direct_overwrite(f"{lab.mnt}/rewrite.bin", min(40 * MiB, int(out["store_bytes_after"] * 0.8) // MiB * MiB))
    st = lab.status("cp")
    assert st["state"] == "active" and st["used_bytes"] > out["store_bytes_after"] // 2, st
    lab.umount()
    _rollback_is_exact(lab, first, before, "ext4-4k")


def _plug_all_free_space(mnt: str) -> None:
    """Allocate (fallocate: no data written, no COW) every free block of an ext4 mount,
    ext4's own reserve of free clusters included, so the next allocation can only get blocks
    freed after this point."""
    dev = os.stat(mnt).st_dev
    name = os.path.basename(os.readlink(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"))
    with open(f"/sys/fs/ext4/{name}/reserved_clusters", "w") as f:
        f.write("0")
    fd = os.open(f"{mnt}/plug", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        off, size = 0, 64 * MiB
        while size >= 4096:
            try:
                os.posix_fallocate(fd, off, size)
                off += size
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                size //= 2
    finally:
        os.close(fd)
    os.sync()
    sv = os.statvfs(mnt)
    assert sv.f_bfree * sv.f_frsize <= MiB, f"precondition: free space left after the plug: {sv}"


def _store_file_bytes(lab) -> int:
    return sc.load_record(lab.state, "cp").raw["store_file_bytes"]


def test_extend_and_monitor_back_off_when_no_new_chunk_is_safe(lab, tmp_path):
    """Every free block the filesystem can hand the store file was in use at the checkpoint
    (a deleted checkpoint-time file; the rest is plugged): extend maps nothing and says so
    with exit 7; the monitor says it once at error level (exit 1 with --once) and then stops
    allocating instead of eating the free space at every poll; the rollback stays exact, the
    blocks the store file holds unmapped included."""
    sc.online_setup(lab, "ext4-4k")
    sh("tune2fs", "-m", "0", "/dev/mapper/cp")
    _write_file(f"{lab.mnt}/victim.bin", 40 * MiB)  # live at the checkpoint, deleted after
    _write_file(f"{lab.mnt}/rewrite.bin", 2 * MiB)
    os.sync()
    before = tree_digest(lab.mnt)
    lab.fiesnap("start", "cp", "--size", "8M")
    first = sc.load_record(lab.state, "cp")
    _o_direct_overwrite(f"{lab.mnt}/rewrite.bin", 2 * MiB)  # ~25% of the store used
    _plug_all_free_space(lab.mnt)
    os.unlink(f"{lab.mnt}/victim.bin")
    os.sync()
    store = lab.status("cp")["store_bytes"]

    p = lab.fiesnap("extend", "cp", "--by", "8M", "--json", check=False)
    assert p.returncode == 7, (p.returncode, p.stdout, p.stderr)
    out = json.loads(p.stdout)
    assert (out["store_bytes_added"], out["added_chunks"], out["file_bytes_added"]) == (0, 0, 8 * MiB), out
    assert out["store_bytes_after"] == out["store_bytes_before"] == store, out
    assert out["skipped_live_at_checkpoint"] == 8 * MiB // 4096, out
    assert p.stderr.count("\n") == 1 and "cannot grow safely" in p.stderr, p.stderr
    assert "2048 were in use at the checkpoint" in p.stderr, p.stderr

    mon = ["monitor", "cp", "--threshold", "10", "--step", "4M"]
    p = lab.fiesnap(*mon, "--once", check=False)
    assert p.returncode == 1, (p.returncode, p.stderr)
    errors = [ln for ln in p.stderr.splitlines() if ": error: " in ln]
    assert len(errors) == 1 and "cannot grow safely" in errors[0], p.stderr
    assert _store_file_bytes(lab) == out["file_bytes_after"] + 4 * MiB

    logpath = tmp_path / "monitor.log"
    with open(logpath, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "fiesnap", *mon, "--interval", "1", "--verbose"],
                                stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, FIESNAP_STATE_DIR=lab.state))
        try:
            deadline = time.monotonic() + 90
            grown_once = None
            while logpath.read_text().count("not growing: the last extension mapped nothing") < 3:
                if grown_once is None and "cannot grow safely" in logpath.read_text():
                    grown_once = _store_file_bytes(lab)
                assert proc.poll() is None and time.monotonic() < deadline, logpath.read_text()
                time.sleep(0.2)
            file_after_polls = _store_file_bytes(lab)
        finally:
            proc.terminate()
            rc = proc.wait(timeout=60)
    mlog = logpath.read_text()
    print(mlog)
    assert rc == 0, mlog
    errors = [ln for ln in mlog.splitlines() if ": error: " in ln]
    assert len(errors) == 1 and "cannot grow safely" in errors[0], mlog
    assert "grew the store" not in mlog, mlog
    assert grown_once == file_after_polls == out["file_bytes_after"] + 8 * MiB, (grown_once, file_after_polls)
    st = lab.status("cp")
    assert st["state"] == "active" and st["store_bytes"] == store, st
    lab.umount()
    _rollback_is_exact(lab, first, before, "ext4-4k")


_UNSAFE_EXTEND = """
import sys
import fiesnap.commands.extend as ext
real = ext.plan_extension
def without_exception_rule(grown, chunk_bytes, *, free_at_checkpoint, excepted, mapped):
    grown = list(grown)
    honest = real(grown, chunk_bytes, free_at_checkpoint=free_at_checkpoint, excepted=excepted, mapped=mapped)
    print("EXCEPTED", honest.excepted, file=sys.stderr)
    return real(grown, chunk_bytes, free_at_checkpoint=free_at_checkpoint, excepted=ext.chunk_set(()), mapped=mapped)
ext.plan_extension = without_exception_rule
from fiesnap.cli import main
sys.argv = ["fiesnap", *sys.argv[1:]]
main()
"""


def test_merge_refuses_a_store_grown_over_saved_chunks(lab):
    """Merge planning for grown stores: a chunk written after the checkpoint (so it has
    an exception: its checkpoint data sits in the store) and freed again must never join the
    store, or the merge would copy the saved data back over store chunks. extend skips such
    chunks; here that rule is switched off in-process (the only way to get there), and the
    merge must refuse with a clear error and write nothing. A plain store: a free-aware one
    saves nothing for chunks free at the checkpoint, so none gets such an exception."""
    sc.online_setup(lab, "ext4-4k")
    sh("tune2fs", "-m", "0", "/dev/mapper/cp")  # no root reserve: the plug below takes it all
    sh("fallocate", "-l", str(_avail(lab.mnt) - 140 * MiB), f"{lab.mnt}/filler")
    _write_file(f"{lab.mnt}/keep.bin", 4 * MiB)
    os.sync()
    lab.fiesnap("start", "cp", "--size", "64M", "--plain")
    _write_file(f"{lab.mnt}/temp.bin", 40 * MiB)  # free at the checkpoint, written now: exceptions
    sh("fallocate", "-l", str(_avail(lab.mnt) - 2 * MiB), f"{lab.mnt}/plug")
    os.unlink(f"{lab.mnt}/temp.bin")
    os.sync()
    p = subprocess.run([sys.executable, "-c", _UNSAFE_EXTEND, "extend", "cp", "--by", "24M", "--json"],
                       capture_output=True, text=True, env=dict(os.environ, FIESNAP_STATE_DIR=lab.state))
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    excepted = int(p.stderr.split("EXCEPTED ")[1].split()[0])
    assert excepted * 4096 > 8 * MiB, f"precondition: the honest rule would skip saved chunks: {p.stderr}"
    assert out["added_chunks"] >= excepted, (out, p.stderr)
    lab.umount()
    before = device_digest(lab.disk, [])
    m = lab.fiesnap("merge", "cp", check=False)
    assert m.returncode == 7, (m.returncode, m.stdout, m.stderr)
    assert "holds the snapshot store itself" in m.stderr and m.stderr.count("\n") == 1, m.stderr
    assert differing_mib(device_digest(lab.disk, []), before) == [], "a refused merge wrote to the device"
    assert sc.load_record(lab.state, "cp").raw["phase"] == "active"


ROUNDS = 20  # x 10 MiB of churn


@pytest.mark.parametrize("kind", ["ext4-4k", "xfs"])
def test_monitor_keeps_a_small_store_from_overflowing(lab, tmp_path, kind):
    """An 8 MiB store, the monitor running, 200 MiB of churn that deletes
    checkpoint-time files and writes new ones into the freed space (then deletes and rewrites
    those too): never overflows, and the rollback is exact."""
    sc.online_setup(lab, kind)
    os.makedirs(f"{lab.mnt}/bulk")
    for i in range(12):
        _write_file(f"{lab.mnt}/bulk/old{i:02d}.bin", 10 * MiB)
    os.sync()
    before = tree_digest(lab.mnt)
    lab.fiesnap("start", "cp", "--size", "8M")
    first = sc.load_record(lab.state, "cp")
    log = open(tmp_path / "monitor.log", "w")
    mon = subprocess.Popen(
        [sys.executable, "-m", "fiesnap", "monitor", "cp", "--interval", "1", "--threshold", "25",
         "--step", "32M", "--verbose"], stdout=log, stderr=subprocess.STDOUT,
        env=dict(os.environ, FIESNAP_STATE_DIR=lab.state))
    try:
        deadline = time.monotonic() + 60
        while "debug" not in open(tmp_path / "monitor.log").read():  # its first poll is done
            assert mon.poll() is None and time.monotonic() < deadline, open(tmp_path / "monitor.log").read()
            time.sleep(0.2)
        for i in range(ROUNDS):  # 10 MiB a round: 12 rounds free checkpoint-time files, then
            if i < 12:           # 8 more free the first rounds' new files
                os.unlink(f"{lab.mnt}/bulk/old{i:02d}.bin")
            else:
                for j in range(5):
                    os.unlink(f"{lab.mnt}/bulk/new{i - 12:02d}-{j}.bin")
            for j in range(5):
                _write_file(f"{lab.mnt}/bulk/new{i:02d}-{j}.bin", 2 * MiB)
                time.sleep(1.0)  # a paced writer (~2 MiB/s); the limits are a benchmark's job
            if i % 5 == 4:  # an overflow is permanent: checking now and then only fails sooner
                st = lab.status("cp")
                if st["state"] != "active":
                    pytest.fail(f"round {i}: {st['state']}\n" + open(tmp_path / "monitor.log").read())
        _o_direct_overwrite(f"{lab.mnt}/bulk/new{ROUNDS - 1:02d}-0.bin", 2 * MiB)
    finally:
        mon.terminate()
        rc = mon.wait(timeout=60)
        log.close()
    mlog = open(tmp_path / "monitor.log").read()
    print(mlog)
    assert rc == 0, mlog
    st = lab.status("cp")
    sv = os.statvfs(lab.mnt)
    print(f"after {ROUNDS * 10} MiB of churn: store {st['store_bytes'] // MiB} MiB, used "
          f"{st['used_bytes'] // MiB} MiB, fs free {sv.f_bavail * sv.f_frsize // MiB} MiB")
    # 120 MiB of new files live at once (a plain store saves all they overwrite; a free-aware
    # one only what was in use at the checkpoint: still more than the 8 MiB it started with)
    floor = 8 * MiB if first.raw.get("seeded_areas") else 120 * MiB
    assert st["state"] == "active" and st["used_bytes"] > floor, st
    assert "grew" in mlog or "grown" in mlog, mlog
    lab.umount()
    _rollback_is_exact(lab, first, before, kind)
