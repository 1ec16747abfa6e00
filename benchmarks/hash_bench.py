#!/usr/bin/env python3
"""Benchmark: does dm-snapshot's fixed exception hash table hurt a store grown online?

    .venv/bin/python -m tests.lab script benchmarks/hash_bench.py --disks 1 --disk-size 3G --timeout 1500
    ... -- --rounds ABBA --targets 16 --density 192      (defaults)

The kernel sizes the snapshot's hash tables once, in the snapshot constructor
(drivers/md/dm-snap.c, init_hash_tables; Debian 6.1 = mainline here):

    complete = rounddown_pow_of_two(max(64, min(cow_dev_size_in_chunks, calc_max_buckets())))
    pending  = max(64, complete >> 3)
    calc_max_buckets() = 2 MiB / sizeof(struct hlist_bl_head) = 2 MiB / 8 = 262144 (64-bit)
    bucket(chunk) = (chunk >> hash_shift) & (size - 1), hash_shift = DM_CHUNK_CONSECUTIVE_BITS = 8
                    for the complete table (0 for pending)

`fiesnap extend` reloads only NAME-cow, so the table of a checkpoint started with an 8 MiB store
(2047 chunks of 4 KiB -> 1024 buckets) keeps 1024 buckets when the store grows to 1 GiB, where a
1 GiB store loaded from the start gets 131072. Because of hash_shift 8, the 256 chunks of one
1 MiB origin stretch ("group") always share a bucket; what a bigger table changes is how many
groups share one: on a disk of G groups, G/1024 with 1024 buckets (3 on the 3 GiB lab disk),
1 with >= G buckets. A lookup walks its bucket's list (sorted by origin chunk; a miss walks all
of it), so the cost is ~ the number of exceptions of all the groups sharing the bucket.

Peers, same run, same disk, same target chunks (rounds in ABBA order against drift):
  A: start --size 8M, extend --to 1G (table: 1024 buckets)
  B: start --size 1G                (table: 131072 buckets)
Layout: for K bucket indices b, every group b + j*1024 (j = 0 .. G/1024-1) gets DENSITY single-
chunk exceptions (chunks 255, 254, ... written one by one in descending order, so none coalesce;
DENSITY 192 = chunks 64..255), by 4 KiB O_DIRECT writes to /dev/mapper/NAME over checkpoint-time
data (fallocated files; the filesystem is unmounted while timing). Then, timed:
  rewrite-4k    random 4 KiB writes to saved chunks (a hash hit each, no copy)
  rewrite-group one write per group over its saved chunks (192 chunk bios, a lookup each)
  new-4k        4 KiB writes that create exceptions (two full-chain misses + an insert each)
Control (against a busy host): as many "control" groups with the same DENSITY, each alone in its
bucket in both peers (same chain in A and B), get the same workloads interleaved with the target
ones (pass by pass, alternating order). target/control per pass cancels the host's speed of the
moment; A/B of those normalized times is the reported ratio (the raw A/B is reported too).
Also reported: the modelled list entries visited per write and the cost per extra entry visited
they imply. Results: $FIESNAP_LAB_RESULTS/hash_bench.json and hash_bench.txt.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (KiB, MiB, Fiesnap, Usage, aligned_buffer, log, machine, median,  # noqa: E402
                    require_lab, sh, write_results)
from fiesnap.model.units import parse_size  # noqa: E402

NAME = "hb"
STATE = "/tmp/hb-state"
MNT = "/tmp/hb-mnt"
CHUNK = 4 * KiB
GROUP_CHUNKS = 256  # 1 << DM_CHUNK_CONSECUTIVE_BITS
GROUP = GROUP_CHUNKS * CHUNK
MAX_BUCKETS = (2 * MiB) // 8  # calc_max_buckets(): 2 MiB / sizeof(struct hlist_bl_head)
FILL_FILE = 32 * MiB


def rounddown_pow2(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def hash_sizes(cow_chunks: int) -> tuple[int, int]:
    """(complete, pending) bucket counts init_hash_tables() gives a COW device of that size."""
    complete = rounddown_pow2(max(64, min(cow_chunks, MAX_BUCKETS)))
    return complete, max(64, complete >> 3)


def cow_chunks(record: dict) -> int:
    return sum(s["count"] for s in record["cow_table"]["segments"])


# ------------------------------------------------------------------ layout


def fill_and_map(mnt: str) -> dict[int, str]:
    """Fill the filesystem with fallocated 32 MiB files; return {group: file} for every 1 MiB
    physical group that lies entirely inside one file's extent."""
    from fiesnap.kernel.fiemap import raw_file_extents

    os.makedirs(f"{mnt}/fill", exist_ok=True)
    covered: dict[int, str] = {}
    i = 0
    while True:
        sv = os.statvfs(mnt)
        if sv.f_bavail * sv.f_frsize < FILL_FILE + 64 * MiB:
            break
        path = f"{mnt}/fill/f{i:05d}"
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        try:
            os.posix_fallocate(fd, 0, FILL_FILE)
            for e in raw_file_extents(fd):
                first = -(-e.physical // GROUP)
                last = (e.physical + e.length) // GROUP  # exclusive
                for g in range(first, last):
                    covered[g] = path
        finally:
            os.close(fd)
        i += 1
    return covered


def choose_targets(covered: dict[int, str], groups: int, buckets_a: int, k: int) -> tuple[list[int], int]:
    """K bucket indices b whose groups b + j*buckets_a (j < groups // buckets_a) are checkpoint-
    time data: K consecutive ones near the middle with every group covered if there are, else
    the K with the most covered groups (only covered groups are used). Returns (target groups,
    groups per bucket index)."""
    per_bucket = groups // buckets_a
    members = {b: [b + j * buckets_a for j in range(per_bucket) if b + j * buckets_a in covered]
               for b in range(buckets_a)}
    full = {b for b, m in members.items() if len(m) == per_bucket}
    starts = [b for b in full if all(b + d in full for d in range(k))]
    if starts:  # consecutive: few files to keep
        b0 = min(starts, key=lambda b: abs(b - buckets_a // 2))
        chosen = list(range(b0, b0 + k))
    else:
        chosen = sorted(members, key=lambda b: (-len(members[b]), abs(b - buckets_a // 2)))[:k]
    targets = sorted(g for b in chosen for g in members[b])
    if len(targets) < k:
        raise RuntimeError(f"too little checkpoint-time data in the chosen buckets: {targets}")
    return targets, per_bucket


def choose_controls(covered: dict[int, str], groups: int, buckets_a: int, targets: list[int], n: int) -> list[int]:
    """n groups, each the only loaded group of its bucket in A (and in B), next to the targets'
    bucket indices so that few files are kept: one group per bucket index, cycling through
    the j = 0 .. groups // buckets_a - 1 stretches."""
    per_bucket = max(1, groups // buckets_a)
    used = {g & (buckets_a - 1) for g in targets}
    start = max(used) + 1 if used else 0
    out: list[int] = []
    for i in range(buckets_a):
        b = (start + i) % buckets_a
        if b in used:
            continue
        for dj in range(per_bucket):
            g = b + ((len(out) + dj) % per_bucket) * buckets_a
            if g in covered:
                out.append(g)
                break
        if len(out) == n:
            return sorted(out)
    raise RuntimeError(f"only {len(out)} control groups found, not {n}")


# ------------------------------------------------------------------ I/O


def write_chunks(dev: str, offsets: list[int]) -> float:
    """4 KiB O_DIRECT writes at these byte offsets, in this order; seconds."""
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
    buf = aligned_buffer(CHUNK)
    try:
        t0 = time.perf_counter()
        for off in offsets:
            os.pwrite(fd, buf, off)
        return time.perf_counter() - t0
    finally:
        os.close(fd)
        buf.close()


def write_spans(dev: str, spans: list[tuple[int, int]]) -> float:
    """One O_DIRECT write per (offset, length); seconds."""
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
    buf = aligned_buffer(max(n for _o, n in spans))
    try:
        t0 = time.perf_counter()
        for off, n in spans:
            os.pwrite(fd, memoryview(buf)[:n], off)
        return time.perf_counter() - t0
    finally:
        os.close(fd)
        buf.close()


def prepopulate(dev: str, groups: list[int], saved: list[int], threads: int) -> float:
    """Save `saved` chunks (descending) of every group; groups split over threads, each group
    written by one thread in descending order, so no two exceptions can coalesce."""
    parts = [groups[i::threads] for i in range(threads)]
    times: list[float] = []

    def work(part: list[int]) -> None:
        times.append(write_chunks(dev, [g * GROUP + c * CHUNK for g in part for c in saved]))

    t0 = time.perf_counter()
    ts = [threading.Thread(target=work, args=(p,)) for p in parts if p]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return time.perf_counter() - t0


# ------------------------------------------------------------------ walk model


def bucket_of(group: int, buckets: int) -> int:
    return group & (buckets - 1)  # (chunk >> 8) & mask, chunk >> 8 == group


def model_visits(groups: list[int], density: int, buckets: int, rewrites: list[tuple[int, int]],
                 span_groups: list[int], new: list[tuple[int, int]]) -> dict:
    """List entries dm_lookup_exception / dm_insert_exception visit, per workload, when the
    complete table has `buckets` buckets and every target group holds `density` exceptions
    (chunks 255-density+1 .. 255). Stray exceptions (a few filesystem blocks) are ignored."""
    by_bucket: dict[int, list[int]] = {}
    for g in sorted(groups):
        by_bucket.setdefault(bucket_of(g, buckets), []).append(g)
    lowest_saved = GROUP_CHUNKS - density

    def groups_below(g: int) -> int:
        return by_bucket[bucket_of(g, buckets)].index(g)

    # Hit on chunk c of group g: every entry of the lower groups of the bucket, then the rank.
    hit = sum(groups_below(g) * density + (c - lowest_saved) + 1 for g, c in rewrites)
    span = sum(groups_below(g) * density * density + density * (density + 1) // 2 for g in span_groups)
    # New exception: two lookups that walk the whole chain (misses), then the ordered insert.
    extra = {g: 0 for g in groups}
    miss = 0
    for g, _c in new:
        chain = sum(density + extra[h] for h in by_bucket[bucket_of(g, buckets)])
        below = sum(density + extra[h] for h in by_bucket[bucket_of(g, buckets)] if h < g)
        miss += 2 * chain + below + 1
        extra[g] += 1
    return {"rewrite_4k": hit, "rewrite_group": span, "new_4k": miss,
            "chain_len": max(len(v) for v in by_bucket.values()) * density}


# ------------------------------------------------------------------ one round


def run_round(fs: Fiesnap, peer: str, args, sets: dict[str, dict]) -> dict:
    """One peer: start (and extend), load both sets' exceptions, run the workloads on the
    target and the control set interleaved, commit."""
    dev = f"/dev/mapper/{NAME}"
    if peer == "A":
        fs("start", NAME, "--size", args.small, "--plain")
        at_load = cow_chunks(fs.record(NAME))
        t0 = time.monotonic()
        fs("extend", NAME, "--to", args.store)
        extend_s = time.monotonic() - t0
    else:
        fs("start", NAME, "--size", args.store, "--plain")  # the kernel hash of a plain store
        at_load = cow_chunks(fs.record(NAME))
        extend_s = None
    rec = fs.record(NAME)
    complete, pending = hash_sizes(at_load)
    usage = Usage(NAME, lambda: fs.record(NAME))
    st0 = usage()
    log(f"peer {peer}: COW chunks at load {at_load} -> {complete} buckets (pending {pending}); "
        f"store now {cow_chunks(rec)} chunks")
    saved = sets["target"]["saved"]
    everything = sorted(sets["target"]["groups"] + sets["control"]["groups"])
    pre_s = prepopulate(dev, everything, saved, args.threads)
    st1 = usage()
    res: dict = {"peer": peer, "cow_chunks_at_load": at_load, "cow_chunks_now": cow_chunks(rec),
                 "complete_buckets": complete, "pending_buckets": pending,
                 "extend_to_store_s": round(extend_s, 3) if extend_s is not None else None,
                 "prepopulate_s": round(pre_s, 3), "prepopulate_exceptions": len(everything) * len(saved),
                 "used_before_bytes": st0[1], "used_after_prepopulate_bytes": st1[1]}
    times: dict[str, dict[str, list[float]]] = {k: {"rewrite_4k": [], "rewrite_group": [], "new_4k": []}
                                                for k in sets}
    order = ["target", "control"]
    for p in range(args.passes):
        for k in (order if p % 2 == 0 else order[::-1]):
            times[k]["rewrite_4k"].append(write_chunks(dev, sets[k]["rewrite_offsets"]))
        for k in (order[::-1] if p % 2 == 0 else order):
            times[k]["rewrite_group"].append(write_spans(dev, sets[k]["spans"]))
    # New exceptions: group by group, target and control alternating.
    nt = {"target": 0.0, "control": 0.0}
    for i, (gt, gc) in enumerate(zip(sets["target"]["groups"], sets["control"]["groups"])):
        for k, g in ((("target", gt), ("control", gc)) if i % 2 == 0 else (("control", gc), ("target", gt))):
            nt[k] += write_chunks(dev, [g * GROUP + c * CHUNK for c in sets[k]["new_chunks"]])
    for k in sets:
        times[k]["new_4k"].append(nt[k])
    st2 = usage()
    state = fs.status(NAME)["state"]
    res.update({"times_s": {k: {w: [round(x, 4) for x in v] for w, v in d.items()} for k, d in times.items()},
                "used_after_bytes": st2[1], "store_bytes": st2[2], "state_after": state})
    t = times["target"]
    c = times["control"]
    log(f"peer {peer}: prepopulate {pre_s:.1f}s; target/control rewrite-4k "
        f"{[f'{a:.2f}/{b:.2f}' for a, b in zip(t['rewrite_4k'], c['rewrite_4k'])]}, rewrite-group "
        f"{[f'{a:.2f}/{b:.2f}' for a, b in zip(t['rewrite_group'], c['rewrite_group'])]}, new-4k "
        f"{t['new_4k'][0]:.2f}/{c['new_4k'][0]:.2f} s; {state}")
    fs("commit", NAME)
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", default="ABBA", help="peer order, e.g. ABBA or AB")
    ap.add_argument("--small", default="8M", help="peer A's store at load")
    ap.add_argument("--store", default="1G", help="the grown store (A) = the store loaded (B)")
    ap.add_argument("--targets", type=int, default=16, help="K bucket indices to load")
    ap.add_argument("--density", type=int, default=192, help="exceptions per 1 MiB target group (<= 224)")
    ap.add_argument("--new-per-group", type=int, default=16, help="new exceptions per group, timed")
    ap.add_argument("--rewrites", type=int, default=8000, help="random 4 KiB rewrites per pass")
    ap.add_argument("--span-repeats", type=int, default=24, help="group writes per group per pass")
    ap.add_argument("--passes", type=int, default=4, help="passes of the rewrite workloads per round")
    ap.add_argument("--threads", type=int, default=4, help="writer threads for the prepopulation")
    args = ap.parse_args()
    assert 1 <= args.density <= GROUP_CHUNKS - args.new_per_group
    disk, results = require_lab()
    t_start = time.monotonic()
    disk_bytes = int(sh("blockdev", "--getsize64", disk).stdout)
    groups_total = disk_bytes // GROUP

    log(f"mkfs.ext4 {disk} ({disk_bytes / 2**30:.1f} GiB), setup, fill with fallocated files")
    sh("mkfs.ext4", "-F", "-q", "-b", "4096", "-N", "16384", "-J", "size=64",
       "-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard", disk)
    fs = Fiesnap(STATE)
    fs("setup", disk, "--name", NAME)
    os.makedirs(MNT, exist_ok=True)
    sh("mount", f"/dev/mapper/{NAME}", MNT)
    covered = fill_and_map(MNT)
    # A's table at load, predicted: the store file minus its 4 KiB identity block, in chunks.
    buckets_a = hash_sizes((parse_size(args.small) - 4 * KiB) // CHUNK)[0]
    targets, per_bucket = choose_targets(covered, groups_total, buckets_a, args.targets)
    controls = choose_controls(covered, groups_total, buckets_a, targets, len(targets))
    keep = {covered[g] for g in targets + controls}
    for path in set(covered.values()) - keep:
        os.unlink(path)
    sh("sync")
    sv = os.statvfs(MNT)
    log(f"{len(targets)} target groups ({args.targets} bucket indices x up to {per_bucket} groups each), "
        f"{len(controls)} control groups; kept {len(keep)} files, {sv.f_bavail * sv.f_frsize / MiB:.0f} MiB free")
    sh("umount", MNT)

    saved = list(range(GROUP_CHUNKS - 1, GROUP_CHUNKS - 1 - args.density, -1))  # 255, 254, ... descending
    new_chunks = list(range(args.new_per_group - 1, -1, -1))  # 15 .. 0, below the saved ones
    rnd = random.Random(4)
    pairs = [(rnd.randrange(len(targets)), rnd.choice(saved)) for _ in range(args.rewrites)]
    sets: dict[str, dict] = {}
    for k, groups in (("target", targets), ("control", controls)):
        rw = [(groups[i], c) for i, c in pairs]  # the same ranks in both sets
        sets[k] = {"groups": groups, "saved": saved, "new_chunks": new_chunks, "rewrite_pairs": rw,
                   "rewrite_offsets": [g * GROUP + c * CHUNK for g, c in rw],
                   "spans": [(g * GROUP + saved[-1] * CHUNK, len(saved) * CHUNK) for g in groups] * args.span_repeats}

    rounds = [run_round(fs, peer, args, sets) for peer in args.rounds]

    # ---- aggregate
    def series(peer: str, kind: str, w: str) -> list[float]:
        return [x for r in rounds if r["peer"] == peer for x in r["times_s"][kind][w]]

    peers = [p for p in "AB" if p in args.rounds]
    buckets = {p: next(r["complete_buckets"] for r in rounds if r["peer"] == p) for p in peers}
    if "A" in buckets and buckets["A"] != buckets_a:
        log(f"WARNING: A's table has {buckets['A']} buckets, the layout assumed {buckets_a}: "
            "the target groups do not collide as planned")
    counts = {"rewrite_4k": args.rewrites, "rewrite_group": len(sets["target"]["spans"]),
              "new_4k": len(targets) * len(new_chunks)}
    visits = {}
    for p, b in buckets.items():
        for k in sets:
            st = sets[k]
            visits[(p, k)] = model_visits(st["groups"], args.density, b, st["rewrite_pairs"],
                                          [o // GROUP for o, _n in st["spans"]],
                                          [(g, c) for g in st["groups"] for c in new_chunks])
    table = {}
    for w, n in counts.items():
        row: dict = {"writes": n}
        for p in peers:
            t, c = series(p, "target", w), series(p, "control", w)
            norm = [a / b for a, b in zip(t, c)]
            row[p] = {"target_median_s": round(median(t), 4), "control_median_s": round(median(c), 4),
                      "target_over_control_median": round(median(norm), 4),
                      "us_per_write_target": round(median(t) / n * 1e6, 1),
                      "entries_visited_per_write_target": round(visits[(p, "target")][w] / n, 1),
                      "entries_visited_per_write_control": round(visits[(p, "control")][w] / n, 1)}
        if "A" in row and "B" in row:
            a, b = row["A"], row["B"]
            row["ratio_A_over_B"] = round(a["target_over_control_median"] / b["target_over_control_median"], 3)
            row["ratio_A_over_B_raw"] = round(a["target_median_s"] / b["target_median_s"], 3)
            row["control_A_over_B"] = round(a["control_median_s"] / b["control_median_s"], 3)
            ctrl = median(series("A", "control", w) + series("B", "control", w))
            dt = (a["target_over_control_median"] - b["target_over_control_median"]) * ctrl / n
            dv = (visits[("A", "target")][w] - visits[("B", "target")][w]) / n
            # None: A was not slower (the difference is below the noise).
            row["ns_per_extra_entry"] = round(dt / dv * 1e9, 1) if dv > 0 and dt > 0 else None
        table[w] = row

    out = {
        "benchmark": "hash_bench",
        "machine": machine(),
        "config": {**vars(args), "disk": disk, "disk_bytes": disk_bytes, "origin_groups_1MiB": groups_total,
                   "target_groups": len(targets), "control_groups": len(controls),
                   "groups_sharing_a_bucket_in_A": per_bucket,
                   "chunk_bytes": CHUNK},
        "kernel_source": {
            "file": "drivers/md/dm-snap.c (init_hash_tables, calc_max_buckets, exception_hash, "
                    "dm_lookup_exception, dm_insert_exception, __origin_write)",
            "max_buckets": MAX_BUCKETS, "hash_shift_complete": 8, "hash_shift_pending": 0,
        },
        "hash_tables": {p: {"complete": b, "pending": max(64, b >> 3),
                            "chain_len_in_target_buckets": visits[(p, "target")]["chain_len"],
                            "chain_len_in_control_buckets": visits[(p, "control")]["chain_len"]}
                        for p, b in buckets.items()},
        "workloads": table,
        "rounds": rounds,
        "total_seconds": round(time.monotonic() - t_start, 1),
    }
    m = out["machine"]
    summary = [
        f"hash_bench: {m['kernel']}, {m['cpus']} vCPU, {m['emulation']}; disk {disk_bytes / 2**30:.1f} GiB = "
        f"{groups_total} 1-MiB groups; 4 KiB chunks; rounds {args.rounds}",
        "A: start --size %s, extend --to %s -> %d buckets (pending %d); B: start --size %s -> %d buckets (pending %d)" % (
            args.small, args.store, buckets.get("A", 0), max(64, buckets.get("A", 0) >> 3),
            args.store, buckets.get("B", 0), max(64, buckets.get("B", 0) >> 3)),
        f"layout: {len(targets)} target groups x {args.density} single-chunk exceptions; in A up to {per_bucket} "
        f"groups share a bucket (chain {visits.get(('A', 'target'), {}).get('chain_len')}), in B 1 (chain "
        f"{visits.get(('B', 'target'), {}).get('chain_len')}); {len(controls)} control groups alone in their bucket in both",
        "ratio = A/B of the median per-pass (target time / control time); raw = A/B of the target times",
    ]
    for w, row in table.items():
        parts = [f"{p} {row[p]['target_median_s']:.3f}s ({row[p]['us_per_write_target']} us/write, "
                 f"~{row[p]['entries_visited_per_write_target']} entries; /control {row[p]['target_over_control_median']})"
                 for p in ("A", "B") if p in row]
        extra = ""
        if "ratio_A_over_B" in row:
            extra = (f" -> A/B = {row['ratio_A_over_B']} (raw {row['ratio_A_over_B_raw']}, "
                     f"control A/B {row['control_A_over_B']})")
            extra += (f", {row['ns_per_extra_entry']} ns per extra entry visited" if row["ns_per_extra_entry"]
                      else ", A not slower")
        summary.append(f"{w} ({row['writes']} writes): " + ", ".join(parts) + extra)
    summary.append(f"total {out['total_seconds']} s")
    write_results(results, "hash_bench", out, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
