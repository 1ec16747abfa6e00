#!/usr/bin/env python3
"""Benchmark: space and time of dm-bow's backup-on-write (bow_compat's model) against
fiesnap (the real dm-snapshot), for one update-like workload on the same starting image.

    .venv/bin/python -m tests.lab script benchmarks/bow_bench.py --disks 3 --disk-size 1G --timeout 1500
    ... -- --fs-mib 256 --seed 7                        (defaults)

Setup: ext4 (4 KiB blocks) of FS_MIB on disk 1, filled with a deterministic tree (~45% full);
its image is saved as base.img on a work filesystem (disk 3).

The workload (deterministic, same seed every time): an update. Replace a third of the big files
with new versions (written first, then the old ones deleted), rewrite parts of others in place,
append to logs, update a sqlite database, unpack many small files; ~40 MiB
written. One `sync` at the end.

Peer A, dm-bow (bow_compat): the workload runs once on the base image through dm-log-writes
(bow_compat.capture: mount, fstrim, mark checkpoint while frozen, workload). The trace is then
  - replayed into a file by `bow_compat.replay` (space: backup bytes, log bytes, copy I/O; the
    replay's CPU time is the model's, reported but not compared);
  - replayed onto disk 1 (after restoring base.img) through the dm-bow model with a barrier
    after every backup and log write as dm-bow makes them (`sync_each_step`), timed; and the same
    trace replayed onto disk 1 plainly (writes, a barrier at every FLUSH/FUA) as its baseline.
    Reported: bow time / plain time.
Peer B, fiesnap, in both store modes: base.img back on disk 1, `fiesnap start --plain` (offline,
the store file in the filesystem), mount /dev/mapper/NAME, the same workload, sync, timed; then
the same from base.img again with `fiesnap start --free-aware` (one pre-written exception per
chunk free at the checkpoint, fiesnap/model/seeding.py: writes into free space copy nothing);
baseline: the same workload on the plain mount. Reported per mode: fiesnap time / plain time and
what the store really uses (`status --json`: `used_bytes` = backed bytes in use: header,
metadata areas, including a free-aware store's seeded areas, and saved chunks; also
`metadata_bytes`, `seeded_bytes`, `store_bytes`, and the record's seeded areas/chunks). fiesnap
cannot replay the trace itself: its store file sits in the filesystem's free space, where the
trace writes its new files; so peer B runs the same workload live instead (its allocations
differ only by the store file). As a cross-check the trace also gives the COW dm-snapshot would
need for it: plain, every distinct 4 KiB chunk written after the mark, plus one metadata chunk
per 256 exceptions and the header; free-aware, only those chunks that were not free at the
checkpoint (the base image's GETFSMAP free map), plus their metadata and the header (the
seeded areas not counted: the model has no store file and seeds no table).

A/B: space = fiesnap used / dm-bow backup bytes (per mode); time = (fiesnap / its plain) /
(bow / its plain). The project's goal for the free-aware store: <= 1.1x dm-bow's backup bytes.
Absolute times are qemu TCG times (benchmarks/README.md); only the ratios carry over.
Results: $FIESNAP_LAB_RESULTS/bow_bench.json and bow_bench.txt.
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import time

from common import MiB, Fiesnap, log, machine, sh, timed, trace_chunks, write_results  # noqa: E402 (sets sys.path)

from fiesnap.kernel.fsmap import free_space
from fiesnap.model.extents import free_chunks

from bow_compat.capture import capture
from bow_compat.image import FileImage, copy_prefix
from bow_compat.logwrites import read_log
from bow_compat.model import BowDevice
from bow_compat.replay import replay, replay_entries

NAME = "bb"
WORK = "/tmp/bow-bench-work"
MNT = "/tmp/bow-bench-mnt"
STATE = "/tmp/bow-bench-state"
BLOCK = 4096


def populate(root: str, fs_bytes: int, seed: int) -> None:
    """~45% of the filesystem: big files, medium files, a database, logs."""
    rnd = random.Random(seed)
    os.makedirs(f"{root}/app/lib", exist_ok=True)
    os.makedirs(f"{root}/var/log", exist_ok=True)
    big = fs_bytes * 30 // 100 // 12
    for i in range(12):
        with open(f"{root}/app/big{i:02d}.bin", "wb") as f:
            f.write(rnd.randbytes(big))
    for i in range(200):
        with open(f"{root}/app/lib/mod{i:03d}.so", "wb") as f:
            f.write(rnd.randbytes(rnd.randint(8, 200) * 1024))
    for i in range(4):
        with open(f"{root}/var/log/app{i}.log", "wb") as f:
            f.write(rnd.randbytes(256 * 1024))
    db = sqlite3.connect(f"{root}/var/app.db")
    db.execute("create table t (k integer primary key, v text)")
    db.executemany("insert into t values (?, ?)", [(i, f"row {i} " * 30) for i in range(20000)])
    db.commit()
    db.close()
    os.sync()


def workload(root: str, seed: int) -> None:
    """An update: new versions of a third of the big files, in-place patches, logs, db, small files."""
    rnd = random.Random(seed + 1)
    for i in range(0, 12, 3):
        old = f"{root}/app/big{i:02d}.bin"
        size = os.path.getsize(old)
        with open(old + ".new", "wb") as f:
            f.write(rnd.randbytes(size))
        os.replace(old + ".new", old)
    for i in range(1, 12, 3):  # patch 10% of a file in place, 64 KiB at a time
        path = f"{root}/app/big{i:02d}.bin"
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            for _ in range(size // 10 // (64 * 1024)):
                f.seek(rnd.randrange(0, size - 64 * 1024) // BLOCK * BLOCK)
                f.write(rnd.randbytes(64 * 1024))
    for i in range(0, 200, 4):
        with open(f"{root}/app/lib/mod{i:03d}.so", "wb") as f:
            f.write(rnd.randbytes(rnd.randint(8, 200) * 1024))
    for i in range(4):
        with open(f"{root}/var/log/app{i}.log", "ab") as f:
            for _ in range(64):
                f.write(rnd.randbytes(1000) + b"\n")
                f.flush()
    db = sqlite3.connect(f"{root}/var/app.db")
    for _ in range(20):
        db.executemany("update t set v = ? where k = ?",
                       [(f"new {rnd.random()} " * 20, rnd.randrange(20000)) for _ in range(200)])
        db.commit()
    db.close()
    os.makedirs(f"{root}/app/res", exist_ok=True)
    for i in range(400):
        with open(f"{root}/app/res/r{i:04d}.dat", "wb") as f:
            f.write(rnd.randbytes(rnd.randint(100, 16000)))
    os.sync()


def replay_plain(log_path: str, disk: str, mark: str) -> float:
    """The trace after the mark onto `disk` as it was logged: writes, a barrier at FLUSH/FUA."""
    with read_log(log_path) as trace, FileImage(disk) as img:
        entries = iter(trace.entries())
        for e in entries:  # before the mark: applied, untimed
            if e.is_mark and e.mark == mark:
                break
            if e.is_write:
                img.write(e.offset, e.data)
        img.sync()
        t0 = time.monotonic()
        for e in entries:
            if e.is_flush:
                img.sync()
            if e.is_write:
                img.write(e.offset, e.data)
            if e.is_fua:
                img.sync()
        img.sync()
        return time.monotonic() - t0


def replay_bow_on_disk(log_path: str, disk: str, mark: str) -> tuple[float, dict]:
    """The whole trace through the dm-bow model onto `disk`, barriers as dm-bow makes them;
    the time counts only what comes after the mark (before it dm-bow is a pass-through)."""
    marks: list[float] = []
    with read_log(log_path) as trace, FileImage(disk) as img:
        dev = BowDevice(img, BLOCK, sync_each_step=True)

        def entries():
            for e in trace.entries():
                if e.is_mark and e.mark == mark and not marks:
                    img.sync()
                    marks.append(time.monotonic())
                yield e

        res = replay_entries(entries(), dev, mark=mark)
        img.sync()
        return time.monotonic() - marks[0], res.to_dict()


def cow_model(log_path: str, mark: str, free_at_mark=(), chunk: int = 4096) -> dict:
    """What dm-snapshot would store for the trace: distinct chunks written after the mark,
    + 1 metadata chunk per chunk/16 exceptions + the header chunk. `free_aware`: the same
    for the chunks that were not wholly free at the mark (`free_at_mark`: byte ranges), the
    ones a free-aware store copies (its seeded areas not counted)."""
    chunks = trace_chunks(log_path, mark, chunk)
    per_meta = chunk // 16

    def size(n: int) -> int:
        return (n + -(-n // per_meta) + 1) * chunk

    free = free_chunks(free_at_mark, chunk)
    live = sum(1 for c in chunks if c not in free)
    return {"exceptions": len(chunks), "bytes": size(len(chunks)),
            "free_aware": {"exceptions": live, "bytes": size(live),
                           "written_into_free_chunks": len(chunks) - live,
                           "free_chunks_at_mark": len(free)}}


def fiesnap_peer(fs: Fiesnap, data: str, base: str, fs_bytes: int, seed: int, mode: str) -> dict:
    """base.img onto `data`, an offline `fiesnap start --MODE`, the workload on the live
    checkpoint, timed; the store's figures from `status --json` and the record; commit."""
    copy_prefix(base, data, fs_bytes)
    store = fs_bytes // 4  # room for every chunk the workload writes (it is not the subject here)
    fs("start", data, "--size", str(store), "--name", NAME, f"--{mode}")
    start_s = fs.calls[-1][1]
    rec = fs.record(NAME)
    st0 = fs.status(NAME)
    sh("mount", f"/dev/mapper/{NAME}", MNT)
    t = timed(lambda: workload(MNT, seed))
    sh("umount", MNT)
    st = fs.status(NAME)
    fs("commit", NAME)
    cow_lines = len(rec["cow_table"]["segments"])
    return {
        "mode": mode, "status_at_start": st0, "status": st, "store_bytes_asked": store,
        "workload_s": round(t, 2), "start_cli_s": round(start_s, 2),
        "seeded_areas": rec.get("seeded_areas", 0), "seeded_chunks": rec.get("seeded_chunks", 0),
        "chunk_bytes": rec["chunk_bytes"], "cow_segments": cow_lines,
        "seeded_area_bytes": rec.get("seeded_areas", 0) * rec["chunk_bytes"],
        "store_extents": len(rec["store_extents"]),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fs-mib", type=int, default=256, help="size of the traced filesystem")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    if os.geteuid() != 0 or os.environ.get("FIESNAP_LAB") != "1":
        raise SystemExit("run this in the VM lab (see the docstring): it formats three disks")
    disks = os.environ.get("FIESNAP_LAB_DISKS", "").split()
    if len(disks) < 3:
        raise SystemExit("needs three scratch disks: give the lab --disks 3 --disk-size 1G")
    data, logdev, workdisk = disks[:3]
    results = os.environ.get("FIESNAP_LAB_RESULTS", "/tmp")
    fs_bytes = args.fs_mib * MiB
    mark = "checkpoint"
    for d in (WORK, MNT):
        os.makedirs(d, exist_ok=True)
    sh("mkfs.ext4", "-F", "-q", workdisk)
    sh("mount", workdisk, WORK)
    base, out = f"{WORK}/base.img", f"{WORK}/out.img"

    log(f"ext4 of {args.fs_mib} MiB on {data}, deterministic tree (seed {args.seed})")
    sh("mkfs.ext4", "-F", "-q", "-b", str(BLOCK), "-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard",
       data, str(fs_bytes // BLOCK))
    sh("mount", data, MNT)
    populate(MNT, fs_bytes, args.seed)
    sv = os.statvfs(MNT)
    used_at_checkpoint = (sv.f_blocks - sv.f_bfree) * sv.f_frsize
    sh("umount", MNT)
    copy_prefix(data, base, fs_bytes)

    log("peer A, dm-bow: capture the workload with dm-log-writes")
    t_capture = timed(lambda: capture(data, logdev, MNT, lambda r: workload(r, args.seed),
                                      sectors=fs_bytes // 512, mark=mark))
    t0 = time.monotonic()
    rep = replay(logdev, base, out, mark=mark, block_size=BLOCK).to_dict()
    t_model = time.monotonic() - t0
    log(f"  replay into a file: {t_model:.1f} s; backup {rep['backup_bytes'] // 1024} KiB, "
        f"log writes {rep['log_bytes'] // 1024} KiB in {rep['log_sectors']} log sectors")
    copy_prefix(base, data, fs_bytes)
    sh("mount", "-o", "ro", data, MNT)
    free_at_mark = free_space(MNT)  # the checkpoint's free map (base.img = the image at the mark)
    sh("umount", MNT)
    cow = cow_model(logdev, mark, free_at_mark)
    t_plain_trace = replay_plain(logdev, data, mark)
    copy_prefix(base, data, fs_bytes)
    t_bow, rep_disk = replay_bow_on_disk(logdev, data, mark)
    log(f"  on disk: plain trace {t_plain_trace:.1f} s, through dm-bow {t_bow:.1f} s")

    log("peer B, fiesnap: the same workload on a live checkpoint (plain and free-aware store), "
        "and on the plain mount")
    copy_prefix(base, data, fs_bytes)
    sh("mount", data, MNT)
    t_plain_fs = timed(lambda: workload(MNT, args.seed))
    sh("umount", MNT)
    # fiesnap refuses a state folder that group or others can read (common.Fiesnap makes it 0755)
    os.makedirs(STATE, mode=0o700, exist_ok=True)
    os.chmod(STATE, 0o700)
    fs = Fiesnap(STATE)
    peers = {}
    for mode in ("plain", "free-aware"):
        p = fiesnap_peer(fs, data, base, fs_bytes, args.seed, mode)
        peers[mode] = p
        st = p["status"]
        log(f"  {mode}: under fiesnap {p['workload_s']:.1f} s (plain mount {t_plain_fs:.1f} s); store used "
            f"{st['used_bytes'] // 1024} KiB, metadata {st['metadata_bytes'] // 1024} KiB, seeded "
            f"{(st['seeded_bytes'] or 0) // MiB} MiB in {p['seeded_areas']} areas ({st['state']})")
    sh("umount", WORK)

    bow_space = rep["backup_bytes"]
    bow_over = t_bow / t_plain_trace

    def ratios(p: dict) -> dict:
        used = p["status"]["used_bytes"]
        over = p["workload_s"] / t_plain_fs
        return {"space_over_bow_backup": round(used / bow_space, 3) if bow_space else None,
                "time_overhead": round(over, 3), "time_ratio_over_bow": round(over / bow_over, 3)}

    for p in peers.values():
        p.update(ratios(p))
    plain, fa = peers["plain"], peers["free-aware"]
    goal = 1.1
    fa_ratio = fa["space_over_bow_backup"]
    data_out = {
        "machine": machine(),
        "args": vars(args),
        "fs_bytes": fs_bytes,
        "used_at_checkpoint": used_at_checkpoint,
        "free_at_checkpoint_bytes": sum(n for _, n in free_at_mark),
        "bow": {"replay": rep, "replay_on_disk": rep_disk, "model_cpu_s": round(t_model, 2),
                "capture_s": round(t_capture, 2), "trace_plain_s": round(t_plain_trace, 2),
                "trace_bow_s": round(t_bow, 2)},
        "fiesnap": {"plain": plain, "free_aware": fa, "workload_plain_s": round(t_plain_fs, 2),
                    "calls": fs.calls},
        "dm_snapshot_cow_from_trace": cow,
        "space_ratio_fiesnap_over_bow": plain["space_over_bow_backup"],
        "space_ratio_free_aware_over_bow": fa_ratio,
        "free_aware_goal": {"max_ratio": goal, "met": (fa_ratio is not None and fa_ratio <= goal)},
        "time_ratio_fiesnap_over_bow": plain["time_ratio_over_bow"],
        "time_ratio_free_aware_over_bow": fa["time_ratio_over_bow"],
    }

    def mib(b: int | None) -> str:
        return "-" if b is None else f"{b / MiB:.1f}"

    summary = [
        f"bow_bench: ext4 {args.fs_mib} MiB, {used_at_checkpoint // MiB} MiB used at the checkpoint; "
        f"workload wrote {rep['data_bytes'] // MiB} MiB after the mark",
        f"dm-bow: backed up {mib(bow_space)} MiB (+ {rep['log_sectors']} log sector(s) of {BLOCK // 1024} KiB; "
        f"{mib(rep['log_bytes'])} MiB of log writes); copy I/O {mib(rep['copy_io_bytes'])} MiB; "
        f"time x{bow_over:.2f} ({t_bow:.1f} s vs plain trace {t_plain_trace:.1f} s); "
        f"CPU model replay {t_model:.1f} s (not compared)",
        "",
        "| store | used MiB | of which metadata | seeded MiB (areas) | trace model MiB | / dm-bow backup | "
        "time vs plain mount | overhead / dm-bow's |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, p, model in (("fiesnap --plain", plain, cow["bytes"]),
                            ("fiesnap --free-aware", fa, cow["free_aware"]["bytes"])):
        st = p["status"]
        summary.append(
            f"| {label} | {mib(st['used_bytes'])} | {mib(st['metadata_bytes'])} | "
            f"{mib(st['seeded_bytes']) if st['seeded_bytes'] is not None else '-'} ({p['seeded_areas']}) | "
            f"{mib(model)} | {p['space_over_bow_backup']:.2f} | "
            f"{p['workload_s']:.1f} s vs {t_plain_fs:.1f} s (x{p['time_overhead']:.2f}) | {p['time_ratio_over_bow']:.2f} |")
    summary += [
        "",
        f"free-aware store / dm-bow backup bytes = {fa_ratio:.2f} (goal <= {goal}: "
        f"{'met' if data_out['free_aware_goal']['met'] else 'NOT met'})" if fa_ratio is not None
        else "dm-bow backed up nothing: no ratio",
    ]
    write_results(results, "bow_bench", data_out, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
