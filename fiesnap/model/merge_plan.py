"""Which COW chunks to copy back where, proven safe before any write (pure).

A rollback copies every saved chunk (COW chunk new_chunk) back over origin
chunk old_chunk. The store lives on the very device being rewritten, so the
plan is refused outright if any destination is one of the store's own
physical chunks: that copy would destroy chunks the merge has yet to read.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from fiesnap.errors import RefusedError, StoreFormatError
from fiesnap.model.exstore import ExceptionTable
from fiesnap.model.extents import ChunkSet, require_chunk_bytes


@dataclass(frozen=True)
class CopyRun:
    """Copy `count` chunks from COW chunk `src_chunk` to device chunk `dest_chunk`."""

    dest_chunk: int
    src_chunk: int
    count: int

    @property
    def dest_end(self) -> int:
        return self.dest_chunk + self.count


@dataclass(frozen=True)
class MergePlan:
    """Copy runs sorted by destination, destinations pairwise disjoint."""

    runs: tuple[CopyRun, ...]
    chunk_bytes: int

    def __post_init__(self) -> None:
        require_chunk_bytes(self.chunk_bytes)
        object.__setattr__(self, "runs", tuple(self.runs))
        prev_end = 0
        for r in self.runs:
            if r.count <= 0 or r.dest_chunk < prev_end or r.src_chunk < 0:
                raise ValueError(f"copy run {r!r} is empty, unsorted or overlapping")
            prev_end = r.dest_end

    @property
    def total_chunks(self) -> int:
        return sum(r.count for r in self.runs)

    @property
    def total_bytes(self) -> int:
        return self.total_chunks * self.chunk_bytes

    def byte_ranges(self, origin_bytes: int) -> Iterator[tuple[int, int, int]]:
        """(dest_offset, src_offset, length) in bytes, clipped to the origin.

        The origin's last chunk may be partial (its size need not be a
        multiple of the chunk size); the COW copy of it is a full chunk, and
        writing all of it would run past the end of the device.
        """
        cb = self.chunk_bytes
        for r in self.runs:
            dest = r.dest_chunk * cb
            if dest >= origin_bytes:
                raise RefusedError(
                    f"merge would write device chunk {r.dest_chunk}, beyond the "
                    f"end of the {origin_bytes}-byte device"
                )
            length = min(r.count * cb, origin_bytes - dest)
            yield dest, r.src_chunk * cb, length


def plan_merge(
    table: ExceptionTable,
    *,
    forbidden: ChunkSet,
    max_run_chunks: int = 256,
) -> MergePlan:
    """Turn a validated exception table into copy runs, sorted by destination.

    Entries are coalesced while both destination and source stay consecutive,
    up to max_run_chunks per run. Before returning, every destination is
    checked against `forbidden` (the store's own physical chunks); the first
    hit raises RefusedError naming the chunk. (Sources need no such check: the
    exception table was validated against the store's size, and the store
    has no holes.) Every exception ends up in exactly one run.
    """
    if max_run_chunks < 1:
        raise ValueError(f"max_run_chunks must be at least 1, not {max_run_chunks}")
    runs: list[CopyRun] = []
    # Entries are (old, new) tuples: sorting them sorts by origin chunk, in C.
    ordered = sorted(table.entries)
    dest = src = count = prev_old = -1
    for old, new in ordered:
        if old == prev_old:
            raise StoreFormatError(
                f"origin chunk {old} has two saved copies; refusing to merge"
            )
        prev_old = old
        if count > 0 and count < max_run_chunks and dest + count == old and src + count == new:
            count += 1
            continue
        if count > 0:
            runs.append(CopyRun(dest, src, count))
        dest, src, count = old, new, 1
    if count > 0:
        runs.append(CopyRun(dest, src, count))

    for r in runs:
        hit = forbidden.first_overlap(r.dest_chunk, r.count)
        if hit is not None:
            raise RefusedError(
                f"merge would overwrite device chunk {hit}, which holds the snapshot "
                "store itself; refusing (nothing was written): this store cannot be rolled back "
                "safely (please report it); 'fiesnap commit' keeps the current data"
            )
    return MergePlan(tuple(runs), table.chunk_bytes)


@dataclass(frozen=True)
class CopyWrite:
    """Write `length` bytes from `buf_offset` of a batch's buffer to device byte `dest`."""

    dest: int
    buf_offset: int
    length: int


@dataclass(frozen=True)
class ReadBatch:
    """One read of the store, `length` bytes from store byte `src`, and the writes it feeds
    (sorted by destination)."""

    src: int
    length: int
    writes: tuple[CopyWrite, ...]

    @property
    def write_bytes(self) -> int:
        return sum(w.length for w in self.writes)


def plan_batches(ranges: Sequence[tuple[int, int, int]], *, max_read_bytes: int,
                 max_gap_bytes: int) -> tuple[ReadBatch, ...]:
    """Group (dest, src, length) copies into reads of the store in its own order.

    The store's chunks were allocated in write order, so the copies of a rollback are
    scattered over the device but mostly contiguous in the store: reading the store in order,
    in reads of up to `max_read_bytes` that may step over gaps of up to `max_gap_bytes`
    (metadata areas, chunks another run holds), turns thousands of small reads into a few
    large ones. Every copy lands in exactly one batch, whole.
    """
    if max_read_bytes <= 0 or max_gap_bytes < 0:
        raise ValueError("max_read_bytes must be positive and max_gap_bytes not negative")
    batches: list[ReadBatch] = []
    start = end = -1
    writes: list[CopyWrite] = []

    def flush() -> None:
        if writes:
            batches.append(ReadBatch(start, end - start, tuple(sorted(writes, key=lambda w: w.dest))))

    for dest, src, length in sorted(ranges, key=lambda r: r[1]):
        if writes and start <= src and src - end <= max_gap_bytes and src + length - start <= max_read_bytes:
            writes.append(CopyWrite(dest, src - start, length))
            end = max(end, src + length)
            continue
        flush()
        start, end, writes = src, src + length, [CopyWrite(dest, 0, length)]
    flush()
    return tuple(batches)

