"""The state folder is trusted only after its whole path has been checked (root, real files).

A record names the store whose saved blocks `merge` copies over the device as
root, so a record someone else could write is a way to write the device. These
tests build forged folders and files under pytest's tmp_path (root-owned, 0700,
below the sticky /tmp) and check that every command path refuses them with one
StateError, changing nothing. Root only: the ownership cases chown to nobody.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from test_record import _started

from fiesnap.commands import status as status_cmd
from fiesnap.errors import CheckpointNameError, StateError
from fiesnap.services import statedir
from fiesnap.services.statedir import StateStore

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, root-owned folders)"),
]

NOBODY = 65534


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def _snapshot(folder: Path) -> dict[str, bytes | str]:
    """What is in `folder` (and where its links point): a refusal must change none of it."""
    out: dict[str, bytes | str] = {}
    for p in sorted(folder.iterdir()):
        if p.is_symlink():
            out[p.name] = "-> " + os.readlink(p)
        elif p.is_file():
            out[p.name] = p.read_bytes()
        else:
            out[p.name] = f"mode {_mode(p):o}"
    return out


@pytest.fixture
def record():
    return _started().with_phase("active")


@pytest.fixture
def good(tmp_path: Path, record) -> Path:
    """A valid state folder holding record 'cp'."""
    folder = tmp_path / "state"
    StateStore(str(folder)).save(record)
    return folder


def _refused(folder: Path, record, match: str) -> None:
    """Every way in refuses `folder` with one line matching `match`, and changes nothing."""
    before = _snapshot(folder) if folder.is_dir() else None
    st = StateStore(str(folder))
    calls = [st.names, st.load_all, lambda: st.load("cp"), lambda: st.save(record), st.ensure,
             st.device_id, lambda: st.delete("cp"), lambda: st.exists("cp")]
    for call in calls:
        with pytest.raises(StateError, match=match) as e:
            call()
        assert "\n" not in str(e.value)
    with pytest.raises(StateError, match=match):
        with st.locked():
            pass
    with pytest.raises(StateError, match=match):  # a command that only reads refuses it too
        status_cmd.status(lambda: pytest.fail("no dm call expected"), st, None)
    if before is not None:
        assert _snapshot(folder) == before


def test_creates_the_folder_0700_and_round_trips(tmp_path: Path, record) -> None:
    folder = tmp_path / "new" / "state"
    st = StateStore(str(folder))
    st.save(record)
    assert (_mode(folder), _mode(folder.parent), _mode(folder / "cp.json")) == (0o700, 0o755, 0o600)
    assert st.load("cp") == record and st.names() == ["cp"] and st.exists("cp")
    with st.locked():
        assert stat.S_ISREG(os.lstat(folder / ".lock").st_mode)
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "cp.json"]
    st.delete("cp")
    assert st.names() == [] and not st.exists("cp")


def test_a_missing_folder_reads_as_empty_and_is_not_created(tmp_path: Path) -> None:
    st = StateStore(str(tmp_path / "none"))
    assert st.names() == [] and not st.exists("cp")
    with pytest.raises(CheckpointNameError):
        st.load("cp")
    st.delete("cp")
    assert not (tmp_path / "none").exists()


def test_refuses_a_folder_group_or_others_can_enter(good: Path, record) -> None:
    os.chmod(good, 0o750)
    _refused(good, record, r"state folder .*/state has mode 0750: .*chmod 0700")


def test_refuses_a_folder_owned_by_another_user(good: Path, record) -> None:
    os.chown(good, NOBODY, NOBODY)
    _refused(good, record, r"state folder .*/state is owned by uid 65534, not root: .*chown root:")


def test_refuses_a_parent_another_user_owns(tmp_path: Path, record) -> None:
    parent = tmp_path / "home"
    StateStore(str(parent / "state")).save(record)
    os.chown(parent, NOBODY, NOBODY)
    _refused(parent / "state", record, r"/home \(a parent of the state folder .*\) is owned by uid 65534")


def test_refuses_a_parent_others_can_write_unless_it_is_sticky(tmp_path: Path, record) -> None:
    parent = tmp_path / "shared"
    StateStore(str(parent / "state")).save(record)
    os.chmod(parent, 0o777)
    _refused(parent / "state", record, r"/shared \(a parent of .*\) has mode 0777, .*not sticky: .*chmod go-w")
    os.chmod(parent, 0o1777)  # like /tmp: others cannot rename or replace root's entries
    assert StateStore(str(parent / "state")).load("cp") == record


def test_refuses_symlinks_anywhere_on_the_path(tmp_path: Path, good: Path, record, monkeypatch) -> None:
    (tmp_path / "link").symlink_to(tmp_path)
    _refused(tmp_path / "link" / "state", record, r"/link is a symlink or not a directory")
    (tmp_path / "state-link").symlink_to(good)
    _refused(tmp_path / "state-link", record, r"/state-link is a symlink or not a directory")
    monkeypatch.setenv("FIESNAP_STATE_DIR", str(tmp_path / "state-link"))
    with pytest.raises(StateError, match="state-link is a symlink"):
        StateStore().load("cp")


def test_refuses_forged_record_files(tmp_path: Path, good: Path, record) -> None:
    st = StateStore(str(good))
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(record.to_json())
    record_file = good / "cp.json"

    record_file.unlink()
    record_file.symlink_to(elsewhere)
    with pytest.raises(StateError, match=r"checkpoint record .*cp\.json is a symlink: .*remove it"):
        st.load("cp")

    record_file.unlink()
    record_file.write_text(record.to_json())
    os.chown(record_file, NOBODY, NOBODY)
    with pytest.raises(StateError, match=r"cp\.json is not a regular file owned by root .*uid 65534"):
        st.load("cp")
    os.chown(record_file, 0, 0)
    os.chmod(record_file, 0o620)
    with pytest.raises(StateError, match=r"cp\.json is not a regular file .*mode 0620"):
        st.load("cp")

    record_file.unlink()
    os.mkfifo(record_file, 0o600)
    old = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("opening a FIFO record hung"))
    signal.alarm(5)
    try:
        with pytest.raises(StateError, match=r"cp\.json is not a regular file"):
            st.load("cp")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_a_name_that_is_a_path_is_no_record(tmp_path: Path, good: Path, record) -> None:
    (tmp_path / "x.json").write_text(record.to_json())
    st = StateStore(str(good))
    with pytest.raises(CheckpointNameError):
        st.load("../x")
    assert not st.exists("../x")


def test_save_replaces_a_stale_temporary_without_following_it(tmp_path: Path, good: Path, record) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (good / "cp.json.tmp").symlink_to(victim)
    grown = record.with_phase("merging")
    StateStore(str(good)).save(grown)
    assert victim.read_text() == "keep"
    assert StateStore(str(good)).load("cp") == grown
    assert sorted(p.name for p in good.iterdir()) == ["cp.json"]
    assert _mode(good / "cp.json") == 0o600


def test_the_lock_file_must_be_a_real_root_file(tmp_path: Path, good: Path) -> None:
    victim = tmp_path / "victim"
    (good / ".lock").symlink_to(victim)
    with pytest.raises(StateError, match=r"lock file .*/\.lock is a symlink"):
        with StateStore(str(good)).locked():
            pass
    assert not victim.exists()
    (good / ".lock").unlink()
    (good / ".lock").write_text("")
    os.chown(good / ".lock", NOBODY, NOBODY)
    with pytest.raises(StateError, match=r"lock file .*/\.lock is not a regular file owned by root"):
        with StateStore(str(good)).locked():
            pass


def test_save_writes_the_whole_record_when_writes_are_short(good: Path, record, monkeypatch) -> None:
    real_write = os.write
    monkeypatch.setattr(statedir.os, "write", lambda fd, data: real_write(fd, bytes(data[:7])))
    grown = record.with_phase("merging")
    StateStore(str(good)).save(grown)
    monkeypatch.undo()
    assert StateStore(str(good)).load("cp") == grown


def test_cli_status_refuses_a_forged_folder_in_one_line(good: Path) -> None:
    """Before anything else, also before looking for device-mapper (this host may have none)."""
    os.chown(good, NOBODY, NOBODY)
    env = dict(os.environ, FIESNAP_STATE_DIR=str(good))
    p = subprocess.run([sys.executable, "-m", "fiesnap", "status", "--json"], capture_output=True, text=True,
                       env=env, cwd=Path(__file__).resolve().parents[2], timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 10, (p.returncode, p.stdout, p.stderr)
    assert len(lines) == 1 and "owned by uid 65534" in lines[0] and str(good) in lines[0], p.stderr
    assert json.loads((good / "cp.json").read_text())["name"] == "cp"


# -- a failing command leaves the state folder as it found it -----------------------------------


def test_a_failing_command_leaves_no_folder_or_lock_it_created(tmp_path: Path) -> None:
    folder = tmp_path / "new" / "deeper" / "state"
    with pytest.raises(CheckpointNameError):
        with StateStore(str(folder)).locked():
            StateStore(str(folder)).load("nosuch")
    assert list(tmp_path.iterdir()) == []


def test_a_failing_command_keeps_a_folder_that_was_there(good: Path) -> None:
    """Its lock file stays too: another command may have opened it a moment ago, and must
    not end up holding a file that is no longer the lock."""
    before = _snapshot(good)
    with pytest.raises(CheckpointNameError):
        with StateStore(str(good)).locked():
            StateStore(str(good)).load("nosuch")
    after = _snapshot(good)
    assert after.pop(".lock") == b"" and after == before


def test_a_folder_another_command_removed_is_made_again(tmp_path: Path, monkeypatch) -> None:
    """A command that made the folder and then failed removes it: one that opened the folder in
    between finds it gone when it creates the lock file, and makes it again."""
    folder = tmp_path / "state"
    real_open_lock = StateStore._open_lock
    calls = []

    def open_lock_after_the_folder_went(dfd: int, where: str) -> int:
        if not calls:
            (folder / ".lock").unlink(missing_ok=True)
            folder.rmdir()
        calls.append(where)
        return real_open_lock(dfd, where)

    monkeypatch.setattr(StateStore, "_open_lock", staticmethod(open_lock_after_the_folder_went))
    with StateStore(str(folder)).locked():
        assert (folder / ".lock").is_file()
    assert len(calls) == 2


def test_a_command_that_succeeds_keeps_its_folder_and_lock(tmp_path: Path, record) -> None:
    folder = tmp_path / "new" / "state"
    with StateStore(str(folder)).locked():
        StateStore(str(folder)).save(record)
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "cp.json"]


def test_a_failure_after_a_record_was_saved_keeps_the_folder(tmp_path: Path, record) -> None:
    folder = tmp_path / "new" / "state"
    with pytest.raises(RuntimeError):
        with StateStore(str(folder)).locked():
            StateStore(str(folder)).save(record)
            raise RuntimeError("the command failed after saving")
    assert [p.name for p in folder.iterdir()] == ["cp.json"]


def test_a_lock_file_removed_under_us_is_taken_again(good: Path, monkeypatch) -> None:
    """Another command that created the lock file removes it when it fails: whoever opened the
    old file must not count it as the lock, or two commands would both hold 'the' lock."""
    real_flock = statedir.fcntl.flock
    calls = []

    def flock_after_the_other_command_left(fd: int, op: int) -> None:
        if not calls:  # the other command unlinks its lock file between our open and our flock
            os.unlink(good / ".lock")
        calls.append(fd)
        real_flock(fd, op)

    monkeypatch.setattr(statedir.fcntl, "flock", flock_after_the_other_command_left)
    with StateStore(str(good)).locked():
        held = os.stat(good / ".lock")
        assert os.fstat(calls[-1]).st_ino == held.st_ino  # the lock held is the file named .lock
    assert len(calls) == 2


def test_device_id_does_not_create_the_folder(tmp_path: Path) -> None:
    st = StateStore(str(tmp_path / "new" / "state"))
    assert st.device_id() == os.stat(tmp_path).st_dev
    assert list(tmp_path.iterdir()) == []
