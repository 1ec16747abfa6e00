#!/usr/bin/env python3
"""Benchmark: the offline merge against raw copies of the same bytes and against LVM's merge.

    .venv/bin/python -m tests.lab script benchmarks/merge_bench.py --disks 2 --disk-size 2G --timeout 2400
    ... -- --rounds 5 --sequential 96M --random 3000                      (defaults)

The workload, per round and per peer, from the same kind of image: an ext4 of FILES files of
random data, a checkpoint (fiesnap: a plain store, so every overwritten chunk is saved; LVM: a
thick snapshot), then SEQUENTIAL bytes of the files rewritten in 1 MiB O_DIRECT writes and
RANDOM single 4 KiB O_DIRECT writes at random places of the other files; unmounted. Then:

  fiesnap merge   `merge --keep-store`, in-process (no Python start-up; startup_bench has that):
                  the whole command, and its copy phase (table read twice, plan, copy, fsync
                  are the rest)
  raw same runs   the copies of that merge, read from the kept store through a linear device
                  over its extents and written to the same device places (the same bytes again,
                  so the restored filesystem is unchanged), one run at a time with O_DIRECT,
                  one I/O in flight: the plain copy loop, no table, no plan
  fio same runs   the same reads and writes replayed by fio from an I/O log (libaio, 16 in
                  flight, O_DIRECT): the copy pattern at the speed of C; fio writes its own
                  data, so it runs last, onto a filesystem the round then throws away
  raw sequential  as many bytes copied with dd (O_DIRECT, 1 MiB) from the store to free space
                  of the second disk: what the disk does with the same byte count, no pattern
  lvconvert       the same workload on an LVM thick snapshot (second disk), then
                  `lvconvert --merge -i 1` with the origin unmounted: until it returns

The store's used chunks are read once before any peer runs (the lab's disks are files in the
host's page cache: every peer then reads from the same warm cache). Results:
$FIESNAP_LAB_RESULTS/merge_bench.json and merge_bench.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (MiB, aligned_buffer, have_lvm, log, lvm, machine, median, populate_ext4, quiet,  # noqa: E402
                    raw_same_runs, require_lab, sh, store_device, write_results)
from fiesnap.commands import merge as merge_cmd  # noqa: E402
from fiesnap.commands import start as start_cmd  # noqa: E402
from fiesnap.kernel.dm import DeviceMapper  # noqa: E402
from fiesnap.model.record import CheckpointRecord  # noqa: E402
from fiesnap.model.units import parse_size  # noqa: E402
from fiesnap.services.cowio import make_plan, read_table  # noqa: E402
from fiesnap.services.stack import StackNames  # noqa: E402
from fiesnap.services.statedir import StateStore  # noqa: E402

NAME = "mb"
STATE = "/tmp/mb-state"
MNT = "/tmp/mb-mnt"
FILES = 8
FILE_MIB = 48
BLOCK = 4096
VG = "mbvg"


def populate(dev: str) -> None:
    populate_ext4(dev, MNT, FILES, FILE_MIB)


def workload(dev: str, sequential: int, random_writes: int, seed: int) -> None:
    """Rewrite `sequential` bytes of the first files in 1 MiB writes, then `random_writes`
    single 4 KiB blocks of the others, all O_DIRECT (every one reaches the device)."""
    sh("mount", dev, MNT)
    big, small = aligned_buffer(MiB), aligned_buffer(BLOCK)
    left, i = sequential, 0
    while left > 0:
        fd = os.open(f"{MNT}/f{i}.bin", os.O_WRONLY | os.O_DIRECT)
        for off in range(0, FILE_MIB * MiB, MiB):
            if left <= 0:
                break
            os.pwrite(fd, big, off)
            left -= MiB
        os.close(fd)
        i += 1
    rng = random.Random(seed)
    others = list(range(i, FILES))
    fds = {f: os.open(f"{MNT}/f{f}.bin", os.O_WRONLY | os.O_DIRECT) for f in others}
    for _ in range(random_writes):
        os.pwrite(fds[rng.choice(others)], small, rng.randrange(FILE_MIB * MiB // BLOCK) * BLOCK)
    for fd in fds.values():
        os.close(fd)
    sh("umount", MNT)


def fiesnap_round(disk: str, sequential: int, random_writes: int, seed: int) -> tuple[dict, CheckpointRecord, list]:
    populate(disk)
    os.makedirs(STATE, mode=0o700, exist_ok=True)
    os.chmod(STATE, 0o700)
    store = sequential + random_writes * BLOCK + sequential // 8 + 32 * MiB
    start_cmd.start(start_cmd.StartRequest(disk, store, name=NAME, free_aware=False), DeviceMapper,
                    StateStore(STATE), quiet)
    workload(f"/dev/mapper/{NAME}", sequential, random_writes, seed)
    record = StateStore(STATE).load(NAME)
    cow = f"/dev/mapper/{StackNames.for_name(NAME).cow}"
    table = read_table(cow, record)
    ranges = list(make_plan(table, record).byte_ranges(record.device_bytes))
    sh("dd", f"if={cow}", "of=/dev/null", "bs=1M", f"count={table.used_bytes // MiB + 1}", "iflag=direct",
       "status=none")  # warm: every peer reads the store from the same host cache
    t0 = time.monotonic()
    r = merge_cmd.merge(NAME, DeviceMapper, StateStore(STATE), quiet, keep_store=True)
    total = time.monotonic() - t0
    return ({"merge_s": total, "copy_s": r.seconds, "runs": r.runs, "chunks": r.chunks, "bytes": r.bytes_copied},
            record, ranges)


def fio_same_runs(src: str, dst: str, ranges: list, results: str) -> float | None:
    if shutil.which("fio") is None:
        return None
    iolog = os.path.join("/tmp", "mb.iolog")
    with open(iolog, "w") as f:
        f.write(f"fio version 2 iolog\n{src} add\n{dst} add\n{src} open\n{dst} open\n")
        for dest, off, n in sorted(ranges, key=lambda r: r[1]):
            f.write(f"{src} read {off} {n}\n{dst} write {dest} {n}\n")
        f.write(f"{src} close\n{dst} close\n")
    t0 = time.monotonic()
    p = sh("fio", "--name=replay", f"--read_iolog={iolog}", "--ioengine=libaio", "--iodepth=16",
           "--direct=1", "--replay_no_stall=1", "--fsync_on_close=1", "--output-format=json", check=False)
    took = time.monotonic() - t0
    if p.returncode != 0:
        log(f"fio replay failed (skipped): {p.stderr[-500:]}")
        return None
    with open(os.path.join(results, "fio-replay.json"), "w") as f:
        f.write(p.stdout)
    return took


def raw_sequential(src: str, dst: str, nbytes: int) -> float:
    t0 = time.monotonic()
    sh("dd", f"if={src}", f"of={dst}", "bs=1M", f"count={-(-nbytes // MiB)}", "iflag=direct", "oflag=direct",
       "conv=notrunc,fsync", "status=none")
    return time.monotonic() - t0


def lvm_round(disk: str, sequential: int, random_writes: int, seed: int) -> float | None:
    if not have_lvm():
        return None
    sh("wipefs", "-aq", disk)
    lvm("pvcreate", "-qq", "-y", disk)
    lvm("vgcreate", "-qq", VG, disk)
    try:
        fs_mib = FILES * FILE_MIB + 128
        lvm("lvcreate", "-qq", "-y", "-n", "origin", "-L", f"{fs_mib}M", VG)
        origin = f"/dev/{VG}/origin"
        populate(origin)
        cow_mib = (sequential + random_writes * BLOCK) // MiB + sequential // 8 // MiB + 32
        lvm("lvcreate", "-qq", "-y", "-s", "-n", "snap", "-L", f"{cow_mib}M", f"{VG}/origin")
        workload(origin, sequential, random_writes, seed)
        t0 = time.monotonic()
        lvm("lvconvert", "-qq", "--merge", "-i", "1", f"{VG}/snap")
        return time.monotonic() - t0
    finally:
        lvm("vgremove", "-qq", "-f", VG, check=False)
        lvm("pvremove", "-qq", "-y", disk, check=False)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sequential", default="96M")
    ap.add_argument("--random", type=int, default=3000)
    args = ap.parse_args()
    disk, results = require_lab()
    disks = os.environ.get("FIESNAP_LAB_DISKS", "").split()
    second = disks[1] if len(disks) > 1 else None
    sequential = parse_size(args.sequential)
    dm = DeviceMapper()
    rows = []
    for i in range(args.rounds):
        row, record, ranges = fiesnap_round(disk, sequential, args.random, seed=i)
        src = store_device(dm, record, "mb-store")
        try:
            row["raw_same_runs_s"] = raw_same_runs(src, disk, ranges)
            if second:
                row["raw_sequential_s"] = raw_sequential(src, second, row["bytes"])
            row["fio_same_runs_s"] = fio_same_runs(src, disk, ranges, results)
        finally:
            dm.remove("mb-store")
        if second:
            row["lvconvert_merge_s"] = lvm_round(second, sequential, args.random, seed=i)
        rows.append(row)
        log(f"round {i}: {json.dumps(row)}")

    def med(key: str):
        vals = [r[key] for r in rows if r.get(key) is not None]
        return median(vals) if vals else None

    m = {k: med(k) for k in ("merge_s", "copy_s", "raw_same_runs_s", "fio_same_runs_s", "raw_sequential_s",
                              "lvconvert_merge_s", "bytes", "runs", "chunks")}
    mib = m["bytes"] / MiB

    def vs(key: str) -> str:
        return f"{m[key]:7.2f} s  {mib / m[key]:7.1f} MiB/s" if m.get(key) else "      -"

    summary = [f"merge_bench: {len(rows)} rounds, {sequential // MiB} MiB in 1 MiB writes + {args.random} random "
               f"4 KiB writes; {m['chunks']} chunks ({mib:.1f} MiB) in {m['runs']} runs; plain store, ext4; medians",
               f"  fiesnap merge (in-process)   {vs('merge_s')}",
               f"    of which the copy          {vs('copy_s')}",
               f"  raw same runs, 1 in flight   {vs('raw_same_runs_s')}",
               f"  fio same runs, 16 in flight  {vs('fio_same_runs_s')}",
               f"  raw sequential (dd 1 MiB)    {vs('raw_sequential_s')}",
               f"  lvconvert --merge            {vs('lvconvert_merge_s')}"]
    ratios = {}
    for peer in ("raw_same_runs_s", "fio_same_runs_s", "raw_sequential_s", "lvconvert_merge_s"):
        if m.get(peer):
            ratios[f"copy_vs_{peer[:-2]}"] = m[peer] / m["copy_s"]
            ratios[f"merge_vs_{peer[:-2]}"] = m[peer] / m["merge_s"]
    summary.append("  speed against each peer (peer time / fiesnap time; 1.0 = as fast): " +
                   ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    write_results(results, "merge_bench", {"machine": machine(), "rounds": rows, "medians": m, "ratios": ratios,
                                           "sequential_bytes": sequential, "random_writes": args.random}, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
