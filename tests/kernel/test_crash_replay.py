"""Crash consistency, measured like xfstests generic/482: record the raw device with the
kernel's dm-log-writes target while fiesnap runs its whole online sequence, then replay the
log to many flush/FUA/mark points and run, at each one, what an admin runs after a crash.

Recording (one logged device of 192 MiB, beneath everything):

    mkfs + files (the base image, before logging) -> log-writes over the device ->
    fiesnap setup -> mount /dev/mapper/NAME -> a writer creates files -> ONLINE fiesnap start
    --size 40M (the checkpoint view is copied and its tree hashed right after) -> churn ->
    fiesnap extend --by 24M -> more churn and 4 MiB overwrites of a checkpoint-time file until the store reaches into the
    extension -> umount -> fiesnap merge --keep-store

fiesnap runs through a wrapper (crash_replay.SAVE_MARKS) that logs a mark after every record
save, so each replay point knows the state folder as it was at that instant.

At each chosen point the device image (advanced entry by entry) is written onto a work device
and the record is put into a fresh state folder, then: `activate`, then `merge` (or `commit`
when the record says the checkpoint never finished starting, or was committing). The outcome
must be one of

  exact       the device equals the checkpoint image byte for byte outside the store file's
              blocks, fsck is clean and every file equals the checkpoint's tree;
  consistent  (no checkpoint yet, or commit cleaned up) fsck is clean after a mount, no
              -snap/-cow device is left and the record is a pass-through;
  refused     a command refused with a one-line message and changed neither the device nor
              the record.

Anything else fails the test with the point, its phase and what differed. How many points:
``--crash-points N`` (``-p tests.kernel.crash_replay``; 0 = all) or $FIESNAP_CRASH_POINTS;
`make test` replays a small sample, `make crash-replay` a wide one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter

from fiesnap.commands import activate as activate_cmd
from fiesnap.commands import commit as commit_cmd
from fiesnap.commands import merge as merge_cmd
from fiesnap.commands import start as start_cmd
from fiesnap.errors import FiesnapError
from fiesnap.kernel.dm import DeviceMapper
from fiesnap.model.record import CheckpointRecord
from fiesnap.model.snapstatus import parse_snapshot_status
from fiesnap.services.statedir import StateStore

from . import crash_replay as cr
from . import scenario as sc
from .helpers import (
    MiB,
    dev_majmin,
    dm_create,
    dm_names,
    flush_buffers,
    fsck_clean,
    mount_at,
    sh,
    tree_digest,
    umount,
)

NAME = "crx"
DEV_BYTES = 192 * MiB
SECTORS = DEV_BYTES // 512
KIND = "ext4-4k"
IMAGE_AT = 256 * MiB  # where on the work disk the checkpoint image is kept
BALLAST = 48 * MiB  # a checkpoint-time file, overwritten after the extend


def _wrapped(state: str, side: str, logdev: str, *args: str, ok=(0,)) -> subprocess.CompletedProcess:
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", cr.SAVE_MARKS, side, logdev, *args], capture_output=True,
                       text=True, env=dict(os.environ, FIESNAP_STATE_DIR=state), stdin=subprocess.DEVNULL)
    print(f"$ fiesnap {' '.join(args)} -> {p.returncode} ({time.monotonic() - t0:.1f}s)\n{p.stdout}{p.stderr}")
    assert p.returncode in ok, f"fiesnap {' '.join(args)} -> {p.returncode}\n{p.stdout}{p.stderr}"
    return p


def _used(state: str) -> int:
    p = sh(sys.executable, "-m", "fiesnap", "status", NAME, "--json", env=dict(os.environ, FIESNAP_STATE_DIR=state))
    return json.loads(p.stdout)["checkpoints"][0]["used_bytes"] or 0


def _snap_used(state: str) -> int:
    """Bytes used in NAME's store, as `status` counts them (backed bytes: a free-aware store's
    COW address space opens with holes), from the kernel's status without a CLI start."""
    fields = sh("dmsetup", "status", f"{NAME}-snap").stdout.split()
    with open(os.path.join(state, f"{NAME}.json")) as f:
        backed = CheckpointRecord.from_dict(json.load(f)).store_bytes
    return parse_snapshot_status(" ".join(fields[3:])).backed(backed).used_bytes


def _teardown(mnts: list[str]) -> None:
    """Unmount and remove NAME's devices between points (a reboot, as far as dm goes)."""
    for m in mnts:
        subprocess.run(["umount", m], capture_output=True)
    for n in (NAME, f"{NAME}-snap", f"{NAME}-cow"):
        if n in dm_names():
            sh("dmsetup", "remove", "--retry", n)
    sh("dmsetup", "mknodes", check=False)


