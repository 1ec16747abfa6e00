"""Every bad input: a distinct exit code, a one-line message, and nothing changed."""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest

from . import scenario as sc
from .helpers import MiB, device_digest, make_fs, read_direct, sh, write_direct

pytestmark = pytest.mark.every_kernel

USAGE, NOT_ROOT, DEVICE, FILESYSTEM, NAME, REFUSED, STORE_FORMAT = 2, 3, 4, 5, 6, 7, 8


def world(lab, with_image=True):
    """What a failed command must not change: dm devices, state records, the state folder
    itself (no folder or lock file of its own), the device bytes."""
    names = sorted(sh("dmsetup", "ls").stdout.split()[::2])
    state = {}
    listing = sorted(os.listdir(lab.state)) if os.path.isdir(lab.state) else None
    for f in listing or ():
        if f.endswith(".json"):
            with open(os.path.join(lab.state, f)) as fh:
                state[f] = fh.read()
    image = device_digest(lab.disk) if with_image else None
    return names, state, listing, image


def refused(lab, args, code, needle, *, env=None, with_image=True, argv_prefix=()):
    before = world(lab, with_image)
    p = lab.fiesnap(*args, check=False, env=env) if not argv_prefix else sh(
        *argv_prefix, *lab_cmd(lab, args), check=False, env=env)
    lines = [l for l in p.stderr.strip().splitlines() if l.strip()]
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    assert len(lines) == 1, f"expected a one-line error, got: {p.stderr!r}"
    assert lines[0].startswith("fiesnap: error: "), lines[0]
    assert needle in lines[0], lines[0]
    assert "Traceback" not in p.stderr
    assert world(lab, with_image) == before, "a refused command changed something"
    return lines[0]


def lab_cmd(lab, args):
    import sys
    return [sys.executable, "-m", "fiesnap", *args]


def test_not_root(lab):
    make_fs(lab.disk, "ext4-4k")
    env = dict(os.environ, FIESNAP_STATE_DIR=lab.state)
    refused(lab, ["start", lab.disk, "--size", "16M"], NOT_ROOT, "must run as root", env=env,
            argv_prefix=("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"))


def test_missing_and_non_block_device(lab):
    refused(lab, ["start", "/dev/does-not-exist", "--size", "16M"], DEVICE, "does-not-exist")
    refused(lab, ["start", "/etc/hostname", "--size", "16M"], DEVICE, "not a block device")


def test_mounted_device_says_where(lab):
    make_fs(lab.disk, "ext4-4k")
    lab.mount(lab.disk)
    try:
        refused(lab, ["start", lab.disk, "--size", "16M"], DEVICE, lab.mnt, with_image=False)
    finally:
        lab.umount()


def test_no_filesystem_and_unsupported_filesystem(lab):
    write_direct(lab.disk, 0, bytes(MiB))
    refused(lab, ["start", lab.disk, "--size", "16M"], FILESYSTEM, "ext4 or XFS")
    if shutil.which("mkfs.vfat"):
        sh("mkfs.vfat", lab.disk)
        refused(lab, ["start", lab.disk, "--size", "16M"], FILESYSTEM, "ext4 or XFS")


def test_bad_sizes(lab):
    make_fs(lab.disk, "ext4-4k")
    refused(lab, ["start", lab.disk, "--size", "12XB"], USAGE, "--size")
    refused(lab, ["start", lab.disk, "--size", "-5M"], USAGE, "--size")
    refused(lab, ["start", lab.disk, "--size", "16M", "--chunk-size", "3K"], USAGE, "chunk size")
    refused(lab, ["start", lab.disk, "--size", "100G"], USAGE, "smaller --size")
    # Smaller than the device but more than the filesystem has free.
    disk_bytes = int(sh("blockdev", "--getsize64", lab.disk).stdout)
    refused(lab, ["start", lab.disk, "--size", str(disk_bytes - 4 * MiB)], FILESYSTEM, "free space")


def test_bad_and_taken_names(lab):
    make_fs(lab.disk, "ext4-4k")
    refused(lab, ["start", lab.disk, "--size", "16M", "--name", "../x"], USAGE, "invalid name")
    refused(lab, ["start", lab.disk, "--size", "16M", "--name", "a-cow"], USAGE, "invalid name")
    sh("dmsetup", "create", "taken", "--table", "0 8 zero")
    try:
        refused(lab, ["start", lab.disk, "--size", "16M", "--name", "taken"], NAME, "exists")
    finally:
        sh("dmsetup", "remove", "taken")


