"""`fiesnap merge` (alias `rollback`): copy the saved chunks back, offline.

Phases make it resumable: `active` -> `merging` (recorded once the devices
are down, the store's identity checked, its exception table read again and
the plan proven, just before the first write) -> `copied` (recorded after the
device is fsynced) -> the record ends or becomes a pass-through. The copy
only reads the store and the plan proves no destination lies inside it, so a
merge killed at any point and run again ends exact. The exception table is
read and fully validated twice: once before anything changes, and again after
the origin is gone. A refusal before `merging` is recorded wrote nothing, and
leaves a checkpoint that `activate` or `commit` can still take.
"""

from __future__ import annotations

from fiesnap.commands import instant as instant_cmd
from fiesnap.commands.guards import Log, require_root, verify_device
from fiesnap.commands.instant import InstantResult
from fiesnap.errors import DeviceError, FiesnapError, RefusedError
from fiesnap.kernel import blockdev
from fiesnap.kernel.directio import probe_exclusive
from fiesnap.model.record import CheckpointRecord
from fiesnap.services import storefile
from fiesnap.services.deviceseal import find_bypass
from fiesnap.model.exstore import ExceptionTable
from fiesnap.services.cowio import MergeResult, copy_back, make_plan, read_table
from fiesnap.services.stack import (
    StackNames,
    create_passthrough,
    ensure_cow,
    mount_source,
    remove_if_present,
    resume_leftovers,
    snapshot_usage,
)
from fiesnap.services.statedir import StateStore


def merge(name: str, dm_factory, state: StateStore, log: Log, *, keep_store: bool = False,
          progress_factory=None, instant: bool = False) -> MergeResult | InstantResult | None:
    """Roll back to the checkpoint. Safe to re-run after an interruption.

    `instant`: hand the store to the kernel's snapshot-merge (commands/instant.py) and return
    at once. Without it, a rollback the kernel is doing is waited for and finished."""
    require_root()
    with state.locked():
        dm, record = dm_factory(), state.load(name)
        if instant:
            return _merge_instant(dm, record, state, log)
        if record.phase in ("handover", "kernel-merging"):
            resume_leftovers(dm, record, log)
            if record.phase == "handover":
                record = instant_cmd.hand_over(dm, record, state, log)
            return instant_cmd.wait_and_finish(dm, record, state, log, progress_factory,
                                               keep_store=keep_store)
        return merge_locked(dm, record, state, log, keep_store=keep_store,
                            progress_factory=progress_factory)


def _merge_instant(dm, record: CheckpointRecord, state: StateStore, log: Log) -> InstantResult:
    name = record.name
    names = StackNames.for_name(name)
    resume_leftovers(dm, record, log)
    _refuse_ended(record)
    if record.phase in ("merging", "copied"):
        raise RefusedError(f"an offline rollback of {name!r} is under way: 'fiesnap merge {name}' finishes it")
    if record.phase == "active":
        verify_device(record)
        instant_cmd.refuse_unsafe(record)
        _refuse_mounted(dm, record, names)
        record = _refuse_bypassed(dm, record, names, state)
        instant_cmd.refuse_unsafe(record, real=len(_precheck(dm, record, names).entries))
        _refuse_open(dm, names)
    return instant_cmd.merge_instant(dm, record, state, log)


def _refuse_ended(record: CheckpointRecord) -> None:
    name = record.name
    if record.phase == "starting":
        raise RefusedError(
            f"checkpoint {name!r} never finished starting: nothing to roll back; "
            f"run 'fiesnap commit {name}' to clean up"
        )
    if record.phase in ("committing", "passthrough"):
        raise RefusedError(
            f"checkpoint {name!r} was committed: there is nothing to roll back"
        )


def _refuse_mounted(dm, record: CheckpointRecord, names: StackNames) -> None:
    where = blockdev.mounts_anywhere(record.device_major, record.device_minor)
    for n in names.all():
        info = dm.info(n)
        if info is not None:
            where += blockdev.mounts_anywhere(info.major, info.minor)
    if where:
        raise RefusedError(
            f"the filesystem is mounted on {', '.join(where)}: unmount it, then run merge again"
        )


def _refuse_open(dm, names: StackNames) -> None:
    for n in (names.origin, names.snap):
        info = dm.info(n)
        if info is not None and info.open_count:
            raise DeviceError(
                f"/dev/mapper/{n} is open by another program: close it and run merge again"
            )


