"""Real-kernel tests: setup, online start/commit with the filesystem mounted and
busy, activate/deactivate over an existing store, the identity block, udev hygiene."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from fiesnap.model.identity import IDENTITY_BYTES, decode_identity, encode_identity

from . import scenario as sc
from .helpers import (
    dev_majmin,
    dev_sectors,
    device_digest,
    differing_mib,
    dm_create,
    dm_names,
    dm_remove,
    dm_table,
    fsck_clean,
    make_fs,
    read_direct,
    run_fiesnap,
    sh,
    tree_digest,
    write_direct,
)
from .test_bad_input import DEVICE, NAME, REFUSED, STORE_FORMAT, USAGE, refused

STATE = 10


def _without_writer(tree: dict) -> dict:
    return {k: v for k, v in tree.items() if k != "w" and not k.startswith("w/")}


def _fiesnap_devices() -> list[str]:
    return sorted(n for n in dm_names() if n == "cp" or n.startswith("cp-"))


@pytest.mark.every_kernel
@pytest.mark.parametrize("kind,by", [("ext4-4k", "name"), ("xfs", "mountpoint")])
def test_online_start_under_writer_then_rollback_is_exact(lab, tmp_path, kind, by):
    sc.online_setup(lab, kind)
    before = tree_digest(lab.mnt)
    writer = sc.Writer(lab.mnt, str(tmp_path))
    writer.wait_for(15)
    done_before_start = writer.done()
    p = lab.fiesnap("start", "cp" if by == "name" else lab.mnt, "--size", "48M")
    done_after_start = writer.done()
    writer.wait_for(done_after_start + 15)
    finished = writer.stop()
    assert "frozen" in p.stderr
    assert "udev did not confirm" not in p.stderr, p.stderr  # no cookie, no wait (no udev here)

    rec = sc.load_record(lab.state, "cp")
    assert rec.raw["mode"] == "online" and rec.raw["managed"] and rec.raw["free_map"]
    st = lab.status("cp")
    assert st["state"] == "active" and st["mounted_on"] == [lab.mnt]
    # No write was lost: every file the writer finished, before, during or after start, is intact.
    assert sc.writer_files(lab.mnt) == list(range(finished))
    checkpoint = device_digest("/dev/mapper/cp-snap", rec.outside_checkpoint)  # the checkpoint view

    sc.churn(lab.mnt)
    lab.umount()
    out = json.loads(lab.fiesnap("merge", "cp", "--keep-store", "--json").stdout)
    assert out["chunks"] > 0 and not out["store_removed"]
    # Byte level: the device equals the checkpoint view outside the store file's blocks.
    assert differing_mib(device_digest(lab.disk, rec.outside_checkpoint), checkpoint) == []
    sc.assert_fsck_clean(lab, "/dev/mapper/cp", kind)
    st = lab.status("cp")
    assert st["state"] == "passthrough" and st["checkpoint_id"] is None
    assert _fiesnap_devices() == ["cp"]

    lab.mount("/dev/mapper/cp", ro=True)
    assert _without_writer(tree_digest(lab.mnt)) == _without_writer(before)
    present = sc.writer_files(lab.mnt)
    assert present == list(range(len(present))), "the checkpoint holds a prefix of the writer's files"
    assert done_before_start <= len(present) <= done_after_start, (
        done_before_start, len(present), done_after_start)
    assert os.path.exists(os.path.join(lab.mnt, rec.raw["store_relpath"])), "--keep-store keeps it"
    lab.umount()


@pytest.mark.every_kernel
@pytest.mark.parametrize("kind", ["ext4-4k", "xfs"])
def test_online_commit_keeps_the_filesystem_mounted(lab, tmp_path, kind):
    sc.online_setup(lab, kind)
    writer = sc.Writer(lab.mnt, str(tmp_path))
    writer.wait_for(5)
    lab.fiesnap("start", "cp", "--size", "32M")
    sc.churn(lab.mnt)
    writer.wait_for(writer.done() + 10)
    out = json.loads(lab.fiesnap("commit", "cp", "--json").stdout)  # writer still running
    assert out["result"] == "passthrough"
    finished = writer.stop()
    assert sc.writer_files(lab.mnt) == list(range(finished))
    after = tree_digest(lab.mnt)
    st = lab.status("cp")
    assert st["state"] == "passthrough" and st["mounted_on"] == [lab.mnt]
    assert _fiesnap_devices() == ["cp"]
    assert dm_table("cp").split()[2] == "linear"
    assert not os.path.exists(os.path.join(lab.mnt, ".fiesnap")), "store file and folder removed"

    # The next online checkpoint on the same device starts empty (stale-header trap); the
    # thaw's own superblock write may already have been saved.
    # (A free-aware start also saves what the freeze's own sync allocated after its table was
    # prepared: delayed blocks, ext4's 2 MiB group preallocations; and the thaw's journal
    # commit may follow the superblock. Stale exceptions would be thousands of chunks.)
    p = lab.fiesnap("start", "cp", "--size", "32M")
    fresh = sc.load_record(lab.state, "cp").fresh_used_bytes
    assert lab.status("cp")["used_bytes"] <= fresh + (sc.saved_before_freeze(p.stderr) + 4) * 4096
    lab.fiesnap("commit", "cp")
    lab.umount()
    ok, log = fsck_clean("/dev/mapper/cp", kind)
    assert ok, log
    lab.mount("/dev/mapper/cp", ro=True)
    assert tree_digest(lab.mnt) == after
    lab.umount()


@pytest.mark.every_kernel
def test_deactivate_then_activate_keeps_the_checkpoint(lab):
    sc.online_setup(lab, "ext4-4k")
    before = tree_digest(lab.mnt)
    lab.fiesnap("start", "cp", "--size", "48M")
    rec = sc.load_record(lab.state, "cp")
    checkpoint = device_digest("/dev/mapper/cp-snap", rec.outside_checkpoint)
    sc.churn(lab.mnt)
    lab.umount()
    used = lab.status("cp")["used_bytes"]

    out = json.loads(lab.fiesnap("deactivate", "cp", "--json").stdout)
    assert out["removed"] == ["cp", "cp-snap", "cp-cow"]
    assert _fiesnap_devices() == []
    assert lab.status("cp")["state"] == "inactive"

    out = json.loads(lab.fiesnap("activate", "cp", "--json").stdout)
    assert out["activated"] == [{"name": "cp", "result": "activated", "detail": "checkpoint", "bypass": "",
                                 "boot_attempts": None}]
    assert lab.status("cp")["used_bytes"] == used, "activate must load the existing store, never zero it"
    again = json.loads(lab.fiesnap("activate", "--all", "--json").stdout)
    assert again["activated"][0]["result"] == "already active"

    lab.mount("/dev/mapper/cp")
    sc.churn(lab.mnt, seed=5)
    lab.umount()
    lab.fiesnap("merge", "cp", "--keep-store")
    assert differing_mib(device_digest(lab.disk, rec.outside_checkpoint), checkpoint) == []
    lab.mount("/dev/mapper/cp", ro=True)
    assert tree_digest(lab.mnt) == before
    lab.umount()


def test_activate_refuses_a_store_whose_identity_does_not_match(lab):
    sc.online_setup(lab, "ext4-4k")
    lab.fiesnap("start", "cp", "--size", "32M")
    lab.umount()
    lab.fiesnap("deactivate", "cp")
    rec = sc.load_record(lab.state, "cp")
    off = rec.raw["identity_offset"]
    good = read_direct(lab.disk, off, IDENTITY_BYTES)
    ident = decode_identity(good, "test")
    assert ident.checkpoint_id == rec.raw["checkpoint_id"] and ident.fs_uuid == rec.raw["fs_uuid"]

    write_direct(lab.disk, off, bytes(IDENTITY_BYTES))
    refused(lab, ["activate", "cp"], STORE_FORMAT, "no fiesnap store identity")
    foreign = ident.__class__(**{**ident.__dict__, "checkpoint_id": "0" * 32})
    write_direct(lab.disk, off, encode_identity(foreign))
    refused(lab, ["activate", "cp"], REFUSED, "0" * 32)
    other_map = ident.__class__(**{**ident.__dict__, "map_sha256": "f" * 64})
    write_direct(lab.disk, off, encode_identity(other_map))
    refused(lab, ["activate", "cp"], REFUSED, "map")
    assert _fiesnap_devices() == []

    write_direct(lab.disk, off, good)
    lab.fiesnap("activate", "cp")
    assert lab.status("cp")["state"] == "active"
    refused(lab, ["release", "cp"], REFUSED, "commit or merge it first")
    lab.fiesnap("commit", "cp")


def test_activate_refuses_a_device_that_changed_size(lab, dm_prefix):
    wrap = f"{dm_prefix}disk"
    full = dev_sectors(lab.disk)
    dev = dm_create(wrap, f"0 {full - 65536} linear {dev_majmin(lab.disk)} 0")
    make_fs(dev, "ext4-4k")
    lab.fiesnap("setup", dev, "--name", "cp")
    lab.fiesnap("start", "cp", "--size", "16M")  # unmounted: fiesnap mounts it privately
    lab.fiesnap("deactivate", "cp")
    sh("dmsetup", "reload", wrap, "--table", f"0 {full} linear {dev_majmin(lab.disk)} 0")
    sh("dmsetup", "resume", wrap)
    refused(lab, ["activate", "cp"], DEVICE, "not the recorded", with_image=False)
    assert _fiesnap_devices() == []


def test_activate_finds_a_device_whose_name_moved(lab, dm_prefix):
    wrap = f"{dm_prefix}disk"
    dev = dm_create(wrap, f"0 {dev_sectors(lab.disk)} linear {dev_majmin(lab.disk)} 0")
    make_fs(dev, "ext4-4k")
    lab.fiesnap("setup", dev, "--name", "cp")
    lab.fiesnap("start", "cp", "--size", "16M")
    lab.fiesnap("deactivate", "cp")
    dm_remove(wrap)  # the device now shows up under another name: the raw disk
    lab.fiesnap("activate", "cp")
    st = lab.status("cp")
    assert st["state"] == "active" and st["device"] == lab.disk
    lab.fiesnap("commit", "cp")


def test_online_refusals(lab, tmp_path):
    make_fs(lab.disk, "ext4-4k")
    lab.mount(lab.disk)
    refused(lab, ["start", lab.mnt, "--size", "16M"], DEVICE, "not through fiesnap", with_image=False)
    refused(lab, ["setup", lab.disk, "--name", "cp"], DEVICE, "is mounted on", with_image=False)
    lab.umount()
    lab.fiesnap("setup", lab.disk, "--name", "cp")
    refused(lab, ["setup", lab.disk, "--name", "cp"], NAME, "taken")
    refused(lab, ["setup", lab.disk, "--name", "other"], DEVICE, "already under fiesnap as", with_image=False)
    refused(lab, ["start", "nosuch", "--size", "16M"], NAME, "no device under fiesnap")
    refused(lab, ["commit", "cp"], REFUSED, "nothing to commit")

    lab.mount("/dev/mapper/cp")
    # A state folder on the filesystem being checkpointed would be written while it is frozen.
    inside = os.path.join(lab.mnt, "state")
    shutil.copytree(lab.state, inside)
    p = run_fiesnap("start", "cp", "--size", "16M", state_dir=inside)
    assert p.returncode == STATE and "lives on" in p.stderr, p.stderr
    # So would fiesnap's own output.
    p = sh("sh", "-c", f"FIESNAP_STATE_DIR={lab.state} python -m fiesnap start cp --size 16M "
                       f"> {lab.mnt}/out.txt", check=False)
    assert p.returncode == USAGE and "stdout is a file" in p.stderr, p.stderr
    refused(lab, ["deactivate", "cp"], REFUSED, "is mounted on", with_image=False)
    assert _fiesnap_devices() == ["cp"] and not os.path.exists(os.path.join(lab.mnt, ".fiesnap"))
    assert lab.status("cp")["state"] == "passthrough"
    lab.umount()
    lab.fiesnap("deactivate", "cp")
    refused(lab, ["start", "cp", "--size", "16M"], REFUSED, "fiesnap activate cp")
    lab.fiesnap("release", "cp")  # undo setup: no device, no record
    assert _fiesnap_devices() == [] and json.loads(lab.fiesnap("status", "--json").stdout)["checkpoints"] == []


@pytest.mark.udev
def test_checkpoint_view_gets_no_by_uuid_link_under_udev(lab):
    if os.environ.get("FIESNAP_LAB_UDEV") != "1":
        pytest.skip("needs a lab guest with systemd-udevd (python -m tests.lab kernel-tests --udev)")
    sc.online_setup(lab, "ext4-4k")
    uuid = sc.load_record(lab.state, "cp").raw["fs_uuid"]
    lab.fiesnap("start", "cp", "--size", "32M")
    sh("udevadm", "settle", "--timeout=30")

    def kname(dev):
        return os.path.realpath(dev)

    snap, cow, origin = kname("/dev/mapper/cp-snap"), kname("/dev/mapper/cp-cow"), kname("/dev/mapper/cp")
    assert len({snap, cow, origin}) == 3
    for _ in range(2):  # also after a synthetic change event (flags come back from the udev db)
        links = {p: os.path.realpath(p) for p in glob.glob("/dev/disk/by-*/*")}
        assert snap not in links.values() and cow not in links.values(), links
        assert os.path.realpath(f"/dev/disk/by-uuid/{uuid}") in (origin, lab.disk)
        props = sh("udevadm", "info", "--query=property", snap).stdout
        assert "DM_UDEV_DISABLE_DISK_RULES_FLAG=1" in props and "ID_FS_UUID" not in props, props
        sh("udevadm", "trigger", "--action=change", snap, cow)
        sh("udevadm", "settle", "--timeout=30")
    lab.fiesnap("commit", "cp")
    lab.umount()


@pytest.mark.udev
def test_a_slow_udevd_does_not_stretch_the_freeze(lab):
    """udev takes 6 s over NAME's change event (a rule that sleeps before the dm notify rule):
    the online start must not wait for it while the filesystem is frozen."""
    if os.environ.get("FIESNAP_LAB_UDEV") != "1":
        pytest.skip("needs a lab guest with systemd-udevd (python -m tests.lab kernel-tests --udev)")
    rule = "/etc/udev/rules.d/10-fiesnap-lab-slow.rules"
    sc.online_setup(lab, "ext4-4k")
    os.makedirs(os.path.dirname(rule), exist_ok=True)
    with open(rule, "w") as f:
        # runs before 95-dm-notify.rules releases the cookie; DM_NAME is not known yet this early
        f.write('ACTION=="change", SUBSYSTEM=="block", KERNEL=="dm-*", ATTR{dm/name}=="cp", '
                'RUN+="/bin/sleep 6"\n')
    sh("udevadm", "control", "--reload")
    stalls: list[float] = []
    stop = threading.Event()

    def writer() -> None:  # how long does one small synced write wait, at most?
        with open(f"{lab.mnt}/heartbeat", "wb") as f:
            while not stop.is_set():
                t0 = time.monotonic()
                f.write(b"x" * 4096)
                f.flush()
                os.fsync(f.fileno())
                stalls.append(time.monotonic() - t0)
                time.sleep(0.05)

    beat = threading.Thread(target=writer, daemon=True)
    beat.start()
    try:
        lab.fiesnap("start", "cp", "--size", "32M")
    finally:
        stop.set()
        beat.join(30)
        os.unlink(rule)
        sh("udevadm", "control", "--reload")
    assert len(stalls) > 10 and max(stalls) < 3, f"a writer waited {max(stalls):.1f} s while udev was slow"
    frozen = sc.load_record(lab.state, "cp").raw["notes"]["frozen_seconds"]
    assert frozen < 3, f"the filesystem stayed frozen {frozen} s while udev was slow"
    assert lab.status("cp")["state"] == "active"
    sh("udevadm", "settle", "--timeout=30")
    assert os.path.exists("/dev/mapper/cp") and os.path.realpath("/dev/mapper/cp").startswith("/dev/dm-")
    lab.fiesnap("commit", "cp")
    lab.umount()


_THAW_FAILS = """
import sys
from contextlib import contextmanager
import fiesnap.commands.start as start
from fiesnap.errors import FilesystemError
real = start.frozen
@contextmanager
def thaw_fails(mnt):
    with real(mnt):
        yield
    raise FilesystemError("thaw failed: injected after a successful switch")
