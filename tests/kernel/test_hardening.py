"""Real-kernel checks of three hardening rules:

- the state folder is trusted only after its path has been checked (merge, commit and
  status refuse a folder someone else could write, changing nothing);
- a scratch mount never shows up in another mount namespace, even with /run shared;
- XFS with a realtime section is refused, and so is a store file with the realtime flag;
- writes that reached the device while the stack was down (the raw device mounted directly)
  are noticed by activate or merge, and merge then refuses: commit keeps the current data.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Iterator

import pytest

from fiesnap.errors import FilesystemError
from fiesnap.kernel import mounts
from fiesnap.kernel.blockdev import mounts_of
from fiesnap.services import storefile

from . import scenario as sc
from .helpers import MiB, dm_names, dm_remove, make_fs, sh
from .mount_views import MountViews, mount_points
from .test_bad_input import FILESYSTEM, REFUSED, refused, world

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


# --------------------------------------------------------------------------- writes around the origin


def _mount_raw_and_write(lab, name: str) -> None:
    """What a bypass looks like: the raw device mounted directly, one file written."""
    lab.mount(lab.disk)
    with open(os.path.join(lab.mnt, name), "wb") as f:
        f.write(os.urandom(256 * 1024))
    lab.umount()


@pytest.mark.parametrize("kind", ["ext4-4k", "xfs"])
def test_a_direct_mount_after_deactivate_is_found_by_activate_and_merge_refuses(lab, kind):
    sc.prepare(lab, kind)
    sc.churn_through(lab)
    lab.fiesnap("deactivate", "cp")  # seals: the superblock as the origin left it
    _mount_raw_and_write(lab, "bypassed")
    out = json.loads(lab.fiesnap("activate", "cp", "--json").stdout)["activated"][0]
    assert out["result"] == "activated"  # the machine still boots; the checkpoint is marked
    assert out["bypass"].startswith(f"{lab.disk} was written outside /dev/mapper/cp after 'fiesnap deactivate': ")
    if kind == "ext4-4k":
        assert "mounted read-write 1 time(s)" in out["bypass"]
    line = refused(lab, ["merge", "cp"], REFUSED, "cannot be rolled back exactly")
    assert "'fiesnap commit cp' keeps the current data" in line
    lab.fiesnap("commit", "cp")
    lab.mount(lab.disk, ro=True)
    assert os.path.exists(os.path.join(lab.mnt, "bypassed"))
    lab.umount()


def test_merge_finds_a_direct_mount_itself_and_keeps_the_finding(lab):
    """No activate in between: merge, with the stack down, reads the seal itself."""
    sc.prepare(lab, "ext4-4k")
    lab.fiesnap("deactivate", "cp")
    _mount_raw_and_write(lab, "bypassed")
    names, _, _, image = world(lab)
    p = lab.fiesnap("merge", "cp", check=False)
    assert p.returncode == REFUSED and "cannot be rolled back exactly" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    after_names, _, _, after_image = world(lab)
    assert (after_names, after_image) == (names, image), "a refused merge changed the devices"
    rec = sc.load_record(lab.state, "cp")
    assert "mounted read-write 1 time(s)" in rec.raw["notes"]["bypass"]  # kept for later commands
    lab.fiesnap("commit", "cp")
    assert dm_names() == []


def test_a_direct_mount_in_a_new_boot_before_activate_is_found(lab):
    """The stack went down without deactivate (a reboot): no seal. The record says which boot
    built the stack; an ext4 mounted read-write since this boot began, before activate, is a
    bypass. A reboot is stood in for by the boot the record names."""
    sc.prepare(lab, "ext4-4k")
    for n in ("cp", "cp-snap", "cp-cow"):  # what a power-off does: no deactivate, no seal
        dm_remove(n)
    path = os.path.join(lab.state, "cp.json")
    with open(path) as f:
        raw = json.load(f)
    built = raw["notes"]["built"]
    assert built["boot_id"] == open("/proc/sys/kernel/random/boot_id").read().strip()
    raw["notes"]["built"] = {"boot_id": str(uuid.uuid4()), "at": built["at"] - 3600}
    with open(path, "w") as f:
        json.dump(raw, f)
    # The last mount (populating it, before the start) as if it were in that earlier boot.
    sh("debugfs", "-w", "-R", "ssv mtime 20000101000000", lab.disk)
    out = json.loads(lab.fiesnap("activate", "cp", "--json").stdout)["activated"][0]
    assert out["bypass"] == ""  # not mounted since this boot began: nothing to see
    lab.fiesnap("deactivate", "cp")
    os.unlink(os.path.join(lab.state, "cp.json"))  # back to the reboot case: no seal
    with open(path, "w") as f:
        json.dump(raw, f)
    _mount_raw_and_write(lab, "bypassed")
    out = json.loads(lab.fiesnap("activate", "cp", "--json").stdout)["activated"][0]
    assert out["bypass"].startswith(f"{lab.disk} was mounted read-write directly during this boot")
    refused(lab, ["merge", "cp"], REFUSED, "cannot be rolled back exactly")
    lab.fiesnap("commit", "cp")
