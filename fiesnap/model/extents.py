"""Extent and chunk arithmetic (pure).

All offsets here are in bytes (Extent) or in chunks of the checkpoint's chunk
size (ChunkRun). Physical chunk N covers device bytes [N*chunk, (N+1)*chunk):
dm-snapshot copies whole origin chunks, so the store may only use chunks that
lie entirely inside the store file (a chunk shared with another file would get
an exception when that file is written, and the merge would overwrite store
data with it).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from fiesnap.errors import FilesystemError
from fiesnap.model.units import SECTOR_BYTES

# Second line of defence behind fiemap.py (which allows only LAST and
# UNWRITTEN): FIEMAP extent flags (linux/fiemap.h) under which `physical` is
# not a private run of device blocks owned by this file alone. Writing the
# store through such an extent would land on the wrong blocks (UNKNOWN 0x2,
# DELALLOC 0x4: no address yet; NOT_ALIGNED 0x100, DATA_INLINE 0x200,
# DATA_TAIL 0x400: metadata blocks) or on another file's data (SHARED 0x2000:
# reflink; ENCODED 0x8). whole_chunks refuses them even if a caller forgot.
UNSAFE_EXTENT_FLAGS = 0x2 | 0x4 | 0x8 | 0x100 | 0x200 | 0x400 | 0x2000

# dm-exception-store.c rejects chunk_size (sectors) > INT_MAX >> SECTOR_SHIFT;
# the largest power of two it accepts is 2**21 sectors.
MAX_CHUNK_BYTES = 2**30


@dataclass(frozen=True)
class Extent:
    """One FIEMAP extent of a file, in bytes."""

    logical: int
    physical: int
    length: int
    flags: int = 0


@dataclass(frozen=True)
class ChunkRun:
    """A run of `count` consecutive physical chunks starting at chunk `start`."""

    start: int
    count: int

    @property
    def end(self) -> int:
        return self.start + self.count


def is_valid_chunk_bytes(chunk_bytes: object) -> bool:
    """True for the chunk sizes dm-snapshot accepts: powers of two, 512 B..1 GiB."""
    return (
        isinstance(chunk_bytes, int)
        and not isinstance(chunk_bytes, bool)
        and SECTOR_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES
        and chunk_bytes & (chunk_bytes - 1) == 0
    )


def require_chunk_bytes(chunk_bytes: int) -> int:
    """Return chunk_bytes, or raise ValueError: a bad chunk size here is a bug
    (user input is validated, with a UsageError, before it gets this far)."""
    if not is_valid_chunk_bytes(chunk_bytes):
        raise ValueError(
            f"chunk size {chunk_bytes!r} is not a power of two between "
            f"{SECTOR_BYTES} and {MAX_CHUNK_BYTES} bytes"
        )
    return chunk_bytes


def whole_chunks(extents: Iterable[Extent], chunk_bytes: int) -> list[ChunkRun]:
    """The physical chunks lying entirely inside the extents, in file order.

    Each extent is trimmed inward to chunk boundaries at both ends. A run is
    merged into the previous one only when it continues it physically
    (prev.end == start), never reordered: the COW address space follows file
    order, so the store's layout is reproducible from its FIEMAP alone.

    Raises FilesystemError for an extent whose flags mean its blocks are not
    this file's own (see UNSAFE_EXTENT_FLAGS) or whose numbers are nonsense:
    mapping such an extent would let the store overwrite someone else's data.
    """
    require_chunk_bytes(chunk_bytes)
    runs: list[ChunkRun] = []
    for ext in extents:
        if ext.flags & UNSAFE_EXTENT_FLAGS:
            raise FilesystemError(
                f"store file extent at offset {ext.logical} has FIEMAP flags "
                f"{ext.flags:#x} (shared, inline, delayed or unknown location): "
                "its blocks cannot be used as a snapshot store"
            )
        if ext.physical < 0 or ext.length <= 0 or ext.logical < 0:
            raise FilesystemError(
                f"store file extent at offset {ext.logical} is invalid "
                f"(physical {ext.physical}, length {ext.length})"
            )
        first = -(-ext.physical // chunk_bytes)  # ceil: skip a partial head
        end = (ext.physical + ext.length) // chunk_bytes  # floor: drop the tail
        if end <= first:
            continue
        if runs and runs[-1].end == first:
            runs[-1] = ChunkRun(runs[-1].start, runs[-1].count + end - first)
        else:
            runs.append(ChunkRun(first, end - first))
    return runs


class ChunkSet:
    """An immutable set of physical chunks, stored as sorted disjoint runs.

    Overlapping or adjacent input runs are allowed and merged (it is a set);
    zero-count runs are ignored. Membership and overlap queries bisect, so
    they stay O(log n) for stores with many fragments.
    """

    __slots__ = ("_starts", "_ends", "_size")

    def __init__(self, runs: Iterable[ChunkRun] = ()) -> None:
        items = []
        for r in runs:
            if r.start < 0 or r.count < 0:
                raise ValueError(f"invalid chunk run {r!r}")
            if r.count:
                items.append((r.start, r.end))
        items.sort()
        starts: list[int] = []
        ends: list[int] = []
        for s, e in items:
            if ends and s <= ends[-1]:
                ends[-1] = max(ends[-1], e)
            else:
                starts.append(s)
                ends.append(e)
        self._starts = tuple(starts)
        self._ends = tuple(ends)
        self._size = sum(e - s for s, e in zip(starts, ends))

    @property
    def runs(self) -> tuple[ChunkRun, ...]:
        return tuple(ChunkRun(s, e - s) for s, e in zip(self._starts, self._ends))

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[int]:
        for s, e in zip(self._starts, self._ends):
            yield from range(s, e)

    def __contains__(self, chunk: object) -> bool:
        return isinstance(chunk, int) and self.contains(chunk)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ChunkSet):
            return NotImplemented
        return self._starts == other._starts and self._ends == other._ends

    def __hash__(self) -> int:
        return hash((self._starts, self._ends))

    def __repr__(self) -> str:
        inner = ", ".join(f"{s}..{e - 1}" for s, e in zip(self._starts, self._ends))
        return f"ChunkSet({inner})"

    def contains(self, chunk: int) -> bool:
        i = bisect_right(self._starts, chunk) - 1
        return i >= 0 and chunk < self._ends[i]

    def contains_any(self, chunks: Iterable[int]) -> bool:
        """True when any of `chunks` is in the set (one call for many lookups)."""
        starts, ends = self._starts, self._ends
        if not starts:
            return False
        lo, hi = starts[0], ends[-1]
        for c in chunks:
            if lo <= c < hi:
                i = bisect_right(starts, c) - 1
                if i >= 0 and c < ends[i]:
                    return True
        return False

    def first_overlap(self, start: int, count: int) -> int | None:
        """The lowest chunk of [start, start+count) in the set, or None."""
        if count <= 0:
            return None
        i = bisect_right(self._starts, start) - 1
        if i >= 0 and self._ends[i] > start:
            return start
        j = i + 1
        if j < len(self._starts) and self._starts[j] < start + count:
            return self._starts[j]
        return None

    def overlaps(self, start: int, count: int) -> bool:
        return self.first_overlap(start, count) is not None


def free_chunks(free_ranges: Iterable[tuple[int, int]], chunk_bytes: int) -> ChunkSet:
    """Whole chunks inside free byte ranges given as (start, length).

    Adjacent or overlapping ranges are joined first, so a chunk covered by
    two neighbouring free ranges (e.g. across a block-group boundary) counts.
    """
    require_chunk_bytes(chunk_bytes)
    spans = sorted((s, s + n) for s, n in free_ranges if n > 0)
    merged: list[list[int]] = []
    for s, e in spans:
        if s < 0:
            raise ValueError(f"negative free range start {s}")
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    runs = []
    for s, e in merged:
        first = -(-s // chunk_bytes)
        end = e // chunk_bytes
        if end > first:
            runs.append(ChunkRun(first, end - first))
    return ChunkSet(runs)


def without_head(extents: Iterable[Extent], nbytes: int) -> list[Extent]:
    """The extents with logical bytes [0, nbytes) cut away, flags kept.

    The store file's first bytes hold its identity header, which must never
    become COW store: feed the result, not the file's extents, to whole_chunks.
    """
    if nbytes < 0:
        raise ValueError(f"negative head size {nbytes}")
    out = []
    for ext in extents:
        cut = min(max(nbytes - ext.logical, 0), ext.length)
        if cut < ext.length:
            out.append(Extent(ext.logical + cut, ext.physical + cut, ext.length - cut, ext.flags))
    return out


def head_location(extents: Iterable[Extent], nbytes: int) -> int:
    """Device byte offset of the file's logical byte 0, whose first `nbytes` are one run.

    The header is read raw from the device in one piece, so it must not
    straddle two runs of blocks (neighbouring extents that continue each
    other physically count as one). Raises FilesystemError otherwise.
    """
    if nbytes <= 0:
        raise ValueError(f"head size {nbytes} is not positive")
    runs = physical_layout(extents)
    if runs and runs[0][0] == 0 and runs[0][2] >= nbytes:
        return runs[0][1]
    raise FilesystemError(
        f"the store file's first {nbytes} bytes are not one contiguous extent: "
        "the filesystem is fragmented there; retry, or choose a larger --size"
    )


def physical_layout(extents: Iterable[Extent]) -> tuple[tuple[int, int, int], ...]:
    """(logical, physical, length) runs, merged where contiguous both ways, flags ignored.

    Writing into an unwritten extent makes FIEMAP split it into a written
    and an unwritten part without moving any block; comparing layouts, not
    extents, tells "blocks moved" apart from "flags changed".
    """
    runs: list[tuple[int, int, int]] = []
    for ext in sorted(extents, key=lambda e: e.logical):
        if runs:
            lg, ph, n = runs[-1]
            if lg + n == ext.logical and ph + n == ext.physical:
                runs[-1] = (lg, ph, n + ext.length)
                continue
        runs.append((ext.logical, ext.physical, ext.length))
    return tuple(runs)
