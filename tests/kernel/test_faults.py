"""Faults beneath the stack and commands racing on one name, on a real kernel.

- I/O errors beneath the store (the COW write fails) or beneath the origin (the copy of the
  old data fails to read): dm-snapshot invalidates the snapshot; fiesnap reports it invalid,
  merge refuses and changes nothing, commit works and the current data is intact. The errors
  come from a dm `error` segment loaded, for a moment, into a linear device the filesystem
  lives on (a transient fault: the segment is removed again before the checks).
- Two commands on one name at once: one runs, the other is refused by the state folder's lock
  and changes nothing; the record stays readable and agrees with the kernel.
- A monitor killed (SIGKILL) at random moments while it grows the store, and restarted: the
  record stays valid, the store identity matches it (activate accepts it after a
  deactivate), and the rollback is exact.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from fiesnap.kernel.fiemap import file_extents

from . import helpers as h
from . import scenario as sc
from .helpers import (
    MiB,
    dev_sectors,
    device_digest,
    differing_mib,
    dm_create,
    dm_names,
    dm_remove,
    dm_status,
    make_fs,
    sh,
    tree_digest,
)
from .test_bad_input import REFUSED, refused
from .test_extend import _store_blocks

STATE = 10
BASE = "fault-base"


def _table(disk: str, sectors: int, bad: list[tuple[int, int]]) -> str:
    """A linear map of `disk` with `error` over the byte ranges in `bad`."""
    lines, pos = [], 0
    for start, length in sorted((s // 512, -(-(s + n) // 512) - s // 512) for s, n in bad):
        if start > pos:
            lines.append(f"{pos} {start - pos} linear {disk} {pos}")
        if start + length > pos:
            lines.append(f"{max(pos, start)} {start + length - max(pos, start)} error")
            pos = start + length
    if pos < sectors:
        lines.append(f"{pos} {sectors - pos} linear {disk} {pos}")
    return "\n".join(lines)


def _swap_table(name: str, table: str) -> None:
    sh("dmsetup", "load", name, "--table", table)
    sh("dmsetup", "suspend", name)
    sh("dmsetup", "resume", name)


def _overwrite_direct(path: str, data: bytes) -> OSError | None:
    """Overwrite a file's first bytes in place with O_DIRECT + fsync; the error, if any."""
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        import mmap
        buf = mmap.mmap(-1, len(data))
        buf.write(data)
        os.pwrite(fd, buf, 0)
        os.fsync(fd)
        return None
    except OSError as e:
        return e
    finally:
        os.close(fd)


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("where", ["store", "origin"])
def test_io_errors_beneath_the_store_or_the_origin_invalidate_the_checkpoint(lab, where):
    make_fs(lab.disk, "ext4-4k")
    sectors = dev_sectors(lab.disk)
    base = dm_create(BASE, _table(lab.disk, sectors, []))
    try:
        lab.mount(base)
        sc.populate(lab.mnt)
        victim = os.path.join(lab.mnt, "victim.bin")
        with open(victim, "wb") as f:
            f.write(os.urandom(MiB))
        os.sync()
        with open(victim, "rb") as f:
            victim_extents = [(e.physical, e.length) for e in file_extents(f.fileno())]
        lab.umount()
        lab.fiesnap("start", base, "--size", "48M", "--name", "cp")
        rec = sc.load_record(lab.state, "cp")
        lab.mount("/dev/mapper/cp")
        with open(os.path.join(lab.mnt, "after-start"), "wb") as f:
            f.write(b"kept" * 1024)
        os.sync()
        assert lab.status("cp")["state"] == "active"
        others = {k: v for k, v in tree_digest(lab.mnt).items() if k != "victim.bin"}

        bad = rec.store_ranges if where == "store" else victim_extents
        _swap_table(BASE, _table(lab.disk, sectors, bad))
        new = os.urandom(MiB)
        err = _overwrite_direct(victim, new)
        _swap_table(BASE, _table(lab.disk, sectors, []))  # the fault was transient
        if where == "store":
            assert err is None, err  # the origin write itself lands; only its saved copy failed
        else:
            assert err is not None, "a write over unreadable, unwritable blocks succeeded"

        st = lab.status("cp")
        assert st["state"] == "invalid", st
        lab.umount()
        line = refused(lab, ["merge", "cp"], REFUSED, "is invalid")
        assert "'fiesnap commit cp' keeps the current data" in line
        lab.fiesnap("commit", "cp")
        assert dm_names() == [BASE]
        sc.assert_fsck_clean(lab, base, "ext4-4k")
        lab.mount(base, ro=True)
        try:
            assert {k: v for k, v in tree_digest(lab.mnt).items() if k != "victim.bin"} == others
            if where == "store":
                assert _read_file(os.path.join(lab.mnt, "victim.bin")) == new
        finally:
            lab.umount()
    finally:
        if BASE in dm_names():
            dm_remove(BASE)


def _keep_checkpoint(copy_to: str) -> str:
    """A copy of the checkpoint view, taken now: the later comparison needs the final store's
    blocks excluded, and those are known only at the end."""
    sh("dd", "if=/dev/mapper/cp-snap", f"of={copy_to}", "bs=4M", "iflag=direct", "oflag=direct",
       "status=none")
    return copy_to