def merge_locked(dm, record: CheckpointRecord, state: StateStore, log: Log, *, keep_store: bool = False,
                 progress_factory=None) -> MergeResult | None:
    """The merge, with the state folder locked by the caller (merge, or activate rolling back)."""
    name = record.name
    names = StackNames.for_name(name)
    resume_leftovers(dm, record, log)
    _refuse_ended(record)
    if record.phase in ("handover", "kernel-merging"):
        raise RefusedError(f"the kernel is rolling {name!r} back: 'fiesnap merge {name}' waits for it")
    verify_device(record)
    _refuse_mounted(dm, record, names)
    result = None
    if record.phase == "active":
        record = _refuse_bypassed(dm, record, names, state)
        _precheck(dm, record, names)
        _refuse_open(dm, names)
    if record.phase in ("active", "merging"):
        # Origin first: once it is gone nothing can write to the device, and
        # removing the snapshot afterwards cannot let an unsaved write through.
        remove_if_present(dm, names.origin)
        remove_if_present(dm, names.snap)
        try:
            cow_node, table, plan = _prove(dm, record, names)
        except FiesnapError as e:
            if record.phase == "active":  # one line, with what to do next
                remove_if_present(dm, names.cow)  # as activate and commit expect to find it
                if not record.auto_rollback:  # activate's rollback says what to do itself
                    e.args = (f"{e}; nothing was written to {record.device}: 'fiesnap activate {name}' "
                              f"brings the checkpoint back, 'fiesnap commit {name}' keeps the current data",)
            raise
        if record.phase == "active":
            # Only now, with the table read again and the plan proven: a refusal
            # above leaves a checkpoint that activate or commit can still take.
            record = record.with_phase("merging")
            state.save(record)
        log(f"merging {len(table.entries)} chunks in {len(plan.runs)} runs "
            f"({plan.total_bytes} bytes) onto {record.device}")
        progress = progress_factory(plan.total_bytes) if progress_factory else None
        try:
            result = copy_back(plan, record, cow_node, record.device,
                               progress=progress.advance if progress else (lambda n: None))
        finally:
            if progress:
                progress.close()
        record = record.with_phase("copied")
        state.save(record)
    if record.phase == "copied":
        _finish(dm, record, state, log, keep_store=keep_store)
    return result


def _refuse_bypassed(dm, record: CheckpointRecord, names: StackNames, state: StateStore) -> CheckpointRecord:
    """Refuse when writes reached the device without the origin (model/seal.py).

    Found by activate earlier, or now when the stack is down: with it up, the
    device is held exclusively and nothing can bypass it."""
    why = record.bypass
    if not why and dm.info(names.origin) is None:
        why = find_bypass(record)
        if why:
            state.save(record.bypassed(why))
    if why:
        raise RefusedError(
            f"checkpoint {record.name!r} cannot be rolled back exactly: {why}; those writes have no "
            "saved old data, so a rollback would build a filesystem that never existed; "
            f"'fiesnap commit {record.name}' keeps the current data (fsck it)")
    return record


def _prove(dm, record: CheckpointRecord, names: StackNames):
    """With NAME and NAME-snap gone: the device is free, the store is this checkpoint's,
    its exception table reads and validates, and the plan is safe. Returns
    (store node, table, plan). Changes nothing on the device."""
    remove_if_present(dm, names.cow)  # recreated below, after the identity check
    if not probe_exclusive(record.device):
        raise DeviceError(
            f"{record.device} is in use (mounted in another mount namespace, or held by another "
            f"device or program): find it with 'lsblk {record.device}' and 'fuser -vm {record.device}', "
            "free it, then run merge again"
        )
    cow_node = ensure_cow(dm, record)
    table = read_table(cow_node, record)
    return cow_node, table, make_plan(table, record)


def _finish(dm, record: CheckpointRecord, state: StateStore, log: Log, *, keep_store: bool) -> None:
    """The device holds the checkpoint again: take the store down and end the record."""
    name = record.name
    names = StackNames.for_name(name)
    remove_if_present(dm, names.cow)
    if record.managed and dm.info(names.origin) is None:
        create_passthrough(dm, record)
    if keep_store:
        log(f"kept the store file /{record.store_relpath} (immutable; "
            "chattr -i it before deleting)")
    else:
        storefile.discard_store(mount_source(record), record.fstype, record.store_relpath)
        log(f"removed store file /{record.store_relpath}")
    if record.managed:
        state.save(record.as_passthrough())
        log(f"/dev/mapper/{name} is a plain pass-through again: mount it")
    else:
        state.delete(name)
    log(f"rolled {record.device} back to checkpoint {name!r} of {record.created}")


def _precheck(dm, record: CheckpointRecord, names: StackNames) -> ExceptionTable:
    """Refuse before changing anything: invalid/overflowed snapshot, unreadable store.
    Returns the table as read now."""
    snap = dm.info(names.snap)
    if snap is not None:
        usage = snapshot_usage(dm, record)
        if usage.state != "active":
            raise RefusedError(
                f"checkpoint {record.name!r} is {usage.state}: the store did not keep every "
                f"change, so a rollback is impossible; 'fiesnap commit {record.name}' keeps "
                "the current data"
            )
    created_cow = dm.info(names.cow) is None
    cow_node = ensure_cow(dm, record)
    try:
        table = read_table(cow_node, record)
        make_plan(table, record)
    finally:
        if created_cow:
            remove_if_present(dm, names.cow)
    return table
