#!/usr/bin/env python3
"""Benchmark: what a free-aware store costs at start, against a plain store, by disk size and
chunk size (fiesnap/model/seeding.py: one pre-written exception per chunk free at the checkpoint).

    .venv/bin/python -m tests.lab script benchmarks/free_aware_bench.py --disks 1 --disk-size 86G --timeout 1800
    ... -- --sizes 1G,4G,16G,64G --chunks 4K,16K,64K --store 128M --frag-size 1G     (defaults)

One sparse scratch disk, cut into one MBR partition per size (1 MiB aligned), each with a fresh
ext4 (4 KiB blocks, lazy init off: `-E lazy_itable_init=0,lazy_journal_init=0`, which takes
< 1 s even at 64 GiB here, since mkfs discards the sparse disk first and then need not zero;
`--lazy-mkfs`: mkfs defaults). For every size and chunk size (`--chunks`; the online starts only
for `--online-chunks`, 4K and 64K by default, to keep the run near 15 min):

- **offline start**: `fiesnap start PART --size STORE --chunk-size C --plain`, then the same
  with `--free-aware`, each as a CLI call (wall time; a bare `python -m fiesnap version` is timed
  too: most of a CLI call under TCG is python starting). Recorded: the record's seeded_areas,
  seeded_chunks, chunk_bytes and cow_table segment count, `dmsetup table NAME-cow | wc -l`,
  `status --json` (store, used, metadata, seeded bytes), and the kernel's in-core exceptions:
  the `dm_exception` slab cache's `objects` (/sys/kernel/slab/dm_exception/objects, after a
  `shrink` of the cache, which flushes its per-CPU slabs; the cache is merged into a shared
  32-byte cache, so only deltas mean anything) read right before and
  right after the start, and again after the in-process commit (the unload delta: removing the
  snapshot frees exactly its exceptions, with little else going on). The plain start's delta is
  the control. A model gives the expected count: one in-core exception per 256-chunk window a
  seeded run touches (dm_insert_exception joins consecutive entries; the hash groups `old >> 8`).
- **online start**: `fiesnap setup PART --name X` once per size, mount /dev/mapper/X
  (`noinit_itable`: no lazy-init writer, in case of `--lazy-mkfs`), then per chunk size and mode the CLI
  `fiesnap start X --size STORE --chunk-size C --plain|--free-aware` on the idle mounted
  filesystem: wall time and the record's notes.frozen_seconds (the freeze window, which for a
  free-aware store includes reading the free map, writing the seeded table and loading
  NAME-snap). Commit in-process after each.

Then a **fragmented** filesystem (`--frag-size`, on the first partition, re-made): filled with
small files (4 - 16 KiB, deterministic) until STORE + 64 MiB are left, every other file deleted;
the same offline and online starts per chunk size. Its free space is mostly holes of 4 - 16 KiB,
so larger chunks seed less, and at 4 KiB every hole is its own in-core exception: the kernel
memory per GiB of seeded space is the figure to look at.

Absolute times are qemu TCG times (benchmarks/README.md); compare plain against free-aware
within one run. Results: $FIESNAP_LAB_RESULTS/free_aware_bench.json and free_aware_bench.txt.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import random
import struct
import time

from common import (SLAB, KiB, MiB, Fiesnap, log, machine, quiet, sh, slab_info, slab_objects,  # noqa: E402 (sets sys.path)
                    write_results)

from fiesnap.commands import commit as commit_cmd
from fiesnap.commands import setup as setup_cmd
from fiesnap.commands import status as status_cmd
from fiesnap.kernel.dm import DeviceMapper
from fiesnap.kernel.fsmap import free_space
from fiesnap.model.extents import free_chunks
from fiesnap.model.record import CheckpointRecord
from fiesnap.model.seeding import WINDOW, plan_seeding
from fiesnap.model.units import parse_size
from fiesnap.services.statedir import StateStore

GiB = 1 << 30
STATE = "/tmp/fa-bench-state"
MNT = "/tmp/fa-bench-mnt"
OFF = "fa"    # offline checkpoint name
ON = "fo"     # online: the device under fiesnap
BLKRRPART = 0x125F


# --------------------------------------------------------------------- disk

def partition(disk: str, sizes: list[int]) -> list[str]:
    """An MBR with one primary partition per size (at most 4), 1 MiB aligned; their nodes."""
    if len(sizes) > 4:
        raise SystemExit("at most 4 sizes (one MBR primary partition each)")
    mbr = bytearray(512)
    mbr[440:444] = struct.pack("<I", 0xF1E5A4E0)
    lba = 2048
    for i, size in enumerate(sizes):
        n = size // 512
        mbr[446 + 16 * i: 462 + 16 * i] = struct.pack("<B3sB3sII", 0, b"\xfe\xff\xff", 0x83, b"\xfe\xff\xff", lba, n)
        lba += n
    mbr[510:512] = b"\x55\xaa"
    need = lba * 512
    fd = os.open(disk, os.O_RDWR)
    try:
        have = os.lseek(fd, 0, os.SEEK_END)
        if have < need:
            raise SystemExit(f"{disk} has {have / GiB:.1f} GiB, the sizes need {need / GiB:.1f} GiB: "
                             "give the lab a larger --disk-size")
        os.pwrite(fd, bytes(mbr), 0)
        os.fsync(fd)
        fcntl.ioctl(fd, BLKRRPART)
    finally:
        os.close(fd)
    base = os.path.basename(disk)
    parts = [f"/dev/{base}{i + 1}" for i in range(len(sizes))]
    for _ in range(100):
        if all(os.path.exists(p) for p in parts):
            break
        time.sleep(0.1)
    else:
        raise SystemExit(f"the kernel made no nodes for {parts}")
    return parts


def mkfs(dev: str, eager: bool, extra: tuple = (), fs_bytes: int = 0) -> float:
    opts = ["-E", "lazy_itable_init=0,lazy_journal_init=0"] if eager else []
    blocks = [str(fs_bytes // 4096)] if fs_bytes else []
    t0 = time.monotonic()
    sh("mkfs.ext4", "-F", "-q", "-b", "4096", *opts, *extra, dev, *blocks, timeout=1800)
    return time.monotonic() - t0


# --------------------------------------------------------------------- kernel memory

def model_exceptions(record: CheckpointRecord) -> int:
    """In-core exceptions the seeded table should load as: the seeded runs cut at 256-chunk
    windows (model/seeding.py recomputed from the record's checkpoint-time map)."""
    layout = record.seed_layout
    if layout is None:
        return 0
    plan = plan_seeding(record.free_map, layout, store=record.cow.store_chunks())
    n = 0
    for r in plan.chosen.runs:
        n += (r.end - 1) // WINDOW - r.start // WINDOW + 1
    return n


# --------------------------------------------------------------------- fiesnap

def in_process_commit(name: str) -> None:
    commit_cmd.commit(name, DeviceMapper, StateStore(STATE), quiet)


def in_process_status(name: str) -> dict:
    return status_cmd.status(DeviceMapper, StateStore(STATE), name)[0].to_dict()


def cow_table_lines(name: str) -> int:
    return len([ln for ln in sh("dmsetup", "table", f"{name}-cow").stdout.splitlines() if ln.strip()])


def one_start(fs: Fiesnap, target: str, name: str, store: int, chunk: int, mode: str,
              extra: tuple = ()) -> dict:
    """A CLI start (timed), its figures, an in-process commit; slab objects around both."""
    s0 = slab_objects()
    fs("start", target, "--size", str(store), "--chunk-size", str(chunk), f"--{mode}", *extra)
    wall = fs.calls[-1][1]
    s1 = slab_objects()
    raw = fs.record(name)
    rec = CheckpointRecord.from_dict(raw)
    st = in_process_status(name)
    lines = cow_table_lines(name)
    model = model_exceptions(rec)
    s2 = slab_objects()
    in_process_commit(name)
    s3 = slab_objects()
    free = sum(n for _, n in rec.free_map)
    out = {
        "mode": mode, "chunk_bytes": chunk, "start_cli_s": round(wall, 3),
        "frozen_s": raw.get("notes", {}).get("frozen_seconds"),
        "seeded_areas": raw.get("seeded_areas", 0), "seeded_chunks": raw.get("seeded_chunks", 0),
        "seeded_bytes": raw.get("seeded_chunks", 0) * chunk,
        "seeded_metadata_bytes": raw.get("seeded_areas", 0) * chunk,
        "cow_segments": len(raw["cow_table"]["segments"]), "cow_table_lines": lines,
        "store_extents": len(raw["store_extents"]),
        "free_bytes_at_checkpoint": free,
        "free_whole_chunks": len(free_chunks(rec.free_map, chunk)),
        "free_ranges": len(rec.free_map),
        "status": {k: st[k] for k in ("state", "store_bytes", "used_bytes", "metadata_bytes",
                                      "seeded_bytes", "segments", "extents")},
        "slab": {"before": s0, "after_start": s1, "before_commit": s2, "after_commit": s3,
                 "load_delta": s1 - s0, "unload_delta": s2 - s3},
        "model_incore_exceptions": model,
    }
    log(f"    {mode:10s} chunk {chunk // KiB:>2} KiB: CLI {wall:5.1f} s"
        + (f", frozen {out['frozen_s']:.3f} s" if out["frozen_s"] is not None else "")
        + f"; seeded {out['seeded_bytes'] / GiB:.2f} GiB ({out['seeded_chunks']} chunks, {out['seeded_areas']} areas)"
        f"; cow lines {lines}; dm_exception +{s1 - s0} / -{s2 - s3} (model {model})")
    return out


def run_fs(fs: Fiesnap, dev: str, label: str, chunks: list[int], online_chunks: list[int], store: int,
           mount_opts: str) -> dict:
    """Offline starts (plain, free-aware) per chunk size, then online ones on a mounted setup."""
    res: dict = {"device": dev, "label": label, "offline": {}, "online": {}}
    for c in chunks:
        res["offline"][str(c)] = {m: one_start(fs, dev, OFF, store, c, m, ("--name", OFF))
                                  for m in ("plain", "free-aware")}
    setup_cmd.setup(dev, ON, DeviceMapper, StateStore(STATE), quiet)
    sh("mount", "-o", mount_opts, f"/dev/mapper/{ON}", MNT)
    try:
        for c in online_chunks:
            res["online"][str(c)] = {m: one_start(fs, ON, ON, store, c, m) for m in ("plain", "free-aware")}
    finally:
        sh("umount", MNT)
        setup_cmd.release(ON, DeviceMapper, StateStore(STATE), quiet)
    return res


# --------------------------------------------------------------------- fragmented fs

def fragment(dev: str, store: int, seed: int) -> dict:
    """Small files (4 - 16 KiB) until STORE + 64 MiB are left, then every other one deleted."""
    sh("mount", dev, MNT)
    rnd = random.Random(seed)
    blob = rnd.randbytes(16 * KiB)
    paths: list[str] = []
    leave = store + 64 * MiB
    t0 = time.monotonic()
    d = 0
    while True:
        sv = os.statvfs(MNT)
        if sv.f_bavail * sv.f_frsize <= leave or sv.f_favail < 1000:
            break
        folder = f"{MNT}/d{d:04d}"
        os.mkdir(folder)
        d += 1
        for i in range(1000):
            p = f"{folder}/f{i:04d}"
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, blob[: rnd.randint(1, 4) * 4 * KiB])
            os.close(fd)
            paths.append(p)
    os.sync()
    t_fill = time.monotonic() - t0
    t0 = time.monotonic()
    for p in paths[::2]:
        os.unlink(p)
    os.sync()
    t_del = time.monotonic() - t0
    free = free_space(MNT)
    sv = os.statvfs(MNT)
    sh("umount", MNT)
    lens = sorted(n for _, n in free)
    out = {"files_written": len(paths), "files_left": len(paths) - len(paths[::2]),
           "fill_s": round(t_fill, 1), "delete_s": round(t_del, 1),
           "free_bytes": sum(lens), "free_ranges": len(lens),
           "largest_free_range": lens[-1] if lens else 0,
           "free_in_ranges_up_to_64k": sum(n for n in lens if n <= 64 * KiB),
           "statvfs_free": sv.f_bfree * sv.f_frsize}
    log(f"  fragmented: {out['files_written']} files written in {t_fill:.0f} s, half deleted in {t_del:.0f} s; "
        f"{out['free_bytes'] / MiB:.0f} MiB free in {out['free_ranges']} ranges, "
        f"{out['free_in_ranges_up_to_64k'] / MiB:.0f} MiB of it in ranges <= 64 KiB, "
        f"largest {out['largest_free_range'] / MiB:.0f} MiB")
    return out


