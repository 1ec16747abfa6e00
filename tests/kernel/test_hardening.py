"""Real-kernel checks of three hardening rules:

- the state folder is trusted only after its path has been checked (merge, commit and
  status refuse a folder someone else could write, changing nothing);
- a scratch mount never shows up in another mount namespace, even with /run shared;
- XFS with a realtime section is refused, and so is a store file with the realtime flag.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import pytest

from fiesnap.errors import FilesystemError
from fiesnap.kernel import mounts
from fiesnap.kernel.blockdev import mounts_of
from fiesnap.services import storefile

from . import scenario as sc
from .helpers import MiB, make_fs, sh
from .mount_views import MountViews, mount_points
from .test_bad_input import FILESYSTEM, refused

STATE = 10
NOBODY = 65534


# --------------------------------------------------------------------------- state folder


def test_a_state_folder_others_could_write_is_refused(lab):
    sc.prepare(lab, "ext4-4k")
    try:
        os.chown(lab.state, NOBODY, NOBODY)
        refused(lab, ["merge", "cp"], STATE, f"state folder {lab.state} is owned by uid 65534, not root")
        refused(lab, ["status"], STATE, "owned by uid 65534", with_image=False)
        os.chown(lab.state, 0, 0)
        os.chmod(lab.state, 0o755)
        refused(lab, ["commit", "cp"], STATE, "has mode 0755", with_image=False)
    finally:
        os.chown(lab.state, 0, 0)
        os.chmod(lab.state, 0o700)
    lab.fiesnap("commit", "cp")


# --------------------------------------------------------------------------- scratch mounts


def _propagation(mountpoint: str) -> str | None:
    """The optional fields (shared:N, master:N) of the top mount at `mountpoint`, or None."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left = line.split(" - ")[0].split()
            if left[4] == mountpoint:
                found = " ".join(left[6:])
    return found


@pytest.fixture
def shared_run(tmp_path) -> Iterator[str]:
    """/run made shared (as systemd makes it) with a peer bind of it: the peer's path."""
    was = _propagation("/run")
    if was is None:
        pytest.skip("/run is not a mount point in this guest")
    peer = str(tmp_path / "peer")
    os.makedirs(peer)
    sh("mount", "--make-shared", "/run")
    sh("mount", "--bind", "/run", peer)
    try:
        yield peer
    finally:
        sh("umount", "-l", peer, check=False)
        if not re.search(r"\bshared:", was):
            sh("mount", "--make-private", "/run", check=False)


def test_a_scratch_mount_stays_out_of_other_namespaces(lab, shared_run):
    make_fs(lab.disk, "ext4-4k")
    lab.mount(lab.disk)  # the user's mount: fiesnap must still see it
    st = os.stat(lab.disk)
    with MountViews() as views:
        with mounts.private_mount(lab.disk, "ext4") as mp:
            name = os.path.basename(mp)
            assert mounts_of(os.major(st.st_rdev), os.minor(st.st_rdev)) == [lab.mnt, mp]
            seen = views.look()
            peer_path = os.path.join(shared_run, "fiesnap", name)
            assert not os.path.ismount(peer_path)
    assert {who: mount_points(text, name) for who, text in seen.items()} == {
        "caller": [], "peer": [], "clone": []}
    assert mounts_of(os.major(st.st_rdev), os.minor(st.st_rdev)) == [lab.mnt]
    lab.umount()


# --------------------------------------------------------------------------- XFS realtime


@pytest.fixture
def rt_xfs(lab, scratch_disks) -> str:
    """lab.disk as XFS whose realtime section is on a second disk (returned)."""
    rt = scratch_disks(1)[0]
    sh("mkfs.xfs", "-f", "-q", "-K", "-r", f"rtdev={rt}", lab.disk)
    return rt


def test_xfs_with_a_realtime_section_is_refused(lab, rt_xfs):
    refused(lab, ["start", lab.disk, "--size", "16M"], FILESYSTEM, "has a realtime section")
    refused(lab, ["setup", lab.disk, "--name", "cp"], FILESYSTEM, "has a realtime section")


def test_a_store_file_with_the_realtime_flag_is_refused(lab, rt_xfs):
    p = sh("mount", "-o", f"rtdev={rt_xfs}", lab.disk, lab.mnt, check=False)
    if p.returncode != 0:
        pytest.skip(f"this kernel cannot mount XFS with a realtime device: {p.stderr.strip()}")
    try:
        sh("xfs_io", "-c", "chattr +t", lab.mnt)  # rtinherit: files below get the realtime flag
        with pytest.raises(FilesystemError, match=r"\.fiesnap/s is a realtime file of XFS") as e:
            storefile.create_store_file(lab.mnt, "s", 16 * MiB)
        assert "\n" not in str(e.value)
        assert not os.path.exists(os.path.join(lab.mnt, storefile.STORE_DIR))
    finally:
        lab.umount()
