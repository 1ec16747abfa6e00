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

Growth is what the store maps (`store_bytes_*`, `mapped_bytes`), not what the
file grew by. When no new chunk is safe, the file has grown and the store has
not: `extend` returns that result (nothing mapped, the record keeps the longer
file) and the CLI turns it into exit 7 (RefusedError) after printing it. The
unsafe blocks stay in the file on purpose, until the checkpoint ends: freed,
the filesystem would hand the same blocks to the next attempt.
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
from fiesnap.services.stack import StackNames, cow_targets, resume_leftovers, snapshot_usage
from fiesnap.services.statedir import StateStore


@dataclass(frozen=True)
class ExtendResult:
    name: str
    file_bytes_before: int
    file_bytes_after: int
    store_bytes_before: int
    store_bytes_after: int
    plan: ExtensionPlan
    chunk_bytes: int

    @property
    def mapped_bytes(self) -> int:
        """What the store grew by: the new chunks it maps (its usable size)."""
        return self.store_bytes_after - self.store_bytes_before

    @property
    def file_grown_bytes(self) -> int:
        return self.file_bytes_after - self.file_bytes_before

    @property
    def unsafe_chunks(self) -> int:
        """New chunks left unmapped because mapping them would destroy checkpoint data."""
        return self.plan.live_at_checkpoint + self.plan.excepted

    def why_unsafe(self) -> str:
        """Why chunks were skipped, in words: '3 were in use at the checkpoint, 2 hold saved chunks'."""
        return (f"{self.plan.live_at_checkpoint} were in use at the checkpoint, "
                f"{self.plan.excepted} hold saved chunks")

    def nothing_mapped(self) -> str:
        """Why an extension mapped nothing, in one line (the CLI's error, the monitor's alarm)."""
        if self.plan.skipped_chunks == 0:
            why = (f"the file's {format_bytes(self.file_grown_bytes)} of new space holds no whole chunk "
                   f"of {format_bytes(self.chunk_bytes)}")
        else:
            why = (f"none of the {self.plan.skipped_chunks} new chunks of its file may be mapped "
                   f"({self.why_unsafe()}: store data there would destroy checkpoint data)")
        return (f"the store of {self.name!r} cannot grow safely: {why}; the file grew by "
                f"{format_bytes(self.file_grown_bytes)} and keeps those blocks until the checkpoint "
                f"ends, the store stays {format_bytes(self.store_bytes_after)}")

    def to_dict(self) -> dict:
        p = self.plan
        return {
            "name": self.name,
            "file_bytes_before": self.file_bytes_before,
            "file_bytes_after": self.file_bytes_after,
            "file_bytes_added": self.file_grown_bytes,
            "store_bytes_before": self.store_bytes_before,
            "store_bytes_after": self.store_bytes_after,
            "store_bytes_added": self.mapped_bytes,
            "chunk_bytes": self.chunk_bytes,
            "added_chunks": p.added_chunks,
            "skipped_chunks": p.skipped_chunks,
            "skipped_live_at_checkpoint": p.live_at_checkpoint,
            "skipped_with_exception": p.excepted,
            "skipped_already_mapped": p.already_mapped,
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
        resume_leftovers(dm, record, log)
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
                # The file grew, the map did not: the caller says so (CLI: exit 7; monitor: backs off).
                state.save(record)
                return ExtendResult(name, old_size, new_size, before_store, before_store, plan,
                                    record.chunk_bytes)
            record = record.grown(record.cow.append_runs(plan.runs))
            state.save(record)  # 3: the new map first; the old identity stays acceptable
            storefile.rewrite_head(mnt, record.store_relpath, encode_identity(record.expected_identity()))
            record = record.identity_rewritten()
            state.save(record)
        # 4: only now can the kernel allocate in the new chunks.
        dm.load(names.cow, cow_targets(record))
        dm.suspend(names.cow, lockfs=False)
        dm.resume(names.cow)
        result = ExtendResult(name, old_size, new_size, before_store, record.store_bytes, plan,
                              record.chunk_bytes)
        log(f"store of {name!r} grew from {format_bytes(before_store)} to {format_bytes(result.store_bytes_after)}"
            + (f"; skipped {plan.skipped_chunks} unsafe chunks ({result.why_unsafe()}), left allocated "
               "but unmapped" if plan.skipped_chunks else ""))
        return result


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
