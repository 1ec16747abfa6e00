import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fiesnap.errors import FilesystemError
from fiesnap.model.extents import (
    ChunkRun,
    ChunkSet,
    Extent,
    free_chunks,
    is_valid_chunk_bytes,
    require_chunk_bytes,
    whole_chunks,
)

CB = 4096

# linux/fiemap.h
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNKNOWN = 0x2
FIEMAP_EXTENT_DELALLOC = 0x4
FIEMAP_EXTENT_ENCODED = 0x8
FIEMAP_EXTENT_DATA_ENCRYPTED = 0x80
FIEMAP_EXTENT_NOT_ALIGNED = 0x100
FIEMAP_EXTENT_DATA_INLINE = 0x200
FIEMAP_EXTENT_DATA_TAIL = 0x400
FIEMAP_EXTENT_UNWRITTEN = 0x800
FIEMAP_EXTENT_MERGED = 0x1000
FIEMAP_EXTENT_SHARED = 0x2000


def test_chunk_bytes_validation():
    for ok in (512, 4096, 2**20, 2**30):
        assert is_valid_chunk_bytes(ok)
        assert require_chunk_bytes(ok) == ok
    for bad in (0, 256, 1000, 4097, 2**31, -4096, True, 4096.0, "4096"):
        assert not is_valid_chunk_bytes(bad)
    with pytest.raises(ValueError):
        require_chunk_bytes(3000)


def test_whole_chunks_trims_both_edges():
    # bytes [1000, 1000 + 3*CB): only chunks 1 and 2 lie entirely inside
    assert whole_chunks([Extent(0, 1000, 3 * CB)], CB) == [ChunkRun(1, 2)]


def test_whole_chunks_aligned_extent():
    assert whole_chunks([Extent(0, 8 * CB, 4 * CB)], CB) == [ChunkRun(8, 4)]


def test_whole_chunks_extent_smaller_than_a_chunk_yields_nothing():
    assert whole_chunks([Extent(0, 10 * CB + 1, CB)], CB) == []
    assert whole_chunks([Extent(0, 10 * CB, CB - 1)], CB) == []


def test_whole_chunks_coalesces_only_physically_contiguous():
    exts = [
        Extent(0, 10 * CB, 2 * CB),
        Extent(2 * CB, 12 * CB, 3 * CB),  # continues physically: merged
        Extent(5 * CB, 4 * CB, 1 * CB),  # jumps back: new run, order kept
        Extent(6 * CB, 5 * CB, 1 * CB),  # continues the previous run
    ]
    assert whole_chunks(exts, CB) == [ChunkRun(10, 5), ChunkRun(4, 2)]


def test_whole_chunks_no_merge_across_a_trimmed_gap():
    # two extents that touch physically, but neither edge is chunk-aligned:
    # the chunk straddling the join belongs to both and is used by neither
    exts = [Extent(0, 0, CB + 100), Extent(CB + 100, CB + 100, 2 * CB)]
    assert whole_chunks(exts, CB) == [ChunkRun(0, 1), ChunkRun(2, 1)]


def test_whole_chunks_allows_safe_flags():
    flags = FIEMAP_EXTENT_UNWRITTEN | FIEMAP_EXTENT_LAST | FIEMAP_EXTENT_MERGED | FIEMAP_EXTENT_DATA_ENCRYPTED
    assert whole_chunks([Extent(0, 0, CB, flags)], CB) == [ChunkRun(0, 1)]


@pytest.mark.parametrize(
    "flag",
    [
        FIEMAP_EXTENT_UNKNOWN,
        FIEMAP_EXTENT_DELALLOC,
        FIEMAP_EXTENT_ENCODED,
        FIEMAP_EXTENT_NOT_ALIGNED,
        FIEMAP_EXTENT_DATA_INLINE,
        FIEMAP_EXTENT_DATA_TAIL,
        FIEMAP_EXTENT_SHARED,
    ],
)
def test_whole_chunks_rejects_unsafe_flags(flag):
    with pytest.raises(FilesystemError):
        whole_chunks([Extent(0, 0, CB), Extent(CB, CB, CB, flag)], CB)


@pytest.mark.parametrize("ext", [Extent(0, -CB, CB), Extent(0, 0, 0), Extent(0, 0, -1)])
def test_whole_chunks_rejects_nonsense(ext):
    with pytest.raises(FilesystemError):
        whole_chunks([ext], CB)


