#!/usr/bin/env python3
"""Benchmark: the two rollbacks on the same store, against a raw O_DIRECT copy of the same bytes.

    .venv/bin/python -m tests.lab script benchmarks/instant_bench.py --disks 1 --disk-size 2G --timeout 1500
    ... -- --rounds ABBA --overwrite 192M --pattern sequential      (defaults; or --pattern scatter)

Per round, on one ext4: mkfs, files, an offline `start` (plain store: every overwritten chunk
is saved, so both merges copy the same chunks), OVERWRITE of checkpoint data rewritten with
O_DIRECT 1 MiB writes through /dev/mapper/NAME, unmount; then one of
  A offline  `merge --keep-store`: mountable when it returns (time to mount = time to finish)
  B instant  `merge --instant` (time to mount: until the mount of /dev/mapper/NAME returns),
             then `merge --keep-store` waiting for the kernel (time to finish)
and, after each, the peer: a raw copy of as many bytes with O_DIRECT in 1 MiB blocks between two
free regions of the disk (dd iflag=direct oflag=direct), the lower bound for moving those bytes.
fiesnap runs in-process (no Python start-up in the times). Rounds in ABBA order against drift.
Results: $FIESNAP_LAB_RESULTS/instant_bench-PATTERN.json and .txt.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (MiB, aligned_buffer, log, machine, median, populate_ext4, quiet, require_lab, sh,  # noqa: E402
                    write_results)
from fiesnap.commands import merge as merge_cmd  # noqa: E402
from fiesnap.commands import start as start_cmd  # noqa: E402
from fiesnap.kernel.dm import DeviceMapper  # noqa: E402
from fiesnap.model.units import parse_size  # noqa: E402
from fiesnap.services.statedir import StateStore  # noqa: E402

NAME = "ib"
STATE = "/tmp/ib-state"
MNT = "/tmp/ib-mnt"
FILES = 8  # files of FILE_MIB each hold the checkpoint data that gets overwritten
FILE_MIB = 40


def prepare(disk: str, overwrite: int, scatter: bool) -> None:
    """A checkpointed ext4 whose store holds `overwrite` bytes of saved data: rewritten in 1 MiB
    writes, or (`scatter`) one 4 KiB block in two, so that every saved chunk is a run of its own."""
    populate_ext4(disk, MNT, FILES, FILE_MIB)
    os.makedirs(STATE, mode=0o700, exist_ok=True)
    os.chmod(STATE, 0o700)
    store = overwrite + overwrite // 8 + 16 * MiB
    start_cmd.start(start_cmd.StartRequest(disk, store, name=NAME, free_aware=False), DeviceMapper,
                    StateStore(STATE), quiet)
    sh("mount", f"/dev/mapper/{NAME}", MNT)
    size, step = (4096, 8192) if scatter else (MiB, MiB)
    buf = aligned_buffer(size)
    left = overwrite
    for i in range(FILES):
        fd = os.open(f"{MNT}/f{i}.bin", os.O_WRONLY | os.O_DIRECT)
        for off in range(0, FILE_MIB * MiB, step):
            if left <= 0:
                break
            os.pwrite(fd, buf, off)
            left -= size
        os.close(fd)
    sh("umount", MNT)


def offline() -> dict:
    t0 = time.monotonic()
    r = merge_cmd.merge(NAME, DeviceMapper, StateStore(STATE), quiet, keep_store=True)
    t = time.monotonic() - t0
    return {"mount_s": t, "finish_s": t, "chunks": r.chunks}


def instant() -> dict:
    t0 = time.monotonic()
    r = merge_cmd.merge(NAME, DeviceMapper, StateStore(STATE), quiet, instant=True)
    handed = time.monotonic() - t0
    sh("mount", "-o", "ro", f"/dev/mapper/{NAME}", MNT)
    mounted = time.monotonic() - t0
    sh("umount", MNT)
    merge_cmd.merge(NAME, DeviceMapper, StateStore(STATE), quiet, keep_store=True)
    return {"handover_s": handed, "mount_s": mounted, "finish_s": time.monotonic() - t0,
            "chunks": r.entries}


def raw_copy(disk: str, nbytes: int) -> float:
    """dd of `nbytes` with O_DIRECT 1 MiB blocks from the disk's second quarter to its last."""
    size = int(sh("blockdev", "--getsize64", disk).stdout)
    mib = nbytes // MiB
    src, dst = size // 4 // MiB, (size - nbytes) // MiB - 1
    t0 = time.monotonic()
    sh("dd", f"if={disk}", f"of={disk}", "bs=1M", f"count={mib}", f"skip={src}", f"seek={dst}",
       "iflag=direct", "oflag=direct", "conv=notrunc", "status=none")
    return time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", default="ABBA")
    ap.add_argument("--overwrite", default="192M")
    ap.add_argument("--pattern", choices=("sequential", "scatter"), default="sequential",
                    help="1 MiB overwrites, or one 4 KiB block in two (every saved chunk its own run)")
    args = ap.parse_args()
    disk, results = require_lab()
    overwrite = parse_size(args.overwrite)
    rows: list[dict] = []
    for i, peer in enumerate(args.rounds):
        prepare(disk, overwrite, args.pattern == "scatter")
        res = offline() if peer == "A" else instant()
        nbytes = res["chunks"] * 4096
        res["raw_s"] = raw_copy(disk, nbytes)
        res.update(round=i, peer="offline" if peer == "A" else "instant", bytes=nbytes)
        rows.append(res)
        log(f"round {i} {res['peer']}: {res}")

    def med(peer: str, key: str):
        return median([r[key] for r in rows if r["peer"] == peer and key in r])

    summary = [f"instant_bench: {len(rows)} rounds ({args.rounds}), {overwrite // MiB} MiB overwritten "
               f"per round ({args.pattern}), plain store, ext4, 4 KiB chunks; medians"]
    out = {"machine": machine(), "rounds": rows, "overwrite_bytes": overwrite, "pattern": args.pattern,
           "medians": {}}
    for peer in ("offline", "instant"):
        m = {k: med(peer, k) for k in ("mount_s", "finish_s", "raw_s", "bytes")}
        if m["finish_s"] is None:
            continue
        m["finish_vs_raw"] = m["finish_s"] / m["raw_s"] if m["raw_s"] else None
        m["finish_mib_s"] = m["bytes"] / MiB / m["finish_s"]
        m["raw_mib_s"] = m["bytes"] / MiB / m["raw_s"] if m["raw_s"] else None
        out["medians"][peer] = m
        summary.append(
            f"  {peer:8s} time to mount {m['mount_s']:7.2f} s   time to finish {m['finish_s']:7.2f} s   "
            f"{m['finish_mib_s']:6.1f} MiB/s; raw O_DIRECT copy of the same {m['bytes'] / MiB:.0f} MiB "
            f"{m['raw_s']:.2f} s ({m['raw_mib_s']:.1f} MiB/s): finish = {m['finish_vs_raw']:.2f}x raw")
    o, n = out["medians"].get("offline"), out["medians"].get("instant")
    if o and n:
        out["instant_vs_offline"] = {"mount": n["mount_s"] / o["mount_s"], "finish": n["finish_s"] / o["finish_s"]}
        summary.append(f"  instant / offline: time to mount {n['mount_s'] / o['mount_s']:.3f}x, "
                       f"time to finish {n['finish_s'] / o['finish_s']:.2f}x")
    write_results(results, f"instant_bench-{args.pattern}", out, summary)
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
