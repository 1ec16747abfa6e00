"""Grow a live checkpoint's store: `fiesnap extend NAME --by SIZE | --to SIZE`.

dm-snapshot asks the COW device for its size on every allocation
(persistent_prepare_exception -> get_dev_size), so a store grows by
appending segments to the `-cow` table; the COW chunks already in use keep
their addresses. Order, so that a crash at any point leaves an activatable
store and no unsafe chunk is ever used:

1. grow the store file (fallocate through the mounted filesystem); its old
   blocks must not move;
2. read the exception table; keep only new chunks that were free at the
   checkpoint and have no exception (extend_plan.py says why);
3. record the new map (generation + 1, the previous identity kept as
   acceptable), then rewrite the identity block, then drop the previous one;
4. only then reload `-cow` with the longer table (load, suspend, resume: the
   snapshot's I/O waits, none is lost).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from fiesnap.commands.guards import Log, require_root
from fiesnap.errors import RefusedError, UsageError
from fiesnap.kernel import blockdev, mounts
from fiesnap.model.extend_plan import ExtensionPlan, chunk_set, new_extents, plan_extension
from fiesnap.model.extents import free_chunks
from fiesnap.model.identity import encode_identity
from fiesnap.model.record import CheckpointRecord
from fiesnap.model.units import format_bytes
from fiesnap.services import storefile
from fiesnap.services.cowio import read_table
from fiesnap.services.stack import StackNames, cow_targets, snapshot_usage
from fiesnap.services.statedir import StateStore


@dataclass(frozen=True)
class ExtendResult:
    name: str
    file_bytes_before: int
    file_bytes_after: int
    store_bytes_before: int
    store_bytes_after: int
    plan: ExtensionPlan

    def to_dict(self) -> dict:
        p = self.plan
        return {
            "name": self.name,
            "file_bytes_before": self.file_bytes_before,
            "file_bytes_after": self.file_bytes_after,
            "store_bytes_before": self.store_bytes_before,
            "store_bytes_after": self.store_bytes_after,
            "added_chunks": p.added_chunks,
            "skipped_chunks": p.skipped_chunks,
            "skipped_live_at_checkpoint": p.live_at_checkpoint,
            "skipped_with_exception": p.excepted,
        }


def _target_file_size(record: CheckpointRecord, by: int | None, to: int | None) -> int:
    if (by is None) == (to is None):
        raise UsageError("give exactly one of --by SIZE or --to SIZE")
    new = record.store_file_bytes + by if by is not None else to
    if new <= record.store_file_bytes:
        raise UsageError(
            f"--to {format_bytes(new)} is not larger than the store file "
            f"({format_bytes(record.store_file_bytes)}): give a larger size"
        )
    return -(-new // 4096) * 4096


def extend(name: str, dm_factory, state: StateStore, log: Log, *,
           by: int | None = None, to: int | None = None) -> ExtendResult:
    require_root()
    with state.locked():
        record = state.load(name)
        if record.phase != "active":
            raise RefusedError(f"{name!r} has no active checkpoint ({record.phase}): nothing to extend")
        dm = dm_factory()
        names = StackNames.for_name(name)
        missing = [n for n in names.all() if dm.info(n) is None]
        if missing:
            raise RefusedError(f"{', '.join(missing)} not active: run 'fiesnap activate {name}' first")
        usage = snapshot_usage(dm, record)
        if usage.state != "active":
            raise RefusedError(
                f"checkpoint {name!r} is {usage.state}: growing the store cannot bring it back; "
                f"'fiesnap commit {name}' keeps the current data"
            )
        new_size = _target_file_size(record, by, to)
        origin = dm.info(names.origin)
        state.refuse_on(os.makedev(origin.major, origin.minor), f"/dev/mapper/{name}")
        before_store = record.store_bytes
        old_size = record.store_file_bytes

        with mounts.private_mount(f"/dev/mapper/{name}", record.fstype) as mnt:
            storefile.check_free_space(mnt, new_size - old_size, label=f"/dev/mapper/{name}",
                                       hint="grow by less, or free space on the filesystem")
            grown = storefile.grow_store_file(mnt, record.store_relpath, new_size)
            record = record.with_store_file(new_size, grown)
            table = read_table(dm.node_path(names.cow), record)
            plan = plan_extension(
                new_extents(grown, old_size), record.chunk_bytes,
                free_at_checkpoint=free_chunks(record.free_map, record.chunk_bytes),
                excepted=chunk_set(e.old_chunk for e in table.entries),
                mapped=record.cow.store_chunks(),
            )
            if plan.added_chunks == 0:
                state.save(record)  # the file grew; the map did not
                log(f"no safe chunk among the {plan.skipped_chunks} new ones "
                    f"({plan.live_at_checkpoint} were in use at the checkpoint, {plan.excepted} have "
                    "exceptions): the store did not grow; try a larger --by")
                return ExtendResult(name, old_size, new_size, before_store, before_store, plan)
            record = record.grown(record.cow.append_runs(plan.runs))
            state.save(record)  # 3: the new map first; the old identity stays acceptable
            storefile.rewrite_head(mnt, record.store_relpath, encode_identity(record.expected_identity()))
            record = record.identity_rewritten()
            state.save(record)
        # 4: only now can the kernel allocate in the new chunks.
        dm.load(names.cow, cow_targets(record))
        dm.suspend(names.cow, lockfs=False)
        dm.resume(names.cow)
        after_store = record.store_bytes
        log(f"store of {name!r} grew from {format_bytes(before_store)} to {format_bytes(after_store)}"
            + (f"; skipped {plan.skipped_chunks} unsafe chunks ({plan.live_at_checkpoint} in use at the "
               f"checkpoint, {plan.excepted} with exceptions), left allocated but unmapped"
               if plan.skipped_chunks else ""))
        return ExtendResult(name, old_size, new_size, before_store, after_store, plan)


def fs_room(dm, record: CheckpointRecord) -> int:
    """Usable free bytes for growing the store (free space minus fiesnap's margin).

    Read from a mount of /dev/mapper/NAME when there is one (a poll must be
    cheap), else from a short private mount.
    """
    info = dm.info(record.name)
    where = blockdev.mounts_of(info.major, info.minor) if info is not None else []
    if where:
        return storefile.usable_space(where[0])
    with mounts.private_mount(f"/dev/mapper/{record.name}", record.fstype) as mnt:
        return storefile.usable_space(mnt)
