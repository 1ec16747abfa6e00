"""The safe-chunk rule for growing a live store (pure): blocks freed since the checkpoint and reused must never join the store."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fiesnap.model.extend_plan import chunk_set, new_extents, plan_extension
from fiesnap.model.extents import ChunkRun, ChunkSet, Extent

C = 4096


def test_new_extents_cuts_at_the_old_size():
    ext = [Extent(0, 100 * C, 8 * C), Extent(8 * C, 300 * C, 8 * C, 0x800)]
    assert new_extents(ext, 4 * C) == [Extent(4 * C, 104 * C, 4 * C), Extent(8 * C, 300 * C, 8 * C, 0x800)]
    assert new_extents(ext, 16 * C) == []


def test_only_chunks_free_at_the_checkpoint_and_without_exceptions_join():
    grown = [Extent(0, 10 * C, 20 * C)]  # chunks 10..29
    plan = plan_extension(grown, C,
                          free_at_checkpoint=ChunkSet([ChunkRun(10, 10), ChunkRun(25, 5)]),
                          excepted=chunk_set([12, 13, 27]),
                          mapped=ChunkSet([ChunkRun(29, 1)]))
    assert plan.runs == (ChunkRun(10, 2), ChunkRun(14, 6), ChunkRun(25, 2), ChunkRun(28, 1))
    assert plan.added_chunks == 11
    assert (plan.live_at_checkpoint, plan.excepted, plan.already_mapped) == (5, 3, 1)
    assert plan.skipped_chunks == 9


def test_chunk_set_from_singles():
    assert chunk_set([5, 3, 4, 9, 9]).runs == (ChunkRun(3, 3), ChunkRun(9, 1))


@given(
    extents=st.lists(st.tuples(st.integers(0, 200), st.integers(1, 40)), max_size=6),
    free=st.lists(st.tuples(st.integers(0, 250), st.integers(1, 60)), max_size=6),
    exc=st.lists(st.integers(0, 250), max_size=20),
)
def test_every_added_chunk_is_safe_and_every_chunk_is_accounted(extents, free, exc):
    grown, logical = [], 0
    for start, n in extents:
        grown.append(Extent(logical, start * C, n * C))
        logical += n * C
    free_set = ChunkSet(ChunkRun(s, n) for s, n in free)
    excepted = chunk_set(exc)
    plan = plan_extension(grown, C, free_at_checkpoint=free_set, excepted=excepted, mapped=ChunkSet())
    added = [c for r in plan.runs for c in range(r.start, r.end)]
    assert all(c in free_set and c not in excepted for c in added)
    assert len(added) == plan.added_chunks
    total = sum(n for _s, n in extents)
    assert plan.added_chunks + plan.skipped_chunks == total