def test_unknown_name(lab):
    for cmd in (["merge", "nope"], ["commit", "nope"], ["status", "nope"], ["rollback", "nope"]):
        refused(lab, cmd, NAME, "no checkpoint named 'nope'", with_image=False)


def test_merge_while_mounted(lab):
    make_fs(lab.disk, "ext4-4k")
    lab.fiesnap("start", lab.disk, "--size", "16M", "--name", "cp")
    lab.mount("/dev/mapper/cp")
    try:
        refused(lab, ["merge", "cp"], REFUSED, "unmount", with_image=False)
    finally:
        lab.umount()
    lab.fiesnap("commit", "cp")


def test_store_header_not_valid(lab):
    sc.prepare(lab, "ext4-4k", size="16M")
    sc.churn_through(lab)
    # Corrupt the magic through the store device itself.
    head = bytearray(read_direct("/dev/mapper/cp-cow", 0, 4096))
    head[0:4] = struct.pack("<I", 0xDEADBEEF)
    write_direct("/dev/mapper/cp-cow", 0, bytes(head))
    refused(lab, ["merge", "cp"], STORE_FORMAT, "rollback")
    assert lab.status("cp")["phase"] == "active"
    lab.fiesnap("commit", "cp")


@pytest.mark.parametrize("store,size", [("--plain", "256K"), ("--free-aware", "2560K")])
def test_overflowed_checkpoint_refuses_merge_but_commits(lab, store, size):
    """(A free-aware store's first ~1.9 MiB here hold its seeded areas.)"""
    sc.prepare(lab, "ext4-4k", size=size, store=store)
    lab.mount("/dev/mapper/cp")
    # Synchronous 4 KiB writes: each exception commits before the next write, so the store
    # fills gradually and its on-disk frontier shows the overflow (see docs/design.md).
    sh("dd", "if=/dev/urandom", f"of={lab.mnt}/data/big0.bin", "bs=4K", "count=200", "conv=notrunc",
          "oflag=direct", check=False)
    lab.umount()
    assert lab.status("cp")["state"] == "overflowed"
    refused(lab, ["merge", "cp"], REFUSED, "commit", with_image=False)
    lab.fiesnap("commit", "cp")
    assert not os.path.exists("/dev/mapper/cp")


def test_merge_refuses_a_different_device(lab, scratch_disks):
    """Device names move between boots: a record pointing at another disk must not be merged."""
    (scratch_disk_2,) = scratch_disks(1)
    make_fs(lab.disk, "ext4-4k")
    make_fs(scratch_disk_2, "ext4-4k")
    lab.fiesnap("start", lab.disk, "--size", "16M", "--name", "cp")
    path = os.path.join(lab.state, "cp.json")
    with open(path) as f:
        good = f.read()
    rec = json.loads(good)
    rec["device"] = scratch_disk_2
    with open(path, "w") as f:
        json.dump(rec, f)
    other_before = device_digest(scratch_disk_2)
    try:
        refused(lab, ["merge", "cp"], DEVICE, "refusing to touch it")
        assert device_digest(scratch_disk_2) == other_before
    finally:
        with open(path, "w") as f:
            f.write(good)
    lab.fiesnap("commit", "cp")


def test_a_refusal_on_a_fresh_machine_leaves_no_state_folder(lab):
    """The first command ever run, refused after taking the state folder's lock, leaves no
    folder or lock file behind (nor does one refused before it)."""
    make_fs(lab.disk, "ext4-4k")
    assert not os.path.exists(lab.state)
    refused(lab, ["merge", "nope"], NAME, "no checkpoint named 'nope'", with_image=False)
    refused(lab, ["extend", "nope", "--by", "16M"], NAME, "no checkpoint named 'nope'", with_image=False)
    refused(lab, ["monitor", "nope", "--once"], NAME, "no checkpoint named 'nope'", with_image=False)
    disk_bytes = int(sh("blockdev", "--getsize64", lab.disk).stdout)
    refused(lab, ["start", lab.disk, "--size", str(disk_bytes - 4 * MiB)], FILESYSTEM, "free space")
    assert not os.path.exists(lab.state)