def _assert_rollback_exact(lab, first, last, checkpoint_copy: str, before: dict) -> None:
    """The device equals the checkpoint copy outside the store's blocks (as it was at the
    checkpoint, plus every chunk the grown store maps), and every file is as it was."""
    skip = _store_blocks(first, last)
    assert differing_mib(device_digest(lab.disk, skip), device_digest(checkpoint_copy, skip)) == []
    sc.assert_fsck_clean(lab, "/dev/mapper/cp", "ext4-4k")
    lab.mount("/dev/mapper/cp", ro=True)
    assert tree_digest(lab.mnt) == before
    lab.umount()


def _racing(lab, *commands: list[str]) -> list[subprocess.CompletedProcess]:
    """Run fiesnap commands at the same moment; their completed processes."""
    env = dict(os.environ, FIESNAP_STATE_DIR=lab.state)
    procs = [subprocess.Popen([sys.executable, "-m", "fiesnap", *c], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for c in commands]
    out = []
    for c, p in zip(commands, procs):
        stdout, stderr = p.communicate(timeout=600)
        print(f"$ fiesnap {' '.join(c)} -> {p.returncode}\n{stdout}{stderr}")
        out.append(subprocess.CompletedProcess(c, p.returncode, stdout, stderr))
    return out


def _lock_refusal(p: subprocess.CompletedProcess) -> bool:
    lines = p.stderr.strip().splitlines()
    return (p.returncode == STATE and len(lines) == 1
            and "another fiesnap command holds" in lines[0] and "wait for it to finish" in lines[0])


def test_two_commands_on_one_name_at_once(lab, scratch_disks):
    sc.online_setup(lab, "ext4-4k")
    before = tree_digest(lab.mnt)
    lab.fiesnap("start", "cp", "--size", "32M")
    rec = sc.load_record(lab.state, "cp")
    checkpoint = _keep_checkpoint(scratch_disks(1)[0])
    sc.churn(lab.mnt)
    os.sync()
    ran = refused_by_lock = 0
    for _ in range(3):
        for p in _racing(lab, ["extend", "cp", "--by", "8M"], ["extend", "cp", "--by", "8M"]):
            assert p.returncode == 0 or _lock_refusal(p), (p.returncode, p.stderr)
            ran += p.returncode == 0
            refused_by_lock += p.returncode != 0
    print(f"racing extends: {ran} ran, {refused_by_lock} refused by the lock")
    grown = sc.load_record(lab.state, "cp")
    assert grown.raw["store_file_bytes"] == rec.raw["store_file_bytes"] + ran * 8 * MiB
    assert ran >= 3 and lab.status("cp")["state"] == "active"

    lab.umount()
    last = sc.load_record(lab.state, "cp")
    merge, commit = _racing(lab, ["merge", "cp", "--keep-store"], ["commit", "cp"])
    # Exactly one ends the checkpoint; the other was refused by the lock, or found it ended.
    assert (merge.returncode == 0) != (commit.returncode == 0), (merge.stderr, commit.stderr)
    loser = commit if merge.returncode == 0 else merge
    assert _lock_refusal(loser) or loser.returncode == REFUSED, loser.stderr
    st = lab.status("cp")
    assert st["state"] == "passthrough" and dm_names() == ["cp"]
    if merge.returncode == 0:
        _assert_rollback_exact(lab, rec, last, checkpoint, before)
    else:
        sc.assert_fsck_clean(lab, "/dev/mapper/cp", "ext4-4k")


def _wait_for_first_poll(mon: subprocess.Popen, log_path) -> None:
    deadline = time.monotonic() + 120
    while "debug" not in open(log_path).read():
        assert mon.poll() is None and time.monotonic() < deadline, open(log_path).read()
        time.sleep(0.2)


def test_a_monitor_killed_and_restarted_never_corrupts_the_record(lab, tmp_path, scratch_disks):
    sc.online_setup(lab, "ext4-4k")
    before = tree_digest(lab.mnt)
    lab.fiesnap("start", "cp", "--size", "16M")
    rec = sc.load_record(lab.state, "cp")
    checkpoint = _keep_checkpoint(scratch_disks(1)[0])
    rng = random.Random(7)
    env = dict(os.environ, FIESNAP_STATE_DIR=lab.state)
    kills = left_suspended = 0
    for round_ in range(3):
        log_path = tmp_path / f"monitor-{round_}.log"
        with open(log_path, "w") as log:
            mon = subprocess.Popen(
                [sys.executable, "-m", "fiesnap", "monitor", "cp", "--interval", "0.5", "--threshold", "30",
                 "--step", "8M", "--verbose"], stdout=log, stderr=subprocess.STDOUT, env=env)
            _wait_for_first_poll(mon, log_path)  # it also resumed what the last kill left suspended
            for j in range(3):  # the store fills; the monitor grows it
                with open(os.path.join(lab.mnt, f"new-{round_}-{j}.bin"), "wb") as f:
                    f.write(os.urandom(MiB))
                    os.fsync(f.fileno())
                time.sleep(0.5)
            time.sleep(rng.uniform(0.0, 2.0))
            if mon.poll() is None:
                mon.send_signal(signal.SIGKILL)
                kills += 1
            mon.wait(timeout=60)
        print(open(log_path).read())
        # The record reads, and agrees with the kernel, after every kill.
        st = lab.status("cp")
        assert st["state"] == "active", st
        left_suspended += bool(st["suspended"])
    after = sc.load_record(lab.state, "cp")
    print(f"{kills} kills ({left_suspended} left a device suspended); store file "
          f"{rec.raw['store_file_bytes'] // MiB} -> {after.raw['store_file_bytes'] // MiB} MiB, "
          f"generation {after.raw['generation']}")
    assert kills == 3
    lab.umount()
    # The store's identity block agrees with the record: activate maps it again.
    lab.fiesnap("deactivate", "cp")
    lab.fiesnap("activate", "cp")
    last = sc.load_record(lab.state, "cp")
    out = json.loads(lab.fiesnap("merge", "cp", "--keep-store", "--json").stdout)
    assert out["chunks"] > 0
    _assert_rollback_exact(lab, rec, last, checkpoint, before)


def _recorded_store_bytes(rec) -> int:
    return sum(seg["count"] for seg in rec.raw["cow_table"]["segments"]
               if seg.get("kind", "linear") == "linear") * rec.raw["chunk_bytes"]


def _recorded_cow_bytes(rec) -> int:
    """The COW device's address space (a free-aware store's has unbacked stretches)."""
    return sum(seg["count"] for seg in rec.raw["cow_table"]["segments"]) * rec.raw["chunk_bytes"]


def _kernel_store_bytes() -> int:
    """The COW device's size as dm-snapshot sees it (status: used/total sectors)."""
    fields = dm_status("cp-snap").split()
    return int(fields[3].split("/")[1]) * 512


def test_a_command_killed_between_suspend_and_resume_does_not_hold_writes_forever(lab, scratch_disks):
    """extend killed right after it suspended -cow: every write that needs a new exception
    waits. The next fiesnap command on the name (here one round of the monitor) resumes it,
    with the longer map the dead extend had recorded."""
    sc.online_setup(lab, "ext4-4k")
    before = tree_digest(lab.mnt)
    lab.fiesnap("start", "cp", "--size", "16M")
    rec = sc.load_record(lab.state, "cp")
    checkpoint = _keep_checkpoint(scratch_disks(1)[0])
    p = lab.fiesnap("extend", "cp", "--by", "8M", check=False, kill_after=(h.AFTER_SUSPENDS, 1))
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr)
    st = lab.status("cp")
    assert st["suspended"] == ["cp-cow"] and "holding every write" in lab.fiesnap("status").stdout
    writer = subprocess.Popen([sys.executable, "-c", (
        "import os, sys\n"
        "with open(sys.argv[1], 'r+b') as f:\n"  # checkpoint-time data: its old content is saved
        "    f.write(os.urandom(1 << 20)); os.fsync(f.fileno())\n"), os.path.join(lab.mnt, "data/big0.bin")])
    time.sleep(5)
    assert writer.poll() is None, "a write needing a new exception went through a suspended store"
    mon = lab.fiesnap("monitor", "cp", "--once", check=False)
    assert "resumed /dev/mapper/cp-cow" in mon.stdout + mon.stderr
    assert writer.wait(timeout=120) == 0
    st = lab.status("cp")
    assert st["suspended"] == [] and st["state"] == "active"
    # The kernel's store is the map the dead extend had recorded, longer than the first.
    last = sc.load_record(lab.state, "cp")
    assert _kernel_store_bytes() == _recorded_cow_bytes(last)
    assert st["store_bytes"] == _recorded_store_bytes(last) > _recorded_store_bytes(rec) > 16 * MiB * 0.8
    lab.umount()
    lab.fiesnap("merge", "cp", "--keep-store")
    _assert_rollback_exact(lab, rec, last, checkpoint, before)


def test_a_start_killed_before_its_record_leaves_no_store_file_behind(lab):
    """Killed right after creating its store file, before recording it: the file (immutable,
    named by no record) is removed by the next start of the name. Found by the crash replay."""
    sc.online_setup(lab, "ext4-4k")
    p = lab.fiesnap("start", "cp", "--size", "32M", check=False,
                    kill_after=(("fiesnap.services.storefile", "", "create_store_file"), 1))
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr)
    assert sc.load_record(lab.state, "cp").raw["phase"] == "passthrough"
    (left,) = os.listdir(os.path.join(lab.mnt, ".fiesnap"))
    p = lab.fiesnap("start", "cp", "--size", "32M")
    assert f"removed /.fiesnap/{left}, a store file left by an interrupted start" in p.stderr
    rec = sc.load_record(lab.state, "cp")
    assert os.listdir(os.path.join(lab.mnt, ".fiesnap")) == [os.path.basename(rec.raw["store_relpath"])]
    lab.fiesnap("commit", "cp")
    assert not os.path.exists(os.path.join(lab.mnt, ".fiesnap"))
    lab.umount()
