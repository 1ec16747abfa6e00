#!/usr/bin/env python3
"""Benchmark: what a fiesnap command costs before it does anything.

    .venv/bin/python -m tests.lab script benchmarks/startup_bench.py --disks 1 --disk-size 512M --timeout 900
    ... -- --runs 10                                   (default)

A fiesnap command starts at every boot (`activate --all`), at every monitor poll in a script,
and in every update hook, so its start-up is a cost users pay often. Timed here, each command
as a whole process (its interpreter start included), RUNS times in turn (A B C ... A B C ...,
so drift hits all alike), medians reported and each as a ratio against `python3 -c pass` from
the same interpreter in the same run:

  python -c pass           the floor: the interpreter alone
  import fiesnap.cli       the CLI module with typer and click (what every command pays)
  fiesnap --version        start, parse, print
  fiesnap --help           the whole help text
  fiesnap status --json    with one active checkpoint (a real dm stack on the scratch disk)
  fiesnap activate --all   the same checkpoint already active (what a second boot unit run does)

Results: $FIESNAP_LAB_RESULTS/startup_bench.json and startup_bench.txt.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Fiesnap, log, machine, median, require_lab, sh, write_results  # noqa: E402

NAME = "sb"
STATE = "/tmp/sb-state"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    disk, results = require_lab()
    fs = Fiesnap(STATE)
    py = sys.executable
    sh("mkfs.ext4", "-q", "-F", disk)
    fs("start", disk, "--size", "64M", "--name", NAME)
    commands = {
        "python -c pass": [py, "-c", "pass"],
        "import fiesnap.cli": [py, "-c", "import fiesnap.cli"],
        "fiesnap --version": [py, "-m", "fiesnap", "--version"],
        "fiesnap --help": [py, "-m", "fiesnap", "--help"],
        "fiesnap status --json": [py, "-m", "fiesnap", "status", "--json"],
        "fiesnap activate --all": [py, "-m", "fiesnap", "activate", "--all"],
    }
    times: dict[str, list[float]] = {k: [] for k in commands}
    exits: dict[str, set[int]] = {k: set() for k in commands}  # an older fiesnap lacks --version
    for i in range(args.runs):
        for label, argv in commands.items():
            t0 = time.monotonic()
            p = sh(*argv, env=fs.env, check=False)
            times[label].append(time.monotonic() - t0)
            exits[label].add(p.returncode)
        log(f"round {i + 1}/{args.runs}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()))
    fs("commit", NAME)
    floor = median(times["python -c pass"]) or 1.0
    figures = {k: {"median_s": round(median(v) or 0, 4), "min_s": round(min(v), 4), "max_s": round(max(v), 4),
                   "vs_python_pass": round((median(v) or 0) / floor, 2), "exit": sorted(exits[k])}
               for k, v in times.items()}
    summary = [f"start-up, {args.runs} runs each, medians (kernel {machine()['kernel']}):"]
    summary += [f"  {k:<24} {f['median_s']:7.3f} s  {f['vs_python_pass']:5.2f}x python -c pass"
                + ("" if f["exit"] == [0] else f"  (exit {f['exit']})") for k, f in figures.items()]
    write_results(results, "startup_bench", {"machine": machine(), "runs": args.runs, "figures": figures}, summary)


if __name__ == "__main__":
    main()
