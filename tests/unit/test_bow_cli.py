"""`bow-compat` as a user runs it: replay -> inspect -> restore on files, exit codes, --json,
one-line errors, and that a refused command writes nothing."""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import stat
import subprocess
import sys

import pytest

from bow_compat.logwrites import LogWritesWriter

BS = 4096
BLOCKS = 256


def _bow(*args: object, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bow_compat", *map(str, args)], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=120, **kw)


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
    p = _bow("inspect", out)  # prints the log, then the same error as restore
    assert p.returncode == 8 and "NOT restorable" in p.stdout and "bad" in p.stdout, p.stdout
    assert p.stderr.startswith(f"bow-compat: error: {out}: ") and p.stderr.count("\n") == 1, p.stderr


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


# ---- replay's OUT: refused when it is LOG, BASE, not a regular file, or exists without --force ----

def _snapshot(folder) -> dict:
    """Every entry of `folder`: its type, and its bytes, link target or device number, and mtime."""
    snap = {}
    for p in sorted(folder.iterdir()):
        st = p.lstat()
        if stat.S_ISREG(st.st_mode):
            what = p.read_bytes()
        elif stat.S_ISLNK(st.st_mode):
            what = os.readlink(p)
        elif stat.S_ISDIR(st.st_mode):
            what = sorted(os.listdir(p))
        else:
            what = st.st_rdev
        snap[p.name] = (stat.S_IFMT(st.st_mode), what, st.st_mtime_ns)
    return snap


def _node(path, kind: int, major: int, minor: int) -> None:
    try:
        os.mknod(path, kind | 0o600, os.makedev(major, minor))
    except PermissionError:
        pytest.skip("making a device node needs root")


def _same_as(target):
    def make(d):
        os.symlink(target, d / "out.img")
    return make


_OUTS = {  # how OUT (typed as "out.img", in the trace folder) is made, and what the refusal says
    "log-itself": (None, "is the log being replayed"),
    "hard-link-of-log": (lambda d: os.link(d / "log.img", d / "out.img"), "is the log being replayed"),
    "symlink-to-log": (_same_as("log.img"), "is the log being replayed"),
    "base-itself": (None, "is the base image"),
    "hard-link-of-base": (lambda d: os.link(d / "base.img", d / "out.img"), "is the base image"),
    "symlink-to-base": (_same_as("base.img"), "is the base image"),
    "char-device": (lambda d: _node(d / "out.img", stat.S_IFCHR, 1, 3), "is a character device"),
    "block-device": (lambda d: _node(d / "out.img", stat.S_IFBLK, 7, 0), "is a block device"),
    "directory": (lambda d: (d / "out.img").mkdir(), "is a directory"),
    "fifo": (lambda d: os.mkfifo(d / "out.img"), "is a named pipe"),
    "dangling-symlink": (_same_as("gone.img"), "is a symbolic link to gone.img"),
}


@pytest.mark.parametrize("force", [False, True], ids=["", "force"])
@pytest.mark.parametrize("case", list(_OUTS))
def test_replay_refuses_an_out_it_must_not_write(trace, case, force):
    """Refused even with --force: exit 2, one line naming OUT as typed, nothing changed."""
    make, says = _OUTS[case]
    given = {"log-itself": "log.img", "base-itself": "base.img"}.get(case, "out.img")
    if make is not None:
        make(trace)
    before = _snapshot(trace)
    p = _bow("replay", "log.img", "--base", "base.img", "--out", given, *(["--force"] * force),
             cwd=trace)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert p.stderr.startswith(f"bow-compat: error: {given} {says}"), p.stderr
    assert p.stderr.count("\n") == 1 and str(trace) not in p.stderr and ".partial" not in p.stderr
    assert "--out" in p.stderr  # says what to do: name another --out / a new file for --out
    assert _snapshot(trace) == before


def test_replay_refuses_an_existing_out_without_force_and_replaces_it_with(trace):
    out = trace / "out.img"
    out.write_bytes(b"keep me")
    os.link(out, trace / "other-name.img")
    before = _snapshot(trace)
    p = _bow("replay", "log.img", "--base", "base.img", "--out", "out.img", cwd=trace)
    assert p.returncode == 2 and p.stderr == (
        "bow-compat: error: out.img exists: pass --force to replace it, or name another --out\n"), p.stderr
    assert _snapshot(trace) == before

    p = _bow("replay", "log.img", "--base", "base.img", "--out", "out.img", "--force", cwd=trace)
    assert p.returncode == 0, p.stderr
    assert json.loads(_bow("inspect", out, "--json").stdout)["valid"]
    assert (trace / "other-name.img").read_bytes() == b"keep me"  # a new file, not written into
    assert {k: v for k, v in _snapshot(trace).items() if k != "out.img"} == {
        k: v for k, v in before.items() if k != "out.img"}


def test_replay_force_through_a_symlink_replaces_the_file_it_points_to(trace):
    (trace / "real.img").write_bytes(b"old")
    os.symlink("real.img", trace / "out.img")
    p = _bow("replay", "log.img", "--base", "base.img", "--out", "out.img", "--force", cwd=trace)
    assert p.returncode == 0, p.stderr
    assert os.readlink(trace / "out.img") == "real.img"
    assert json.loads(_bow("inspect", trace / "real.img", "--json").stdout)["valid"]
    assert sorted(p.name for p in trace.iterdir()) == ["base.img", "log.img", "out.img", "real.img"]


def _small_file_limit() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))  # writes past 64 KiB fail: EFBIG


