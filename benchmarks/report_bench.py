#!/usr/bin/env python3
"""The A/B report's measurements: every workload (benchmarks/workloads.py) against every peer,
from the same checkpoint-time image, in one lab guest. `make report` runs it and renders
benchmarks/REPORT.md from what it writes (benchmarks/render_report.py).

    .venv/bin/python -m tests.lab script benchmarks/report_bench.py --disks 4 --disk-size 3G --timeout 7200
    ... -- --workloads package_upgrade,database --fs-mib 1024 [--no-verify]

Disks: 1 the filesystem under test (ext4, FS_MIB), 2 the dm-log-writes log, 3 LVM's physical
volume, 4 a work filesystem holding the checkpoint-time image (base.img) and the dm-bow model's
output. Per workload, in this order, each from base.img:

  none       the workload on the plain filesystem: the time every ratio is against
  trace      the workload through dm-log-writes (bow_compat.capture: fstrim, mark while frozen);
             the trace is replayed through the dm-bow model (bow_compat.replay: backup and log
             bytes; its CPU time is a Python model's and reported only as such), and gives the
             lower bound with the free maps at the mark and at the end (report_model.lower_bound)
  plain      `fiesnap start --plain` offline, the workload on /dev/mapper/NAME (timed), the
             store's use (`status`), the kernel's in-core exceptions (dm_exception slab), then
             `merge --keep-store` (timed, in-process) and a raw O_DIRECT copy of the same runs
             from the kept store to the same places (the limit); the device after the merge
             against a hash of the checkpoint image read before any write, outside the store
             file's blocks, and e2fsck -fn (`--no-verify` skips both)
  free_aware the same with `--free-aware` (the merge and check too; the check skips the blocks
             free at the checkpoint, which this store does not keep: nothing of the
             filesystem's is there)
  instant    plain again, then `merge --instant`: time until the filesystem mounts, time until
             the kernel's merge is finished
  lvm        the workload on an LVM logical volume holding base.img, without and with a thick
             snapshot (`lvcreate -s -c 4k`), its COW use, slab, `lvconvert --merge -i 1` time

fiesnap runs in-process (no Python start-up in any time). Every timed run starts with dropped
caches and ends with `sync`. Results: $FIESNAP_LAB_RESULTS/<workload>.json and .txt.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (MiB, REPO, drop_caches, have_lvm, log, lvm, machine, quiet, raw_same_runs,  # noqa: E402
                    require_lab, sh, slab_info, slab_objects, store_device, timed, trace_chunks, write_results)
from report_model import lower_bound, ratios  # noqa: E402
from workloads import BLOCK, Workload, by_name, preflight  # noqa: E402

from bow_compat.capture import capture  # noqa: E402
from bow_compat.image import copy_prefix  # noqa: E402
from bow_compat.replay import replay  # noqa: E402
from fiesnap.commands import merge as merge_cmd  # noqa: E402
from fiesnap.commands import start as start_cmd  # noqa: E402
from fiesnap.commands import status as status_cmd  # noqa: E402
from fiesnap.kernel.dm import DeviceMapper  # noqa: E402
from fiesnap.kernel.fsmap import free_space  # noqa: E402
from fiesnap.model.cowtable import LINEAR  # noqa: E402
from fiesnap.model.extents import free_chunks  # noqa: E402
from fiesnap.model.snapstatus import parse_snapshot_status  # noqa: E402
from fiesnap.services.cowio import make_plan, read_table  # noqa: E402
from fiesnap.services.stack import StackNames  # noqa: E402
from fiesnap.services.statedir import StateStore  # noqa: E402

NAME = "ab"
STATE = "/tmp/ab-state"
MNT = "/tmp/ab-mnt"
WORK = "/tmp/ab-work"
MARK = "checkpoint"
VG = "abvg"
HASH_BLOCK = 4 * MiB


# --------------------------------------------------------------------- plumbing

def restore(base: str, dev: str, nbytes: int) -> None:
    copy_prefix(base, dev, nbytes)


def prewrite(dev: str) -> None:
    size = int(sh("blockdev", "--getsize64", dev).stdout)
    sh("dd", "if=/dev/zero", f"of={dev}", "bs=4M", f"count={size // (4 * MiB)}", "oflag=direct", "status=none",
       timeout=3600)


def timed_run(w: Workload, dev: str) -> tuple[float, dict]:
    """The workload on `dev` mounted at MNT, from a cold cache, `sync` included."""
    drop_caches()
    sh("mount", dev, MNT)
    figures: dict = {}
    try:
        t = timed(lambda: (figures.update(w.run(MNT) or {}), os.sync()))
    finally:
        sh("umount", MNT)
    return round(t, 3), figures


def free_map(dev: str) -> list[tuple[int, int]]:
    sh("mount", "-o", "ro,noload", dev, MNT)
    try:
        return free_space(MNT)
    finally:
        sh("umount", MNT)


def image_hash(dev: str, nbytes: int, skip: list[tuple[int, int]]) -> str:
    """blake2b of `dev`'s first `nbytes` with the byte ranges in `skip` read as zeros."""
    h = hashlib.blake2b(digest_size=20)
    skip = sorted(skip)
    with open(dev, "rb", buffering=0) as f:
        for off in range(0, nbytes, HASH_BLOCK):
            n = min(HASH_BLOCK, nbytes - off)
            buf = bytearray(f.read(n))
            for s, length in skip:
                a, b = max(s, off), min(s + length, off + n)
                if a < b:
                    buf[a - off:b - off] = bytes(b - a)
            h.update(buf)
    return h.hexdigest()


