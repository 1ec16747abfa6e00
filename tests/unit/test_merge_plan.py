import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fiesnap.errors import RefusedError, StoreFormatError
from fiesnap.model.exstore import (
    CowException,
    ExceptionTable,
    allocate_new_chunks,
    encode_store,
    read_exception_table,
)
from fiesnap.model.extents import ChunkRun, ChunkSet
from fiesnap.model.merge_plan import CopyRun, MergePlan, plan_merge

CB = 4096
NOTHING = ChunkSet()


def table(pairs, cb=CB):
    entries = tuple(CowException(o, n) for o, n in pairs)
    return ExceptionTable(cb, entries, areas_read=1, next_free=max([n for _, n in pairs] + [1]) + 1)


def test_coalesces_consecutive_dest_and_src():
    t = table([(10, 2), (11, 3), (12, 4), (20, 5), (21, 7), (13, 6)])
    plan = plan_merge(t, forbidden=NOTHING)
    assert plan.runs == (CopyRun(10, 2, 3), CopyRun(13, 6, 1), CopyRun(20, 5, 1), CopyRun(21, 7, 1))
    assert plan.total_chunks == 6 and plan.total_bytes == 6 * CB and plan.chunk_bytes == CB


def test_sorted_by_destination_regardless_of_table_order():
    t = table([(30, 2), (10, 3), (20, 4)])
    assert [r.dest_chunk for r in plan_merge(t, forbidden=NOTHING).runs] == [10, 20, 30]


def test_run_length_cap():
    t = table([(100 + i, 2 + i) for i in range(10)])
    plan = plan_merge(t, forbidden=NOTHING, max_run_chunks=4)
    assert plan.runs == (CopyRun(100, 2, 4), CopyRun(104, 6, 4), CopyRun(108, 10, 2))
    with pytest.raises(ValueError):
        plan_merge(t, forbidden=NOTHING, max_run_chunks=0)


def test_empty_table_gives_empty_plan():
    plan = plan_merge(table([]), forbidden=NOTHING)
    assert plan.runs == () and plan.total_chunks == 0 and plan.total_bytes == 0


def test_refuses_to_write_into_the_store():
    t = table([(10, 2), (11, 3), (12, 4), (50, 5)])
    with pytest.raises(RefusedError, match="device chunk 12"):
        plan_merge(t, forbidden=ChunkSet([ChunkRun(12, 30)]))
    with pytest.raises(RefusedError, match="device chunk 50"):
        plan_merge(t, forbidden=ChunkSet([ChunkRun(13, 30), ChunkRun(50, 1)]))
    # touching the store's edges is fine
    plan_merge(t, forbidden=ChunkSet([ChunkRun(13, 37), ChunkRun(0, 10)]))


def test_duplicate_destination_refused():
    with pytest.raises(StoreFormatError):
        plan_merge(table([(10, 2), (10, 3)]), forbidden=NOTHING)


def test_merge_plan_validation():
    with pytest.raises(ValueError):
        MergePlan((CopyRun(10, 2, 2), CopyRun(11, 9, 1)), CB)  # overlapping dests
    with pytest.raises(ValueError):
        MergePlan((CopyRun(10, 2, 0),), CB)
    with pytest.raises(ValueError):
        MergePlan((), 1000)


def test_byte_ranges_clip_partial_last_chunk():
    plan = MergePlan((CopyRun(0, 2, 2), CopyRun(9, 7, 1)), CB)
    origin_bytes = 9 * CB + 1000  # last chunk (9) is partial
    assert list(plan.byte_ranges(origin_bytes)) == [(0, 2 * CB, 2 * CB), (9 * CB, 7 * CB, 1000)]
    with pytest.raises(RefusedError):
        list(plan.byte_ranges(9 * CB))


def test_from_real_store_bytes():
    cb = 512
    olds = [7, 8, 9, 3, 100, 101]
    chunks = encode_store(cb, olds)
    t = read_exception_table(chunks.__getitem__, cow_chunks=40, origin_chunks=200, chunk_bytes=cb)
    plan = plan_merge(t, forbidden=ChunkSet([ChunkRun(150, 40)]))
    # allocation: 7->2, 8->3, 9->4, 3->5, 100->6, 101->7
    assert plan.runs == (CopyRun(3, 5, 1), CopyRun(7, 2, 3), CopyRun(100, 6, 2))


@st.composite
def tables_and_forbidden(draw):
    n = draw(st.integers(0, 120))
    olds = draw(st.lists(st.integers(0, 400), min_size=n, max_size=n, unique=True))
    if draw(st.booleans()):
        olds.sort()  # long runs, like a sequential overwrite
    news = allocate_new_chunks(n, 512)
    if draw(st.booleans()):
        news = draw(st.permutations(news))  # out-of-order commits
    t = ExceptionTable(512, tuple(map(CowException, olds, news)), n // 32 + 1, 0)
    spans = draw(st.lists(st.tuples(st.integers(0, 450), st.integers(0, 20)), max_size=3))
    forb = ChunkSet(ChunkRun(s, c) for s, c in spans)
    cap = draw(st.integers(1, 40))
    return t, forb, cap


@settings(max_examples=150, deadline=None)
@given(tables_and_forbidden())
def test_plan_properties(args):
    t, forb, cap = args
    hits = [e.old_chunk for e in t.entries if forb.contains(e.old_chunk)]
    if hits:
        with pytest.raises(RefusedError) as ei:
            plan_merge(t, forbidden=forb, max_run_chunks=cap)
        assert f"device chunk {min(hits)}," in str(ei.value)
        return
    plan = plan_merge(t, forbidden=forb, max_run_chunks=cap)
    expanded = [(r.dest_chunk + k, r.src_chunk + k) for r in plan.runs for k in range(r.count)]
    # every exception exactly once, nothing invented
    assert sorted(expanded) == sorted((e.old_chunk, e.new_chunk) for e in t.entries)
    assert len(expanded) == len(t.entries) == plan.total_chunks
    # sorted by destination, runs within cap, no destination in the store
    assert [d for d, _ in expanded] == sorted(d for d, _ in expanded)
    assert all(1 <= r.count <= cap for r in plan.runs)
    assert not any(forb.overlaps(r.dest_chunk, r.count) for r in plan.runs)
    # maximal under the cap: a run is only split when it had to be
    for a, b in zip(plan.runs, plan.runs[1:]):
        if a.dest_end == b.dest_chunk and a.src_chunk + a.count == b.src_chunk:
            assert a.count == cap


