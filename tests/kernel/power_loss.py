"""Power cuts, on a real kernel, across three boots of one guest on the same disks.

    python -m tests.lab boots tests/kernel/power_loss.py --boots 3 --disks 3   (part of make test)

Disks: 1 = ext4 ("e4"), 2 = XFS ("xf"), 3 = the state folder's own filesystem, kept between boots.
e4 gets a free-aware store, xf a plain one (STORES), so both stores go through the power cuts.

boot 1  setup e4 and xf, mount /dev/mapper/NAME, start online while a writer creates files,
        record the checkpoint view's bytes, churn, sync, write more without syncing, and cut
        the power (sysrq o: no unmount, no sync).
boot 2  `fiesnap activate --all` (what fiesnap-activate.service runs), status shows both
        checkpoints, mount (journal/log replay goes through the origin), write, unmount;
        merge e4 and check it; start merging xf and cut the power in the middle of the copy.
boot 3  activate --all refuses xf (its rollback is under way); merge xf finishes it; check it.

Check after each merge: the device equals the checkpoint view byte for byte outside the
store file's blocks, fsck is clean, every checkpoint-time file is identical, the writer's
files are a prefix that ends inside the start command's window, later files are gone.
"""

from __future__ import annotations

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from tests.kernel import scenario as sc  # noqa: E402
from tests.kernel.boot_script import (  # noqa: E402
    BOOT,
    CARRY,
    LAB_POWEROFF,
    STATE,
    STATE_MNT,
    carry,
    fiesnap,
    jsonable,
    say,
)
from tests.kernel.helpers import (  # noqa: E402
    MiB,
    device_digest,
    differing_mib,
    fsck_clean,
    lab_disks,
    make_fs,
    mount_at,
    tree_digest,
    umount,
)

KINDS = {"e4": "ext4-4k", "xf": "xfs"}
STORES = {"e4": "--free-aware", "xf": "--plain"}


def without_writer(tree: dict) -> dict:
    return {k: v for k, v in tree.items() if k != "w" and not k.startswith("w/")}


def disks() -> dict[str, str]:
    d = lab_disks()
    assert len(d) >= 3, f"need 3 scratch disks, have {d}"
    return {"e4": d[0], "xf": d[1], "state": d[2]}


def boot1() -> int:
    dev = disks()
    make_fs(dev["state"], "ext4-4k")
    mount_at(dev["state"], STATE_MNT)
    for name, kind in KINDS.items():
        make_fs(dev[name], kind)
        fiesnap("setup", dev[name], "--name", name)
        mnt = mount_at(f"/dev/mapper/{name}", f"/tmp/m-{name}")
        sc.populate(mnt)
        before = jsonable(tree_digest(mnt))
        os.makedirs(f"/tmp/w-{name}", exist_ok=True)
        writer = sc.Writer(mnt, f"/tmp/w-{name}")
        writer.wait_for(10)
        n0 = writer.done()
        fiesnap("start", name, "--size", "48M", STORES[name])
        n1 = writer.done()
        writer.wait_for(n1 + 10)
        writer.stop()
        rec = sc.load_record(STATE, name)
        image = device_digest(f"/dev/mapper/{name}-snap", rec.outside_checkpoint)
        carry(name, {"before": before, "n0": n0, "n1": n1, "image": image,
                     "store_ranges": rec.outside_checkpoint, "checkpoint_id": rec.raw["checkpoint_id"]})
        sc.churn(mnt)
        say(f"{name}: checkpoint {rec.raw['checkpoint_id'][:8]} taken with writer files {n0}..{n1}, churned")
    os.sync()
    # Changes after the last sync: lost or kept by the power cut, the rollback must not care.
    for name in KINDS:
        with open(f"/tmp/m-{name}/unsynced.bin", "wb") as f:
            f.write(os.urandom(3 * MiB))
        with open(f"/tmp/m-{name}/data/big0.bin", "r+b") as f:
            f.write(os.urandom(MiB))
    say("cutting the power with both filesystems mounted and dirty")
    return LAB_POWEROFF


