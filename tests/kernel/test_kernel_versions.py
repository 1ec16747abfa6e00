"""What the kernels the lab runs differ in, where fiesnap meets it (docs/design.md, "Kernel versions").

Each test pins one kernel behaviour fiesnap depends on, on whichever kernel the guest booted,
and says which kernels behave which way; fiesnap's code is written so that both ways end
well. The lab runs them on Debian's 6.1 and 6.12 (make test, make test-kernels).
"""

from __future__ import annotations

import os
import platform
import subprocess

import pytest

from fiesnap.kernel import fsmap
from fiesnap.kernel.dm import DeviceMapper

from .helpers import dev_size, kernel_series, make_fs, sh

pytestmark = pytest.mark.every_kernel


def test_the_targets_fiesnap_uses_have_the_versions_it_needs():
    """snapshot >= 1.15 for store type PO (Overflow reported as such); the versions both
    Debian kernels carry: snapshot 1.16.0, snapshot-origin 1.9.0, snapshot-merge 1.5.0,
    linear 1.4.0 (drivers/md/dm-snap.c, dm-linear.c, the same in 6.1 and 6.12)."""
    subprocess.run(["modprobe", "dm-snapshot"], check=False, capture_output=True)
    versions = DeviceMapper().target_versions()
    print(f"kernel {platform.release()}: " + ", ".join(f"{k} {'.'.join(map(str, v))}"
                                                      for k, v in sorted(versions.items())))
    assert versions["snapshot"] >= (1, 15, 0)
    for target in ("snapshot-origin", "snapshot-merge", "linear"):
        assert target in versions


def test_dm_lockfs_on_a_filesystem_another_tool_froze_fails_before_6_8_and_nests_after(lab, dm_prefix):
    """Why commit checks for a foreign freeze (a freeze and thaw of its own) before its lockfs suspend.

    6.1: freeze_bdev -> freeze_super finds the filesystem frozen: EBUSY, the suspend fails.
    6.8+: bdev_freeze -> freeze_super(FREEZE_MAY_NEST): the suspend succeeds inside the
    other tool's freeze, and after the resume the filesystem is still frozen (fs/super.c).
    FIFREEZE itself refuses a frozen filesystem on both (no FREEZE_MAY_NEST for userspace).
    """
    name = f"{dm_prefix}frz"
    sh("mkfs.ext4", "-q", "-F", lab.disk)
    size = dev_size(lab.disk) // 512
    st = os.stat(lab.disk)
    sh("dmsetup", "create", name, "--table", f"0 {size} linear {os.major(st.st_rdev)}:{os.minor(st.st_rdev)} 0")
    sh("dmsetup", "mknodes", name)
    try:
        lab.mount(f"/dev/mapper/{name}")
        sh("fsfreeze", "--freeze", lab.mnt)
        try:
            again = sh("fsfreeze", "--freeze", lab.mnt, check=False)
            assert again.returncode != 0 and "busy" in again.stderr.lower(), again
            p = sh("dmsetup", "suspend", name, check=False, timeout=60)
            if kernel_series() < (6, 8):
                assert p.returncode != 0 and "busy" in p.stderr.lower(), p
            else:
                assert p.returncode == 0, p
                sh("dmsetup", "resume", name)
                # Still frozen by the other tool: a second user freeze is still refused.
                still = sh("fsfreeze", "--freeze", lab.mnt, check=False)
                assert still.returncode != 0 and "busy" in still.stderr.lower(), still
        finally:
            sh("dmsetup", "resume", name, check=False)
            sh("fsfreeze", "--unfreeze", lab.mnt, check=False)
        with open(os.path.join(lab.mnt, "writable"), "w") as f:  # thawed for good
            f.write("yes\n")
        lab.umount()
    finally:
        sh("umount", lab.mnt, check=False)
        sh("dmsetup", "remove", "--retry", name, check=False)


@pytest.mark.parametrize("kind", ["ext4-4k", "xfs"])
def test_getfsmap_free_space_lies_inside_the_device(lab, kind):
    """6.12's XFS GETFSMAP reports the gap after the last record up to the end of the query
    ("xfs: Fix missing interval for missing_owner in xfs fsmap"); a whole-device query must
    still give free ranges inside the data device, the ones the free-aware store seeds."""
    make_fs(lab.disk, kind)
    lab.mount(lab.disk)
    try:
        free = fsmap.free_space(lab.mnt)
        end = dev_size(lab.disk)
        assert free and all(0 <= s and s + n <= end for s, n in free), (free[-3:], end)
        assert sum(n for _, n in free) > end // 2  # a fresh filesystem is mostly free
    finally:
        lab.umount()
