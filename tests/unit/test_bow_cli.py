"""`bow-compat` as a user runs it: replay -> inspect -> restore on files, exit codes, --json,
one-line errors, and that a refused command writes nothing."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys

import pytest

from bow_compat.logwrites import LogWritesWriter

BS = 4096
BLOCKS = 256


def _bow(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bow_compat", *map(str, args)], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=120)


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def trace(tmp_path):
    """A base image, and a log-writes trace: the top half discarded (free), mark, then
    overwrites of the live bottom half and writes into the free half."""
    rnd = random.Random(5)
    base = tmp_path / "base.img"
    base.write_bytes(rnd.randbytes(BS * BLOCKS))
    w = LogWritesWriter(512)
    w.discard(BS * BLOCKS // 2, BS * BLOCKS // 2)
    w.mark("checkpoint")
    for _ in range(80):
        w.write(rnd.randrange(1, BLOCKS) * BS - rnd.choice((0, 512)), rnd.randbytes(BS * rnd.randint(1, 2)))
    w.save(tmp_path / "log.img")
    return tmp_path


def test_replay_inspect_restore_round_trip(trace):
    base, out = trace / "base.img", trace / "out.img"
    before = _sha(base)
    p = _bow("replay", trace / "log.img", "--base", base, "--out", out, "--json")
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    assert rep["backup_bytes"] > 0 and rep["enospc"] is None and rep["log_entries"] > 0, rep
    assert _sha(base) == before, "replay must never modify the base image"
    assert oct(os.stat(out).st_mode & 0o777) != oct(0o600)

    p = _bow("inspect", out, "--json")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["valid"] and d["state"] == "BOW" and d["entries"] == rep["log_entries"]
    assert "log sector 0" in _bow("inspect", out).stdout

    assert _bow("restore", out, "--dry-run").returncode == 0
    p = _bow("restore", out, "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["bytes_copied"] == d["bytes_to_copy"]
    got, want = out.read_bytes(), base.read_bytes()
    half = BS * BLOCKS // 2
    assert got[:half] == want[:half]  # every block live at the checkpoint is back

    p = _bow("restore", out)  # nothing left to restore
    assert p.returncode == 7 and p.stderr.count("\n") == 1 and "nothing to restore" in p.stderr


def test_restore_refuses_a_corrupt_log_and_writes_nothing(trace):
    out = trace / "out.img"
    assert _bow("replay", trace / "log.img", "--base", trace / "base.img", "--out", out).returncode == 0
    d = json.loads(_bow("inspect", out, "--json").stdout)
    dest = d["log_sectors"][0]["entries"][-1]["dest"] * 512  # the newest backup: never moved since
    with open(out, "r+b") as f:  # one flipped bit in a backed-up block
        f.seek(dest + 100)
        b = f.read(1)
        f.seek(dest + 100)
        f.write(bytes([b[0] ^ 1]))
    corrupt = _sha(out)
    p = _bow("restore", out)
    assert p.returncode == 8 and p.stderr.startswith("bow-compat: error: ") and p.stderr.count("\n") == 1, p.stderr
    assert _sha(out) == corrupt
    assert _bow("inspect", out).returncode == 8


def test_restore_refuses_a_truncated_image(trace):
    out = trace / "out.img"
    assert _bow("replay", trace / "log.img", "--base", trace / "base.img", "--out", out).returncode == 0
    with open(out, "r+b") as f:
        f.truncate(BS * BLOCKS // 2)  # backups live in the (free) top half
    cut = _sha(out)
    p = _bow("restore", out)
    assert p.returncode == 8 and p.stderr.count("\n") == 1, p.stderr
    assert _sha(out) == cut


def test_replay_errors_leave_no_output(trace):
    out = trace / "out.img"
    p = _bow("replay", trace / "log.img", "--base", trace / "base.img", "--out", out, "--mark", "nope")
    assert p.returncode == 2 and "mark 'nope'" in p.stderr and not out.exists()
    p = _bow("replay", trace / "missing.img", "--base", trace / "base.img", "--out", out)
    assert p.returncode == 4 and p.stderr.count("\n") == 1 and not out.exists(), p.stderr
    (trace / "junk.img").write_bytes(os.urandom(8192))
    p = _bow("replay", trace / "junk.img", "--base", trace / "base.img", "--out", out)
    assert p.returncode == 8 and p.stderr.count("\n") == 1 and not out.exists(), p.stderr
    p = _bow("replay", trace / "log.img", "--base", trace / "base.img", "--out", out, "--block-size", "3000")
    assert p.returncode == 2 and not out.exists(), p.stderr
    p = _bow("replay", trace / "log.img")
    assert p.returncode == 2 and "--base" in p.stderr, p.stderr
