#!/usr/bin/env python3
"""What a flush costs through a device-mapper table of many linear targets.

    python -m tests.lab script benchmarks/flush_bench.py --disks 1 --disk-size 2G --timeout 900 \
        [-- --targets 1,16,256,1024,4096 --ops 300]

device-mapper sends an empty flush (what fsync ends with, and what dm-snapshot's persistent
store sends with each commit of its exception table) to every target of a table,
`num_flush_bios` clones per target (`__send_empty_flush` in drivers/md/dm.c), even when they all
lie on one disk. Newer kernels (6.12 here) skip that and flush each underlying device once, but
only when every target of the table is one that allows it (linear, striped): a single `zero` or
`error` target brings the fan-out back. A free-aware store's NAME-cow table is exactly that
shape: a linear target per seeded exception area, with zero and error stretches between them.

This measures the cost alone: one device over the same 1 GiB of one disk, split into N linear
targets, alone and with a zero and an error target after each, written with 4 KiB O_DIRECT
writes each followed by fdatasync, against the same writes without it; and how many flushes
reached the disk (its flush counter; the block layer merges some).
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import KiB, MiB, aligned_buffer, log, machine, require_lab, sh, write_results  # noqa: E402

NAME = "flushbench"
SPAN = 1024 * MiB
SECTOR = 512


def disk_flushes(disk: str) -> int | None:
    """Flush requests the disk completed (field 16 of /sys/block/X/stat), None where absent."""
    try:
        with open(f"/sys/block/{os.path.basename(disk)}/stat") as f:
            fields = f.read().split()
    except OSError:
        return None
    return int(fields[15]) if len(fields) > 15 else None


def create_split_linear(disk: str, targets: int, holes: bool) -> str:
    """NAME: a linear map of the disk's first SPAN bytes in `targets` consecutive pieces; with
    `holes`, each piece is followed by a `zero` and an `error` target of one chunk (the shape of
    a free-aware NAME-cow table: backed areas between unbacked stretches), which the writes
    never touch."""
    sectors = SPAN // SECTOR
    step = sectors // targets
    lines, at = [], 0
    for k in range(targets):
        length = step if k < targets - 1 else sectors - k * step
        lines.append(f"{at} {length} linear {disk} {k * step}")
        at += length
        if holes:
            lines += [f"{at} 8 zero", f"{at + 8} 8 error"]
            at += 16
    subprocess.run(["dmsetup", "create", NAME], input="\n".join(lines) + "\n", text=True, check=True,
                   capture_output=True)
    sh("dmsetup", "mknodes", NAME)
    return f"/dev/mapper/{NAME}"


def piece_offsets(targets: int, holes: bool) -> tuple[int, int]:
    """(bytes per linear piece, bytes between piece starts on the dm device)."""
    step = SPAN // targets
    return step, step + (16 * SECTOR if holes else 0)


def timed_writes(dev: str, ops: int, sync: bool, seed: int, targets: int, holes: bool) -> float:
    """`ops` 4 KiB O_DIRECT writes at random places inside the linear pieces (fdatasync after
    each with `sync`)."""
    rnd = random.Random(seed)
    piece, stride = piece_offsets(targets, holes)
    buf = aligned_buffer(4 * KiB)
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
    try:
        t0 = time.monotonic()
        for _ in range(ops):
            os.pwrite(fd, buf, rnd.randrange(targets) * stride + rnd.randrange(piece // (4 * KiB)) * 4 * KiB)
            if sync:
                os.fdatasync(fd)
        return time.monotonic() - t0
    finally:
        os.close(fd)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", default="1,16,256,1024,4096")
    ap.add_argument("--ops", type=int, default=300)
    args = ap.parse_args()
    disk, results = require_lab()
    counts = [int(t) for t in args.targets.split(",")]
    rows = []
    for holes, n in [(h, n) for h in (False, True) for n in counts]:
        dev = create_split_linear(disk, n, holes)
        try:
            timed_writes(dev, 20, True, 0, n, holes)          # warm-up: first touch of the image file
            plain_s = timed_writes(dev, args.ops, False, 1, n, holes)
            f0 = disk_flushes(disk)
            sync_s = timed_writes(dev, args.ops, True, 2, n, holes)
            f1 = disk_flushes(disk)
        finally:
            sh("dmsetup", "remove", NAME)
        row = {"targets": n, "holes": holes, "ops": args.ops, "write_s": round(plain_s, 3),
               "write_fdatasync_s": round(sync_s, 3),
               "flush_ms_per_op": round((sync_s - plain_s) / args.ops * 1000, 3),
               "disk_flushes": None if f0 is None or f1 is None else f1 - f0}
        rows.append(row)
        log(f"{n:5d} linear targets{' between holes' if holes else ''}: {row['flush_ms_per_op']:.2f} ms "
            f"of flush per fdatasync, {row['disk_flushes']} flushes reached the disk for {args.ops} fdatasyncs")
    base = rows[0]["flush_ms_per_op"] or None   # one linear target, no holes
    summary = [f"flush cost through a dm-linear table of N targets over one disk ({args.ops} x 4 KiB O_DIRECT "
               f"write + fdatasync, {machine()['kernel']}):"]
    for r in rows:
        rel = f" ({r['flush_ms_per_op'] / base:.1f}x one target)" if base else ""
        shape = " + holes" if r["holes"] else "        "
        summary.append(f"  {r['targets']:5d} linear{shape}: {r['flush_ms_per_op']:.2f} ms per flush{rel}; "
                       f"{r['disk_flushes']} disk flushes")
    write_results(results, "flush_bench", {"machine": machine(), "span_bytes": SPAN, "rows": rows}, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
