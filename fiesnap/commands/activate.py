"""`fiesnap activate` and `fiesnap deactivate`: bring recorded devices up after boot, or down.

activate finds each device again (names move between boots), checks a
checkpoint's store identity block raw from the device before mapping a single
block of it, and rebuilds the stack over the existing store (never zeroed).
deactivate takes the devices down without ending anything.

An update checkpoint (model/lifecycle.py) is where activate counts boots: one
attempt saved before the stack is built, and, once every attempt is spent
without a commit, the merge instead of the stack, so that the system comes up
on the checkpoint's data. A rollback it began and a power cut interrupted is
finished by the next activate.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from fiesnap.commands.guards import Log, require_root
from fiesnap.commands.progress import LoggedProgress
from fiesnap.errors import DeviceError, DeviceMapperError, FiesnapError, RefusedError
from fiesnap.commands import instant
from fiesnap.commands.merge import merge_locked
from fiesnap.kernel import boot
from fiesnap.kernel.locate import Wanted, find_device
from fiesnap.model.lifecycle import COUNT, BootAttempts, ROLL_BACK, attempts_of, decide_at_boot, rollback_reason
from fiesnap.model.record import CheckpointRecord
from fiesnap.services.stack import (
    StackNames,
    build_stack,
    create_passthrough,
    refuse_in_use,
    resume_leftovers,
)
from fiesnap.services.deviceseal import built_now, current_stamp, find_bypass
from fiesnap.services.storeid import check_store_identity
from fiesnap.services.statedir import StateStore


@dataclass(frozen=True)
class ActivateResult:
    name: str
    result: str  # "activated", "already active", "rolled back", "failed"
    detail: str = ""
    #: writes that bypassed the origin while the stack was down ("" if none seen).
    bypass: str = ""
    #: an update checkpoint's boot attempts after this activate (None: it counts none).
    attempts: BootAttempts | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "result": self.result, "detail": self.detail, "bypass": self.bypass,
                "boot_attempts": self.attempts.to_dict() if self.attempts else None}


def _locate(record: CheckpointRecord, state: StateStore) -> CheckpointRecord:
    """Find the device again (names move between boots); record its new name and numbers."""
    dev = find_device(Wanted(record.name, record.device, record.fs_uuid, record.device_bytes))
    if (dev.path, dev.major, dev.minor) != (record.device, record.device_major, record.device_minor):
        record = record.relocated(os.path.realpath(dev.path), dev.major, dev.minor)
        state.save(record)
    return record


def _activate_one(dm, record: CheckpointRecord, state: StateStore, log: Log, boot_id: str) -> ActivateResult:
    name = record.name
    names = StackNames.for_name(name)
    if record.phase in ("merging", "copied") and record.auto_rollback:
        return _roll_back(dm, _locate(record, state), state, log)
    if record.phase in ("handover", "kernel-merging"):
        if dm.info(names.origin) is not None and record.phase == "kernel-merging":
            return ActivateResult(name, "already active", "kernel merge")
        instant.resume(dm, _locate(record, state), state, log)
        return ActivateResult(name, "activated", "kernel merge")
    if record.phase in ("merging", "copied"):
        raise RefusedError(f"a rollback of {name!r} is under way: run 'fiesnap merge {name}' to finish it")
    if record.phase in ("starting", "committing"):
        raise RefusedError(
            f"checkpoint {name!r} was interrupted while {record.phase}: run 'fiesnap commit {name}' to finish"
        )
    present = [n for n in names.all() if dm.info(n) is not None]
    if present:
        resume_leftovers(dm, record, log)
    if record.phase == "passthrough":
        if names.origin in present:
            return ActivateResult(name, "already active")
        record = _locate(record, state)
        create_passthrough(dm, record)
        log(f"activated /dev/mapper/{name} (pass-through of {record.device})")
        return ActivateResult(name, "activated", "passthrough")
    if set(present) == set(names.all()):
        return ActivateResult(name, "already active")
    if present:
        raise RefusedError(
            f"{name!r} is half active ({', '.join(present)} present): run 'fiesnap deactivate {name}' first"
        )
    record = _locate(record, state)
    decision = decide_at_boot(record, boot_id)
    if decision == ROLL_BACK:
        return _roll_back(dm, record, state, log)
    check_store_identity(record, record.device)
    found = "" if record.bypass else find_bypass(record)
    if found:
        record = record.bypassed(found)
        state.save(record)  # before the stack: the finding must outlive a failed build
    why = record.bypass
    if decision == COUNT:
        # Durable before anything is exposed: a power cut from here on spent this attempt.
        record = record.attempt_counted(boot_id)
        state.save(record)
        log(f"{name!r}: boot attempt {record.attempts_used} of {record.boot_attempts} of the update")
    build_stack(dm, record, zero_header=False, log=log)
    state.save(built_now(record))
    log(f"activated checkpoint {name!r} over its existing store")
    attempts = attempts_of(record, boot_id)
    if why:
        log(f"warning: {why}; a rollback would no longer be exact, so 'fiesnap merge {name}' "
            f"will refuse; 'fiesnap commit {name}' keeps the current data")
        return ActivateResult(name, "activated", "checkpoint", bypass=why, attempts=attempts)
    return ActivateResult(name, "activated", "checkpoint", attempts=attempts)


def _roll_back(dm, record: CheckpointRecord, state: StateStore, log: Log) -> ActivateResult:
    """The update's boot attempts are spent: roll back instead of exposing (or finish doing so).

    The decision is saved before the merge starts: from then on this checkpoint is never
    counted or exposed again, only rolled back (or committed by hand, while the merge has
    not begun to write)."""
    name = record.name
    if not record.auto_rollback:
        record = record.rolling_back(rollback_reason(record))
        state.save(record)
    verb = "rolling back" if record.phase == "active" else "finishing the rollback of"
    log(f"{name!r}: {record.auto_rollback}: {verb} checkpoint of {record.created}")
    try:
        result = merge_locked(dm, record, state, log,
                              progress_factory=lambda total: LoggedProgress(f"{name!r}: rollback", total, log))
    except FiesnapError as e:
        if state.load(name).phase != "active":
            raise  # the copy began: only finishing it is possible ('fiesnap merge' says the same)
        raise type(e)(
            f"{name!r}: {record.auto_rollback}, but it cannot be rolled back: {e}; nothing was "
            f"exposed: 'fiesnap commit {name}' keeps the update's data, or fix the cause and run "
            f"'fiesnap activate {name}' to roll back") from e
    chunks = result.chunks if result else 0
    return ActivateResult(name, "rolled back", f"{record.auto_rollback}; {chunks} chunks restored")


def activate(name: str | None, dm_factory, state: StateStore, log: Log, *,
             wait_seconds: float = 0.0) -> list[ActivateResult]:
    """Rebuild recorded devices after boot. With --all, one failure does not stop the others."""
    require_root()
    with state.locked():
        records = [state.load(name)] if name else state.load_all()
        dm = dm_factory()
        boot_id = boot.boot_id()
        results = []
        errors: list[FiesnapError] = []
        deadline = time.monotonic() + wait_seconds  # one budget for all: boot waits at most this
        for r in records:
            while True:
                try:
                    # Read again on every try: one that failed may have saved (counted, relocated).
                    results.append(_activate_one(dm, state.load(r.name), state, log, boot_id))
                    break
                except FiesnapError as e:
                    if isinstance(e, DeviceError) and time.monotonic() < deadline:
                        time.sleep(0.5)  # devices still appearing during boot
                        continue
                    if name:
                        raise
                    errors.append(e)
                    results.append(ActivateResult(r.name, "failed", str(e)))
                    break
        if errors:
            for e in errors:
                log(f"error: {e}")
            first = errors[0]
            raise type(first)(
                f"{len(errors)} of {len(records)} could not be activated; first: {first}"
            )
        return results


def deactivate(name: str | None, dm_factory, state: StateStore, log: Log) -> dict[str, list[str]]:
    """Take devices down, ending nothing: activate brings them back. Returns name -> removed.

    A checkpoint whose stack this call took down is sealed (model/seal.py): its
    superblock as the origin left it, so that activate and merge can tell
    whether the device was written without the stack in between. With --all
    (NAME None, what the boot unit runs at shutdown) one failure does not stop
    the others."""
    require_root()
    with state.locked():
        records = [state.load(name)] if name else state.load_all()
        dm = dm_factory()
        removed: dict[str, list[str]] = {}
        errors: list[FiesnapError] = []
        for record in records:
            try:
                removed[record.name] = _deactivate_one(dm, record, state, log)
            except FiesnapError as e:
                if name:
                    raise
                log(f"error: {e}")
                errors.append(e)
        if errors:
            raise type(errors[0])(
                f"{len(errors)} of {len(records)} could not be deactivated; first: {errors[0]}")
        return removed


def _deactivate_one(dm, record: CheckpointRecord, state: StateStore, log: Log) -> list[str]:
    name = record.name
    names = StackNames.for_name(name)
    resume_leftovers(dm, record, log)  # a suspended device is neither removable nor sealable
    refuse_in_use(dm.info(names.origin), name)
    snap = dm.info(names.snap)
    if snap is not None and snap.open_count:
        raise DeviceError(f"{names.snap} is open by another program: close it first")
    removed = []
    for n in names.all():  # origin first: once it is gone nothing writes the device
        if dm.info(n) is not None:
            try:
                dm.remove(n)
            except DeviceMapperError as e:
                raise DeviceMapperError(
                    f"{e}; removed so far: {', '.join(removed) or 'nothing'}; "
                    f"'fiesnap activate {name}' rebuilds them"
                ) from e
            removed.append(n)
    if record.phase == "active" and names.origin in removed and set(removed) == set(names.all()):
        # Only a stack this call took down proves nothing bypassed it until now.
        state.save(record.sealed(current_stamp(record)))
    log(f"deactivated {name!r} ({record.phase}); 'fiesnap activate {name}' brings it back")
    return removed