def _fsck_after_mount(dev: str, mnt: str, seen: list | None = None) -> tuple[bool, str]:
    """What an admin's boot does: mount (journal replay), unmount, then a read-only fsck.
    `seen` gets the names in the filesystem's .fiesnap/ folder (store files) while mounted."""
    mount_at(dev, mnt)
    try:
        if seen is not None and os.path.isdir(os.path.join(mnt, ".fiesnap")):
            seen.extend(sorted(os.listdir(os.path.join(mnt, ".fiesnap"))))
    finally:
        umount(mnt)
    return fsck_clean(dev, KIND)


def _writeback_throttling(dev: str, value: str | None = "0") -> str | None:
    """Set the block layer's writeback throttling latency for dev ("0": off); returns the old
    value (None: no such knob). dm-log-writes writes its log entries as plain background
    writes, which wbt throttles: in one recording out of five its log thread sat in wbt_wait
    and never woke (hung-task reports), and the removal of the target hung behind it."""
    knob = f"/sys/block/{os.path.basename(os.path.realpath(dev))}/queue/wbt_lat_usec"
    if value is None or not os.path.exists(knob):
        return None
    with open(knob) as f:
        old = f.read().strip()
    with open(knob, "w") as f:
        f.write(value)
    return old


def record_run(disk_a, disk_b, disk_d, tmp_path, dm_prefix):
    """Record the sequence; returns (recording, base image, checkpoint image, checkpoint tree,
    extend's exit status)."""
    lwname = f"{dm_prefix}lw"
    state, side = str(tmp_path / "state"), str(tmp_path / "saves")
    os.makedirs(side)
    # The filesystem and its files exist before the log starts: the base image.
    # A 4 MiB journal: mke2fs would give this size 16 MiB, and every journal block written
    # after the checkpoint is saved in the store once (the journal is circular).
    sh("mkfs.ext4", "-F", "-q", "-b", "4096", "-J", "size=4",
       "-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard", disk_a, str(DEV_BYTES // 4096))
    mnt = mount_at(disk_a, tmp_path / "mnt")
    sc.populate(mnt)
    with open(f"{mnt}/ballast.bin", "wb") as f:  # checkpoint data, overwritten after the extend
        for _ in range(BALLAST // MiB):
            f.write(os.urandom(MiB))
    umount(mnt)
    flush_buffers(disk_a)
    base = cr.read_region(disk_a, 0, DEV_BYTES)

    sh("modprobe", "dm-log-writes")
    wbt = {d: _writeback_throttling(d) for d in (disk_a, disk_d)}
    logdev = dm_create(lwname, f"0 {SECTORS} log-writes {dev_majmin(disk_a)} {dev_majmin(disk_d)}")
    fs = lambda *a, ok=(0,): _wrapped(state, side, lwname, *a, ok=ok)  # noqa: E731
    fs("setup", logdev, "--name", NAME)
    mount_at(f"/dev/mapper/{NAME}", mnt)
    writer = sc.Writer(mnt, str(tmp_path))
    writer.wait_for(8)
    fs("start", NAME, "--size", "40M")
    writer.wait_for(writer.done() + 8)
    writer.stop()
    # The checkpoint, taken independently right after start returns: the view's bytes (copied
    # to the second half of the work disk, past the work device) and its tree of files.
    snap = f"/dev/mapper/{NAME}-snap"
    cr.copy_region(snap, disk_b, DEV_BYTES, dst_off=IMAGE_AT)
    image = cr.Region(disk_b, IMAGE_AT, DEV_BYTES)
    view = mount_at(snap, tmp_path / "view", options="ro,noload")
    tree = tree_digest(view)
    umount(view)
    sc.churn(mnt)
    used1 = _used(state)
    print(f"store used after the first churn: {used1} bytes")
    ext = fs("extend", NAME, "--by", "24M", "--json")
    sc.churn(mnt, seed=3)
    # Overwrite checkpoint data 4 MiB at a time: its old contents go to the store (with either
    # store: writes into space free at the checkpoint cost a free-aware store nothing), until
    # it reaches into the chunks extend added (how much the churn and the writer used varies,
    # so write until the store is past 44 MiB).
    for i in range(BALLAST // (4 * MiB)):
        if _snap_used(state) > 44 * MiB:
            break
        with open(f"{mnt}/ballast.bin", "r+b") as f:
            f.seek(i * 4 * MiB)
            f.write(os.urandom(4 * MiB))
            os.fsync(f.fileno())
    os.sync()
    used2 = _used(state)
    assert used2 > 40 * MiB, f"the store used {used2} bytes: the extension was never written"
    umount(mnt)
    fs("merge", NAME, "--keep-store")
    sh("dmsetup", "remove", "--retry", NAME)
    sh("dmsetup", "remove", "--retry", lwname)  # logs the end mark and the final entry count
    sh("dmsetup", "mknodes", check=False)
    for d, old in wbt.items():
        _writeback_throttling(d, old)
    print(f"store used: {used1} bytes after the first churn, {used2} after extend and the second; "
          f"extend exit {ext.returncode}")
    flush_buffers(disk_d)
    rec = cr.load_recording(disk_d, side)
    # The recorded merge itself must be exact (the same check every point gets below).
    stores = _store_ranges(rec)
    diff = cr.masked_diff(cr.Region(disk_a, 0, DEV_BYTES), image, stores)
    assert diff == [], f"the recorded merge did not restore the checkpoint: (MiB offset, byte) {diff[:8]}"
    return rec, base, image, tree, ext.returncode


def _store_ranges(rec: cr.Recording) -> list[tuple[int, int]]:
    """Every byte range any record gave the store file (the extended map included), and the
    chunks a free-aware store seeded (free at the checkpoint: writes there are not copied)."""
    out = set()
    for s in rec.saves:
        if s.record:
            out.update((p, n) for _l, p, n, _f in s.record.get("store_extents") or [])
            if s.record.get("seeded_chunks"):
                out.update(sc.Record(s.record).outside_checkpoint)
    return sorted(out)


class PointFailure(AssertionError):
    pass


def run_point(n, save, img, image, tree, stores, work, tmp_path, merged_k, mid_copy, times):
    """Replay point n; returns (phase, outcome, messages). Raises PointFailure on a bug."""
    where = tmp_path / f"p{n}"
    state = str(where / "state")
    os.makedirs(state, mode=0o700)
    os.makedirs(where / "mnt")
    mnt = str(where / "mnt")
    t0 = time.monotonic()
    cr.write_region(work, 0, img.buf)
    flush_buffers(work)
    times["copy"] = time.monotonic() - t0
    rec = save.record if save else None
    if rec is not None:
        # The work device stands for the recorded one: the same thing as a disk renumbered at
        # reboot. fiesnap finds it by path first (then by filesystem UUID + size); no other
        # visible device has this UUID with this size (the other disks are 512 MiB).
        st = os.stat(work)
        rec = dict(rec, device=os.path.realpath(work), device_major=os.major(st.st_rdev),
                   device_minor=os.minor(st.st_rdev))
        with open(os.path.join(state, f"{NAME}.json"), "w") as f:
            json.dump(rec, f)
        os.chmod(os.path.join(state, f"{NAME}.json"), 0o600)
    phase = "none" if rec is None else rec["phase"]
    if phase == "passthrough":
        phase = "passthrough-after" if save.k >= merged_k else "passthrough-before"
    if mid_copy:
        phase = "merging-mid-copy"
    times["phase"] = phase
    store = StateStore(state)
    logs: list[str] = []
    refusals: list[str] = []

    def fail(what: str) -> PointFailure:
        return PointFailure(f"point {n} (phase {phase}, save {save.k if save else 0}): {what}\n"
                            + "\n".join(logs))

    def record_now() -> dict | None:
        p = os.path.join(state, f"{NAME}.json")
        if not os.path.exists(p):
            return None
        with open(p) as f:
            return json.load(f)

    def call(what, fn, *a, **kw):
        before = record_now()
        t0 = time.monotonic()
        try:
            return fn(NAME, DeviceMapper, store, logs.append, *a, **kw)
        except FiesnapError as e:
            msg = str(e)
            if not cr.one_line(msg):
                raise fail(f"{what} refused without a one-line message: {msg!r}")
            if record_now() != before:
                raise fail(f"{what} refused ({msg}) but changed the record")
            refusals.append(f"{what}: {msg}")
            logs.append(f"{what} refused: {msg}")
            return e
        finally:
            times["fiesnap"] = times.get("fiesnap", 0.0) + time.monotonic() - t0

    def unchanged_device(what: str) -> None:
        diff = cr.masked_diff(cr.Region(work, 0, DEV_BYTES), cr.Region(img.buf))
        if diff:
            raise fail(f"{what} refused but the device changed: (MiB offset, first byte) {diff[:8]}")

    try:
        r = call("activate", activate_cmd.activate)
        if phase == "none":
            if not isinstance(r, FiesnapError):
                raise fail("activate without a record succeeded")
            unchanged_device("activate")
            ok, log = _fsck_after_mount(work, mnt)
            if not ok:
                raise fail(f"no record yet, the filesystem is not consistent: {log}")
            return phase, "refused", refusals
        if isinstance(r, FiesnapError):
            unchanged_device("activate")
        if phase in ("starting", "committing"):
            r = call("commit", commit_cmd.commit)
            if isinstance(r, FiesnapError):
                unchanged_device("commit")
                return phase, "refused", refusals
            return phase, _consistent_after_commit(fail, rec, state, work, mnt, times), refusals
        if phase == "passthrough-before":
            r = call("merge", merge_cmd.merge, keep_store=True)
            if not isinstance(r, FiesnapError):
                raise fail("merge of a pass-through with no checkpoint succeeded")
            unchanged_device("merge")
            return phase, _consistent_after_commit(fail, rec, state, work, mnt, times), refusals
        # active, merging, copied, passthrough-after: the rollback (or its end) must be exact.
        if phase != "passthrough-after":
            r = call("merge", merge_cmd.merge, keep_store=True)
            if isinstance(r, FiesnapError):
                unchanged_device("merge")
                return phase, "refused", refusals
        else:
            r = call("merge", merge_cmd.merge, keep_store=True)
            if not isinstance(r, FiesnapError):
                raise fail("merge after the rollback had finished did something")
        _exact(fail, image, tree, stores, work, state, mnt)
        return phase, "exact", refusals
    finally:
        _teardown([mnt])


def _no_checkpoint_left(fail, state: str, when: str) -> None:
    """The record is a pass-through and no -snap/-cow of NAME is left."""
    with open(os.path.join(state, f"{NAME}.json")) as f:
        phase = json.load(f)["phase"]
    if phase != "passthrough":
        raise fail(f"{when} the record is in phase {phase}")
    leftovers = [n for n in dm_names() if n in (f"{NAME}-snap", f"{NAME}-cow")]
    if leftovers:
        raise fail(f"{when} {leftovers} still exist")


def _exact(fail, image, tree, stores, work, state, mnt) -> None:
    diff = cr.masked_diff(cr.Region(work, 0, DEV_BYTES), image, stores)
    if diff:
        firsts = [f"MiB {m // MiB} (first byte {b})" for m, b in diff[:6]]
        raise fail(f"the device differs from the checkpoint outside the store in {len(diff)} MiB: "
                   + ", ".join(firsts))
    _no_checkpoint_left(fail, state, "after the merge")
    dev = f"/dev/mapper/{NAME}"
    ok, log = fsck_clean(dev, KIND)
    if not ok:
        raise fail(f"fsck after the merge: {log}")
    mount_at(dev, mnt, options="ro,noload")
    try:
        got = tree_digest(mnt)
    finally:
        umount(mnt)
    if got != tree:
        changed = sorted(k for k in set(got) | set(tree) if got.get(k) != tree.get(k))
        raise fail(f"files differ from the checkpoint's tree: {changed[:10]}")


def _consistent_after_commit(fail, rec, state, work, mnt, times) -> str:
    """No checkpoint (any more): a pass-through record, no -snap/-cow, a consistent filesystem,
    and, after a commit, no store file. A pass-through record with a store file on the device
    (a crash after start created the file, before it recorded `starting`) is a leftover: the
    next start of the name must remove it (counted as `orphan_store`, checked by a start and
    a commit that must leave no store file)."""
    _no_checkpoint_left(fail, state, "after commit")
    seen: list[str] = []
    ok, log = _fsck_after_mount(f"/dev/mapper/{NAME}", mnt, seen)
    if not ok:
        raise fail(f"the filesystem is not consistent after commit: {log}")
    if rec["phase"] != "passthrough":
        gone = os.path.basename(rec["store_relpath"])
        if gone in seen:
            raise fail(f"commit left the store file {rec['store_relpath']} behind")
    elif seen:
        times["orphan_store"] = seen
        store, logs = StateStore(state), []
        start_cmd.start(start_cmd.StartRequest(NAME, 8 << 20), DeviceMapper, store, logs.append)
        commit_cmd.commit(NAME, DeviceMapper, store, logs.append)
        after: list[str] = []
        _fsck_after_mount(f"/dev/mapper/{NAME}", mnt, after)
        if after:
            raise fail(f"the next start and commit left store files behind: {after}\n" + "\n".join(logs))
        if not any("left by an interrupted start" in line for line in logs):
            raise fail("the next start did not say it removed the leftover store file\n" + "\n".join(logs))
    return "consistent"


def test_crash_replay_of_an_online_checkpoint(request, scratch_disks, tmp_path, dm_prefix, lab_results):
    t_start = time.monotonic()
    disk_a, disk_b, disk_d = scratch_disks(3)
    rec, base, image, tree, ext_rc = record_run(disk_a, disk_b, disk_d, tmp_path, dm_prefix)
    t_recorded = time.monotonic()
    stores = _store_ranges(rec)
    phases_by_save = [(s.k, s.phase) for s in rec.saves]
    print(f"log: {len(rec.entries)} entries, saves {phases_by_save}")
    assert [p for _k, p in phases_by_save] [:3] == ["passthrough", "starting", "active"], phases_by_save
    merged_k = min(s.k for s in rec.saves if s.phase == "copied")

    # The work device: the first 192 MiB of another disk, the only visible device of that size.
    work = dm_create(f"{dm_prefix}work", f"0 {SECTORS} linear {dev_majmin(disk_b)} 0")
    all_points = cr.crash_points(rec)
    want = cr.wanted_points(request.config)
    points = cr.choose_points(rec, all_points, want)
    img = cr.ReplayImage(base, rec)
    results = []
    failures = []
    for n in points:
        img.advance_to(n)
        save = rec.save_at(n)
        times: dict = {}
        t0 = time.monotonic()
        try:
            phase, outcome, refusals = run_point(n, save, img, image, tree, stores, work, tmp_path,
                                                 merged_k, cr.is_mid_copy(rec, n), times)
        except PointFailure as e:
            phase, outcome, refusals = times.get("phase", "?"), "FAIL", []
            failures.append(str(e))
            print(str(e))
        except Exception as e:  # fiesnap crashed (not a clean refusal): a bug to report
            phase, outcome, refusals = times.get("phase", "?"), "FAIL", []
            failures.append(f"point {n} (phase {phase}): {type(e).__name__}: {e}")
            print(failures[-1])
        took = time.monotonic() - t0
        results.append({"point": n, "save": save.k if save else 0, "phase": phase, "outcome": outcome,
                        "refusals": refusals, "seconds": round(took, 2),
                        "copy_seconds": round(times.get("copy", 0), 2),
                        "fiesnap_seconds": round(times.get("fiesnap", 0), 2),
                        "orphan_store": times.get("orphan_store", [])})
        print(f"point {n}: save {save.k if save else 0} phase {phase}: {outcome} ({took:.1f}s)"
              + (f" {refusals}" if refusals else "")
              + (f" leftover store file {times['orphan_store']}" if times.get("orphan_store") else ""))
        shutil.rmtree(tmp_path / f"p{n}", ignore_errors=True)

    per_phase = Counter(r["phase"] for r in results)
    outcomes = Counter(r["outcome"] for r in results)
    messages = Counter(m.split(": ", 1)[0] + ": " + m.split(": ", 1)[1] for r in results for m in r["refusals"])
    summary = {
        "log_entries": len(rec.entries), "flush_fua_mark_points": len(all_points),
        "replayed": len(results), "per_phase": dict(per_phase), "outcomes": dict(outcomes),
        "refusal_messages": dict(messages), "failures": failures,
        "extend_exit": ext_rc, "record_seconds": round(t_recorded - t_start, 1),
        "replay_seconds": round(time.monotonic() - t_recorded, 1),
        "seconds_per_point": round((time.monotonic() - t_recorded) / max(1, len(results)), 2),
        "copy_seconds_per_point": round(sum(r["copy_seconds"] for r in results) / max(1, len(results)), 2),
        "fiesnap_seconds_per_point": round(sum(r["fiesnap_seconds"] for r in results) / max(1, len(results)), 2),
        "mid_copy_points": sum(1 for p in all_points if cr.is_mid_copy(rec, p)),
        "orphan_store_points": [r["point"] for r in results if r["orphan_store"]],
        "saves": phases_by_save, "points": results,
    }
    with open(lab_results / f"crash-replay-{len(results)}.json", "w") as f:
        json.dump(summary, f, indent=1)
    print("crash replay: " + json.dumps({k: v for k, v in summary.items() if k not in ("points",)}, indent=1))
    assert not failures, f"{len(failures)} of {len(results)} points failed:\n" + "\n\n".join(failures[:5])
    assert outcomes["exact"] > 0, "no point ended in an exact rollback"
