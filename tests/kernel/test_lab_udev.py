"""The lab's udev guests: systemd-udevd runs and device-mapper devices get their udev links.

Runs only in a guest started with --udev (FIESNAP_LAB_UDEV=1), skipped elsewhere:

    python -m tests.lab kernel-tests --udev -- -m udev        (part of `make test`)

dmsetup is fine here (a test of the lab); the product never shells out to it.
"""

from __future__ import annotations

import os
import re

import pytest

from . import helpers as h

pytestmark = [
    pytest.mark.udev,
    pytest.mark.skipif(os.environ.get("FIESNAP_LAB_UDEV") != "1",
                       reason="needs systemd-udevd in the lab guest: "
                              "`python -m tests.lab kernel-tests --udev -- -m udev`"),
]


def _settle() -> None:
    h.sh("udevadm", "settle", "--timeout=60")


def test_udevd_runs_and_scratch_disks_have_links(scratch_disk):
    h.sh("udevadm", "control", "--ping")
    serial = open(f"/sys/block/{os.path.basename(scratch_disk)}/serial").read().strip()
    link = f"/dev/disk/by-id/virtio-{serial}"
    assert os.path.realpath(link) == os.path.realpath(scratch_disk), link


def test_plain_dm_linear_gets_by_uuid_link(scratch_disk, dm_prefix):
    """`dmsetup create` over an ext4 filesystem: udev (dmsetup's 55-dm.rules and
    60-persistent-storage-dm.rules from the host) makes /dev/mapper/<name> and
    /dev/disk/by-uuid/<uuid>, and drops them again on remove."""
    name = f"{dm_prefix}udev"
    # Map the disk from 1 MiB on: the filesystem is then visible on the dm device only, so
    # the by-uuid link cannot belong to the scratch disk itself.
    table = f"0 {h.dev_sectors(scratch_disk) - 2048} linear {h.dev_majmin(scratch_disk)} 2048"
    node = f"/dev/mapper/{name}"

    h.sh("dmsetup", "create", name, "--table", table, timeout=120)  # waits for udev (cookie)
    _settle()
    # libdevmapper would make a block node itself; udev's rule makes a symlink to dm-N.
    assert os.path.islink(node), f"{node} was not made by udev"
    dm = os.path.realpath(node)
    assert re.fullmatch(r"/dev/dm-\d+", dm), dm
    h.make_fs(node, "ext4-4k")
    _settle()
    uuid = h.sh("blkid", "-p", "-o", "value", "-s", "UUID", node).stdout.strip()
    assert uuid
    h.sh("dmsetup", "remove", "--retry", name, timeout=120)
    _settle()
    assert not os.path.lexists(node)
    assert not os.path.lexists(f"/dev/disk/by-uuid/{uuid}")

    # Activated with the filesystem already there: the links come with the device.
    h.sh("dmsetup", "create", name, "--table", table, timeout=120)
    _settle()
    link = f"/dev/disk/by-uuid/{uuid}"
    assert os.path.islink(link), f"no {link}: {sorted(os.listdir('/dev/disk/by-uuid')) if os.path.isdir('/dev/disk/by-uuid') else 'no by-uuid folder'}"
    assert os.path.realpath(link) == os.path.realpath(node)
    assert os.path.realpath(f"/dev/disk/by-id/dm-name-{name}") == os.path.realpath(node)
    h.sh("dmsetup", "remove", "--retry", name, timeout=120)
    _settle()
    assert not os.path.lexists(link)
    assert not os.path.lexists(node)
