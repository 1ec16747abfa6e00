"""The A/B report's arithmetic, apart from the lab: the lower bound, the ratios, and where fiesnap
loses and why. Pure functions over plain data, so the unit tests run them without root.

A workload's result (benchmarks/results/<workload>.json) has one section per peer: `none` (the
workload with no checkpoint), `fiesnap` (`plain` and `free_aware` stores), `bow` (the dm-bow
model replaying a dm-log-writes trace), `lvm` (a thick LVM snapshot), `lower_bound` and `merge`.
"""

from __future__ import annotations

from collections.abc import Container, Iterable


def lower_bound(written: Iterable[int], free_at_mark: Container[int], free_at_end: Iterable[int],
                chunk_bytes: int) -> dict:
    """The least any checkpoint has to hold when the workload ends: chunks that were in use at
    the checkpoint (not free in its free map) and were overwritten (a write or a discard after
    the mark). Chunks in use at the checkpoint that the workload freed but nothing overwrote
    still hold their checkpoint data on the disk; they are counted beside the bound
    (`freed_untouched_*`): a store needs them only once something writes there, and then that
    write is what it saves."""
    touched = set(written)
    overwritten = {c for c in touched if c not in free_at_mark}
    freed = {c for c in free_at_end if c not in free_at_mark and c not in touched}
    return {
        "chunk_bytes": chunk_bytes,
        "chunks": len(overwritten),
        "bytes": len(overwritten) * chunk_bytes,
        "written_into_free_chunks": len(touched) - len(overwritten),
        "freed_untouched_chunks": len(freed),
        "freed_untouched_bytes": len(freed) * chunk_bytes,
        "overwritten_or_freed_bytes": (len(overwritten) + len(freed)) * chunk_bytes,
    }


def _ratio(a, b) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def ratios(res: dict) -> dict:
    """Every ratio the report states for one workload (None where a peer did not run)."""
    none_s = res["none"]["write_s"]
    fs = res["fiesnap"]
    lvm = res.get("lvm") or {}
    bow = res.get("bow") or {}
    lb = res["lower_bound"]["bytes"]
    merge = res.get("merge") or {}
    lvm_write = _ratio(lvm.get("write_s"), lvm.get("none_write_s"))
    out: dict = {"lvm_write_vs_none": lvm_write}
    for mode in ("plain", "free_aware"):
        p = fs.get(mode)
        if not p:
            continue
        w = _ratio(p["write_s"], none_s)
        out[mode] = {
            "space_vs_bow": _ratio(p["used_bytes"], bow.get("backup_bytes")),
            "space_vs_bow_with_log": _ratio(p["used_bytes"], (bow.get("backup_bytes") or 0) + (bow.get("log_bytes") or 0)
                                            if bow else None),
            "space_vs_lower_bound": _ratio(p["used_bytes"], lb),
            "space_vs_lvm": _ratio(p["used_bytes"], lvm.get("cow_used_bytes")),
            "write_vs_none": w,
            "write_vs_lvm": _ratio(w, lvm_write),
        }
    out["bow_vs_lower_bound"] = _ratio(bow.get("backup_bytes"), lb)
    out["lvm_vs_lower_bound"] = _ratio(lvm.get("cow_used_bytes"), lb)
    out["merge_vs_raw"] = _ratio(merge.get("fiesnap_s"), merge.get("raw_same_runs_s"))
    out["merge_copy_vs_raw"] = _ratio(merge.get("copy_s"), merge.get("raw_same_runs_s"))
    out["lvconvert_vs_merge"] = _ratio(merge.get("lvconvert_s"), merge.get("fiesnap_s"))
    out["instant_mount_vs_merge"] = _ratio(merge.get("instant_mount_s"), merge.get("fiesnap_s"))
    out["instant_finish_vs_merge"] = _ratio(merge.get("instant_finish_s"), merge.get("fiesnap_s"))
    jobs = (res["none"].get("figures") or {}).get("jobs")
    if jobs:
        out["fio_jobs"] = {job: {peer: job_ratio(res, peer, job) for peer in ("plain", "free_aware", "lvm")}
                           for job in jobs}
    return out


def _jobs(section: dict | None, key: str = "figures") -> dict:
    return ((section or {}).get(key) or {}).get("jobs") or {}


def job_ratio(res: dict, peer: str, job: str) -> float | None:
    """One fio job's run time under a peer against the same job with no checkpoint (LVM's
    against its own logical volume without a snapshot)."""
    if peer == "lvm":
        lvm = res.get("lvm")
        a, b = _jobs(lvm).get(job), _jobs(lvm, "none_figures").get(job)
    else:
        a, b = _jobs(res["fiesnap"].get(peer)).get(job), _jobs(res["none"]).get(job)
    return _ratio(a and job_seconds(a), b and job_seconds(b))


def job_seconds(job: dict) -> float:
    """fio's own run time of the job (its I/O and end_fsync, without fio's start-up, which on a
    cold cache is most of a short job's wall time); the wall time where fio gave none."""
    return job.get("fio_runtime_s") or job["wall_s"]


# flush_bench.py: the fan-out shows from 16 linear targets on (a fraction of a millisecond per
# flush); from 64 on it is several times one flush, worth naming as a cause.
FANOUT_TARGETS = 64