def verify(name: str, dev: str) -> None:
    c = carry(name)
    fiesnap("merge", name, "--keep-store")
    diff = differing_mib(device_digest(dev, [tuple(r) for r in c["store_ranges"]]), c["image"])
    assert diff == [], f"{name}: MiB {diff[:10]} differ from the checkpoint view"
    kind = KINDS[name]
    if kind == "xfs":  # the frozen XFS image needs log recovery first (see test_online)
        mount_at(f"/dev/mapper/{name}", f"/tmp/m-{name}")
        umount(f"/tmp/m-{name}")
    ok, log = fsck_clean(f"/dev/mapper/{name}", kind)
    assert ok, f"{name}: fsck: {log}"
    mnt = mount_at(f"/dev/mapper/{name}", f"/tmp/m-{name}", options="ro")
    tree = jsonable(tree_digest(mnt))
    assert without_writer(tree) == without_writer(c["before"]), f"{name}: checkpoint-time files differ"
    present = sc.writer_files(mnt)
    assert present == list(range(len(present))), f"{name}: writer files are not a prefix"
    assert c["n0"] <= len(present) <= c["n1"], (name, c["n0"], len(present), c["n1"])
    for later in ("unsynced.bin", "after-reboot.bin", "data/new0.bin"):
        assert not os.path.exists(os.path.join(mnt, later)), f"{name}: {later} survived the rollback"
    umount(mnt)
    st = json.loads(fiesnap("status", name, "--json").stdout)["checkpoints"][0]
    assert st["state"] == "passthrough", st
    say(f"{name}: rollback exact ({len(present)} writer files, fsck clean)")


def boot2() -> int:
    dev = disks()
    mount_at(dev["state"], STATE_MNT)
    out = json.loads(fiesnap("activate", "--all", "--wait", "10", "--json").stdout)
    got = sorted((r["name"], r["result"]) for r in out["activated"])
    assert got == [("e4", "activated"), ("xf", "activated")], got
    status = {c["name"]: c for c in json.loads(fiesnap("status", "--json").stdout)["checkpoints"]}
    for name in KINDS:
        st = status[name]
        assert st["state"] == "active" and st["checkpoint_id"] == carry(name)["checkpoint_id"], st
        assert st["used_bytes"] > MiB, st
        mnt = mount_at(f"/dev/mapper/{name}", f"/tmp/m-{name}")  # replays the journal/log
        with open(f"{mnt}/after-reboot.bin", "wb") as f:
            f.write(os.urandom(2 * MiB))
        umount(mnt)
        say(f"{name}: active after the power cut, {st['used_bytes']} bytes saved; mounted and written")
    verify("e4", dev["e4"])
    p = fiesnap("merge", "xf", check=False, kill_after_writes=3)
    assert p.returncode == -9, (p.returncode, p.stderr)
    assert sc.load_record(STATE, "xf").raw["phase"] == "merging"
    say("xf: merge killed after 3 runs; cutting the power mid-merge")
    return LAB_POWEROFF


def boot3() -> int:
    dev = disks()
    mount_at(dev["state"], STATE_MNT)
    p = fiesnap("activate", "--all", check=False)
    assert p.returncode == 7 and "rollback of 'xf' is under way" in p.stderr, (p.returncode, p.stderr)
    assert os.path.exists("/dev/mapper/e4") and not os.path.exists("/dev/mapper/xf")
    verify("xf", dev["xf"])
    return 0


def main() -> int:
    if not CARRY or BOOT not in (1, 2, 3):
        print("run me with: python -m tests.lab boots tests/kernel/power_loss.py --boots 3 --disks 3",
              file=sys.stderr)
        return 2
    return {1: boot1, 2: boot2, 3: boot3}[BOOT]()


if __name__ == "__main__":
    sys.exit(main())
