"""The update lifecycle on a real kernel: boot attempts, automatic rollback, commit on a good
boot, the apt hook; five boots of one guest on the same disks, with power cuts between them.

    python -m tests.lab boots tests/kernel/update_boots.py --boots 5 --disks 4   (part of make test)

Disks: 1 = ext4 ("e4", free-aware store), 2 = XFS ("xf", plain store), 3 = ext4 ("ok", taken
by the apt hook), 4 = the state folder's own filesystem, kept between boots. Every boot begins
with `fiesnap activate --all`, exactly what fiesnap-activate.service runs.

boot 1  set up the three; checkpoint e4 and xf online with --boot-attempts 1 (and check that
        --unless-active starts nothing more); the "update" churns both, syncs, writes more
        without syncing; power cut.
boot 2  the attempt: activate counts it (1 of 1) before exposing (killed right after the
        count, before any dm device: the next activate of this boot counts nothing more);
        activate again counts nothing; the update's data is visible; more written. A real `apt-get install` of a
        local package with the shipped apt hook installed starts a checkpoint of ok before
        dpkg runs (the package's postinst then writes onto ok); `apt-get remove` runs the hook
        again and starts nothing. Power cut, nothing committed.
boot 3  activate finds e4's attempts spent and rolls it back by itself; killed after 3 copy
        runs; power cut in the middle of the automatic rollback.
boot 4  activate finishes e4's rollback (killed once the copy is back: the device is checked
        against the checkpoint image byte for byte there), counts ok's attempt, rolls xf back
        (same check); then fsck, files, update gone, for both. boot-complete commits ok only.
        Power cut.
boot 5  activate: ok keeps the update (no rollback, ever), e4 and xf stay rolled back.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
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

KINDS = {"e4": "ext4-4k", "xf": "xfs", "ok": "ext4-4k"}
STORES = {"e4": "--free-aware", "xf": "--plain", "ok": "--free-aware"}
UPDATED = ("update.txt", "data/new0.bin", "after-attempt.bin")
APT_HOOK = os.path.join(REPO, "fiesnap", "hooks", "80fiesnap-checkpoint.apt.conf")
PKG = "fiesnap-lab-update"


def fiesnap_json(*args: str) -> dict:
    return json.loads(fiesnap(*args, "--json").stdout)


def disks() -> dict[str, str]:
    d = lab_disks()
    assert len(d) >= 4, f"need 4 scratch disks, have {d}"
    return {"e4": d[0], "xf": d[1], "ok": d[2], "state": d[3]}


def status() -> dict[str, dict]:
    return {c["name"]: c for c in fiesnap_json("status")["checkpoints"]}


def activated(**kw) -> dict[str, dict]:
    out = json.loads(fiesnap("activate", "--all", "--wait", "10", "--json", **kw).stdout)
    return {r["name"]: r for r in out["activated"]}


def mount(name: str) -> str:
    return mount_at(f"/dev/mapper/{name}", f"/tmp/m-{name}")


def write(path: str, nbytes: int, sync: bool = True) -> None:
    with open(path, "wb") as f:
        f.write(os.urandom(nbytes))
        if sync:
            os.fsync(f.fileno())


# ------------------------------------------------------------------ boot 1: the update begins

def boot1() -> int:
    dev = disks()
    make_fs(dev["state"], "ext4-4k")
    mount_at(dev["state"], STATE_MNT)
    for name, kind in KINDS.items():
        make_fs(dev[name], kind)
        fiesnap("setup", dev[name], "--name", name)
        sc.populate(mount(name))
    for name in ("e4", "xf"):
        mnt = f"/tmp/m-{name}"
        before = jsonable(tree_digest(mnt))
        out = fiesnap_json("start", name, "--size", "48M", STORES[name], "--boot-attempts", "1")
        assert out["started"] and out["boot_attempts"] == {"allowed": 1, "used": 0, "left": 1,
                                                           "on_trial": False}, out
        rec = sc.load_record(STATE, name)
        image = device_digest(f"/dev/mapper/{name}-snap", rec.outside_checkpoint)
        carry(name, {"before": before, "image": image, "outside": rec.outside_checkpoint,
                     "checkpoint_id": rec.raw["checkpoint_id"]})
        again = fiesnap_json("start", name, "--size", "48M", "--boot-attempts", "1", "--unless-active")
        assert not again["started"] and again["checkpoint_id"] == rec.raw["checkpoint_id"], again
        sc.churn(mnt)
        with open(f"{mnt}/update.txt", "w") as f:
            f.write("the update's data\n")
        say(f"{name}: update checkpoint {rec.raw['checkpoint_id'][:8]} (1 boot attempt), churned")
    os.sync()
    for name in ("e4", "xf"):
        write(f"/tmp/m-{name}/unsynced.bin", 3 * MiB, sync=False)
    say("cutting the power before any commit")
    return LAB_POWEROFF


# ------------------------------------------------------------------ boot 2: the attempt

def _install_apt_hook() -> str:
    """The shipped hook, pointed at this checkout's fiesnap and the lab's state folder."""
    wrapper = "/tmp/bin/fiesnap"
    os.makedirs(os.path.dirname(wrapper), exist_ok=True)
    with open(wrapper, "w") as f:
        f.write(f"#!/bin/sh\nexport FIESNAP_STATE_DIR={shlex.quote(STATE)}\n"
                f"cd {shlex.quote(REPO)} && exec {shlex.quote(sys.executable)} -m fiesnap \"$@\"\n")
    os.chmod(wrapper, 0o755)
    with open(APT_HOOK) as f:
        text = f.read()
    shipped = "/usr/local/bin/fiesnap start NAME --size 2G --boot-attempts 3 --unless-active"
    assert shipped in text
    text = text.replace(shipped, f"{wrapper} start ok --size 48M --boot-attempts 1 --unless-active")
    with open("/etc/apt/apt.conf.d/80fiesnap-checkpoint", "w") as f:
        f.write(text)
    return wrapper


def _build_package() -> str:
    """A local package whose installation writes onto ok, as an update writes its data."""
    root = f"/tmp/{PKG}"
    os.makedirs(f"{root}/DEBIAN", exist_ok=True)
    os.makedirs(f"{root}/etc/{PKG}", exist_ok=True)
    with open(f"{root}/etc/{PKG}/version", "w") as f:
        f.write("2\n")
    with open(f"{root}/DEBIAN/control", "w") as f:
        f.write(f"Package: {PKG}\nVersion: 2.0\nArchitecture: all\nMaintainer: lab <lab@localhost>\n"
                "Description: an update that writes onto a checkpointed filesystem\n")
    with open(f"{root}/DEBIAN/postinst", "w") as f:
        f.write('#!/bin/sh\nset -e\n[ "$1" = configure ] && echo "written by the update" '
                '> /tmp/m-ok/from-apt.txt && sync\nexit 0\n')
    os.chmod(f"{root}/DEBIAN/postinst", 0o755)
    deb = f"/tmp/{PKG}_2.0_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", root, deb], check=True,
                   capture_output=True)
    return deb


def apt(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    p = subprocess.run(["apt-get", "-y", "-q", "-o", "Dpkg::Use-Pty=0", *args], capture_output=True,
                       text=True, env=env, timeout=900)
    print(f"$ apt-get {' '.join(args)} -> {p.returncode}\n{p.stdout[-3000:]}{p.stderr[-3000:]}", flush=True)
    assert p.returncode == 0, p.stderr
    return p


SAVE = ("fiesnap.services.statedir", "StateStore", "save")


def boot2() -> int:
    dev = disks()
    mount_at(dev["state"], STATE_MNT)
    # killed right after saving e4's attempt, before its stack: the attempt stays spent, once
    p = fiesnap("activate", "--all", check=False, kill_after=(SAVE, 1))
    assert p.returncode == -9, (p.returncode, p.stderr)
    assert sc.load_record(STATE, "e4").raw["boot_attempts_used"] == 1
    assert not os.path.exists("/dev/mapper/e4"), "exposed after a kill before its stack"
    got = activated()
    for name in ("e4", "xf"):
        r = got[name]
        assert r["result"] == "activated" and r["detail"] == "checkpoint", r
        assert r["boot_attempts"] == {"allowed": 1, "used": 1, "left": 0, "on_trial": True}, r
    assert got["ok"]["result"] == "activated" and got["ok"]["detail"] == "passthrough", got["ok"]
    again = activated()
    assert {n: r["result"] for n, r in again.items()} == {n: "already active" for n in KINDS}, again
    st = status()
    for name in ("e4", "xf"):
        assert st[name]["boot_attempts"]["used"] == 1 and st[name]["state"] == "active", st[name]
        mnt = mount(name)  # journal / log replay go through the origin
        with open(f"{mnt}/update.txt") as f:
            assert f.read() == "the update's data\n", f"{name}: the update is not visible"
        assert os.path.exists(f"{mnt}/data/new0.bin")
        write(f"{mnt}/after-attempt.bin", 2 * MiB)
        say(f"{name}: boot attempt 1 of 1 counted; the update's data is visible")
    # The apt hook: a real dpkg run, the checkpoint taken before it.
    mnt = mount("ok")
    before_ok = tree_digest(mnt)
    _install_apt_hook()
    deb = _build_package()
    p = apt("install", deb)
    rec = sc.load_record(STATE, "ok")
    assert rec.raw["phase"] == "active" and rec.raw["boot_attempts"] == 1, rec.raw
    assert "checkpoint 'ok' active" in p.stdout + p.stderr
    with open(f"{mnt}/from-apt.txt") as f:
        assert f.read() == "written by the update\n"
    # The checkpoint came first: its view (read-only, through debugfs) lacks the package's file.
    view = subprocess.run(["debugfs", "-R", "ls -p /", "/dev/mapper/ok-snap"], capture_output=True,
                          text=True, check=True).stdout
    assert "/data/" in view and "/from-apt.txt/" not in view, view
    p = apt("remove", PKG)
    assert "holds a checkpoint already" in p.stdout + p.stderr, "the hook did not run again"
    rec2 = sc.load_record(STATE, "ok")
    assert rec2.raw["checkpoint_id"] == rec.raw["checkpoint_id"], "a second checkpoint was started"
    carry("ok", {"before": jsonable(before_ok), "checkpoint_id": rec.raw["checkpoint_id"]})
    assert status()["ok"]["boot_attempts"] == {"allowed": 1, "used": 0, "left": 1, "on_trial": False}
    say("ok: apt's hook took one checkpoint before dpkg ran, and none when it ran again")
    os.sync()
    say("cutting the power: nothing committed")
    return LAB_POWEROFF


# ------------------------------------------------------------------ boot 3: rollback cut short

def boot3() -> int:
    dev = disks()
    mount_at(dev["state"], STATE_MNT)
    p = fiesnap("activate", "--all", check=False, kill_after_writes=3)
    assert p.returncode == -9, (p.returncode, p.stderr)
    assert "the update's only boot attempt was used without a commit" in p.stderr, p.stderr
    e4 = sc.load_record(STATE, "e4").raw
    assert e4["phase"] == "merging" and e4["auto_rollback"], e4
    assert not os.path.exists("/dev/mapper/e4")
    xf, ok = sc.load_record(STATE, "xf").raw, sc.load_record(STATE, "ok").raw
    assert (xf["phase"], xf["boot_attempts_used"], xf["auto_rollback"]) == ("active", 1, ""), xf
    assert ok["boot_attempts_used"] == 0, ok  # activate never reached it
    say("e4: automatic rollback killed after 3 copy runs; cutting the power mid-rollback")
    return LAB_POWEROFF


# ------------------------------------------------------------------ boot 4: finish, check, commit

COPY_BACK = ("fiesnap.commands.merge", "", "copy_back")


def exact(name: str, dev: str) -> None:
    """Right after the copy, before the store file is removed: the checkpoint image."""
    c = carry(name)
    diff = differing_mib(device_digest(dev, [tuple(r) for r in c["outside"]]), c["image"])
    assert diff == [], f"{name}: MiB {diff[:10]} differ from the checkpoint image"
    say(f"{name}: device equals the checkpoint image outside the store and seeded chunks")


def rolled_back(name: str) -> None:
    c = carry(name)
    kind = KINDS[name]
    if kind == "xfs":  # the frozen XFS image needs log recovery first (see test_online)
        mount(name)
        umount(f"/tmp/m-{name}")
    ok, log = fsck_clean(f"/dev/mapper/{name}", kind)
    assert ok, f"{name}: fsck: {log}"
    mnt = mount_at(f"/dev/mapper/{name}", f"/tmp/m-{name}", options="ro")
    tree = jsonable(tree_digest(mnt))
    assert tree == c["before"], f"{name}: checkpoint-time files differ"
    for later in UPDATED + ("unsynced.bin",):
        assert not os.path.exists(os.path.join(mnt, later)), f"{name}: {later} survived the rollback"
    umount(mnt)
    assert status()[name]["state"] == "passthrough"
    say(f"{name}: rolled back by activate, fsck clean, every file as at the checkpoint")


def boot4() -> int:
    dev = disks()
    mount_at(dev["state"], STATE_MNT)
    # 1: e4's interrupted rollback finished; killed once its copy is back
    p = fiesnap("activate", "--all", check=False, kill_after=(COPY_BACK, 1))
    assert p.returncode == -9 and "finishing the rollback of" in p.stderr, (p.returncode, p.stderr)
    exact("e4", dev["e4"])
    # 2: e4 ends; ok's attempt is counted; xf's attempts are spent: killed once its copy is back
    p = fiesnap("activate", "--all", check=False, kill_after=(COPY_BACK, 2))
    assert p.returncode == -9 and "boot attempt 1 of 1" in p.stderr, (p.returncode, p.stderr)
    exact("xf", dev["xf"])
    # 3: xf ends
    got = activated()
    assert got["xf"]["result"] == "rolled back", got
    assert got["e4"]["result"] == got["ok"]["result"] == "already active", got
    for name in ("e4", "xf"):
        rolled_back(name)
    st = status()
    assert st["ok"]["boot_attempts"] == {"allowed": 1, "used": 1, "left": 0, "on_trial": True}, st["ok"]
    out = fiesnap_json("commit", "--boot-complete")
    assert [(v["name"], v["result"]) for v in out["boot_complete"]] == [("ok", "committed")], out
    assert status()["ok"]["state"] == "passthrough"
    mnt = mount("ok")
    with open(f"{mnt}/from-apt.txt") as f:
        assert f.read() == "written by the update\n"
    umount(mnt)
    say("ok: boot-complete committed it; the update's data stays")
    return LAB_POWEROFF


# ------------------------------------------------------------------ boot 5: later boots

def boot5() -> int:
    dev = disks()
    mount_at(dev["state"], STATE_MNT)
    got = activated()
    assert {n: (r["result"], r["detail"]) for n, r in got.items()} == {
        n: ("activated", "passthrough") for n in KINDS}, got
    mnt = mount("ok")
    with open(f"{mnt}/from-apt.txt") as f:
        assert f.read() == "written by the update\n"
    tree = tree_digest(mnt)
    assert "from-apt.txt" in tree and set(carry("ok")["before"]) <= set(tree)
    umount(mnt)
    for name in ("e4", "xf"):
        mnt = mount(name)
        assert not os.path.exists(f"{mnt}/update.txt")
        umount(mnt)
    out = fiesnap_json("commit", "--boot-complete")
    assert out["boot_complete"] == [], out
    say("a later boot: nothing rolled back, nothing left to commit")
    return 0


def main() -> int:
    if not CARRY or BOOT not in (1, 2, 3, 4, 5):
        print("run me with: python -m tests.lab boots tests/kernel/update_boots.py --boots 5 --disks 4",
              file=sys.stderr)
        return 2
    return {1: boot1, 2: boot2, 3: boot3, 4: boot4, 5: boot5}[BOOT]()


if __name__ == "__main__":
    sys.exit(main())
