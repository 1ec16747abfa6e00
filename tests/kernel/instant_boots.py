"""Power cuts during an instant rollback, on a real kernel: two boots on the same disks.

    python -m tests.lab boots tests/kernel/instant_boots.py --boots 2 --disks 4   (part of make test)

Disks: 1 = ext4 with a free-aware store ("hv"), 2 = XFS with a plain store ("xf"), 3 = ext4 with
a free-aware store ("fa"), 4 = the state folder's own filesystem.

boot 1  checkpoint each (offline start of the unmounted device), record the image, churn and
        rewrite one chunk in two of a 24 MiB file (thousands of one-chunk merges).
        hv: `merge --instant` killed after its 3rd table write (the free-aware table half
        rewritten for the kernel, phase handover). xf and fa: `merge --instant`, the kernel
        merging in the background. Power cut (sysrq o), the kernel merges still running.
boot 2  `activate --all`: hv's handover is done again from the entries it never overwrote,
        xf's and fa's merges are loaded again and go on. `merge NAME` waits and finishes each;
        every device equals its checkpoint image byte for byte (outside the store file and the
        chunks free at the checkpoint), fsck clean, every file as at the checkpoint.
"""

from __future__ import annotations

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from tests.kernel import scenario as sc  # noqa: E402
from tests.kernel.boot_script import BOOT, CARRY, LAB_POWEROFF, STATE, STATE_MNT, carry, fiesnap, jsonable, say  # noqa: E402
from tests.kernel.helpers import (  # noqa: E402
    device_digest,
    differing_mib,
    fsck_clean,
    lab_disks,
    make_fs,
    mount_at,
    sh,
    tree_digest,
    umount,
)

KINDS = {"hv": "ext4-4k", "xf": "xfs", "fa": "ext4-4k"}
STORES = {"hv": "--free-aware", "xf": "--plain", "fa": "--free-aware"}


def disks() -> dict[str, str]:
    d = lab_disks()
    assert len(d) >= 4, f"need 4 scratch disks, have {d}"
    return {"hv": d[0], "xf": d[1], "fa": d[2], "state": d[3]}


def boot1() -> int:
    dev = disks()
    make_fs(dev["state"], "ext4-4k")
    mount_at(dev["state"], STATE_MNT)
    for name, kind in KINDS.items():
        make_fs(dev[name], kind)
        mnt = mount_at(dev[name], f"/tmp/m-{name}")
        sc.populate(mnt)
        sc.add_scatter_file(mnt)
        before = jsonable(tree_digest(mnt))
        umount(mnt)
        fiesnap("start", dev[name], "--size", "48M", "--name", name, STORES[name])
        rec = sc.load_record(STATE, name)
        carry(name, {"before": before, "image": device_digest(dev[name], rec.outside_checkpoint),
                     "outside": rec.outside_checkpoint})
        mnt = mount_at(f"/dev/mapper/{name}", f"/tmp/m-{name}")
        sc.churn(mnt)
        sc.scatter(mnt)  # thousands of one-chunk merges: the kernel is still at it at the cut
        umount(mnt)
    p = fiesnap("merge", "hv", "--instant", check=False, kill_after_writes=3)
    assert p.returncode == -9, (p.returncode, p.stderr)
    assert sc.load_record(STATE, "hv").raw["phase"] == "handover"
    say("hv: handover killed after 3 table writes")
    left = {}
    for name in ("fa", "xf"):
        fiesnap("merge", name, "--instant")
        left[name] = merge_left(name)
    assert left["xf"] > 0, f"the kernel finished before the power cut: {left}"
    say(f"kernel merges under way, entries left: {left}; cutting the power")
    return LAB_POWEROFF


def merge_left(name: str) -> int:
    """Entries the kernel has still to merge (allocated - metadata, 4 KiB chunks), read at once."""
    _s, _l, target, ratio, meta = sh("dmsetup", "status", name).stdout.split()
    assert target == "snapshot-merge", target
    return (int(ratio.split("/")[0]) - int(meta)) // 8


def boot2() -> int:
    dev = disks()
    mount_at(dev["state"], STATE_MNT)
    out = json.loads(fiesnap("activate", "--all", "--wait", "10", "--json").stdout)
    got = {r["name"]: (r["result"], r["detail"]) for r in out["activated"]}
    assert got == {n: ("activated", "kernel merge") for n in KINDS}, got
    say(f"after activate, entries left: {({n: merge_left(n) for n in KINDS})}")
    for name, kind in KINDS.items():
        c = carry(name)
        done = json.loads(fiesnap("merge", name, "--keep-store", "--json").stdout)
        assert done["result"] == "finished", done
        diff = differing_mib(device_digest(dev[name], [tuple(r) for r in c["outside"]]), c["image"])
        assert diff == [], f"{name}: MiB {diff[:10]} differ from the checkpoint image"
        ok, log = fsck_clean(dev[name], kind)
        assert ok, f"{name}: fsck: {log}"
        mnt = mount_at(dev[name], f"/tmp/m-{name}", options="ro")
        assert jsonable(tree_digest(mnt)) == c["before"], f"{name}: files differ from the checkpoint"
        umount(mnt)
        say(f"{name}: kernel merge resumed after the power cut and finished exact")
    assert json.loads(fiesnap("status", "--json").stdout)["checkpoints"] == []
    return 0


def main() -> int:
    if not CARRY or BOOT not in (1, 2):
        print("run me with: python -m tests.lab boots tests/kernel/instant_boots.py --boots 2 --disks 4",
              file=sys.stderr)
        return 2
    return {1: boot1, 2: boot2}[BOOT]()


if __name__ == "__main__":
    sys.exit(main())
