"""What a fiesnap command costs before it does anything, measured at every run of the suite and
written to its log (never asserted: a TCG guest's seconds say little; benchmarks/startup_bench.py
has the figures and the ratios). The commands must still work: that much is checked."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from .helpers import make_fs

RUNS = 3


def _timed(argv: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.monotonic()
    p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL)
    return time.monotonic() - t0, p


def test_start_up_times_go_to_the_log(lab, capsys):
    make_fs(lab.disk, "ext4-4k")
    lab.fiesnap("start", lab.disk, "--size", "32M", "--name", "cp")
    env = dict(os.environ, FIESNAP_STATE_DIR=lab.state)
    fiesnap = [sys.executable, "-m", "fiesnap"]
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "fiesnap --version": [*fiesnap, "--version"],
        "fiesnap status --json": [*fiesnap, "status", "--json"],
        "fiesnap activate --all": [*fiesnap, "activate", "--all"],
    }
    times: dict[str, list[float]] = {k: [] for k in commands}
    for _ in range(RUNS):
        for label, argv in commands.items():
            took, p = _timed(argv, env)
            assert p.returncode == 0, (label, p.stderr)
            times[label].append(took)
    (row,) = json.loads(_timed(commands["fiesnap status --json"], env)[1].stdout)["checkpoints"]
    assert row["name"] == "cp" and row["state"] == "active"
    floor = statistics.median(times["python -c pass"])
    line = ", ".join(f"{k} {statistics.median(v):.2f} s ({statistics.median(v) / floor:.1f}x)"
                     for k, v in times.items())
    with capsys.disabled():
        print(f"\nstart-up in this guest, medians of {RUNS}: {line}")
    lab.fiesnap("commit", "cp")