def git_commit() -> str:
    g = ("git", "-c", "safe.directory=*", "-C", REPO)
    head = subprocess.run((*g, "rev-parse", "HEAD"), capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run((*g, "status", "--porcelain", "--untracked-files=no"), capture_output=True,
                           text=True).stdout.strip()
    return head + ("+changes" if dirty else "") if head else "unknown"


# --------------------------------------------------------------------- peers

def peer_trace(w: Workload, data: str, logdev: str, base: str, out: str, fs_bytes: int,
               free_at_mark) -> tuple[dict, dict, int]:
    capture(data, logdev, MNT, lambda root: (w.run(root), None)[1], sectors=fs_bytes // 512, mark=MARK)
    at_end = free_chunks(free_map(data), BLOCK)
    t0 = time.monotonic()
    try:
        rep = replay(logdev, base, out, mark=MARK, block_size=BLOCK).to_dict()
    finally:
        if os.path.exists(out):     # the model's output image: nothing reads it, and the next
            os.unlink(out)          # workload's replay must not find it
    model_s = time.monotonic() - t0
    written = trace_chunks(logdev, MARK, BLOCK)
    lb = lower_bound(written, free_chunks(free_at_mark, BLOCK), at_end, BLOCK)
    bow = {"backup_bytes": rep["backup_bytes"], "log_bytes": rep["log_bytes"], "log_sectors": rep["log_sectors"],
           "trace_data_bytes": rep["data_bytes"], "copy_io_bytes": rep["copy_io_bytes"],
           "model_cpu_s": round(model_s, 2), "replay": rep,
           "note": "bow_compat's dm-bow model replaying the trace; its time is a Python model's"}
    per_meta = BLOCK // 16
    plain_need = (len(written) + -(-len(written) // per_meta) + 1) * BLOCK
    return bow, lb, plain_need


def fiesnap_peer(w: Workload, data: str, base: str, fs_bytes: int, store: int, mode: str,
                 verify: bool, instant: bool = False) -> dict:
    restore(base, data, fs_bytes)
    os.makedirs(STATE, mode=0o700, exist_ok=True)
    os.chmod(STATE, 0o700)
    s0 = slab_objects()
    t0 = time.monotonic()
    start_cmd.start(start_cmd.StartRequest(data, store, name=NAME, free_aware=(mode == "free_aware")),
                    DeviceMapper, StateStore(STATE), quiet)
    start_s = time.monotonic() - t0
    record = StateStore(STATE).load(NAME)
    skip = [(e.physical, e.length) for e in record.store_extents]
    if mode == "free_aware":
        # What it promises: every block in use at the checkpoint. Blocks free then were seeded,
        # so writes there went to the disk, and nothing of theirs is the filesystem's.
        skip += list(record.free_map)
    checkpoint_hash = image_hash(f"/dev/mapper/{NAME}", fs_bytes, skip) if verify and not instant else None
    s1 = slab_objects()
    write_s, figures = timed_run(w, f"/dev/mapper/{NAME}")
    s2 = slab_objects()
    st = status_cmd.status(DeviceMapper, StateStore(STATE), NAME)[0].to_dict()
    res = {"mode": mode, "write_s": write_s, "figures": figures, "start_s": round(start_s, 3),
           "store_bytes": st["store_bytes"], "used_bytes": st["used_bytes"], "metadata_bytes": st["metadata_bytes"],
           "seeded_bytes": st["seeded_bytes"], "segments": st["segments"], "state": st["state"],
           "seeded_areas": record.seeded_areas, "exceptions_in_core_at_start": s1 - s0,
           # every flush of NAME-cow (each metadata commit) goes to each of these (flush_bench.py)
           "cow_linear_targets": sum(1 for seg in record.cow.segments if seg.kind == LINEAR),
           "exceptions_in_core": s2 - s0}
    if st["state"] != "active":
        raise RuntimeError(f"{w.name}/{mode}: the snapshot is {st['state']} after the workload (store too small?)")
    if instant:
        t0 = time.monotonic()
        merge_cmd.merge(NAME, DeviceMapper, StateStore(STATE), quiet, instant=True)
        res["handover_s"] = round(time.monotonic() - t0, 3)
        sh("mount", "-o", "ro", f"/dev/mapper/{NAME}", MNT)
        res["instant_mount_s"] = round(time.monotonic() - t0, 3)
        sh("umount", MNT)
        merge_cmd.merge(NAME, DeviceMapper, StateStore(STATE), quiet, keep_store=True)
        res["instant_finish_s"] = round(time.monotonic() - t0, 3)
        return res
    cow = f"/dev/mapper/{StackNames.for_name(NAME).cow}"
    table = read_table(cow, record)
    ranges = list(make_plan(table, record).byte_ranges(record.device_bytes))
    t0 = time.monotonic()
    m = merge_cmd.merge(NAME, DeviceMapper, StateStore(STATE), quiet, keep_store=True)
    res["merge"] = {"fiesnap_s": round(time.monotonic() - t0, 3), "copy_s": round(m.seconds, 3), "runs": m.runs,
                    "chunks": m.chunks, "bytes": m.bytes_copied}
    if verify:
        res["merge"]["exact"] = image_hash(data, fs_bytes, skip) == checkpoint_hash
        res["merge"]["fsck_clean"] = sh("e2fsck", "-fn", data, check=False).returncode == 0
        if not (res["merge"]["exact"] and res["merge"]["fsck_clean"]):
            raise RuntimeError(f"{w.name}/{mode}: the rollback is not the checkpoint image: {res['merge']}")
    if ranges:
        dm = DeviceMapper()
        src = store_device(dm, record, "ab-store")
        try:
            res["merge"]["raw_same_runs_s"] = round(raw_same_runs(src, data, ranges), 3)
        finally:
            dm.remove("ab-store")
    return res


def lvm_peer(w: Workload, pv: str, base: str, fs_bytes: int, cow_bytes: int) -> dict | None:
    if not have_lvm():
        log("lvm2 is not installed: the LVM peer is skipped (`make bench-sysdeps` installs it)")
        return None
    sh("wipefs", "-aq", pv)
    lvm("pvcreate", "-qq", "-y", pv)
    lvm("vgcreate", "-qq", VG, pv)
    try:
        lvm("lvcreate", "-qq", "-y", "-W", "n", "-Z", "n", "-n", "origin", "-L", f"{fs_bytes // MiB}M", VG)
        origin = f"/dev/{VG}/origin"
        restore(base, origin, fs_bytes)
        none_s, none_figures = timed_run(w, origin)
        restore(base, origin, fs_bytes)
        s0 = slab_objects()
        cow_mib = -(-cow_bytes // MiB)
        lvm("lvcreate", "-qq", "-y", "-s", "-c", "4k", "-n", "snap", "-L", f"{cow_mib}M", f"{VG}/origin")
        write_s, figures = timed_run(w, origin)
        s1 = slab_objects()
        lines = DeviceMapper().status(f"{VG}-snap")
        u = parse_snapshot_status(lines[0].params if lines else "Invalid")
        if u.state != "active":
            raise RuntimeError(f"{w.name}/lvm: the snapshot is {u.state} after the workload")
        t0 = time.monotonic()
        lvm("lvconvert", "-qq", "--merge", "-i", "1", f"{VG}/snap", timeout=3600)
        merge_s = time.monotonic() - t0
        return {"none_write_s": none_s, "none_figures": none_figures, "write_s": write_s, "figures": figures,
                "cow_bytes": cow_mib * MiB, "cow_used_bytes": u.used_bytes, "metadata_bytes": u.metadata_bytes,
                "chunk_bytes": 4096, "exceptions_in_core": s1 - s0, "lvconvert_merge_s": round(merge_s, 3)}
    finally:
        lvm("vgremove", "-qq", "-f", VG, check=False)
        lvm("pvremove", "-qq", "-y", pv, check=False)


def clean_up() -> None:
    """After a failed workload: whatever it left mounted or loaded, so the next one starts clean
    (dmsetup here is the benchmark's tool, not fiesnap's)."""
    sh("umount", MNT, check=False)
    sh("dmsetup", "remove_all", "--force", check=False)
    if have_lvm():
        lvm("vgremove", "-qq", "-f", VG, check=False)
    sh("rm", "-rf", STATE, check=False)


# --------------------------------------------------------------------- one workload

def one_workload(w: Workload, disks: list[str], fs_bytes: int, verify: bool) -> dict:
    data, logdev, pv, _ = disks
    base, out = f"{WORK}/base.img", f"{WORK}/bow-out.img"
    log(f"{w.name}: mkfs, populate")
    sh("wipefs", "-aq", data)
    sh("mkfs.ext4", "-F", "-q", "-b", str(BLOCK), "-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard",
       data, str(fs_bytes // BLOCK))
    sh("mount", data, MNT)
    t_pop = timed(lambda: (w.populate(MNT), os.sync()))
    sv = os.statvfs(MNT)
    used = (sv.f_blocks - sv.f_bfree) * sv.f_frsize
    sh("umount", MNT)
    copy_prefix(data, base, fs_bytes)
    at_mark = free_map(data)

    log(f"{w.name}: no checkpoint")
    restore(base, data, fs_bytes)   # as before every peer: the same bytes, every block written once
    none_s, none_figures = timed_run(w, data)
    log(f"{w.name}:   {none_s:.1f} s {none_figures}")

    log(f"{w.name}: dm-log-writes trace, dm-bow model, lower bound")
    restore(base, data, fs_bytes)
    bow, lb, plain_need = peer_trace(w, data, logdev, base, out, fs_bytes, at_mark)
    store = plain_need + plain_need // 4 + 32 * MiB
    store -= store % MiB
    log(f"{w.name}:   dm-bow backup {bow['backup_bytes'] / MiB:.1f} MiB, lower bound {lb['bytes'] / MiB:.1f} MiB; "
        f"store {store // MiB} MiB")

    fiesnap = {}
    for mode in ("plain", "free_aware"):
        log(f"{w.name}: fiesnap {mode}")
        fiesnap[mode] = fiesnap_peer(w, data, base, fs_bytes, store, mode, verify)
        p = fiesnap[mode]
        log(f"{w.name}:   {p['write_s']:.1f} s, used {p['used_bytes'] / MiB:.1f} MiB, merge {p['merge']}")
    log(f"{w.name}: fiesnap plain, merge --instant")
    inst = fiesnap_peer(w, data, base, fs_bytes, store, "plain", verify, instant=True)
    log(f"{w.name}:   mount after {inst['instant_mount_s']:.2f} s, finished after {inst['instant_finish_s']:.2f} s")

    log(f"{w.name}: LVM")
    lv = lvm_peer(w, pv, base, fs_bytes, store)
    if lv:
        log(f"{w.name}:   {lv['none_write_s']:.1f} s without, {lv['write_s']:.1f} s with the snapshot; "
            f"COW {lv['cow_used_bytes'] / MiB:.1f} MiB; lvconvert --merge {lv['lvconvert_merge_s']:.2f} s")

    pm = fiesnap["plain"].pop("merge")
    fam = fiesnap["free_aware"].pop("merge")
    merge = {"fiesnap_s": pm["fiesnap_s"], "copy_s": pm["copy_s"], "raw_same_runs_s": pm.get("raw_same_runs_s"),
             "bytes": pm["bytes"], "runs": pm["runs"], "chunks": pm["chunks"], "exact": pm.get("exact"),
             "fsck_clean": pm.get("fsck_clean"),
             "lvconvert_s": lv["lvconvert_merge_s"] if lv else None,
             "instant_handover_s": inst["handover_s"], "instant_mount_s": inst["instant_mount_s"],
             "instant_finish_s": inst["instant_finish_s"], "instant_write_s": inst["write_s"],
             "free_aware": fam}
    res = {
        "workload": {"name": w.name, "title": w.title, "what": w.what, "data": w.data},
        "setup": {"filesystem": "ext4", "fs_bytes": fs_bytes, "block_bytes": BLOCK, "chunk_bytes": BLOCK,
                  "used_at_checkpoint": used, "free_at_checkpoint": sum(n for _, n in at_mark),
                  "store_bytes_asked": store, "populate_s": round(t_pop, 2),
                  "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "git_commit": git_commit(),
                  "verified": verify},
        "machine": machine() | {"slab": slab_info()},
        "none": {"write_s": none_s, "figures": none_figures},
        "fiesnap": fiesnap,
        "bow": bow,
        "lvm": lv,
        "lower_bound": lb,
        "merge": merge,
        "units": {"*_bytes": "bytes", "*_s": "seconds (wall clock, qemu TCG guest)",
                  "exceptions_in_core*": "dm_exception slab objects (32 bytes each)",
                  "ratios": "peer / reference, 1.0 = equal"},
    }
    res["ratios"] = ratios(res)
    return res


def summary_lines(r: dict) -> list[str]:
    mib = 1 << 20
    fs, q = r["fiesnap"], r["ratios"]
    lines = [f"{r['workload']['name']}: none {r['none']['write_s']:.1f} s; lower bound {r['lower_bound']['bytes'] / mib:.1f} MiB; "
             f"dm-bow backup {r['bow']['backup_bytes'] / mib:.1f} MiB + log {r['bow']['log_bytes'] / mib:.1f} MiB"]
    for mode in ("plain", "free_aware"):
        lines.append(f"  fiesnap {mode}: used {fs[mode]['used_bytes'] / mib:.1f} MiB (x{q[mode]['space_vs_bow']} dm-bow, "
                     f"x{q[mode]['space_vs_lower_bound']} lower bound); write x{q[mode]['write_vs_none']} "
                     f"(x{q[mode]['write_vs_lvm']} LVM's)")
    if r["lvm"]:
        lines.append(f"  lvm: COW {r['lvm']['cow_used_bytes'] / mib:.1f} MiB; write x{q['lvm_write_vs_none']}")
    m = r["merge"]
    lines.append(f"  merge {m['fiesnap_s']:.2f} s (x{q['merge_vs_raw']} raw copy {m['raw_same_runs_s']}); "
                 f"lvconvert {m['lvconvert_s']}; instant mount {m['instant_mount_s']:.2f} s, finish {m['instant_finish_s']:.2f} s")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", default="all", help="comma-separated names (benchmarks/workloads.py)")
    ap.add_argument("--fs-mib", type=int, default=1024)
    ap.add_argument("--no-verify", dest="verify", action="store_false",
                    help="skip the byte comparison and fsck after each merge")
    args = ap.parse_args()
    _, results = require_lab()
    disks = os.environ.get("FIESNAP_LAB_DISKS", "").split()
    if len(disks) < 4:
        raise SystemExit("needs four scratch disks: give the lab --disks 4 --disk-size 3G")
    workloads = by_name(args.workloads)
    preflight(workloads)
    for d in (WORK, MNT):
        os.makedirs(d, exist_ok=True)
    sh("mkfs.ext4", "-F", "-q", disks[3])
    sh("mount", disks[3], WORK)
    # The lab's disks are sparse files: a first write anywhere costs the host an allocation.
    # Write LVM's disk once, as restore() writes the data disk before every peer, so no peer's
    # store lands on never-written blocks.
    log("writing the LVM disk once")
    prewrite(disks[2])
    failed = []
    try:
        for w in workloads:
            t0 = time.monotonic()
            try:
                r = one_workload(w, disks[:4], args.fs_mib * MiB, args.verify)
            except (Exception, SystemExit):
                traceback.print_exc()
                failed.append(w.name)
                clean_up()
                continue
            r["setup"]["workload_total_s"] = round(time.monotonic() - t0, 1)
            write_results(results, w.name, r, summary_lines(r))
    finally:
        sh("umount", WORK, check=False)
    if failed:
        log(f"failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