def test_whole_chunks_bad_chunk_size():
    with pytest.raises(ValueError):
        whole_chunks([], 1000)


extent_lists = st.lists(
    st.tuples(st.integers(0, 64 * 4), st.integers(1, 16 * 4)), max_size=12
)


@settings(max_examples=150, deadline=None)
@given(raw=extent_lists, cb=st.sampled_from([512, 1024, 4096]))
def test_whole_chunks_properties(raw, cb):
    unit = cb // 4  # sub-chunk granularity, so edges are often unaligned
    exts = []
    logical = 0
    for phys_units, len_units in raw:
        exts.append(Extent(logical, phys_units * unit + 7 * (phys_units % 2), len_units * unit))
        logical += len_units * unit
    runs = whole_chunks(exts, cb)

    # expected: every chunk wholly inside each extent, in file order
    expected = []
    for e in exts:
        for c in range(e.physical // cb, (e.physical + e.length) // cb + 1):
            if c * cb >= e.physical and (c + 1) * cb <= e.physical + e.length:
                expected.append(c)
    got = [c for r in runs for c in range(r.start, r.end)]
    assert got == expected  # inside, maximal, and in file order
    assert all(r.count > 0 for r in runs)
    for a, b in zip(runs, runs[1:]):
        assert a.end != b.start  # contiguous runs would have been merged


def test_chunkset_basics():
    s = ChunkSet([ChunkRun(10, 5), ChunkRun(0, 2), ChunkRun(12, 6), ChunkRun(18, 1), ChunkRun(30, 0)])
    assert s.runs == (ChunkRun(0, 2), ChunkRun(10, 9))
    assert len(s) == 11
    assert s.contains(0) and s.contains(1) and not s.contains(2)
    assert s.contains(18) and not s.contains(19) and not s.contains(-1)
    assert 10 in s and 9 not in s
    assert s.overlaps(2, 8) is False
    assert s.overlaps(2, 9) is True
    assert s.first_overlap(2, 100) == 10
    assert s.first_overlap(11, 3) == 11
    assert s.first_overlap(5, 0) is None
    assert list(ChunkSet([ChunkRun(3, 2)])) == [3, 4]
    assert ChunkSet() == ChunkSet([]) and len(ChunkSet()) == 0
    assert s == ChunkSet(s.runs) and hash(s) == hash(ChunkSet(s.runs))
    with pytest.raises(ValueError):
        ChunkSet([ChunkRun(-1, 2)])


run_lists = st.lists(st.tuples(st.integers(0, 200), st.integers(0, 20)), max_size=15)


@settings(max_examples=150, deadline=None)
@given(raw=run_lists, start=st.integers(0, 230), count=st.integers(0, 40))
def test_chunkset_matches_python_set(raw, start, count):
    s = ChunkSet(ChunkRun(a, n) for a, n in raw)
    ref = {c for a, n in raw for c in range(a, a + n)}
    assert len(s) == len(ref)
    assert set(s) == ref
    for c in range(0, 230):
        assert s.contains(c) == (c in ref)
    window = [c for c in range(start, start + count) if c in ref]
    assert s.overlaps(start, count) == bool(window)
    assert s.first_overlap(start, count) == (min(window) if window else None)
    runs = s.runs
    for a, b in zip(runs, runs[1:]):
        assert a.end < b.start  # sorted, disjoint and not adjacent


def test_free_chunks():
    cb = 4096
    got = free_chunks([(100, 3 * cb), (10 * cb, cb - 1)], cb)
    assert got.runs == (ChunkRun(1, 2),)
    # two adjacent free ranges together cover chunk 5
    assert free_chunks([(5 * cb, 2000), (5 * cb + 2000, cb - 2000)], cb).runs == (ChunkRun(5, 1),)
    # overlapping ranges and empty ones
    assert free_chunks([(0, 2 * cb), (cb, 2 * cb), (50 * cb, 0)], cb).runs == (ChunkRun(0, 3),)
    assert len(free_chunks([], cb)) == 0


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 1500)), max_size=10))
def test_free_chunks_property(ranges):
    cb = 512
    free = {b for s, n in ranges for b in range(s, s + n)}
    got = free_chunks(ranges, cb)
    expected = {c for c in range(0, 5600 // cb + 1) if all(b in free for b in range(c * cb, (c + 1) * cb))}
    assert set(got) == expected
