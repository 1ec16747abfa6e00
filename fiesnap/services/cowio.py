"""The store seen through NAME-cow: its exception table, its frontier, and the copy back.

Reads go through the `-cow` device with O_DIRECT (its page cache is not kept
coherent with the kernel's writes). The copy is idempotent: it only reads the
store, and the plan proves no destination lies inside the store, so a merge
killed at any point and re-run from the start ends exact.
"""

from __future__ import annotations

import mmap
import os
import queue
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from fiesnap.errors import StoreFormatError
from fiesnap.kernel.directio import AlignedBuffer, DirectDevice
from fiesnap.model.exstore import ExceptionTable, check_seeded_areas, read_exception_table, scan_frontier
from fiesnap.model.merge_plan import MergePlan, plan_batches, plan_merge
from fiesnap.model.record import CheckpointRecord
from fiesnap.model.seeding import recorded_plan

MAX_RUN_CHUNKS_BYTES = 1 << 20
MAX_READ_BYTES = 4 << 20  # one read of the store: several runs, stepping over small gaps
MAX_GAP_BYTES = 64 << 10  # read (and drop) up to this much between two runs' sources
COPY_WORKERS = 4  # batches in flight: enough to keep a disk's queue busy


@dataclass(frozen=True)
class MergeResult:
    runs: int
    chunks: int
    bytes_copied: int
    seconds: float


@contextmanager
def chunk_reader(cow_node: str, record: CheckpointRecord) -> Iterator[Callable[[int], bytes]]:
    """read_chunk(n) for the store device, O_DIRECT with one aligned buffer."""
    chunk = record.chunk_bytes
    with AlignedBuffer(chunk) as buf, DirectDevice.open(cow_node, write=False) as dev:
        yield lambda n: bytes(dev.read_into(buf, n * chunk, chunk))


def seed_plan(record: CheckpointRecord):
    """The seeded entries a free-aware record's free map gives; StoreFormatError if the
    record disagrees with its own map (None for a plain store)."""
    layout = record.seed_layout
    if layout is None:
        return None
    plan = recorded_plan(layout, record.free_map, record.seed_map)
    if plan.count != record.seeded_chunks:
        raise StoreFormatError(
            f"snapshot store of {record.name!r}: the recorded free-space map gives {plan.count} "
            f"seeded chunks, the record says {record.seeded_chunks}: the record is damaged; "
            "rollback is impossible; current data was not touched")
    return plan


def check_seeded(cow_node: str, record: CheckpointRecord) -> None:
    """A free-aware store's seeded entries, checked before the kernel loads them again."""
    plan = seed_plan(record)
    if plan is None:
        return
    with chunk_reader(cow_node, record) as read_chunk:
        check_seeded_areas(read_chunk, seeded=plan.entries, chunk_bytes=record.chunk_bytes)


def read_table(cow_node: str, record: CheckpointRecord) -> ExceptionTable:
    """Read and fully validate the exception table; raises StoreFormatError.

    A free-aware store's table must open with exactly the seeded entries its
    recorded free-space map gives (model/seeding.py); only the others are returned.
    """
    seeded = {}
    plan = seed_plan(record)
    if plan is not None:
        seeded = dict(seeded=plan.entries, seeded_old=plan.seeded, data_start=plan.layout.data_start,
                      is_backed=record.cow.is_backed, is_span_backed=record.cow.is_span_backed,
                      converted=plan.converted)
    with chunk_reader(cow_node, record) as read_chunk:
        return read_exception_table(read_chunk, cow_chunks=record.cow.total_chunks,
                                    origin_chunks=record.origin_chunks,
                                    chunk_bytes=record.chunk_bytes, **seeded)


def read_frontier(cow_node: str, record: CheckpointRecord) -> int | None:
    """The committed allocation frontier on disk, ignoring the valid flag (see scan_frontier)."""
    with chunk_reader(cow_node, record) as read_chunk:
        return scan_frontier(read_chunk, cow_chunks=record.cow.total_chunks, chunk_bytes=record.chunk_bytes)


