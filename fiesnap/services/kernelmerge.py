"""Instant rollback: hand a checkpoint's store to the kernel's snapshot-merge target.

The order (docs/design.md, "Instant rollback"): with the filesystem unmounted, NAME (the
origin) goes first, then NAME-snap, so no snapshot-origin and no snapshot of the store are
left; the table is read and checked, a free-aware store's table rewritten to hold only its
real exceptions (model/kernel_merge.py), and only then is NAME created again as a
`snapshot-merge` device over the device and NAME-cow. The kernel reads the table from the
store and merges in the background; the same table load resumes it after a reboot.
"""

from __future__ import annotations

from fiesnap.errors import StoreFormatError
from fiesnap.kernel.directio import write_chunks
from fiesnap.model.dmtable import snapshot_merge
from fiesnap.model.exstore import CowException, area_location, read_exception_table
from fiesnap.model.kernel_merge import areas_to_write, compacted_area, merge_complete, merge_remaining
from fiesnap.model.record import CheckpointRecord
from fiesnap.model.snapstatus import SnapshotUsage, parse_snapshot_status
from fiesnap.model.units import SECTOR_BYTES
from fiesnap.services.cowio import chunk_reader, seed_plan, make_plan, read_table
from fiesnap.services.stack import StackNames, ensure_cow, origin_uuid


def merge_targets(record: CheckpointRecord, cow_dev: str):
    return [snapshot_merge(record.device_bytes // SECTOR_BYTES, record.device_string, cow_dev,
                           record.chunk_bytes // SECTOR_BYTES)]


def real_exceptions(cow_node: str, record: CheckpointRecord) -> tuple[CowException, ...]:
    """The exceptions to hand over, validated. A free-aware store in phase `handover` may have
    its front rewritten already: its seeded slots are skipped unread, the entries after them
    (never written by the rewrite) and the converted ones (from the record) are what counts."""
    if record.phase == "handover" and record.free_aware:
        plan = seed_plan(record)
        with chunk_reader(cow_node, record) as read_chunk:
            table = read_exception_table(
                read_chunk, cow_chunks=record.cow.total_chunks, origin_chunks=record.origin_chunks,
                chunk_bytes=record.chunk_bytes, seeded=plan.entries, seeded_old=plan.seeded,
                data_start=plan.layout.data_start, is_backed=record.cow.is_backed,
                is_span_backed=record.cow.is_span_backed,
                converted=plan.converted, seeded_unchecked=True)
    else:
        table = read_table(cow_node, record)
    make_plan(table, record)  # refuses a destination inside the store, as the offline merge does
    return table.entries


def read_handed_table(cow_node: str, record: CheckpointRecord):
    """The table as handed to the kernel (or what is left of it while it merges): real
    exceptions only, from slot 0, each checked as the offline merge checks them."""
    layout = record.seed_layout
    extra = dict(data_start=layout.data_start, is_backed=record.cow.is_backed,
                 is_span_backed=record.cow.is_span_backed) if layout else {}
    with chunk_reader(cow_node, record) as read_chunk:
        table = read_exception_table(read_chunk, cow_chunks=record.cow.total_chunks,
                                     origin_chunks=record.origin_chunks, chunk_bytes=record.chunk_bytes,
                                     **extra)
    make_plan(table, record)
    return table


def compact(cow_node: str, cow_rdev: int, record: CheckpointRecord, entries: tuple[CowException, ...]) -> None:
    """Rewrite a free-aware table's front with only `entries`, then read it back: it must be
    exactly them. Each area is read and changed only in the slots the compaction owns; the
    areas are written with O_DIRECT, fsynced and read back (write_chunks)."""
    chunk = record.chunk_bytes
    with chunk_reader(cow_node, record) as read_chunk:
        areas = {area_location(a, chunk): compacted_area(a, read_chunk(area_location(a, chunk)), entries, chunk)
                 for a in areas_to_write(len(entries), chunk)}
    write_chunks(cow_node, areas, chunk, expect_rdev=cow_rdev)
    got = read_handed_table(cow_node, record).entries
    if got != entries:
        raise StoreFormatError(
            f"snapshot store of {record.name!r}: the table rewritten for the kernel's merge reads back "
            f"{len(got)} entries, not the {len(entries)} written; nothing was merged: run the same "
            "command again")


def create_merge_device(dm, record: CheckpointRecord) -> None:
    """NAME as snapshot-merge over the device and NAME-cow (the identity checked by ensure_cow)."""
    names = StackNames.for_name(record.name)
    ensure_cow(dm, record)
    cow = dm.info(names.cow)
    dm.create(names.origin, uuid=origin_uuid(record), targets=merge_targets(record, f"{cow.major}:{cow.minor}"))


def merge_usage(dm, record: CheckpointRecord) -> SnapshotUsage | None:
    """The kernel's merge status (raw, not backed bytes), or None when NAME is not a
    snapshot-merge device (not up, or a pass-through again once the merge is finished)."""
    names = StackNames.for_name(record.name)
    if dm.info(names.origin) is None:
        return None
    lines = dm.status(names.origin)
    if not lines or lines[0][2] != "snapshot-merge":
        return None
    return parse_snapshot_status(lines[0][3])


def progress_of(usage: SnapshotUsage | None, record: CheckpointRecord) -> dict | None:
    """What status shows of a kernel merge."""
    if usage is None:
        return None
    left = merge_remaining(usage, record.merge_entries, record.chunk_bytes)
    total = record.merge_entries
    return {"entries": total, "remaining": left, "complete": merge_complete(usage),
            "state": usage.state,
            "percent_done": None if left is None else (100.0 if not total else round(100.0 * (total - left) / total, 1))}
