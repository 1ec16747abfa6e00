"""Which of a grown store file's new chunks may join a live store (pure).

A chunk may become store space only if every block of it was free when the
checkpoint was taken (the recorded FS_IOC_GETFSMAP map) and no exception
names it as an origin chunk. A block that was live at the checkpoint, freed
later and now handed to the store file still holds checkpoint data that was
never saved (freeing writes no data, so nothing was copied): writing store
data there destroys it, and the rollback would restore garbage. A chunk with
an exception would be a merge destination inside the store. Unsafe chunks
stay allocated in the file but are never mapped.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from fiesnap.model.extents import ChunkRun, ChunkSet, Extent, whole_chunks


@dataclass(frozen=True)
class ExtensionPlan:
    """The new store runs (file order) and why the other whole chunks were left out."""

    runs: tuple[ChunkRun, ...]
    added_chunks: int
    live_at_checkpoint: int  # skipped: not entirely free at the checkpoint
    excepted: int  # skipped: free then, but an exception names it
    already_mapped: int  # skipped: already store space (cannot happen; counted, not trusted)

    @property
    def skipped_chunks(self) -> int:
        return self.live_at_checkpoint + self.excepted + self.already_mapped


def new_extents(extents: Iterable[Extent], old_size: int) -> list[Extent]:
    """The parts of the file's extents at logical offsets >= old_size."""
    out = []
    for e in extents:
        end = e.logical + e.length
        if end <= old_size:
            continue
        cut = max(0, old_size - e.logical)
        out.append(Extent(e.logical + cut, e.physical + cut, e.length - cut, e.flags))
    return out


def chunk_set(chunks: Iterable[int]) -> ChunkSet:
    """A ChunkSet from single chunks (e.g. every old_chunk of an exception table)."""
    runs: list[ChunkRun] = []
    for c in sorted(set(chunks)):
        if runs and runs[-1].end == c:
            runs[-1] = ChunkRun(runs[-1].start, runs[-1].count + 1)
        else:
            runs.append(ChunkRun(c, 1))
    return ChunkSet(runs)


def plan_extension(
    grown: Iterable[Extent],
    chunk_bytes: int,
    *,
    free_at_checkpoint: ChunkSet,
    excepted: ChunkSet,
    mapped: ChunkSet,
) -> ExtensionPlan:
    """Safe chunks among the whole chunks of `grown` (the file's new extents)."""
    runs: list[ChunkRun] = []
    live = exc = dup = 0
    for run in whole_chunks(grown, chunk_bytes):
        for c in range(run.start, run.end):
            if c in mapped:
                dup += 1
            elif c not in free_at_checkpoint:
                live += 1
            elif c in excepted:
                exc += 1
            elif runs and runs[-1].end == c:
                runs[-1] = ChunkRun(runs[-1].start, runs[-1].count + 1)
            else:
                runs.append(ChunkRun(c, 1))
    return ExtensionPlan(tuple(runs), sum(r.count for r in runs), live, exc, dup)