def test_replay_write_errors_name_out_not_the_temporary(trace):
    before = _snapshot(trace)
    p = _bow("replay", "log.img", "--base", "base.img", "--out", "out.img", cwd=trace,
             preexec_fn=_small_file_limit)
    assert p.returncode == 4, p.stderr
    assert p.stderr.startswith("bow-compat: error: out.img: File too large") and ".partial" not in p.stderr
    assert p.stderr.count("\n") == 1 and _snapshot(trace) == before


# ---- the same answer from every command: no log, directories, the replay summary ----

def test_inspect_without_a_dm_bow_log_exits_7_like_restore(trace):
    base = trace / "base.img"  # random bytes: no dm-bow log in block 0
    p = _bow("inspect", base)
    assert p.returncode == 7 == _bow("restore", base).returncode, p
    assert p.stdout.count("\n") == 1 and "no dm-bow log" in p.stdout, p.stdout
    assert p.stderr.count("\n") == 1 and p.stderr.startswith(f"bow-compat: error: {base}: no dm-bow log"), p.stderr
    p = _bow("inspect", base, "--json")
    assert p.returncode == 7 and json.loads(p.stdout)["state"] == "none"


def test_the_no_log_message_says_it_once_and_what_to_do(trace):
    for cmd in ("inspect", "restore"):
        p = _bow(cmd, trace / "base.img")
        line = p.stderr
        assert line.count("no dm-bow log") == 1 and "nothing to restore" in line, line
        assert "name the device or image dm-bow ran on" in line, line
    assert _bow("inspect", trace / "base.img").stdout.count("no dm-bow log") == 1


@pytest.mark.parametrize("arg", ["LOG", "BASE", "OUT", "IMAGE-inspect", "IMAGE-restore",
                                 "IMAGE-restore-dry-run"])
def test_a_directory_argument_is_one_line_naming_it(trace, arg):
    d = trace / "a-dir"
    d.mkdir()
    argv = {
        "LOG": ("replay", d, "--base", trace / "base.img", "--out", trace / "out.img"),
        "BASE": ("replay", trace / "log.img", "--base", d, "--out", trace / "out.img"),
        "OUT": ("replay", trace / "log.img", "--base", trace / "base.img", "--out", d),
        "IMAGE-inspect": ("inspect", d),
        "IMAGE-restore": ("restore", d),
        "IMAGE-restore-dry-run": ("restore", d, "--dry-run"),
    }[arg]
    before = _snapshot(trace)
    p = _bow(*argv)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert p.stderr.startswith(f"bow-compat: error: {d} is a directory"), p.stderr
    assert p.stderr.count("\n") == 1 and "bytes" not in p.stderr
    assert _snapshot(trace) == before


