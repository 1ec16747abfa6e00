import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fiesnap.model.cowtable import CowTable, Segment
from fiesnap.model.dmtable import DmTarget
from fiesnap.errors import StateError
from fiesnap.model.extents import ChunkRun, ChunkSet

CB = 4096
CS = CB // 512


def test_from_runs_follows_run_order():
    t = CowTable.from_runs([ChunkRun(100, 3), ChunkRun(10, 2)], CB)
    assert t.segments == (Segment(0, 3, 100), Segment(3, 2, 10))
    assert t.total_chunks == 5
    assert t.total_sectors == 5 * CS
    assert t.chunk_sectors == CS
    assert [t.cow_to_phys(c) for c in range(5)] == [100, 101, 102, 10, 11]


def test_from_runs_merges_physically_contiguous_runs():
    t = CowTable.from_runs([ChunkRun(10, 2), ChunkRun(12, 3)], CB)
    assert t.segments == (Segment(0, 5, 10),)


def test_append_runs_keep_existing_addresses():
    t = CowTable.from_runs([ChunkRun(50, 4)], CB)
    t2 = t.append_runs([ChunkRun(60, 1)]).append_runs([ChunkRun(61, 1), ChunkRun(200, 2)])
    assert t2.segments == (
        Segment(0, 4, 50),
        Segment(4, 2, 60),
        Segment(6, 2, 200),
    )
    assert t2.total_chunks == 8
    for c in range(4):
        assert t2.cow_to_phys(c) == t.cow_to_phys(c)
    assert t2.cow_to_phys(4) == 60 and t2.cow_to_phys(7) == 201
    assert t.segments == (Segment(0, 4, 50),)  # immutable


def test_no_holes():
    """An unbacked stretch would be an error target where dm-snapshot may put a metadata area."""
    assert not hasattr(CowTable, "append_hole")
    with pytest.raises(ValueError):
        CowTable(CB, (Segment(0, 2, 10), Segment(2, 1, None)))
    with pytest.raises(StateError):
        CowTable.from_dict({"chunk_bytes": CB, "segments": [
            {"cow_start": 0, "count": 2, "phys_start": 10}, {"cow_start": 2, "count": 1, "phys_start": None}]})


def test_cow_to_phys_out_of_range():
    t = CowTable.from_runs([ChunkRun(0, 2)], CB)
    for c in (-1, 2, 100):
        with pytest.raises(ValueError):
            t.cow_to_phys(c)


def test_store_chunks():
    t = CowTable.from_runs([ChunkRun(100, 3), ChunkRun(10, 2)], CB)
    assert t.store_chunks() == ChunkSet([ChunkRun(10, 2), ChunkRun(100, 3)])
    assert len(t.store_chunks()) == 5


def test_dm_targets():
    t = CowTable.from_runs([ChunkRun(100, 3)], CB).append_runs([ChunkRun(7, 1)])
    assert t.dm_targets("8:16") == [
        DmTarget(0, 3 * CS, "linear", f"8:16 {100 * CS}"),
        DmTarget(3 * CS, CS, "linear", f"8:16 {7 * CS}"),
    ]


def test_empty_table():
    t = CowTable(CB, ())
    assert t.total_chunks == 0 and t.dm_targets("7:0") == [] and len(t.store_chunks()) == 0


@pytest.mark.parametrize(
    "chunk_bytes, segments",
    [
        (1000, (Segment(0, 1, 0),)),
        (256, (Segment(0, 1, 0),)),
        (CB, (Segment(1, 1, 0),)),  # does not start at 0
        (CB, (Segment(0, 2, 0), Segment(3, 1, 10))),  # gap
        (CB, (Segment(0, 2, 0), Segment(1, 1, 10))),  # overlap in COW space
        (CB, (Segment(0, 0, 0),)),  # empty
        (CB, (Segment(0, -1, 0),)),
        (CB, (Segment(0, 2, 10), Segment(2, 2, 11))),  # physical overlap
        (CB, (Segment(0, 2, 10), Segment(2, 6, 5))),  # physical overlap
        (CB, (Segment(0, 1, -1),)),
        (CB, (Segment(0, True, 1),)),
    ],
)
def test_invalid_tables(chunk_bytes, segments):
    with pytest.raises(ValueError):
        CowTable(chunk_bytes, segments)


