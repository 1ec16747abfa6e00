#!/usr/bin/env python3
"""Render benchmarks/REPORT.md and its plots from benchmarks/results/<workload>.json.

    .venv/bin/python benchmarks/render_report.py [--results benchmarks/results] [--out benchmarks]

Runs on the host after `make report`'s guests (report_bench.py) have written the results. The
text needs nothing beyond the standard library; the plots need matplotlib (the `report` extra:
`pip install -e '.[report]'`). Re-running replaces REPORT.md and every report-*.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from report_model import job_seconds, losses  # noqa: E402
from workloads import WORKLOADS  # noqa: E402

MiB = 1 << 20
PLOTS = ("report-space.png", "report-write.png", "report-rollback.png", "report-fio.png")


def load(results: Path) -> list[dict]:
    order = {w.name: i for i, w in enumerate(WORKLOADS)}
    out = [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]
    out = [r for r in out if "workload" in r]
    return sorted(out, key=lambda r: order.get(r["workload"]["name"], 99))


def mib(b) -> str:
    return "-" if b is None else f"{b / MiB:.1f}"


def x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def s(v) -> str:
    return "-" if v is None else f"{v:.2f} s"


# --------------------------------------------------------------------- plots

def plots(runs: list[dict], out: Path) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install -e '.[report]')", file=sys.stderr)
        return []
    names = [r["workload"]["name"].replace("_", "\n") for r in runs]

    def bars(fname: str, title: str, ylabel: str, series: list[tuple[str, list]], log: bool = False,
             hline: float | None = None, labels=names) -> None:
        fig, ax = plt.subplots(figsize=(11, 4.8))
        width = 0.8 / len(series)
        for k, (label, vals) in enumerate(series):
            ax.bar([i + (k - (len(series) - 1) / 2) * width for i in range(len(labels))],
                   [v if v is not None else float("nan") for v in vals], width, label=label)  # none: no bar
        ax.set_xticks(list(range(len(labels))), labels, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if log:
            ax.set_yscale("log")
        if hline is not None:
            ax.axhline(hline, color="black", linewidth=0.8)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)

    def col(fn) -> list:
        return [fn(r) for r in runs]

    bars("report-space.png", "Store bytes per peer (MiB, log scale)", "MiB", [
        ("lower bound", col(lambda r: r["lower_bound"]["bytes"] / MiB)),
        ("dm-bow backup (model)", col(lambda r: r["bow"]["backup_bytes"] / MiB)),
        ("fiesnap free-aware", col(lambda r: r["fiesnap"]["free_aware"]["used_bytes"] / MiB)),
        ("fiesnap plain", col(lambda r: r["fiesnap"]["plain"]["used_bytes"] / MiB)),
        ("LVM snapshot COW", col(lambda r: r["lvm"]["cow_used_bytes"] / MiB if r["lvm"] else None)),
    ], log=True)
    bars("report-write.png", "Write time against the same workload with no checkpoint (1.0 = no cost)",
         "time ratio", [
             ("fiesnap plain", col(lambda r: r["ratios"]["plain"]["write_vs_none"])),
             ("fiesnap free-aware", col(lambda r: r["ratios"]["free_aware"]["write_vs_none"])),
             ("LVM snapshot", col(lambda r: r["ratios"]["lvm_write_vs_none"])),
         ], hline=1.0)
    bars("report-rollback.png", "Rollback time (s): fiesnap merge, the raw copy of the same runs, LVM, instant",
         "seconds", [
             ("raw O_DIRECT copy", col(lambda r: r["merge"]["raw_same_runs_s"])),
             ("fiesnap merge", col(lambda r: r["merge"]["fiesnap_s"])),
             ("merge --instant: mountable", col(lambda r: r["merge"]["instant_mount_s"])),
             ("merge --instant: done", col(lambda r: r["merge"]["instant_finish_s"])),
             ("lvconvert --merge", col(lambda r: r["merge"]["lvconvert_s"])),
         ])
    made = ["report-space.png", "report-write.png", "report-rollback.png"]
    fio = next((r for r in runs if r["ratios"].get("fio_jobs")), None)
    if fio:
        jobs = list(fio["ratios"]["fio_jobs"])
        bars("report-fio.png", "fio jobs: time against no checkpoint (1.0 = no cost)", "time ratio", [
            (label, [fio["ratios"]["fio_jobs"][j][peer] for j in jobs])
            for label, peer in (("fiesnap plain", "plain"), ("fiesnap free-aware", "free_aware"), ("LVM snapshot", "lvm"))
        ], hline=1.0, labels=[j.replace("-", "\n", 2) for j in jobs])
        made.append("report-fio.png")
    return made


# --------------------------------------------------------------------- text

def header(runs: list[dict]) -> list[str]:
    r0 = runs[0]
    m, st = r0["machine"], r0["setup"]
    commits = sorted({r["setup"]["git_commit"] for r in runs})
    dates = sorted(r["setup"]["date"] for r in runs)
    return [
        "# A/B report: fiesnap against dm-bow, an LVM snapshot and the lower bound",
        "",
        "Generated by `make report` (benchmarks/report_bench.py in lab guests, then "
        "benchmarks/render_report.py); re-running it replaces this file, the plots and "
        "benchmarks/results/. Do not edit by hand.",
        "",
        f"- Measured {dates[0]} to {dates[-1]}, commit {', '.join(c[:12] + ('+changes' if c.endswith('+changes') else '') for c in commits)}.",
        f"- Kernel {m['kernel']} (dm targets: {', '.join(f'{k} {v}' for k, v in sorted(m['dm_targets'].items()))}); "
        f"{m['emulation']}, {m['cpus']} vCPU, {m['mem_total']} RAM.",
        f"- Each workload on a fresh {st['filesystem']} of {st['fs_bytes'] // MiB} MiB with 4 KiB blocks; "
        f"every store uses 4 KiB chunks (fiesnap, LVM `-c 4k`, dm-bow's 4 KiB blocks). Every peer starts "
        "from the same checkpoint-time image of that workload, written back before each run.",
        "",
        "## How to read it",
        "",
        "- **Space** is what each store holds when the workload ends. fiesnap: `status`'s `used_bytes` "
        "(header, exception-table areas, including a free-aware store's pre-written table, and saved "
        "chunks). dm-bow: bow_compat's model of dm-bow replaying a dm-log-writes trace of the same "
        "workload: its backup bytes (blocks copied into free space) and, beside them, its log bytes. "
        "LVM: the snapshot's allocated COW bytes (its data and metadata). "
        "**Lower bound**: the chunks that were in use at the checkpoint and that the workload "
        "overwrote (a write or a discard after the checkpoint mark in the trace, against the "
        "checkpoint's free map): no checkpoint can hold less. Chunks the workload freed but "
        "nothing overwrote keep their checkpoint data on the disk; they are listed beside the bound "
        "(\"freed, untouched\") but not in it: a store needs them only once something writes there, "
        "and that write is what it saves.",
        "- **Write time** is the workload's wall time from a cold cache to the end of its `sync`, "
        "against the same workload with no checkpoint on the same disk (LVM: against the same "
        "logical volume without a snapshot). \"that / LVM's\" divides fiesnap's slowdown factor by LVM's. "
        "Every run starts from the checkpoint image written back to the disk, so no peer writes "
        "where the host never allocated (the lab's disks are sparse files). The two "
        "references differ: fiesnap's is the bare disk, LVM's a device-mapper device on another disk "
        "(a device under fiesnap between checkpoints runs through its pass-through, also a "
        "device-mapper device), so where the overheads differ the report also compares the times "
        "with the checkpoint directly.",
        "- **Rollback**: `fiesnap merge` (in-process, the whole command) against a raw O_DIRECT copy "
        "of the same runs from the same store to the same places, one I/O at a time (the plain copy "
        "loop; fiesnap's merge keeps several I/Os in flight and can beat it); `lvconvert --merge -i 1` "
        "of the same workload on LVM, run as a command (LVM's start-up included) that polls the "
        "kernel's merge every second, so compare it with `merge --instant`'s time until done, which "
        "also waits for the kernel's merge; `merge --instant`: until the filesystem mounts, and "
        "until the kernel's merge is done. After each offline merge (both stores) the device was "
        "compared with a hash of the checkpoint image read before the workload (outside the store "
        "file's blocks; with the free-aware store also outside the blocks free at the checkpoint, "
        "which it does not keep) and checked with `e2fsck -fn`; the instant rollback and LVM's "
        "merge are timed here, not checked (the test suite checks the instant rollback).",
        "- **Memory**: kernel memory for the snapshot's exceptions, as objects of the `dm_exception` "
        "slab cache (32 bytes each) counted before the start and after the workload.",
        "- **What this lab can tell.** The guest is qemu TCG (emulated CPU, no KVM), its disks are "
        "files in the host's page cache. Absolute times are not hardware times; ratios against a peer "
        "measured in the same run carry over, and each ratio here is from one run. A difference under "
        "5% is called a tie, but one run's noise is at times larger: a ratio below 1.0 against no "
        "checkpoint is noise. The report's two guests run side by side and share the host's two "
        "cores, so a workload's peers do not all run under the same host load. "
        "Space figures are exact and do not depend on the machine. dm-bow's time is a Python model's "
        "and is not compared.",
        "",
    ]


def summary_table(runs: list[dict]) -> list[str]:
    out = ["## Summary", "",
           "| workload | lower bound MiB | dm-bow MiB | fiesnap plain MiB | free-aware MiB | LVM MiB | "
           "plain / dm-bow | free-aware / dm-bow | plain / bound | free-aware / bound | "
           "write: plain | free-aware | LVM | merge / raw copy |",
           "|---|" + "---|" * 13]
    for r in runs:
        q, fs = r["ratios"], r["fiesnap"]
        out.append(
            f"| {r['workload']['title']} | {mib(r['lower_bound']['bytes'])} | {mib(r['bow']['backup_bytes'])} | "
            f"{mib(fs['plain']['used_bytes'])} | {mib(fs['free_aware']['used_bytes'])} | "
            f"{mib((r['lvm'] or {}).get('cow_used_bytes'))} | {x(q['plain']['space_vs_bow'])} | "
            f"{x(q['free_aware']['space_vs_bow'])} | {x(q['plain']['space_vs_lower_bound'])} | "
            f"{x(q['free_aware']['space_vs_lower_bound'])} | {x(q['plain']['write_vs_none'])} | "
            f"{x(q['free_aware']['write_vs_none'])} | {x(q['lvm_write_vs_none'])} | {x(q['merge_vs_raw'])} |")
    out += ["", "Write columns: time against no checkpoint. The per-workload sections give the "
            "figures behind each ratio, and where fiesnap loses, why.", ""]
    return out


def workload_section(r: dict) -> list[str]:
    w, q, fs, lb, bow, lv, m = (r["workload"], r["ratios"], r["fiesnap"], r["lower_bound"], r["bow"], r["lvm"] or {},
                                r["merge"])
    st = r["setup"]
    none_s = r["none"]["write_s"]
    fig = r["none"].get("figures") or {}
    fig_text = ", ".join(f"{k} {v}" for k, v in fig.items() if k != "jobs")
    out = [f"## {w['title']} (`{w['name']}`)", "", w["what"], "",
           f"Checkpoint-time image: {mib(st['used_at_checkpoint'])} MiB in use, {mib(st['free_at_checkpoint'])} MiB free. "
           f"With no checkpoint the workload took {none_s:.2f} s" + (f" ({fig_text})." if fig_text else "."), "",
           "| peer | store bytes used (MiB) | of which metadata (MiB) | / dm-bow | / lower bound | "
           "write time | vs no checkpoint | that / LVM's | exceptions in kernel memory |",
           "|---|---|---|---|---|---|---|---|---|",
           f"| lower bound | {mib(lb['bytes'])} | - | {x(1 / q['bow_vs_lower_bound'] if q['bow_vs_lower_bound'] else None)} "
           f"| 1.00x | - | - | - | - |",
           f"| dm-bow (model) | {mib(bow['backup_bytes'])} (+ log {mib(bow['log_bytes'])}) | - | 1.00x | "
           f"{x(q['bow_vs_lower_bound'])} | - | - | - | - |"]
    for mode, label in (("plain", "fiesnap, plain store"), ("free_aware", "fiesnap, free-aware store")):
        p, pq = fs[mode], q[mode]
        meta = mib(p["metadata_bytes"]) + (f" (pre-written table {mib(p['seeded_areas'] * st['chunk_bytes'])})"
                                           if p.get("seeded_areas") else "")
        out.append(f"| {label} | {mib(p['used_bytes'])} | {meta} | {x(pq['space_vs_bow'])} | "
                   f"{x(pq['space_vs_lower_bound'])} | {s(p['write_s'])} | {x(pq['write_vs_none'])} | "
                   f"{x(pq['write_vs_lvm'])} | {p['exceptions_in_core']:,} ({p['exceptions_in_core'] * 32 / 1024:,.0f} KiB) |")
    if lv:
        out.append(f"| LVM thick snapshot | {mib(lv['cow_used_bytes'])} | {mib(lv['metadata_bytes'])} | "
                   f"{x(lv['cow_used_bytes'] / bow['backup_bytes'] if bow['backup_bytes'] else None)} | "
                   f"{x(q['lvm_vs_lower_bound'])} | {s(lv['write_s'])} (without: {s(lv['none_write_s'])}) | "
                   f"{x(q['lvm_write_vs_none'])} | 1.00x | {lv['exceptions_in_core']:,} |")
    out += ["",
            f"Lower bound: {lb['chunks']:,} chunks in use at the checkpoint and overwritten. Beside it: "
            f"{mib(lb['written_into_free_chunks'] * lb['chunk_bytes'])} MiB written into chunks free at the "
            f"checkpoint, {mib(lb['freed_untouched_bytes'])} MiB freed and untouched "
            f"(overwritten or freed: {mib(lb['overwritten_or_freed_bytes'])} MiB).", "",
            "| rollback | time | against fiesnap merge |", "|---|---|---|",
            f"| raw O_DIRECT copy of the same {m['runs']:,} runs ({mib(m['bytes'])} MiB) | {s(m['raw_same_runs_s'])} | "
            f"{x(1 / q['merge_vs_raw'] if q['merge_vs_raw'] else None)} |",
            f"| fiesnap merge (its copy: {s(m['copy_s'])}) | {s(m['fiesnap_s'])} | 1.00x |",
            f"| fiesnap merge, free-aware store ({mib(m['free_aware']['bytes'])} MiB; its copy: "
            f"{s(m['free_aware'].get('copy_s'))}, a raw copy of its runs: {s(m['free_aware'].get('raw_same_runs_s'))}) | "
            f"{s(m['free_aware']['fiesnap_s'])} | "
            f"{x(m['free_aware']['fiesnap_s'] / m['fiesnap_s'] if m['fiesnap_s'] else None)} |",
            f"| merge --instant: filesystem mountable | {s(m['instant_mount_s'])} | {x(q['instant_mount_vs_merge'])} |",
            f"| merge --instant: kernel merge done | {s(m['instant_finish_s'])} | {x(q['instant_finish_vs_merge'])} |",
            f"| lvconvert --merge -i 1 | {s(m['lvconvert_s'])} | {x(q['lvconvert_vs_merge'])} |", ""]
    checks = []
    for label, mm in (("plain", m), ("free-aware", m["free_aware"])):
        if mm.get("exact") is not None:
            checks.append(f"{label}: {'byte-exact' if mm['exact'] else 'NOT EXACT'}, "
                          f"fsck {'clean' if mm['fsck_clean'] else 'NOT CLEAN'}")
    if checks:
        out += ["Rollback checked against the checkpoint image: " + "; ".join(checks) + ".", ""]
    lost = losses(r, q)
    out += (["**Where fiesnap loses:**", ""] + [f"- {line}" for line in lost] if lost
            else ["**Where fiesnap loses:** nowhere beyond the 5% noise of one run."]) + [""]
    if q.get("fio_jobs"):
        jobs_none = fig["jobs"]
        out += ["| fio job | no checkpoint | MiB/s | fiesnap plain | free-aware | LVM |", "|---|---|---|---|---|---|"]
        for job, jq in q["fio_jobs"].items():
            t = jobs_none[job]
            out.append(f"| `{job}` | {s(job_seconds(t))} | {t['bw_bytes'] / MiB:.1f} | {x(jq['plain'])} | "
                       f"{x(jq['free_aware'])} | {x(jq['lvm'])} |")
        out += ["", "Times are fio's own run time of each job (its writes and the end_fsync, without fio's "
                "start-up); ratios against no checkpoint (LVM's against its volume without a snapshot).", ""]
    return out


NOT_COVERED = [
    "## What this report does not tell",
    "",
    "- One run per workload: a ratio within 5% of 1.0 is a tie, and a single noisy run can move "
    "a write-time ratio further (the host's other load is not controlled).",
    "- One filesystem (ext4), one chunk size (4 KiB), one kernel (the lab's default); the "
    "free-aware store's costs grow with the filesystem's free space, which a 1 GiB filesystem "
    "keeps small (benchmarks/free_aware_bench.py measures them by size and chunk size).",
    "- No native hardware: a flush here ends in the host's page cache, not a disk's write cache; "
    "on a real disk every flush that reaches it costs more, in every peer that sends it.",
    "- dm-bow's time: its figures are a Python model's replay of the trace, so only its space is "
    "compared.",
    "",
]


def render(results: Path, out: Path, with_plots: bool = True) -> str:
    runs = load(results)
    if not runs:
        raise SystemExit(f"no results in {results}: run `make report` first")
    made = plots(runs, out) if with_plots else []
    for stale in PLOTS:
        if stale not in made and (out / stale).exists() and with_plots:
            (out / stale).unlink()
    text = header(runs) + summary_table(runs)
    titles = {"report-space.png": "Store bytes", "report-write.png": "Write time",
              "report-rollback.png": "Rollback time", "report-fio.png": "fio jobs"}
    if made:
        text += ["## Plots", ""] + [f"![{titles[p]}]({p})" for p in made] + [""]
    for r in runs:
        text += workload_section(r)
    missing = [w.name for w in WORKLOADS if w.name not in {r["workload"]["name"] for r in runs}]
    if missing:
        text += [f"Not in this run: {', '.join(missing)}.", ""]
    text += NOT_COVERED
    body = "\n".join(text).rstrip() + "\n"
    (out / "REPORT.md").write_text(body)
    return body


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", default=str(HERE / "results"))
    ap.add_argument("--out", default=str(HERE))
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args()
    render(Path(args.results), Path(args.out), not args.no_plots)
    print(f"wrote {Path(args.out) / 'REPORT.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
