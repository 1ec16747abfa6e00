"""`fiesnap commit`: end a checkpoint keeping every change.

The phase `committing` is recorded before the first device goes, so a commit
interrupted at any point is finished by running it again. `--boot-complete` is
the success half of the update lifecycle (model/lifecycle.py): what
fiesnap-boot-complete.service runs once systemd's boot assessment is good.
"""

from __future__ import annotations

from dataclasses import dataclass

from fiesnap.commands.guards import Log, require_root, verify_device
from fiesnap.errors import DeviceError, FiesnapError, RefusedError
from fiesnap.kernel import blockdev, boot
from fiesnap.model.lifecycle import attempts_of, commits_at_boot_complete
from fiesnap.model.record import ROLLBACK_PHASES, CheckpointRecord
from fiesnap.services import storefile
from fiesnap.services.stack import (
    StackNames,
    create_passthrough,
    mount_source,
    passthrough_targets,
    reload_as_passthrough,
    remove_if_present,
    resume_leftovers,
)
from fiesnap.services.statedir import StateStore


def commit(name: str, dm_factory, state: StateStore, log: Log) -> str:
    """End the checkpoint keeping every change. Returns "passthrough" or "removed"."""
    require_root()
    with state.locked():
        return _commit_locked(dm_factory(), state.load(name), state, log)


@dataclass(frozen=True)
class BootVerdict:
    """What `commit --boot-complete` did with one recorded name."""

    name: str
    result: str  # "committed", "skipped", "failed"
    detail: str = ""

    def to_dict(self) -> dict:
        return {"name": self.name, "result": self.result, "detail": self.detail}


def commit_boot_complete(dm_factory, state: StateStore, log: Log) -> list[BootVerdict]:
    """The boot reached boot-complete.target: commit every update checkpoint counted in it.

    An update checkpoint started in this boot, or counted in an earlier one, is left alone:
    this boot says nothing of it. One failure does not stop the others; the first is raised
    after all were tried."""
    require_root()
    with state.locked():
        boot_id = boot.boot_id()
        dm = None
        verdicts: list[BootVerdict] = []
        errors: list[FiesnapError] = []
        for record in state.load_all():
            attempts = attempts_of(record, boot_id)
            if attempts is None:
                continue
            if not commits_at_boot_complete(record, boot_id):
                why = ("its rollback is under way" if record.auto_rollback else
                       f"phase {record.phase}" if record.phase != "active" else
                       "no boot attempt of it was counted in this boot")
                verdicts.append(BootVerdict(record.name, "skipped", why))
                continue
            dm = dm or dm_factory()
            try:
                _commit_locked(dm, record, state, log)
            except FiesnapError as e:
                log(f"error: {e}")
                errors.append(e)
                verdicts.append(BootVerdict(record.name, "failed", str(e)))
                continue
            verdicts.append(BootVerdict(
                record.name, "committed", f"boot attempt {attempts.used} of {attempts.allowed} succeeded"))
        if errors:
            raise type(errors[0])(f"{len(errors)} update checkpoints could not be committed; first: {errors[0]}")
        return verdicts


def _commit_locked(dm, record: CheckpointRecord, state: StateStore, log: Log) -> str:
    """The commit, with the state folder locked by the caller."""
    name = record.name
    names = StackNames.for_name(name)
    resume_leftovers(dm, record, log)
    if record.phase in ROLLBACK_PHASES:
        raise RefusedError(
            f"a rollback of {name!r} is under way: run 'fiesnap merge {name}' to finish it"
        )
    origin = dm.info(names.origin)
    mounted = blockdev.mounts_of(origin.major, origin.minor) if origin else []
    if record.phase == "passthrough" and record.managed:
        raise RefusedError(
            f"{name!r} has no checkpoint: nothing to commit; 'fiesnap start {name} --size SIZE' takes one"
        )
    if record.phase == "passthrough":
        if mounted:
            raise RefusedError(
                f"{name!r} is a plain pass-through mounted on {mounted[0]}: nothing to commit; "
                "unmount it and run commit again to remove the device"
            )
        remove_if_present(dm, names.origin)
        state.delete(name)
        log(f"removed pass-through /dev/mapper/{name}")
        return "removed"

    verify_device(record)
    record = record.with_phase("committing")
    # The record says committing before the origin stops saving overwrites (a rollback
    # after that would be wrong), and only after the last refusal: a filesystem another
    # tool froze, or an origin another program holds open, leaves the record as it was.
    if record.managed:
        return _commit_managed(dm, record, state, log)
    if mounted:
        reload_as_passthrough(dm, record, on_switch=lambda: state.save(record))
        log(f"/dev/mapper/{name} is now a plain pass-through; still mounted on {mounted[0]}")
        remove_if_present(dm, names.snap)
        remove_if_present(dm, names.cow)
        _discard_store(f"/dev/mapper/{name}", record, log)
        state.save(record.with_phase("passthrough"))
        return "passthrough"
    if origin is not None and origin.open_count:
        raise DeviceError(
            f"/dev/mapper/{name} is open by another program: close it and run commit again"
        )
    state.save(record)
    remove_if_present(dm, names.origin)
    remove_if_present(dm, names.snap)
    remove_if_present(dm, names.cow)
    _discard_store(record.device, record, log)
    state.delete(name)
    log(f"checkpoint {name!r} committed; {record.device} holds the current data")
    return "removed"


def _commit_managed(dm, record: CheckpointRecord, state: StateStore, log: Log) -> str:
    """Back to the pass-through, mounted or not; the record stays for the next checkpoint."""
    names = StackNames.for_name(record.name)
    if dm.info(names.origin) is None:
        state.save(record)
        remove_if_present(dm, names.snap)
        remove_if_present(dm, names.cow)
        create_passthrough(dm, record)
    elif dm.table(names.origin) != passthrough_targets(record):
        reload_as_passthrough(dm, record, on_switch=lambda: state.save(record))
    else:
        state.save(record)
    log(f"/dev/mapper/{record.name} is a plain pass-through again")
    remove_if_present(dm, names.snap)
    remove_if_present(dm, names.cow)
    if record.store_relpath:
        _discard_store(mount_source(record), record, log)
    state.save(record.as_passthrough())
    log(f"checkpoint {record.name!r} committed; the device holds the current data")
    return "passthrough"


def _discard_store(device: str, record: CheckpointRecord, log: Log) -> None:
    storefile.discard_store(device, record.fstype, record.store_relpath)
    log(f"removed store file /{record.store_relpath}")
