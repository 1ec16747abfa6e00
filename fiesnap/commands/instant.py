"""`fiesnap merge NAME --instant`: roll back through the kernel's snapshot-merge.

NAME shows the checkpoint the moment it is a snapshot-merge device, and may be mounted; the
kernel copies the saved chunks back in the background and resumes by itself when the table is
loaded again after a reboot (`activate`). `fiesnap merge NAME` run again waits for the kernel
and finishes: NAME back to the pass-through, the store device and file gone, the record ended
(also with the filesystem mounted); `fiesnap monitor` finishes finished merges by itself.

Phases: `active` -> `handover` (saved once the stack is down and the table read and checked;
a free-aware table is then rewritten to hold only real exceptions, which a re-run redoes from
the entries the rewrite never touches) -> `kernel-merging` (saved before NAME becomes the merge
device) -> the pass-through. Which stores may not be handed over, and why: model/kernel_merge.py.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from fiesnap.commands.guards import Log, verify_device
from fiesnap.errors import DeviceError, FiesnapError, RefusedError
from fiesnap.kernel import blockdev
from fiesnap.kernel.directio import probe_exclusive
from fiesnap.model.kernel_merge import compaction_refusal, grown_refusal, merge_complete, merge_remaining
from fiesnap.model.record import CheckpointRecord
from fiesnap.services import storefile
from fiesnap.services.kernelmerge import (
    compact,
    create_merge_device,
    merge_usage,
    read_handed_table,
    real_exceptions,
)
from fiesnap.services.stack import (
    StackNames,
    ensure_cow,
    passthrough_targets,
    reload_as_passthrough,
    remove_if_present,
)
from fiesnap.services.statedir import StateStore

#: how often a waiting merge asks the kernel how far it is
POLL_SECONDS = 0.5


@dataclass(frozen=True)
class InstantResult:
    name: str
    result: str  # "merging" (handed to the kernel), "finished"
    entries: int
    seconds: float

    def to_dict(self) -> dict:
        return {"name": self.name, "result": self.result, "entries": self.entries,
                "seconds": round(self.seconds, 3)}


def offline_instead(name: str, why: str) -> RefusedError:
    return RefusedError(f"checkpoint {name!r} cannot be rolled back instantly: {why}; "
                        f"'fiesnap merge {name}' rolls it back offline (nothing was changed)")


def refuse_unsafe(record: CheckpointRecord, real: int | None = None) -> None:
    """Before anything changes: a grown store is never handed to the kernel, nor a free-aware
    one whose `real` exceptions (when known) outnumber its seeded ones."""
    why = grown_refusal(record.generation)
    if not why and real is not None and record.free_aware:
        why = compaction_refusal(real, record.seeded_chunks)
    if why:
        raise offline_instead(record.name, why)


def hand_over(dm, record: CheckpointRecord, state: StateStore, log: Log) -> CheckpointRecord:
    """From `active` (stack up or down, filesystem unmounted, every check passed) or an
    interrupted `handover`, to NAME as the merge device. Returns the `kernel-merging` record."""
    name = record.name
    names = StackNames.for_name(name)
    remove_if_present(dm, names.origin)  # origin first: nothing writes the device from now on
    remove_if_present(dm, names.snap)
    remove_if_present(dm, names.cow)  # it holds the device too; mapped again after the probe
    if not probe_exclusive(record.device):
        raise DeviceError(
            f"{record.device} is in use (mounted in another mount namespace, or held by another "
            f"device or program): find it with 'lsblk {record.device}' and 'fuser -vm {record.device}', "
            f"free it, then run 'fiesnap merge {name} --instant' again")
    cow_node = ensure_cow(dm, record)
    try:
        entries = real_exceptions(cow_node, record)
        if record.phase == "active" and record.free_aware:
            why = compaction_refusal(len(entries), record.seeded_chunks)
            if why:
                raise offline_instead(name, why)
    except FiesnapError as e:
        if record.phase == "active":
            remove_if_present(dm, names.cow)
            e.args = (f"{e}; 'fiesnap activate {name}' brings the checkpoint back",)
        raise
    if record.phase == "active":
        record = record.handed_over(len(entries))
        state.save(record)
    if record.free_aware:
        cow = dm.info(names.cow)
        compact(cow_node, os.makedev(cow.major, cow.minor), record, entries)
        log(f"rewrote the store's table with its {len(entries)} saved chunks only "
            f"(the {record.seeded_chunks} seeded free chunks are not the kernel's to merge)")
    record = record.with_phase("kernel-merging")
    state.save(record)
    create_merge_device(dm, record)
    log(f"/dev/mapper/{name} shows checkpoint {name!r} of {record.created} now: mount it; the kernel "
        f"merges {len(entries)} chunks back in the background ('fiesnap status {name}'); "
        f"'fiesnap merge {name}' waits for it and finishes")
    return record


def merge_instant(dm, record: CheckpointRecord, state: StateStore, log: Log) -> InstantResult:
    """`merge --instant` with the state lock held."""
    t0 = time.monotonic()
    name = record.name
    if record.phase == "kernel-merging":
        log(f"the kernel is merging {name!r} already ('fiesnap status {name}')")
        return InstantResult(name, "merging", record.merge_entries, 0.0)
    if record.phase != "handover":
        refuse_unsafe(record)
    record = hand_over(dm, record, state, log)
    return InstantResult(name, "merging", record.merge_entries, time.monotonic() - t0)


def resume(dm, record: CheckpointRecord, state: StateStore, log: Log) -> CheckpointRecord:
    """After a reboot (activate): an interrupted handover is done again; a kernel merge is
    loaded again over its table, checked first, and the kernel goes on where it stopped."""
    if record.phase == "handover":
        return hand_over(dm, record, state, log)
    verify_device(record)
    read_handed_table(ensure_cow(dm, record), record)
    create_merge_device(dm, record)
    log(f"resumed the kernel merge of {record.name!r}: /dev/mapper/{record.name} shows the checkpoint")
    return record


def wait_and_finish(dm, record: CheckpointRecord, state: StateStore, log: Log,
                    progress_factory=None, *, keep_store: bool = False) -> InstantResult:
    """`fiesnap merge NAME` during a kernel merge: wait for the kernel, then finish."""
    t0 = time.monotonic()
    total = record.merge_entries
    progress = progress_factory(total * record.chunk_bytes) if progress_factory else None
    shown = 0
    try:
        while not _merged_already(dm, record):
            usage = _usage(dm, record)
            if merge_complete(usage):
                break
            done = total - (merge_remaining(usage, total, record.chunk_bytes) or total)
            if progress and done > shown:
                progress.advance((done - shown) * record.chunk_bytes)
                shown = done
            time.sleep(POLL_SECONDS)
        if progress and total > shown:
            progress.advance((total - shown) * record.chunk_bytes)
    finally:
        if progress:
            progress.close()
    finish(dm, record, state, log, keep_store=keep_store)
    return InstantResult(record.name, "finished", total, time.monotonic() - t0)


def _usage(dm, record: CheckpointRecord):
    usage = merge_usage(dm, record)
    name = record.name
    if usage is None:
        raise RefusedError(f"the kernel merge of {name!r} is not loaded: 'fiesnap activate {name}' resumes it")
    if usage.state == "merge-failed":
        raise RefusedError(
            f"the kernel's merge of {name!r} stopped on an error (see 'dmesg'); /dev/mapper/{name} still "
            f"shows the checkpoint: fix the cause, then 'fiesnap deactivate {name}' and "
            f"'fiesnap activate {name}' resume it")
    if usage.state != "active":
        raise RefusedError(f"the kernel's merge of {name!r} reports {usage.state}: see 'dmesg'")
    return usage


def _merged_already(dm, record: CheckpointRecord) -> bool:
    """NAME is the pass-through already: only `finish` makes it so, once the kernel said the
    merge was complete (a finish cut short after that leaves this)."""
    return dm.info(record.name) is not None and dm.table(record.name) == passthrough_targets(record)


def finish(dm, record: CheckpointRecord, state: StateStore, log: Log, *, keep_store: bool = False) -> None:
    """The kernel merged every chunk: NAME becomes the pass-through first (mounted or not;
    from then on a re-run knows the merge was complete), then the store device and file go
    and the record ends. A NAME nothing uses that is not under fiesnap goes last."""
    name = record.name
    names = StackNames.for_name(name)
    if not _merged_already(dm, record):
        if not merge_complete(_usage(dm, record)):
            raise RefusedError(f"the kernel is still merging {name!r}")
        reload_as_passthrough(dm, record)
    remove_if_present(dm, names.cow)
    if keep_store:
        log(f"kept the store file /{record.store_relpath} (immutable; chattr -i it before deleting)")
    else:
        storefile.discard_store(f"/dev/mapper/{name}", record.fstype, record.store_relpath)
        log(f"removed store file /{record.store_relpath}")
    state.save(record.as_passthrough())
    origin = dm.info(names.origin)
    if not record.managed and not origin.open_count and not blockdev.mounts_of(origin.major, origin.minor):
        dm.remove(names.origin)
        state.delete(name)
    else:
        log(f"/dev/mapper/{name} is a plain pass-through again")
    log(f"rolled {record.device} back to checkpoint {name!r} of {record.created} (kernel merge)")


def finish_if_complete(dm, state: StateStore, name: str, log: Log) -> bool:
    """The monitor's round: finish a kernel merge the kernel has completed (lock held by caller)."""
    record = state.load(name)
    if record.phase != "kernel-merging":
        return False
    if not _merged_already(dm, record):
        usage = merge_usage(dm, record)
        if usage is None or not merge_complete(usage):
            return False
    finish(dm, record, state, log)
    return True