start.frozen = thaw_fails
from fiesnap.cli import main
sys.argv = ["fiesnap", *sys.argv[1:]]
main()
"""


def test_a_failure_after_the_switch_leaves_a_consistent_passthrough(lab):
    """The switch to snapshot-origin went through, then the thaw failed: fiesnap removes the
    store and keeps the record as a pass-through, so NAME must be a pass-through again too
    (not snapshot-origin with its snapshot gone), and nothing written is lost."""
    sc.online_setup(lab, "ext4-4k")
    before = tree_digest(lab.mnt)
    p = subprocess.run([sys.executable, "-c", _THAW_FAILS, "start", "cp", "--size", "32M"],
                       capture_output=True, text=True, env=dict(os.environ, FIESNAP_STATE_DIR=lab.state))
    assert p.returncode == 5 and "thaw failed: injected" in p.stderr, (p.returncode, p.stderr)
    table = dm_table("cp")
    assert " linear " in f" {table} " and "snapshot" not in table, table
    assert _fiesnap_devices() == ["cp"]
    assert sc.load_record(lab.state, "cp").raw["phase"] == "passthrough"
    assert tree_digest(lab.mnt) == before
    with open(f"{lab.mnt}/after.txt", "w") as f:  # writable: not frozen, not suspended
        f.write("still here")
    os.sync()
    lab.fiesnap("start", "cp", "--size", "32M")  # a later start works
    lab.fiesnap("commit", "cp")
    lab.umount()


_SAVE_AND_SWITCH_BACK_FAIL = """
import sys
import fiesnap.commands.start as start
from fiesnap.errors import DeviceMapperError, StateError
from fiesnap.services.statedir import StateStore
real_save = StateStore.save
def save(self, record):
    if record.phase == "active":
        raise StateError("saving the active record failed: injected")
    return real_save(self, record)