def test_replay_text_and_json_count_the_same_things(trace):
    p = _bow("replay", trace / "log.img", "--base", trace / "base.img", "--out", trace / "a.img", "--json")
    d = json.loads(p.stdout)
    assert d["trace_entries"] == 82 and d["trace_entries_before_mark"] == 2, d
    assert "entries" not in d and "entries_before_mark" not in d  # ambiguous: which log?
    text = _bow("replay", trace / "log.img", "--base", trace / "base.img", "--out", trace / "b.img").stdout
    assert f"{d['trace_entries']} trace entries ({d['trace_entries_before_mark']} before the mark)" in text, text
    assert f"dm-bow log: {d['log_entries']} entries in {d['log_sectors']} log sector(s)" in text, text
    assert f"{d['trace_entries']} log entries" not in text


# ---- help and conventions ----

def test_version_and_short_help():
    from fiesnap import __version__

    p = _bow("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"bow-compat {__version__}", p
    for cmd in ((), ("replay",), ("record",), ("inspect",), ("restore",)):
        h, long = _bow(*cmd, "-h"), _bow(*cmd, "--help")
        assert h.returncode == 0 and h.stdout == long.stdout and "Usage:" in h.stdout, (cmd, h.stderr)


_HELP_WANTS = {  # every command: an example, and the metavars of its arguments and options
    "replay": ("Example", "bow-compat replay", "LOG", "--base BASE", "--out OUT", "--mark NAME",
               "--block-size N"),
    "inspect": ("Example", "bow-compat inspect", "IMAGE"),
    "restore": ("Example", "bow-compat restore", "IMAGE"),
    "record": ("Example", "bow-compat record", "DEVICE", "--log LOGDEV", "--base BASE",
               "--mount DIR", "--mark NAME", "COMMAND"),
}


@pytest.mark.parametrize("cmd", list(_HELP_WANTS))
def test_every_command_help_has_an_example_and_named_metavars(cmd):
    from bow_compat.record import MOUNT_ENV

    p = _bow(cmd, "--help", env={**os.environ, "COLUMNS": "200"})
    assert p.returncode == 0, p.stderr
    for want in _HELP_WANTS[cmd] + ((f"${MOUNT_ENV}",) if cmd == "record" else ()):
        assert want in p.stdout, (cmd, want, p.stdout)
    assert "TEXT" not in p.stdout and "INTEGER" not in p.stdout, p.stdout


def test_top_level_help_lists_the_exit_codes():
    from bow_compat.errors import EXIT_CODES

    p = _bow("--help", env={**os.environ, "COLUMNS": "200"})
    assert p.returncode == 0 and "Exit codes" in p.stdout, p.stdout
    for code, _ in EXIT_CODES:
        assert f" {code} " in p.stdout.replace("\n", " "), (code, p.stdout)
    for cmd in _HELP_WANTS:
        assert cmd in p.stdout


@pytest.mark.parametrize("argv, command", [
    (["replay", "log.img"], "replay"),
    (["replay", "log.img", "--base", "b.img"], "replay"),
    (["restore"], "restore"),
    (["record", "/dev/x", "--base", "b.img", "--", "true"], "record"),
    (["record", "/dev/x", "--log", "/dev/y", "--base", "b.img"], "record"),
])
def test_a_missing_argument_is_a_usage_error_of_that_command(argv, command):
    """run_app points the user at the help of the command the error's context names."""
    from bow_compat.cli import app

    with pytest.raises(Exception) as e:  # click's UsageError (typer vendors click in some versions)
        app(argv, standalone_mode=False, prog_name="bow-compat")
    assert hasattr(e.value, "format_message") and e.value.exit_code == 2, e.value
    assert e.value.ctx is not None and e.value.ctx.command_path == f"bow-compat {command}"
    p = _bow(*argv)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "--help" in p.stderr, p.stderr
