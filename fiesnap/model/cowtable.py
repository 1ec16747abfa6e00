"""The COW device's address space as an ordered list of segments (pure).

COW chunk c (what dm-snapshot calls new_chunk) lives at a physical chunk of
the filesystem's device, found by walking the store file's extents in file
order. A plain store is backed everywhere. A free-aware store (model/seeding.py)
has a sparse prefix: only its header and seeded metadata areas are backed,
the dummy chunks seeded exceptions point at are a `zero` target, and what the
kernel never touches is `error`. Everything from the data frontier on is
backed, and a store grows by appending backed runs at the end (dm-snapshot
writes a metadata area every so many chunks: a hole where the next area falls
would invalidate the snapshot, so no hole ever follows the prefix).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fiesnap.model.dmtable import DmTarget, error_target, linear, zero_target
from fiesnap.model.units import is_int
from fiesnap.errors import StateError
from fiesnap.model.extents import SECTOR_BYTES, ChunkRun, ChunkSet, require_chunk_bytes



LINEAR, ZERO, ERROR = "linear", "zero", "error"
SEGMENT_KINDS = (LINEAR, ZERO, ERROR)


@dataclass(frozen=True)
class Segment:
    """`count` COW chunks from `cow_start`: on physical chunks from `phys_start`
    (kind linear), or unbacked: reading zeros (zero) or failing (error)."""

    cow_start: int
    count: int
    phys_start: int
    kind: str = LINEAR

    @property
    def cow_end(self) -> int:
        return self.cow_start + self.count

    @property
    def backed(self) -> bool:
        return self.kind == LINEAR


@dataclass(frozen=True)
class CowTable:
    """The COW device: chunk size plus segments covering COW chunks 0..total.

    Invariants (checked on construction, ValueError otherwise): chunk size is
    a power of two of at least 512 bytes; segments start at COW chunk 0 and
    are contiguous with positive counts; unbacked segments have phys_start 0
    and are followed by a backed one (the store's end is always backed); no
    two backed segments share a physical chunk (two COW chunks on one block
    would corrupt each other).
    """

    chunk_bytes: int
    segments: tuple[Segment, ...]
    _cow_starts: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        require_chunk_bytes(self.chunk_bytes)
        segs = tuple(self.segments)
        object.__setattr__(self, "segments", segs)
        pos = 0
        for s in segs:
            if not isinstance(s, Segment):
                raise ValueError(f"not a Segment: {s!r}")
            if not (is_int(s.cow_start) and is_int(s.count)):
                raise ValueError(f"segment fields must be integers: {s!r}")
            if s.cow_start != pos:
                raise ValueError(f"segment {s!r} does not start at COW chunk {pos}")
            if s.count <= 0:
                raise ValueError(f"segment {s!r} has no chunks")
            if not is_int(s.phys_start) or s.phys_start < 0:
                raise ValueError(f"segment {s!r} has an invalid physical start")
            if s.kind not in SEGMENT_KINDS:
                raise ValueError(f"segment {s!r} has an unknown kind")
            if not s.backed and s.phys_start != 0:
                raise ValueError(f"unbacked segment {s!r} names a physical chunk")
            pos = s.cow_end
        if segs and not segs[-1].backed:
            raise ValueError("the store ends in an unbacked segment")
        backed = sorted((s.phys_start, s.phys_start + s.count) for s in segs if s.backed)
        for (_, prev_end), (start, _) in zip(backed, backed[1:]):
            if start < prev_end:
                raise ValueError(
                    f"physical chunk {start} backs more than one COW chunk"
                )
        object.__setattr__(self, "_cow_starts", tuple(s.cow_start for s in segs))

    # -- construction ------------------------------------------------------

    @classmethod
    def from_runs(cls, runs: Iterable[ChunkRun], chunk_bytes: int) -> CowTable:
        """A fully backed table over `runs`, in the given (file) order."""
        return cls(chunk_bytes, ()).append_runs(runs)

    def append_runs(self, runs: Iterable[ChunkRun]) -> CowTable:
        """A new table with `runs` appended at the end of the COW space.

        Existing COW chunks keep their addresses, which is what lets a live
        store grow: the exception table only ever names COW chunks.
        """
        segs = list(self.segments)
        pos = self.total_chunks
        for r in runs:
            if r.count <= 0:
                raise ValueError(f"empty chunk run {r!r}")
            last = segs[-1] if segs else None
            if last is not None and last.backed and last.phys_start + last.count == r.start:
                segs[-1] = Segment(last.cow_start, last.count + r.count, last.phys_start)
            else:
                segs.append(Segment(pos, r.count, r.start))
            pos += r.count
        return CowTable(self.chunk_bytes, tuple(segs))

    # -- queries -----------------------------------------------------------

    @property
    def chunk_sectors(self) -> int:
        return self.chunk_bytes // SECTOR_BYTES

    @property
    def total_chunks(self) -> int:
        return self.segments[-1].cow_end if self.segments else 0

    @property
    def total_sectors(self) -> int:
        return self.total_chunks * self.chunk_sectors

    @property
    def backed_chunks(self) -> int:
        """COW chunks with a physical chunk behind them: the store's real size."""
        return sum(s.count for s in self.segments if s.backed)

    def segment_at(self, cow_chunk: int) -> Segment:
        if not 0 <= cow_chunk < self.total_chunks:
            raise ValueError(
                f"COW chunk {cow_chunk} is outside the store (0..{self.total_chunks - 1})"
            )
        return self.segments[bisect_right(self._cow_starts, cow_chunk) - 1]

    def cow_to_phys(self, cow_chunk: int) -> int:
        """Physical chunk behind a COW chunk; ValueError beyond the store's end or in a hole."""
        seg = self.segment_at(cow_chunk)
        if not seg.backed:
            raise ValueError(f"COW chunk {cow_chunk} is not backed (a {seg.kind} stretch)")
        return seg.phys_start + (cow_chunk - seg.cow_start)

    def is_backed(self, cow_chunk: int) -> bool:
        return 0 <= cow_chunk < self.total_chunks and self.segment_at(cow_chunk).backed

    def is_span_backed(self, first: int, last: int) -> bool:
        """Every COW chunk in [first, last] is backed: one walk over the segments it touches,
        so a table reader can clear a whole metadata area's entries at once."""
        if not 0 <= first <= last < self.total_chunks:
            return False
        i = bisect_right(self._cow_starts, first) - 1
        while i < len(self.segments) and self.segments[i].cow_start <= last:
            if not self.segments[i].backed:
                return False
            i += 1
        return True

    def store_chunks(self) -> ChunkSet:
        """The physical chunks holding the store: a merge must never write these."""
        return ChunkSet(ChunkRun(s.phys_start, s.count) for s in self.segments if s.backed)

    def dm_targets(self, device: str) -> list[DmTarget]:
        """The `NAME-cow` table: a linear target onto `device` per backed segment,
        `zero` or `error` for the others."""
        cs = self.chunk_sectors
        out = []
        for s in self.segments:
            if s.kind == LINEAR:
                out.append(linear(s.cow_start * cs, s.count * cs, device, s.phys_start * cs))
            elif s.kind == ZERO:
                out.append(zero_target(s.cow_start * cs, s.count * cs))
            else:
                out.append(error_target(s.cow_start * cs, s.count * cs))
        return out

    # -- persistence -------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        def seg(s: Segment) -> dict[str, Any]:
            d: dict[str, Any] = {"cow_start": s.cow_start, "count": s.count, "phys_start": s.phys_start}
            if not s.backed:  # a plain store's map (and its checksum) stays as it always was
                d["kind"] = s.kind
            return d
        return {"chunk_bytes": self.chunk_bytes, "segments": [seg(s) for s in self.segments]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CowTable:
        """Inverse of to_dict. Raises StateError for anything malformed: the
        dict comes from a state file on disk, and a damaged one must stop the
        command, not be half-trusted."""
        try:
            chunk_bytes = data["chunk_bytes"]
            raw = data["segments"]
            if not is_int(chunk_bytes) or not isinstance(raw, list):
                raise TypeError("wrong field types")
            segs = []
            for item in raw:
                if set(item) - {"kind"} != {"cow_start", "count", "phys_start"}:
                    raise KeyError("segment fields")
                phys = item["phys_start"]
                if not is_int(phys):
                    raise TypeError("phys_start must be an integer")
                kind = item.get("kind", LINEAR)
                if kind == LINEAR and "kind" in item:
                    raise ValueError("a backed segment is written without a kind")
                segs.append(Segment(item["cow_start"], item["count"], phys, kind))
            return cls(chunk_bytes, tuple(segs))
        except (KeyError, TypeError, ValueError) as e:
            raise StateError(f"saved COW table is malformed ({e}): state file damaged?") from e