def make_plan(table: ExceptionTable, record: CheckpointRecord) -> MergePlan:
    """Plan the copy; refuses if any destination lies inside the store's own chunks."""
    max_run = max(1, MAX_RUN_CHUNKS_BYTES // record.chunk_bytes)
    return plan_merge(table, forbidden=record.cow.store_chunks(), max_run_chunks=max_run)


def copy_back(
    plan: MergePlan,
    record: CheckpointRecord,
    cow_node: str,
    device_path: str,
    progress: Callable[[int], None] = lambda n: None,
    *,
    workers: int = COPY_WORKERS,
) -> MergeResult:
    """Copy every planned run from the store to the device, then fsync the device.

    The store is read in its own order, in large reads (model/merge_plan.py, plan_batches),
    by `workers` threads, each with its own aligned buffer, so several reads and writes are in
    flight at once; each batch's writes go out in device order. Nothing here changes the
    safety argument: sources are only read, destinations are disjoint from the store and from
    each other, so the order of the writes cannot matter, and a copy cut short and run again
    ends the same. The device is fsynced before this returns.
    """
    ranges = list(plan.byte_ranges(record.device_bytes))  # refuses a run past the end before any write
    batches = plan_batches(ranges, max_read_bytes=MAX_READ_BYTES, max_gap_bytes=MAX_GAP_BYTES)
    started = time.monotonic()
    copied = 0
    if batches:
        size = max(b.length for b in batches)
        size += -size % mmap.PAGESIZE
        with DirectDevice.open(cow_node, write=False) as src, \
                DirectDevice.open(device_path, write=True,
                                  expect_rdev=os.makedev(record.device_major, record.device_minor)) as dst:
            copied = _copy_batches(batches, src, dst, size, progress, max(1, workers))
            dst.fsync()
    return MergeResult(len(plan.runs), plan.total_chunks, copied, time.monotonic() - started)


def _copy_batches(batches, src: DirectDevice, dst: DirectDevice, buf_bytes: int,
                  progress: Callable[[int], None], workers: int) -> int:
    """Run the batches on `workers` threads (preadv/pwritev release the GIL); the first error
    stops the rest and is raised once every batch in flight has ended."""
    buffers: queue.SimpleQueue[AlignedBuffer] = queue.SimpleQueue()
    owned = [AlignedBuffer(buf_bytes) for _ in range(workers)]
    for b in owned:
        buffers.put(b)

    def run(batch) -> int:
        buf = buffers.get()
        try:
            src.read_into(buf, batch.src, batch.length)
            for w in batch.writes:
                dst.write_from(buf, w.dest, w.length, start=w.buf_offset)
            return batch.write_bytes
        finally:
            buffers.put(buf)

    copied = 0
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fiesnap-copy")
    pending: set = set()
    try:
        for batch in batches:
            pending.add(pool.submit(run, batch))
            if len(pending) >= 2 * workers:
                copied += _collect(pending, progress)
        while pending:
            copied += _collect(pending, progress)
    except BaseException:  # an I/O error, or ^C: drop what has not started
        for f in pending:
            f.cancel()
        raise
    finally:
        _join(pool)
        for b in owned:
            b.close()
    return copied


def _join(pool: ThreadPoolExecutor) -> None:
    """Wait for every running batch, through any number of ^C: the caller closes the
    descriptors those threads write through, and a closed number can be reused by the next
    open."""
    while True:
        try:
            pool.shutdown(wait=True, cancel_futures=True)
            return
        except KeyboardInterrupt:
            continue


def _collect(pending: set, progress: Callable[[int], None]) -> int:
    """Wait for at least one batch; account the finished ones; raise the first error."""
    done, _ = wait(pending, return_when=FIRST_COMPLETED)
    total = 0
    for f in done:
        pending.discard(f)
        n = f.result()  # raises the batch's error
        total += n
        try:
            progress(n)
        except Exception:  # noqa: BLE001 - showing progress (a closed pipe, say) must never stop a rollback
            pass
    return total
