"""`bow-compat record` on the host: every refusal before the first change (exit code, one line
naming the path, nothing created), and the steps that need no device-mapper: the sparse copy
to BASE, running COMMAND, SIGTERM as ^C, and what the teardown says it left behind.

The whole record (device-mapper, mount, fstrim, mark) runs in the lab:
tests/kernel/test_bow_trace.py."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys

import pytest

from bow_compat import capture, record as rec
from bow_compat.errors import BowInterrupted, BowNotRootError


def _bow(*args: object, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bow_compat", *map(str, args)], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=120, **kw)


def _blockdev(path, minor: int) -> None:
    try:
        os.mknod(path, stat.S_IFBLK | 0o600, os.makedev(7, minor))
    except PermissionError:
        pytest.skip("making a device node needs root")


def _listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# what the case makes in the folder, the argv after "record", the exit code, the error's start
_REFUSALS = {
    "no-command": (None, ["dev", "--log", "log", "--base", "b.img", "--"], 2, "Missing argument"),
    "command-not-found": (None, ["dev", "--log", "log", "--base", "b.img", "--", "no-such-cmd-x"], 2,
                          "no-such-cmd-x: command not found"),
    "base-exists": ("base", ["dev", "--log", "log", "--base", "b.img", "--", "true"], 2, "b.img exists"),
    "base-is-a-directory": ("base-dir", ["dev", "--log", "log", "--base", "b.img", "--", "true"], 2,
                            "b.img is a directory"),
    "base-folder-missing": (None, ["dev", "--log", "log", "--base", "no/b.img", "--", "true"], 2,
                            "no/b.img: folder"),
    "mount-not-a-directory": (None, ["dev", "--log", "log", "--base", "b.img", "--mount", "mnt", "--",
                                     "true"], 2, "mnt is not a directory"),
    "device-missing": (None, ["dev", "--log", "log", "--base", "b.img", "--", "true"], 4,
                       "dev does not exist"),
    "device-is-a-file": ("dev-file", ["dev", "--log", "log", "--base", "b.img", "--", "true"], 4,
                         "dev is a regular file: DEVICE must be a block device; attach the file with "
                         "'losetup -f --show dev'"),
    "device-is-a-directory": ("dev-dir", ["dev", "--log", "log", "--base", "b.img", "--", "true"], 2,
                              "dev is a directory"),
    "log-missing": ("dev", ["dev", "--log", "log", "--base", "b.img", "--", "true"], 4,
                    "log does not exist"),
    "log-is-a-file": ("dev+log-file", ["dev", "--log", "log", "--base", "b.img", "--", "true"], 4,
                      "log is a regular file: LOGDEV (--log) must be a block device; attach the file "
                      "with 'losetup -f --show log'"),
    "log-is-the-device": ("dev+same", ["dev", "--log", "same", "--base", "b.img", "--", "true"], 2,
                          "dev and same are the same device"),
}


def _make(folder, what: str | None) -> None:
    for part in (what or "").split("+"):
        if part == "base":
            (folder / "b.img").write_bytes(b"keep")
        elif part == "base-dir":
            (folder / "b.img").mkdir()
        elif part == "dev-file":
            (folder / "dev").write_bytes(bytes(4096))
        elif part == "dev-dir":
            (folder / "dev").mkdir()
        elif part == "dev":
            _blockdev(folder / "dev", 0)
        elif part == "log-file":
            (folder / "log").write_bytes(bytes(4096))
        elif part == "same":
            _blockdev(folder / "same", 0)


@pytest.mark.parametrize("case", list(_REFUSALS))
def test_record_refuses_bad_input_and_changes_nothing(tmp_path, case):
    what, argv, code, says = _REFUSALS[case]
    _make(tmp_path, what)
    before = _listing(tmp_path)
    p = _bow("record", *argv, cwd=tmp_path)
    assert p.returncode == code, (p.returncode, p.stderr)
    assert p.stderr.startswith("bow-compat: error: " + says) and p.stderr.count("\n") == 1, p.stderr
    assert _listing(tmp_path) == before


def test_record_refuses_without_root_before_opening_anything(tmp_path, monkeypatch):
    """Arguments are checked first (a user learns of a typo without sudo), then root."""
    _blockdev(tmp_path / "dev", 0)
    _blockdev(tmp_path / "log", 1)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(BowNotRootError, match="record needs root.*sudo"):
        rec.record(str(tmp_path / "dev"), str(tmp_path / "log"), str(tmp_path / "b.img"), ["true"])
    assert _listing(tmp_path) == ["dev", "log"]


def test_copy_to_base_is_sparse_and_exact(tmp_path):
    src = tmp_path / "dev.img"
    data = bytearray(3 * rec._COPY_CHUNK + 4096)
    data[rec._COPY_CHUNK + 5] = 1
    data[-1] = 2
    src.write_bytes(bytes(data) + b"tail not copied")
    seen = []
    rec._copy_to_new_file(str(src), str(tmp_path / "b.img"), len(data), lambda d, t: seen.append((d, t)))
    assert (tmp_path / "b.img").read_bytes() == bytes(data)
    assert os.stat(tmp_path / "b.img").st_blocks * 512 < 2 * rec._COPY_CHUNK + 8192  # 2 zero chunks: holes
    assert seen[-1] == (len(data), len(data))


def test_copy_to_base_removes_a_partial_base(tmp_path):
    (tmp_path / "short.img").write_bytes(os.urandom(8192))
    with pytest.raises(OSError, match="ended at byte 8192 of 16384"):
        rec._copy_to_new_file(str(tmp_path / "short.img"), str(tmp_path / "b.img"), 16384, None)
    assert _listing(tmp_path) == ["short.img"]
    (tmp_path / "b.img").write_bytes(b"keep")
    with pytest.raises(FileExistsError):  # never writes into an existing file
        rec._copy_to_new_file(str(tmp_path / "short.img"), str(tmp_path / "b.img"), 8192, None)
    assert (tmp_path / "b.img").read_bytes() == b"keep"


def test_command_runs_in_the_mount_point_and_its_status_comes_back(tmp_path):
    script = f'test "$PWD" = "{tmp_path}" && test "${rec.MOUNT_ENV}" = "{tmp_path}" && echo hi > here; exit 3'
    assert rec._run_command(["sh", "-c", script], str(tmp_path), None) == 3
    assert (tmp_path / "here").read_text() == "hi\n"
    assert rec._run_command(["sh", "-c", "kill -TERM $$"], str(tmp_path), None) == 128 + signal.SIGTERM


def test_sigterm_ends_a_record_like_ctrl_c():
    with pytest.raises(KeyboardInterrupt):
        with rec._signals_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            signal.sigtimedwait([], 0.5)  # let the handler run
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


class _DeviceMapperRefusingRemove:
    """DeviceMapper's calls logged_mount makes; remove() fails as the real one does when the
    device stays open (DeviceMapperError after its retries)."""

    def __init__(self, node: str) -> None:
        self.devices: set[str] = set()
        self.node = node

    def info(self, name):
        return object() if name in self.devices else None

    def create(self, name, *, targets):
        assert targets[0].target_type == "log-writes"
        self.devices.add(name)

    def node_path(self, name):
        return self.node

    def remove(self, name):
        from fiesnap.errors import DeviceMapperError

        raise DeviceMapperError(f"device-mapper remove {name}: Device or resource busy: still in use")


def test_teardown_names_what_it_left_and_how_to_remove_it(tmp_path):
    """The mount fails (no such node), the removal too: the mount error comes out, with a note
    naming the dm device left and the command that removes it."""
    for n in ("d", "l"):
        _blockdev(tmp_path / n, {"d": 0, "l": 1}[n])
    dm = _DeviceMapperRefusingRemove(str(tmp_path / "no-such-node"))
    with pytest.raises(Exception, match="cannot mount") as e:
        with capture.logged_mount(str(tmp_path / "d"), str(tmp_path / "l"), str(tmp_path), sectors=8,
                                  fstype="ext4", name="bow-record-x", dm=dm):
            pytest.fail("mounted a node that does not exist")
    assert any("bow-record-x is left" in n and "'dmsetup remove bow-record-x'" in n
               for n in e.value.__notes__), e.value.__notes__


def test_interrupt_message_keeps_the_teardown_notes(tmp_path, monkeypatch):
    """^C after the copy: BowInterrupted (exit 130) says what is kept, with the teardown's notes."""
    checked = rec._Checked(str(tmp_path / "d"), str(tmp_path / "l"), str(tmp_path / "b.img"), ["true"],
                           str(tmp_path), "ext4", 4096, 8192, "bow-record-x")
    (tmp_path / "d").write_bytes(os.urandom(8192))

    def interrupted(*_a, **_k):
        e = KeyboardInterrupt()
        e.add_note("dm device bow-record-x is left (busy); remove it with 'dmsetup remove bow-record-x'")
        raise e

    monkeypatch.setattr(rec, "logged_mount", interrupted)
    with pytest.raises(BowInterrupted) as e:
        rec._record_steps(checked, None, "checkpoint", None, None, None)
    assert e.value.exit_code == 130 and "before the mark" in str(e.value)
    assert f"{tmp_path / 'b.img'} is kept" in str(e.value)
    assert "dmsetup remove bow-record-x" in e.value.__notes__[0]
