"""freeze.frozen on real ext4 and XFS (root, loop devices).

Anything that writes to the filesystem while it may be frozen runs in a
child process with a timeout, so a bug here fails the test instead of
hanging pytest; teardown always runs `fsfreeze -u` before unmounting.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_host_adapters import MKFS, host, loop_image  # noqa: F401  (host: fixture)

from fiesnap.errors import FilesystemError, UsageError
from fiesnap.kernel.freeze import FIFREEZE, FITHAW, frozen, refuse_frozen
from fiesnap.kernel.mounts import private_mount

KINDS = ["ext4-4k", "xfs"]

WRITER = textwrap.dedent(
    """
    import os, sys
    fd = os.open(sys.argv[1], os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    os.write(fd, b"hello")
    os.fsync(fd)
    print("done", flush=True)
    """
)


@pytest.fixture(params=KINDS)
def mp(request: pytest.FixtureRequest, host: None, tmp_path: Path) -> Iterator[str]:
    size, mkfs = MKFS[request.param]
    with loop_image(tmp_path, request.param, size, mkfs) as dev:
        with private_mount(dev, "xfs" if request.param == "xfs" else "ext4") as point:
            try:
                yield point
            finally:
                subprocess.run(["fsfreeze", "-u", point], capture_output=True)  # never leave it frozen


def _writer(path: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", WRITER, path], stdout=subprocess.PIPE, text=True)


def _can_write(mp: str, timeout: float = 10.0) -> bool:
    """Whether a child's write+fsync on `mp` finishes within `timeout` (i.e. it is not frozen)."""
    child = _writer(os.path.join(mp, "probe"))
    try:
        out, _ = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return child.returncode == 0 and out == "done\n"


def test_ioctl_numbers() -> None:
    # _IOWR('X', nr, int): dir 3 << 30 | size 4 << 16 | type 0x58 << 8 | nr
    assert FIFREEZE == (3 << 30) | (4 << 16) | (ord("X") << 8) | 119
    assert FITHAW == (3 << 30) | (4 << 16) | (ord("X") << 8) | 120


@pytest.mark.root
def test_writer_waits_for_the_thaw(mp: str) -> None:
    with frozen(mp):
        child = _writer(os.path.join(mp, "f"))
        time.sleep(0.5)
        assert child.poll() is None, "a write went through while frozen"
    out, _ = child.communicate(timeout=10)
    assert (child.returncode, out) == (0, "done\n")
    assert Path(mp, "f").read_bytes() == b"hello"


@pytest.mark.root
def test_exception_still_thaws(mp: str) -> None:
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with pytest.raises(ZeroDivisionError):
        with frozen(mp):
            assert signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])
            1 / 0
    assert _can_write(mp)
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask  # mask restored


@pytest.mark.root
def test_freezing_twice_is_refused(mp: str) -> None:
    with frozen(mp):
        with pytest.raises(FilesystemError) as e:
            with frozen(mp):
                pass
        assert str(e.value) == (
            f"{mp} is already frozen (by another tool?): thaw it with 'fsfreeze -u {mp}' and retry"
        )
    assert _can_write(mp)  # the outer window still thawed
    subprocess.run(["fsfreeze", "-f", mp], check=True)
    with pytest.raises(FilesystemError, match="already frozen"):
        with frozen(mp):
            pass
    subprocess.run(["fsfreeze", "-u", mp], check=True)  # someone else's freeze is left alone
    assert _can_write(mp)


@pytest.mark.root
def test_thaw_failure_says_what_to_do(mp: str) -> None:
    with pytest.raises(FilesystemError) as e:
        with frozen(mp):
            subprocess.run(["fsfreeze", "-u", mp], check=True)  # thawed behind our back
    assert str(e.value) == f"cannot thaw {mp}: Invalid argument; run 'fsfreeze -u {mp}' now"


def test_not_a_mount_point(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="is not a mount point"):
        with frozen(str(tmp_path)):
            pass


CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    from fiesnap.kernel.freeze import frozen
    mp, report, signame = sys.argv[1:]
    sig = getattr(signal, signame)
    def say(line):
        with open(report, "a") as f:
            f.write(line + "\\n")
    try:
        with frozen(mp):
            say("frozen")
            deadline = time.monotonic() + 10
            while sig not in signal.sigpending():
                assert time.monotonic() < deadline, "signal never arrived"
                time.sleep(0.01)
            say("pending")
            time.sleep(0.2)
            say("leaving")
    except KeyboardInterrupt:
        say("interrupted")
        sys.exit(42)
    say("survived")
    """
)


@pytest.mark.root
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_signal_waits_for_the_thaw(mp: str, tmp_path: Path, signame: str) -> None:
    report = tmp_path / "report"  # on the host's filesystem, not the frozen one
    child = subprocess.Popen([sys.executable, "-c", CHILD, mp, str(report), signame])
    try:
        deadline = time.monotonic() + 10
        while not (report.exists() and "frozen" in report.read_text()):
            assert child.poll() is None and time.monotonic() < deadline, "child never froze"
            time.sleep(0.01)
        child.send_signal(getattr(signal, signame))
        rc = child.wait(timeout=15)
    finally:
        if child.poll() is None:
            child.kill()
    lines = report.read_text().split()
    if signame == "SIGTERM":  # default action: the process dies, but only once the mask is lifted
        assert rc == -signal.SIGTERM
        assert lines == ["frozen", "pending", "leaving"]
    else:  # Python's handler: KeyboardInterrupt after the thaw
        assert rc == 42
        assert lines == ["frozen", "pending", "leaving", "interrupted"]
    assert _can_write(mp)


@pytest.mark.root
def test_refuse_frozen_passes_a_thawed_filesystem_and_leaves_it_writable(mp: str) -> None:
    refuse_frozen([mp], os.stat(mp).st_dev)
    assert _can_write(mp)


@pytest.mark.root
def test_refuse_frozen_refuses_a_filesystem_another_tool_froze(mp: str) -> None:
    subprocess.run(["fsfreeze", "-f", mp], check=True)
    try:
        with pytest.raises(FilesystemError, match=r"already frozen \(by another tool\?\).*fsfreeze -u"):
            refuse_frozen([mp], os.stat(mp).st_dev)
    finally:
        subprocess.run(["fsfreeze", "-u", mp], check=True)
    assert _can_write(mp)  # the other tool's thaw was enough: nothing of ours stayed frozen


@pytest.mark.root
def test_refuse_frozen_goes_through_a_bind_mounted_folder(mp: str, tmp_path: Path) -> None:
    """A bind mount of a folder (not the filesystem's root) is a way in, too."""
    os.mkdir(os.path.join(mp, "sub"))
    bind = tmp_path / "bind"
    bind.mkdir()
    subprocess.run(["mount", "--bind", os.path.join(mp, "sub"), str(bind)], check=True)
    try:
        subprocess.run(["fsfreeze", "-f", mp], check=True)
        try:
            with pytest.raises(FilesystemError, match="already frozen"):
                refuse_frozen([str(bind)], os.stat(mp).st_dev)
        finally:
            subprocess.run(["fsfreeze", "-u", mp], check=True)
    finally:
        subprocess.run(["umount", str(bind)], check=True)


@pytest.mark.root
def test_refuse_frozen_skips_a_path_that_is_another_filesystem_now(mp: str, tmp_path: Path) -> None:
    """Something mounted over the mount point: freezing through it would freeze that."""
    subprocess.run(["fsfreeze", "-f", mp], check=True)
    try:
        refuse_frozen([str(tmp_path)], os.stat(mp).st_dev)  # not the filesystem on dev: not checked
        with pytest.raises(FilesystemError):
            refuse_frozen([str(tmp_path), mp], os.stat(mp).st_dev)  # the next one is
    finally:
        subprocess.run(["fsfreeze", "-u", mp], check=True)