def test_append_overlapping_run_rejected():
    t = CowTable.from_runs([ChunkRun(10, 5)], CB)
    with pytest.raises(ValueError):
        t.append_runs([ChunkRun(14, 2)])
    with pytest.raises(ValueError):
        t.append_runs([ChunkRun(20, 0)])


def test_dict_round_trip_through_json():
    t = CowTable.from_runs([ChunkRun(100, 3)], CB).append_runs([ChunkRun(7, 1)])
    d = json.loads(json.dumps(t.to_dict()))
    assert CowTable.from_dict(d) == t
    assert CowTable.from_dict(d).to_dict() == t.to_dict()


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"chunk_bytes": CB},
        {"chunk_bytes": "4096", "segments": []},
        {"chunk_bytes": CB, "segments": {}},
        {"chunk_bytes": CB, "segments": [{"cow_start": 0, "count": 1}]},
        {"chunk_bytes": CB, "segments": [{"cow_start": 0, "count": 1, "phys_start": "5"}]},
        {"chunk_bytes": CB, "segments": [{"cow_start": 0, "count": 1, "phys_start": 1.0}]},
        {"chunk_bytes": CB, "segments": [{"cow_start": 1, "count": 1, "phys_start": 1}]},
        {"chunk_bytes": CB, "segments": [{"cow_start": 0, "count": 1, "phys_start": 1, "x": 2}]},
        {"chunk_bytes": 3, "segments": []},
    ],
)
def test_from_dict_rejects_damage(data):
    with pytest.raises(StateError):
        CowTable.from_dict(data)


# A random table: disjoint physical runs in shuffled order, appended in steps.
@st.composite
def tables(draw):
    cb = draw(st.sampled_from([512, 4096, 65536]))
    n = draw(st.integers(0, 8))
    starts = sorted(draw(st.lists(st.integers(0, 1000), min_size=n, max_size=n, unique=True)))
    runs = []
    for i, s in enumerate(starts):
        limit = (starts[i + 1] - s) if i + 1 < len(starts) else 50
        runs.append(ChunkRun(s * 3, draw(st.integers(1, max(1, min(limit * 3, 50))))))
    order = draw(st.permutations(runs))
    t = CowTable(cb, ())
    for r in order:
        t = t.append_runs([r])
    return t


@settings(max_examples=100, deadline=None)
@given(tables())
def test_cow_to_phys_consistent_with_dm_targets(t):
    cs = t.chunk_sectors
    targets = t.dm_targets("7:0")
    # targets tile the device contiguously from sector 0
    pos = 0
    for tg in targets:
        assert tg.start == pos and tg.length > 0 and tg.length % cs == 0
        pos += tg.length
    assert pos == t.total_sectors
    # every COW chunk resolves the same way through both views
    for tg in targets:
        for k in range(tg.length // cs):
            c = tg.start // cs + k
            assert tg.target_type == "linear"
            dev, off = tg.params.split()
            assert dev == "7:0"
            assert t.cow_to_phys(c) == int(off) // cs + k
    backed = [t.cow_to_phys(c) for c in range(t.total_chunks)]
    assert len(backed) == len(set(backed)) == t.total_chunks == len(t.store_chunks())
    assert set(backed) == set(t.store_chunks())
    assert CowTable.from_dict(json.loads(json.dumps(t.to_dict()))) == t


def test_is_span_backed_agrees_with_is_backed_chunk_by_chunk():
    t = CowTable(CB, (Segment(0, 4, 100), Segment(4, 3, 0, "zero"), Segment(7, 5, 200)))
    for first in range(-1, 14):
        for last in range(first, 14):
            want = 0 <= first and all(t.is_backed(c) for c in range(first, last + 1))
            assert t.is_span_backed(first, last) == want, (first, last)
