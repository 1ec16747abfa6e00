"""The COW device's address space as an ordered list of segments (pure).

COW chunk c (what dm-snapshot calls new_chunk) lives at a physical chunk of
the filesystem's device, found by walking the store file's extents in file
order. The table has no holes: every COW chunk has a physical chunk behind it. (An
unbacked stretch of COW space would be an `error` target, and dm-snapshot
writes a metadata area every so many chunks: a hole where the next area falls
invalidates the snapshot.) A store grows by appending runs at the end.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fiesnap.model.dmtable import DmTarget, linear
from fiesnap.model.units import is_int
from fiesnap.errors import StateError
from fiesnap.model.extents import SECTOR_BYTES, ChunkRun, ChunkSet, require_chunk_bytes



@dataclass(frozen=True)
class Segment:
    """`count` COW chunks from `cow_start`, on physical chunks from `phys_start`."""

    cow_start: int
    count: int
    phys_start: int

    @property
    def cow_end(self) -> int:
        return self.cow_start + self.count


@dataclass(frozen=True)
class CowTable:
    """The COW device: chunk size plus segments covering COW chunks 0..total.

    Invariants (checked on construction, ValueError otherwise): chunk size is
    a power of two of at least 512 bytes; segments start at COW chunk 0 and
    are contiguous with positive counts and no holes; no two segments share a
    physical chunk (two COW chunks on one block would corrupt each other).
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
            pos = s.cow_end
        backed = sorted((s.phys_start, s.phys_start + s.count) for s in segs)
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
            if last is not None and last.phys_start + last.count == r.start:
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

    def cow_to_phys(self, cow_chunk: int) -> int:
        """Physical chunk behind a COW chunk; ValueError beyond the store's end."""
        if not 0 <= cow_chunk < self.total_chunks:
            raise ValueError(
                f"COW chunk {cow_chunk} is outside the store (0..{self.total_chunks - 1})"
            )
        seg = self.segments[bisect_right(self._cow_starts, cow_chunk) - 1]
        return seg.phys_start + (cow_chunk - seg.cow_start)

    def store_chunks(self) -> ChunkSet:
        """The physical chunks holding the store: a merge must never write these."""
        return ChunkSet(ChunkRun(s.phys_start, s.count) for s in self.segments)

    def dm_targets(self, device: str) -> list[DmTarget]:
        """The `NAME-cow` table: one linear target onto `device` per segment."""
        cs = self.chunk_sectors
        return [linear(s.cow_start * cs, s.count * cs, device, s.phys_start * cs)
                for s in self.segments]

    # -- persistence -------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "chunk_bytes": self.chunk_bytes,
            "segments": [
                {"cow_start": s.cow_start, "count": s.count, "phys_start": s.phys_start}
                for s in self.segments
            ],
        }

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
                if set(item) != {"cow_start", "count", "phys_start"}:
                    raise KeyError("segment fields")
                phys = item["phys_start"]
                if not is_int(phys):
                    raise TypeError("phys_start must be an integer")
                segs.append(Segment(item["cow_start"], item["count"], phys))
            return cls(chunk_bytes, tuple(segs))
        except (KeyError, TypeError, ValueError) as e:
            raise StateError(f"saved COW table is malformed ({e}): state file damaged?") from e