def _fanout(p: dict, said: set) -> str | None:
    """The flush fan-out of a store whose NAME-cow has many linear targets, or None; in full
    the first time (`said` remembers), after that by reference."""
    n = p.get("cow_linear_targets") or 0
    if n < FANOUT_TARGETS:
        return None
    if "fanout" in said:
        return f"the same flush fan-out over its {n:,} linear targets"
    said.add("fanout")
    what = ("one per pre-written exception area, between zero and error stretches" if p.get("seeded_areas")
            else "one per extent of the store file")
    return (f"its store device (NAME-cow) is a table of {n:,} linear targets, {what}, and device-mapper "
            f"sends the flush that ends each commit of the exception table to every one of them (about "
            f"11 µs each in this lab; benchmarks/flush_bench.py)")


LOSS_MARGIN = 1.05  # within 5% is a tie for one run on a TCG guest


def losses(res: dict, r: dict) -> list[str]:
    """Where fiesnap does worse than a peer, each with the mechanism that explains it, read
    off the figures (sentences for the report)."""
    out: list[str] = []
    said: set[str] = set()
    lb = res["lower_bound"]
    mib = 1 << 20
    for mode, label in (("plain", "plain store"), ("free_aware", "free-aware store")):
        p = res["fiesnap"].get(mode)
        q = r.get(mode)
        if not p or not q:
            continue
        sv = q["space_vs_bow"]
        if sv is not None and sv > LOSS_MARGIN:
            why = []
            into_free = lb["written_into_free_chunks"] * lb["chunk_bytes"]
            if mode == "plain" and into_free > 0.1 * max(p["used_bytes"], 1):
                why.append(f"the plain store also saves the {into_free / mib:.1f} MiB written into blocks that "
                           f"were free at the checkpoint, which dm-bow skips (they were trimmed)")
            meta = p.get("metadata_bytes") or 0
            if meta > 0.1 * max(p["used_bytes"], 1):
                why.append(f"{meta / mib:.1f} MiB of its use is exception-table metadata"
                           + (" (mostly the pre-written table of the free chunks)" if mode == "free_aware" else ""))
            if not why:
                why.append("dm-snapshot saves whole 4 KiB chunks the way dm-bow saves blocks; the rest is its "
                           "header and exception table")
            out.append(f"fiesnap's {label} needs {sv:.2f}x dm-bow's backup bytes: " + "; ".join(why) + ".")
        lvm_res = res.get("lvm") or {}
        if not lvm_res.get("write_s"):
            continue
        direct = p["write_s"] / lvm_res["write_s"]
        lvm_ratio, own = r.get("lvm_write_vs_none"), q["write_vs_none"]
        refs = f"{own:.2f}x and {lvm_ratio:.2f}x their references" if lvm_ratio else f"{own:.2f}x its reference"
        if direct > LOSS_MARGIN:
            why = _fanout(p, said) or ("both are the same dm-snapshot target with 4 KiB chunks and a persistent "
                                       "store; nothing this report measures tells them apart, so one run's "
                                       "noise is not ruled out")
            out.append(f"fiesnap's {label} took {direct:.2f}x LVM's time with a snapshot ({p['write_s']:.1f} s "
                       f"against {lvm_res['write_s']:.1f} s; {refs}): {why}.")
        elif (q["write_vs_lvm"] or 0) > LOSS_MARGIN and lvm_ratio and lvm_ratio >= 1 / LOSS_MARGIN:
            out.append(f"fiesnap's {label} slowed the workload more against its reference than LVM's snapshot "
                       f"did ({refs}), but with the checkpoint it took {direct:.2f}x LVM's time with a snapshot "
                       f"({p['write_s']:.1f} s against {lvm_res['write_s']:.1f} s): the references differ, "
                       f"fiesnap's being the bare disk and LVM's its logical volume (a device-mapper device "
                       f"on another disk).")
    pl, fa = res["fiesnap"].get("plain"), res["fiesnap"].get("free_aware")
    if pl and fa and pl.get("write_s") and fa["write_s"] > LOSS_MARGIN * pl["write_s"]:
        out.append(f"The free-aware store's writes took {fa['write_s'] / pl['write_s']:.2f}x the plain store's "
                   f"({fa['write_s']:.1f} s against {pl['write_s']:.1f} s): "
                   + (_fanout(fa, said) or "its table's extra entries are the only difference, and this report does "
                      "not isolate their cost") + ".")
    fam = (res["merge"] or {}).get("free_aware") or {}
    if fam.get("raw_same_runs_s") and fam["fiesnap_s"] > LOSS_MARGIN * fam["raw_same_runs_s"]:
        seeded = (fa or {}).get("seeded_bytes") or 0
        out.append(f"fiesnap merge of the free-aware store takes {fam['fiesnap_s'] / fam['raw_same_runs_s']:.2f}x "
                   f"a raw copy of its runs ({fam['fiesnap_s']:.2f} s against {fam['raw_same_runs_s']:.2f} s; "
                   f"its copy alone {fam['copy_s']:.2f} s): before copying it reads and checks the whole "
                   f"exception table, {seeded // res['setup']['chunk_bytes']:,} pre-written entries of free "
                   f"chunks included, which the plain store does not have.")
    mv = r.get("merge_vs_raw")
    if mv is not None and mv > LOSS_MARGIN:
        m = res["merge"]
        out.append(f"fiesnap merge takes {mv:.2f}x a raw O_DIRECT copy of the same runs ({m['fiesnap_s']:.2f} s "
                   f"against {m['raw_same_runs_s']:.2f} s): the merge also reads and checks the table twice, "
                   f"plans, fsyncs and releases the stack (its copy alone: {m['copy_s']:.2f} s).")
    lv = r.get("lvconvert_vs_merge")
    if lv is not None and lv < 1 / LOSS_MARGIN:
        out.append(f"lvconvert --merge was faster ({lv:.2f}x fiesnap merge's time).")
    return out