StateStore.save = save
def switch_back(*a, **kw):
    raise DeviceMapperError("device-mapper suspend cp failed: injected")
start.reload_as_passthrough = switch_back
from fiesnap.cli import main
sys.argv = ["fiesnap", *sys.argv[1:]]
main()
"""


@pytest.mark.every_kernel
def test_a_start_that_cannot_switch_back_keeps_the_store_the_origin_writes_to(lab):
    """The switch to snapshot-origin went through, saving the record failed, and so did the
    switch back: NAME still saves overwrites into the store file, so the undo must keep the
    file (deleting it would free blocks the kernel goes on writing) and say how to end it."""
    sc.online_setup(lab, "ext4-4k")
    p = subprocess.run([sys.executable, "-c", _SAVE_AND_SWITCH_BACK_FAIL, "start", "cp", "--size", "32M"],
                       capture_output=True, text=True, env=dict(os.environ, FIESNAP_STATE_DIR=lab.state))
    assert p.returncode != 0 and "saving the active record failed: injected" in p.stderr, p.stderr
    assert "both are kept" in p.stderr and "fiesnap commit cp" in p.stderr, p.stderr
    assert "snapshot-origin" in dm_table("cp")
    record = sc.load_record(lab.state, "cp")
    assert record.raw["phase"] == "starting"
    assert os.path.exists(os.path.join(lab.mnt, record.raw["store_relpath"]))
    sc.churn(lab.mnt)  # overwrites keep going into the kept store
    after = tree_digest(lab.mnt)
    lab.fiesnap("commit", "cp")
    assert " linear " in f" {dm_table('cp')} "
    assert not os.path.exists(os.path.join(lab.mnt, record.raw["store_relpath"]))
    assert tree_digest(lab.mnt) == after
    lab.umount()
