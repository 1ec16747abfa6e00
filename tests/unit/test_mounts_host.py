"""private_mount keeps its scratch mount out of every other mount namespace (host, root, loop).

The scratch mount is made in a mount namespace of fiesnap's own (see
fiesnap/kernel/mounts.py); these tests check what that promises: other
namespaces - the caller's, a peer of a shared mount, one cloned meanwhile - never
see it; fiesnap itself still sees the user's mounts; and the caller is back in its
own namespace, root and working directory afterwards.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_host_adapters import MKFS, host, loop_image  # noqa: F401  (host: fixture)

from fiesnap.errors import FiesnapError
from fiesnap.kernel.blockdev import mounts_of
from fiesnap.kernel.mounts import private_mount
from tests.kernel.mount_views import MountViews, mount_points

pytestmark = pytest.mark.root


@pytest.fixture
def dev(host: None, tmp_path: Path) -> Iterator[str]:
    with loop_image(tmp_path, "ext4", *MKFS["ext4-4k"]) as d:
        yield d


@pytest.fixture
def shared_run(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A shared tmpfs with a peer bind of it elsewhere: (run dir inside it, the peer)."""
    a, b = tmp_path / "shared", tmp_path / "peer"
    a.mkdir()
    b.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755,size=1m", "fiesnap-test", str(a)], check=True)
    try:
        subprocess.run(["mount", "--make-shared", str(a)], check=True)
        subprocess.run(["mount", "--bind", str(a), str(b)], check=True)
        yield a / "run", b
    finally:
        subprocess.run(["umount", "-l", str(b)], capture_output=True)
        subprocess.run(["umount", "-l", str(a)], capture_output=True)


def _own_mountinfo() -> str:
    with open("/proc/self/mountinfo") as f:
        return f.read()


def test_scratch_mount_stays_out_of_other_namespaces(dev: str, shared_run: tuple[Path, Path]) -> None:
    run, peer = shared_run
    with MountViews() as views:
        with private_mount(dev, "ext4", run_dir=str(run)) as mp:
            name = os.path.basename(mp)
            assert mount_points(_own_mountinfo(), name) == [mp]  # fiesnap itself uses it
            seen = views.look()
    assert {who: mount_points(text, name) for who, text in seen.items()} == {
        "caller": [], "peer": [], "clone": []}
    assert not (peer / "run" / name).exists()


def test_fiesnap_still_sees_the_users_mounts(dev: str, tmp_path: Path) -> None:
    user = tmp_path / "user"
    user.mkdir()
    subprocess.run(["mount", str(dev), str(user)], check=True)
    try:
        st = os.stat(dev)
        with private_mount(dev, "ext4") as mp:
            assert mounts_of(os.major(st.st_rdev), os.minor(st.st_rdev)) == [str(user), mp]
        assert mounts_of(os.major(st.st_rdev), os.minor(st.st_rdev)) == [str(user)]
    finally:
        subprocess.run(["umount", str(user)], check=True)


def test_the_caller_gets_its_namespace_and_cwd_back(dev: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    ns = os.readlink("/proc/thread-self/ns/mnt")
    with private_mount(dev, "ext4") as mp:
        assert os.readlink("/proc/thread-self/ns/mnt") != ns
        assert os.getcwd() == str(tmp_path)
    assert os.readlink("/proc/thread-self/ns/mnt") == ns
    assert os.getcwd() == str(tmp_path)
    assert not os.path.exists(mp)


def test_only_the_main_thread_may_make_one(dev: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            with private_mount(dev, "ext4", run_dir=str(run)):
                pass
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert len(errors) == 1 and isinstance(errors[0], FiesnapError) and "main thread" in str(errors[0])
    assert os.listdir(run) == []