# --------------------------------------------------------------------- summary

def rows(res: dict, fs_label: str, object_size: int) -> list[str]:
    out = []
    for c, pair in res["offline"].items():
        p, f = pair["plain"], pair["free-aware"]
        on = res["online"].get(c, {})
        op, of = on.get("plain", {}), on.get("free-aware", {})
        seeded_gib = f["seeded_bytes"] / GiB
        free_gib = f["free_bytes_at_checkpoint"] / GiB
        load = f["slab"]["load_delta"] - p["slab"]["load_delta"]
        unload = f["slab"]["unload_delta"] - p["slab"]["unload_delta"]
        per = f"{unload / seeded_gib:.0f} ({unload * object_size / seeded_gib / KiB:.0f} KiB)" if seeded_gib else "-"

        def s(x, fmt="{:.1f}"):
            return "-" if x is None else fmt.format(x)

        out.append(
            f"| {fs_label} | {int(c) // KiB}K | {free_gib:.2f} | "
            f"{seeded_gib:.2f} ({100 * seeded_gib / free_gib if free_gib else 0:.0f}%) | {f['seeded_chunks']} | "
            f"{f['seeded_areas']} ({f['seeded_metadata_bytes'] / MiB:.1f}) | {p['cow_table_lines']} / {f['cow_table_lines']} | "
            f"{s(p['start_cli_s'])} / {s(f['start_cli_s'])} | "
            f"{s(op.get('start_cli_s'))} / {s(of.get('start_cli_s'))} | "
            f"{s(op.get('frozen_s'), '{:.3f}')} / {s(of.get('frozen_s'), '{:.3f}')} | "
            f"{load} / {unload} ({f['model_incore_exceptions']}) | {per} |")
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1G,4G,16G,64G", help="filesystem (partition) sizes, at most 4")
    ap.add_argument("--chunks", default="4K,16K,64K", help="chunk sizes of the offline starts")
    ap.add_argument("--online-chunks", default="4K,64K", help="chunk sizes of the online starts (time budget)")
    ap.add_argument("--store", default="128M", help="store size of every start")
    ap.add_argument("--frag-size", default="1G", help="fragmented fs (made on the first partition; 0: none)")
    ap.add_argument("--lazy-mkfs", action="store_true",
                    help="mkfs.ext4 defaults (lazy init); default: -E lazy_itable_init=0,lazy_journal_init=0, "
                         "which is fast on the lab's sparse disks (mkfs discards, then need not zero)")
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args()
    if os.geteuid() != 0 or os.environ.get("FIESNAP_LAB") != "1":
        raise SystemExit("run this in the VM lab (see the docstring): it repartitions its disk")
    disks = os.environ.get("FIESNAP_LAB_DISKS", "").split()
    if not disks:
        raise SystemExit("needs a scratch disk: give the lab --disks 1 --disk-size 86G")
    results = os.environ.get("FIESNAP_LAB_RESULTS", "/tmp")
    sizes = [parse_size(s) for s in args.sizes.split(",") if s]
    chunks = [parse_size(s) for s in args.chunks.split(",") if s]
    online_chunks = [parse_size(s) for s in args.online_chunks.split(",") if s]
    eager = not args.lazy_mkfs
    store = parse_size(args.store)
    frag = parse_size(args.frag_size) if args.frag_size not in ("", "0") else 0
    if frag and frag > sizes[0]:
        raise SystemExit("--frag-size must fit the first partition")
    os.makedirs(MNT, exist_ok=True)
    if not os.path.exists(SLAB):
        sh("modprobe", "dm-snapshot")
    t_all = time.monotonic()
    parts = partition(disks[0], sizes)
    # fiesnap refuses a state folder that group or others can read (common.Fiesnap makes it 0755)
    os.makedirs(STATE, mode=0o700, exist_ok=True)
    os.chmod(STATE, 0o700)
    fs = Fiesnap(STATE)
    base_cli = []
    for _ in range(2):
        fs("version")
        base_cli.append(round(fs.calls[-1][1], 3))
    log(f"partitions {parts}; `python -m fiesnap version` {base_cli} s; slab {slab_info()}")

    mount_opts = "noinit_itable"
    per_size: dict = {}
    for size, dev in zip(sizes, parts):
        label = f"{size / GiB:g}G"
        t_mkfs = mkfs(dev, eager)
        log(f"{label} on {dev}: mkfs.ext4 {'(lazy init off) ' if eager else ''}{t_mkfs:.1f} s")
        t0 = time.monotonic()
        res = run_fs(fs, dev, label, chunks, online_chunks, store, mount_opts)
        res.update(mkfs_s=round(t_mkfs, 1), fs_bytes=size, elapsed_s=round(time.monotonic() - t0, 1))
        per_size[label] = res

    frag_res = None
    if frag:
        dev = parts[0]
        t0 = time.monotonic()
        # Enough inodes for 4 - 16 KiB files (the default ratio gives one per 16 KiB).
        t_mkfs = mkfs(dev, eager, ("-i", "8192"), 0 if frag == sizes[0] else frag)
        info = fragment(dev, store, args.seed)
        frag_res = run_fs(fs, dev, f"{frag / GiB:g}G fragmented", chunks, online_chunks, store, mount_opts)
        frag_res.update(fill=info, mkfs_s=round(t_mkfs, 1), fs_bytes=frag,
                        elapsed_s=round(time.monotonic() - t0, 1))

    data = {
        "machine": machine(), "args": vars(args), "sizes": sizes, "chunks": chunks, "store_bytes": store,
        "cli_baseline_s": base_cli, "slab": slab_info(), "per_size": per_size, "fragmented": frag_res,
        "calls": fs.calls, "elapsed_s": round(time.monotonic() - t_all, 1),
    }
    summary = [
        f"free_aware_bench: ext4 of {args.sizes} (fresh mkfs{', lazy init off' if eager else ''}), "
        f"store {args.store}, chunks {args.chunks} (online: {args.online_chunks}); `python -m fiesnap version` alone: "
        f"{min(base_cli):.1f} s; total {data['elapsed_s']:.0f} s",
        "",
        "a / b: plain / free-aware (CLI wall times; frozen: the online start's freeze window). free: at the "
        "checkpoint, store file made. in-core exceptions: dm_exception slab objects, free-aware minus plain, "
        "at load (start) / at unload (commit), (model); per GiB: unload delta per GiB seeded (x object size)",
        "",
        "| fs | chunk | free GiB | seeded GiB (of free) | seeded chunks | areas (MiB) | NAME-cow lines | "
        "offline start s | online start s | frozen s | in-core exceptions | per GiB seeded |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    osize = int(slab_info().get("object_size", 32))
    for label, res in per_size.items():
        summary += rows(res, label, osize)
    if frag_res:
        summary += rows(frag_res, frag_res["label"], osize)
        fi = frag_res["fill"]
        summary += ["", f"fragmented fs: {fi['files_written']} files of 4-16 KiB, every other deleted: "
                        f"{fi['free_bytes'] / MiB:.0f} MiB free in {fi['free_ranges']} ranges "
                        f"({fi['free_in_ranges_up_to_64k'] / MiB:.0f} MiB in ranges <= 64 KiB, largest "
                        f"{fi['largest_free_range'] / MiB:.0f} MiB)"]
    write_results(results, "free_aware_bench", data, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
