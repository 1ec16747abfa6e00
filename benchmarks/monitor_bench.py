#!/usr/bin/env python3
"""Benchmark: the monitor's reaction time, and the highest sustained write rate that
never overflows an 8 MiB store grown in 32 MiB steps. Runs in the VM lab:

    .venv/bin/python -m tests.lab script benchmarks/monitor_bench.py --disks 1 --disk-size 3G --timeout 1500
    ... -- --rates 0.5,1,2,4,5,6,8 --mib 64          (defaults)

Per trial (one write rate R): a fresh checkpoint `fiesnap start NAME --size 8M` of a mounted
ext4 under fiesnap, `fiesnap monitor NAME --interval 1 --threshold 50 --step 32M --verbose` in the
background (its first poll done), then a writer that overwrites checkpoint-time data with
O_DIRECT 1 MiB writes paced at R MiB/s (every write saves 1 MiB of old data: 256 exceptions),
reading the kernel's snapshot usage after every write; then `fiesnap status` and
`fiesnap commit` (trials are independent). The ladder stops after the first overflow.

Reaction time of one extension = end of the extension (the monitor's "store of 'NAME' grew
from A to B" line, logged after the -cow reload) minus the moment the writer's saved data
passed 50% of the store A (interpolated inside the write that crossed it). It splits into
detection (crossing -> the monitor's decision line) and the extension itself. Peer: a bare
`fiesnap extend NAME --by 32M`, timed as a CLI call and in-process (what the monitor runs).

Results: $FIESNAP_LAB_RESULTS/monitor_bench.json and monitor_bench.txt.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (MiB, Fiesnap, Usage, aligned_buffer, log, machine, median,  # noqa: E402
                    require_lab, sh, write_results)

NAME = "mb"
STATE = "/tmp/mb-state"
MNT = "/tmp/mb-mnt"
START_SIZE = "8M"
STEP = "32M"
INTERVAL = 1.0
THRESHOLD = 50.0

_UNIT = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
GREW_RE = re.compile(r"store of '(?P<name>[^']+)' grew from (?P<a>[0-9.]+ \w+) to (?P<b>[0-9.]+ \w+)")
BY_RE = re.compile(r"grew the store by (?P<by>[0-9.]+ \w+) \((?P<reason>.*)\)$")


def _bytes(text: str) -> int:
    num, unit = text.split()
    return int(float(num) * _UNIT[unit])


class MonitorProc:
    """`fiesnap monitor` in the background; every output line stamped on arrival (monotonic)."""

    def __init__(self, fs: Fiesnap):
        self.lines: list[tuple[float, str]] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fiesnap", "monitor", NAME, "--interval", f"{INTERVAL:g}",
             "--threshold", f"{THRESHOLD:g}", "--step", STEP, "--verbose"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            bufsize=1, env=fs.env)
        self.started = time.monotonic()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def wait_first_poll(self, timeout: float = 120) -> float:
        deadline = time.monotonic() + timeout
        while not any("debug" in text for _t, text in self.lines):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the monitor never polled:\n" + "\n".join(t for _s, t in self.lines))
            time.sleep(0.05)
        return next(t for t, text in self.lines if "debug" in text) - self.started

    def stop(self) -> int:
        self.proc.terminate()
        rc = self.proc.wait(timeout=120)
        self.reader.join(timeout=10)
        return rc


def overwrite_direct(path: str, nbytes: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    buf = aligned_buffer(MiB)
    try:
        for off in range(0, nbytes, MiB):
            os.pwrite(fd, buf, off)
    finally:
        os.close(fd)
        buf.close()


def paced_writer(path: str, rate_mib_s: float, total_mib: int, usage: Usage) -> tuple[list[dict], float]:
    """O_DIRECT 1 MiB overwrites at offsets 0, 1, 2 ... MiB, write i due at t0 + i/R.
    Stops early once the snapshot is no longer active. Returns (samples, t0)."""
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    buf = aligned_buffer(MiB)
    samples: list[dict] = []
    try:
        state, used, total = usage()
        t0 = time.monotonic()
        samples.append({"i": -1, "ts": t0, "te": t0, "state": state, "used": used, "store": total})
        for i in range(total_mib):
            due = t0 + i / rate_mib_s
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            ts = time.monotonic()
            os.pwrite(fd, buf, i * MiB)
            te = time.monotonic()
            state, used, total = usage()
            samples.append({"i": i, "ts": ts, "te": te, "state": state, "used": used, "store": total})
            if state != "active":
                break
    finally:
        os.close(fd)
        buf.close()
    return samples, t0


def crossing_time(samples: list[dict], level: int, before: float) -> float | None:
    """When the saved data first reached `level` bytes (before time `before`): interpolated
    inside the write that crossed it (the COW of an O_DIRECT write happens inside the call)."""
    prev_used = None
    for s in samples:
        if s["ts"] > before:
            return None
        if s["state"] != "active":
            return None
        if s["used"] >= level:
            if prev_used is None or s["used"] == prev_used:
                return s["te"]
            frac = (level - prev_used) / (s["used"] - prev_used)
            return s["ts"] + max(0.0, min(1.0, frac)) * (s["te"] - s["ts"])
        prev_used = s["used"]
    return None


def analyse_growth(lines: list[tuple[float, str]], samples: list[dict]) -> list[dict]:
    events = []
    for k, (t, text) in enumerate(lines):
        m = GREW_RE.search(text)
        if not m:
            continue
        before, after = _bytes(m.group("a")), _bytes(m.group("b"))
        reason, by = "", None
        for t2, text2 in lines[k + 1:k + 3]:
            mb = BY_RE.search(text2)
            if mb:
                reason, by = mb.group("reason"), _bytes(mb.group("by"))
                break
        # The decision: the last debug line before the extension that states this reason.
        t_dec = None
        for t2, text2 in reversed(lines[:k]):
            if "debug:" in text2 and reason and text2.endswith(f"{NAME}: {reason}"):
                t_dec = t2
                break
        # The store size the writer actually saw before this extension (exact, not rounded).
        seen = [s["store"] for s in samples if s["te"] <= (t_dec or t) and s["store"]]
        exact_before = seen[-1] if seen else before
        t_cross = crossing_time(samples, exact_before // 2, t_dec or t)
        used_at_grow = max([s["used"] for s in samples if s["te"] <= t and s["store"] == exact_before] or [0])
        ev = {
            "store_before_bytes": exact_before,
            "store_after_bytes_logged": after,
            "grown_by_bytes_logged": by,
            "reason": reason,
            "t_grown": t,
            "t_decision": t_dec,
            "t_crossed_50pct": t_cross,
            "extension_s": (t - t_dec) if t_dec is not None else None,
            "max_used_pct_of_old_store_before_grown": round(100.0 * used_at_grow / exact_before, 1) if exact_before else None,
        }
        if t_cross is not None:
            ev["reaction_s"] = t - t_cross
            ev["detection_s"] = (t_dec - t_cross) if t_dec is not None else None
            ev["before_50pct"] = False
        else:
            ev["reaction_s"] = None  # grown before 50% was reached (the rate trigger)
            ev["detection_s"] = None
            ev["before_50pct"] = True
        events.append(ev)
    return events


def trial(fs: Fiesnap, data: str, rate: float, total_mib: int) -> dict:
    log(f"trial R={rate:g} MiB/s: start {NAME} --size {START_SIZE}")
    fs("start", NAME, "--size", START_SIZE, "--plain")  # new files must fill the store
    usage = Usage(NAME, lambda: fs.record(NAME))
    mon = MonitorProc(fs)
    first_poll = mon.wait_first_poll()
    samples, t0 = paced_writer(data, rate, total_mib, usage)
    t_end = samples[-1]["te"]
    # One more poll after the writer, so a late extension is still seen.
    time.sleep(INTERVAL * 2.5)
    rc = mon.stop()
    st = fs.status(NAME)
    events = analyse_growth(mon.lines, samples)
    lost = [s for s in samples if s["state"] != "active"]
    for ev in events:  # an extension that ended after the store had already overflowed
        ev["too_late"] = bool(lost) and ev["t_grown"] > lost[0]["te"]
    written = sum(1 for s in samples if s["i"] >= 0) * MiB
    duration = t_end - t0
    res = {
        "rate_mib_s": rate,
        "written_bytes": written,
        "writer_seconds": round(duration, 3),
        "achieved_mib_s": round(written / MiB / duration, 3) if duration > 0 else None,
        "final_state": st["state"],
        "survived": st["state"] == "active" and not lost,
        "first_not_active_after_s": round(lost[0]["te"] - t0, 3) if lost else None,
        "final_store_bytes": st.get("store_bytes"),
        "final_used_bytes": st.get("used_bytes"),
        "max_used_pct": round(max(100.0 * s["used"] / s["store"] for s in samples if s["store"]), 1),
        "monitor_first_poll_s": round(first_poll, 3),
        "monitor_exit": rc,
        "extensions": [{k: (round(v - t0, 3) if k.startswith("t_") and v is not None else
                            (round(v, 3) if isinstance(v, float) else v)) for k, v in ev.items()}
                       for ev in events],
        "monitor_log": [f"{t - t0:+8.3f} {text}" for t, text in mon.lines],
    }
    log(f"trial R={rate:g}: {st['state']}, {len(events)} extensions, reactions "
        f"{[e['reaction_s'] for e in res['extensions']]}")
    fs("commit", NAME)
    return res


def extend_peer(fs: Fiesnap, data: str, reps: int) -> dict:
    """A bare extension by 32 MiB of a live 8 MiB store (4 MiB used), as a CLI call and
    in-process (what the monitor does); plus what a poll and a python start cost."""
    from fiesnap.commands.extend import extend
    from fiesnap.commands.status import status as ops_status
    from fiesnap.services.statedir import StateStore
    from fiesnap.kernel.dm import DeviceMapper

    log("peer: fiesnap extend --by 32M")
    fs("start", NAME, "--size", START_SIZE, "--plain")  # new files must fill the store
    overwrite_direct(data, 4 * MiB)
    cli, inproc, polls, pystart = [], [], [], []
    for _ in range(reps):
        t0 = time.monotonic()
        fs("extend", NAME, "--by", STEP, "--json")
        cli.append(time.monotonic() - t0)
    dm = DeviceMapper()
    state = StateStore(STATE)
    for _ in range(reps):
        t0 = time.monotonic()
        extend(NAME, lambda: dm, state, lambda _m: None, by=32 * MiB)
        inproc.append(time.monotonic() - t0)
    for _ in range(reps):
        t0 = time.monotonic()
        ops_status(lambda: dm, state, NAME)
        polls.append(time.monotonic() - t0)
    for _ in range(reps):
        t0 = time.monotonic()
        sh(sys.executable, "-m", "fiesnap", "version")
        pystart.append(time.monotonic() - t0)
    st = fs.status(NAME)
    fs("commit", NAME)
    r3 = lambda xs: [round(x, 3) for x in xs]  # noqa: E731
    return {
        "cli_extend_s": r3(cli), "cli_extend_median_s": round(median(cli), 3),
        "inprocess_extend_s": r3(inproc), "inprocess_extend_median_s": round(median(inproc), 3),
        "inprocess_status_poll_s": r3(polls), "inprocess_status_poll_median_s": round(median(polls), 4),
        "python_m_fiesnap_version_s": r3(pystart), "python_start_median_s": round(median(pystart), 3),
        "store_bytes_after": st["store_bytes"], "state_after": st["state"],
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rates", default="0.5,1,2,4,5,6,8", help="MiB/s ladder, ascending")
    ap.add_argument("--mib", type=int, default=64, help="MiB overwritten per trial")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of the extend peer")
    ap.add_argument("--no-stop", action="store_true", help="run every rate even after an overflow")
    args = ap.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    disk, results = require_lab()
    t_start = time.monotonic()

    log(f"mkfs.ext4 {disk}, fiesnap setup, {args.mib + 1} MiB of checkpoint-time data")
    sh("mkfs.ext4", "-F", "-q", "-b", "4096", "-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard", disk)
    fs = Fiesnap(STATE)
    fs("setup", disk, "--name", NAME)
    os.makedirs(MNT, exist_ok=True)
    sh("mount", f"/dev/mapper/{NAME}", MNT)
    data = f"{MNT}/data.bin"
    with open(data, "wb") as f:
        for _ in range(args.mib + 1):
            f.write(os.urandom(MiB))
        f.flush()
        os.fsync(f.fileno())
    sh("sync")

    peer = extend_peer(fs, data, args.reps)
    log(f"peer: CLI {peer['cli_extend_s']} s, in-process {peer['inprocess_extend_s']} s")

    trials = []
    for rate in rates:
        res = trial(fs, data, rate, args.mib)
        trials.append(res)
        if not res["survived"] and not args.no_stop:
            break
    sh("umount", MNT)

    ok = [t["rate_mib_s"] for t in trials]
    highest = None
    for t in trials:  # the ladder up to the first overflow
        if not t["survived"]:
            break
        highest = t["rate_mib_s"]
    reactions = [e["reaction_s"] for t in trials for e in t["extensions"] if e["reaction_s"] is not None]
    ext_in_monitor = [e["extension_s"] for t in trials for e in t["extensions"] if e["extension_s"] is not None]
    med_react = median(reactions)
    detects = [e["detection_s"] for t in trials for e in t["extensions"] if e.get("detection_s") is not None]
    data_out = {
        "benchmark": "monitor_bench",
        "machine": machine(),
        "config": {"fs": "ext4 (4k)", "start_size": START_SIZE, "step": STEP, "interval_s": INTERVAL,
                   "threshold_pct": THRESHOLD, "write_size": "1 MiB O_DIRECT overwrites of checkpoint-time data",
                   "mib_per_trial": args.mib, "rates_mib_s": rates, "disk": disk},
        "extend_peer": peer,
        "trials": trials,
        "highest_rate_never_overflowed_mib_s": highest,
        "rates_run": ok,
        "reaction_s_all": [round(r, 3) for r in reactions],
        "reaction_s_median": round(med_react, 3) if med_react is not None else None,
        "extension_in_monitor_s_median": round(median(ext_in_monitor), 3) if ext_in_monitor else None,
        "detection_s_median": round(median(detects), 3) if detects else None,
        "reaction_over_inprocess_extend": round(med_react / peer["inprocess_extend_median_s"], 2) if med_react else None,
        "reaction_over_cli_extend": round(med_react / peer["cli_extend_median_s"], 2) if med_react else None,
        "total_seconds": round(time.monotonic() - t_start, 1),
    }
    m = data_out["machine"]
    summary = [
        f"monitor_bench: {m['kernel']}, {m['cpus']} vCPU, {m['emulation']}; ext4, start {START_SIZE}, "
        f"monitor --interval {INTERVAL:g} --threshold {THRESHOLD:g} --step {STEP}; {args.mib} MiB of 1 MiB O_DIRECT overwrites per trial",
        f"peer  fiesnap extend --by {STEP}: CLI median {peer['cli_extend_median_s']:.2f} s "
        f"(python -m fiesnap start alone {peer['python_start_median_s']:.2f} s), in-process median "
        f"{peer['inprocess_extend_median_s']:.2f} s; one status poll in-process {peer['inprocess_status_poll_median_s'] * 1000:.0f} ms",
    ]
    for t in trials:
        ev = "; ".join(
            f"{e['store_before_bytes'] / MiB:.1f}M->{(e['store_after_bytes_logged'] or 0) / MiB:.1f}M "
            + (f"reaction {e['reaction_s']:.2f}s (detect {e['detection_s']:.2f}s + extend {e['extension_s']:.2f}s)"
               if e["reaction_s"] is not None and e["detection_s"] is not None and e["extension_s"] is not None
               else (f"reaction {e['reaction_s']:.2f}s" if e["reaction_s"] is not None else "before 50% (rate trigger)"))
            + f", old store {e['max_used_pct_of_old_store_before_grown']}% full at most"
            + (" - TOO LATE: the store had overflowed before the extension ended" if e.get("too_late") else "")
            for e in t["extensions"])
        summary.append(f"R={t['rate_mib_s']:g} MiB/s (achieved {t['achieved_mib_s']}): {t['final_state'].upper()}, "
                       f"max {t['max_used_pct']}% used, final store {(t['final_store_bytes'] or 0) // MiB} MiB | {ev or 'no extension'}")
    summary.append(f"highest rate that never overflowed (step {STEP}): "
                   + (f"{highest:g} MiB/s" if highest is not None else "none of the rates run")
                   + f" (ladder {rates}, stops after the first overflow)")
    if med_react is not None:
        summary.append(f"reaction time median {med_react:.2f} s (min {min(reactions):.2f}, max {max(reactions):.2f}, "
                       f"n={len(reactions)}; detection median {data_out['detection_s_median']} s, extension inside "
                       f"the monitor median {data_out['extension_in_monitor_s_median']} s) = "
                       f"{data_out['reaction_over_inprocess_extend']}x the in-process extend, "
                       f"{data_out['reaction_over_cli_extend']}x the CLI extend")
    summary.append(f"total {data_out['total_seconds']} s")
    write_results(results, "monitor_bench", data_out, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
