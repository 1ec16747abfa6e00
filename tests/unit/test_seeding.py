"""The free-aware store (model/seeding.py) and what it changed around it.

The store only works if the *kernel* reads it as designed, and nothing in
fiesnap runs the kernel's table loader. So the first part of this file is a
small, independent model of dm-snapshot's loader (read_exceptions in
drivers/md/dm-snap-persistent.c, dm_insert_exception in dm-snap.c), and the
properties are asserted against what that model sees, not against the
implementation's own description of itself:

* the kernel's first data chunk is area K + 1: data never lands in the dummy
  region, an `error` hole or a seeded area;
* every seeded entry points into the `zero` dummy region, and everything the
  kernel reads or writes (header, areas, data) is backed;
* a seeded run costs one in-core exception per 256-chunk window, and never
  overflows the kernel's 8-bit consecutive count (a BUG_ON);
* the seeded chunks are exactly choose_seeded's, all free, largest runs first.

Then: fiesnap's own reader (read_exception_table) on a seeded store with real
exceptions after the seeded ones, the COW table's unbacked segments, the
record, and the status numbers.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fiesnap.errors import FilesystemError, StateError, StoreFormatError
from fiesnap.model.cowtable import ERROR, LINEAR, ZERO, CowTable, Segment
from fiesnap.model.dmtable import DmTarget
from fiesnap.model.exstore import (
    DISK_VERSION,
    SNAP_MAGIC,
    CowException,
    area_location,
    check_seeded_areas,
    is_metadata_chunk,
    read_exception_table,
)
from fiesnap.model.extents import ChunkRun, ChunkSet, Extent
from fiesnap.model.record import CheckpointRecord
from fiesnap.model.seeding import (
    MAX_SEEDED_AREAS,
    WINDOW,
    SeedLayout,
    SeedPlan,
    areas_for,
    choose_seeded,
    copy_runs,
    correct_seeding,
    difference,
    encode_seeded_store,
    plan_seeding,
    seeded_cow_table,
    seeded_entries,
)
from fiesnap.model.snapstatus import SnapshotUsage

MiB = 1 << 20
CB = 4096  # the smallest chunk a free-aware store accepts: 256 entries per area
EPA = 256
ORIGIN = 20_000  # origin chunks: free sets are drawn below this
STORE_BASE = 10**6  # physical chunks of the store file: far from any free chunk
_ENTRY = struct.Struct("<QQ")


# =========================================================================
# An independent model of the kernel loading a persistent store
# =========================================================================


@dataclass
class KernelView:
    """What dm-snapshot knows after read_exceptions: the entries in table order,
    where it allocates the next data chunk, and where it appends the next entry."""

    entries: list[tuple[int, int]]
    next_free: int
    current_area: int
    current_committed: int


def kernel_read_exceptions(disk: dict[int, bytes], cb: int) -> KernelView:
    """persistent_read_metadata -> read_exceptions -> insert_exceptions, on {cow_chunk: bytes}.

    A chunk the loader needs but the dict lacks is a KeyError: on a real
    store it would be stale data, so the test must fail.
    """
    epa = cb // 16
    stride = epa + 1
    magic, valid, version, chunk_sectors = struct.unpack_from("<IIII", disk[0])
    # magic 0 would make the kernel format a *new* store, dropping every seeded entry
    assert (magic, valid, version, chunk_sectors) == (SNAP_MAGIC, 1, DISK_VERSION, cb // 512)
    next_free = 2  # NUM_SNAPSHOT_HDR_CHUNKS + 1
    entries: list[tuple[int, int]] = []
    area = 0
    while True:
        buf = disk[1 + stride * area]
        assert len(buf) == cb
        committed = None
        for i in range(epa):
            old, new = _ENTRY.unpack_from(buf, 16 * i)
            if new == 0:
                committed = i
                break
            if next_free <= new:
                next_free = new + 1
            entries.append((old, new))
        if committed is not None:
            break
        area += 1
    if next_free % stride == 1:  # skip_metadata
        next_free += 1
    return KernelView(entries, next_free, area, committed)


def kernel_in_core(entries: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """dm_insert_exception into the complete table (hash_shift 8): returns
    (old, new, consecutive) per in-core exception, grouped by `old >> 8` and
    kept ordered by old chunk in each group, as the kernel does."""
    buckets: dict[int, list[list[int]]] = {}
    for old, new in entries:
        lst = buckets.setdefault(old >> 8, [])
        for i, e in enumerate(lst):
            if old == e[0] + e[2] + 1 and new == e[1] + e[2] + 1:  # insert after
                e[2] += 1
                break
            if old == e[0] - 1 and new == e[1] - 1:  # insert before
                e[0] -= 1
                e[1] -= 1
                e[2] += 1
                break
            if old < e[0]:
                lst.insert(i, [old, new, 0])
                break
        else:
            lst.append([old, new, 0])
        # dm_consecutive_chunk_count_inc: BUG_ON when the 8-bit count wraps
        assert all(e[2] <= 255 for e in lst)
    return [tuple(e) for lst in buckets.values() for e in lst]


def kernel_allocate(next_free: int, n: int, cb: int) -> list[int]:
    """persistent_prepare_exception n times from `next_free`."""
    stride = cb // 16 + 1
    out = []
    for _ in range(n):
        out.append(next_free)
        next_free += 1
        if next_free % stride == 1:
            next_free += 1
    return out


def window_pieces(chosen: ChunkSet) -> list[tuple[int, int]]:
    """(start, count) of the chosen runs cut at every 256-chunk window boundary."""
    out = []
    for r in chosen.runs:
        s = r.start
        while s < r.end:
            e = min(r.end, (s // WINDOW + 1) * WINDOW)
            out.append((s, e - s))
            s = e
    return out


# =========================================================================
# Strategies and builders
# =========================================================================


@st.composite
def free_sets(draw, limit: int = ORIGIN, min_size: int = 1):
    """A random checkpoint-time free set: overlapping, adjacent and lone runs."""
    runs = draw(st.lists(st.tuples(st.integers(0, limit - 1), st.integers(1, 700)),
                         min_size=min_size, max_size=25))
    return ChunkSet(ChunkRun(s, min(n, limit - s)) for s, n in runs)


@st.composite
def store_runs(draw, total: int):
    """The store file's whole chunks in file order: `total` chunks cut into 1..4
    physically disjoint runs, not necessarily in physical order."""
    cuts = sorted(draw(st.lists(st.integers(1, total - 1), max_size=3, unique=True))) if total > 1 else []
    sizes = [b - a for a, b in zip([0] + cuts, cuts + [total])]
    runs, pos = [], STORE_BASE
    for n in sizes:
        pos += draw(st.integers(0, 3))  # 0: continues the previous run physically
        runs.append(ChunkRun(pos, n))
        pos += n
    return draw(st.permutations(runs))


def byte_ranges(free: ChunkSet, cb: int) -> list[tuple[int, int]]:
    return [(r.start * cb, r.count * cb) for r in free.runs]


def decode(raw: bytes) -> list[tuple[int, int]]:
    return list(_ENTRY.iter_unpack(raw))


def plain_runs(layout: SeedLayout, data_chunks: int) -> list[ChunkRun]:
    """A store file in one extent: the prefix's backed chunks, then `data_chunks`."""
    return [ChunkRun(STORE_BASE, len(layout.prefix_backed()) + data_chunks)]


# =========================================================================
# 1. The kernel loads a seeded store as designed
# =========================================================================


@settings(max_examples=60, deadline=None)
@given(data=st.data(), cb=st.sampled_from([4096, 16384, 65536]))
def test_the_kernel_loads_a_seeded_store_as_designed(data, cb):
    """Everything the kernel reads back from a freshly seeded store, against the layout and COW table."""
    free = data.draw(free_sets())
    areas = data.draw(st.one_of(st.integers(1, 4), st.just(max(1, areas_for(len(free), cb)))))
    layout = SeedLayout(cb, areas)
    plan = plan_seeding(byte_ranges(free, cb), layout)
    extra = data.draw(st.integers(2, 3 * layout.per_area))
    runs = data.draw(store_runs(len(layout.prefix_backed()) + extra))
    table = seeded_cow_table(runs, layout)
    disk = plan.metadata()

    k = kernel_read_exceptions(disk, cb)

    # the seeded chunks: choose_seeded's, all free, as many as fit
    olds = [o for o, _ in k.entries]
    assert olds == sorted(set(olds)), "one entry per seeded chunk, in origin order"
    assert ChunkSet(ChunkRun(o, 1) for o in olds) == plan.chosen == choose_seeded(free, layout.capacity)
    assert all(o in free for o in olds)
    assert len(olds) == plan.count == min(len(free), layout.capacity)
    assert k.entries == decode(plan.entries)

    # data starts right after area K: never in the dummy region, a hole or before area K
    assert k.next_free == layout.data_start + 1
    assert table.is_backed(k.next_free)

    # every seeded entry points at a `zero` dummy chunk
    for _, new in k.entries:
        assert layout.dummy_start <= new < layout.data_start
        assert table.segment_at(new).kind == ZERO
        assert not is_metadata_chunk(new, cb)

    # what the kernel reads and where it appends is backed; fiesnap writes only there
    assert set(disk) == {0, layout.data_start} | {area_location(a, cb) for a in range(areas)}
    assert all(table.is_backed(c) and len(b) == cb for c, b in disk.items())
    assert k.current_area <= areas
    assert table.is_backed(area_location(k.current_area, cb))

    # the table uses every chunk of the store file exactly once, and fits the layout
    assert table.store_chunks() == ChunkSet(runs)
    assert table.backed_chunks == sum(r.count for r in runs)
    assert table.total_chunks == layout.data_start + extra
    layout.check_table(table)  # no ValueError

    # in-core: one exception per (run, window) piece; the last entry, moved to the
    # region's end, stands alone unless it already was there or alone
    pieces = window_pieces(plan.chosen)
    last = plan.chosen.runs[-1].end - 1
    alone = last % WINDOW != WINDOW - 1 and pieces[-1][1] > 1
    assert len(kernel_in_core(k.entries)) == len(pieces) + alone


@settings(max_examples=40, deadline=None)
@given(data=st.data(), cb=st.sampled_from([4096, 16384]))
def test_the_kernel_saving_chunks_after_seeding_stays_in_backed_chunks(data, cb):
    """Follow the kernel saving m chunks after the load: every data chunk and every
    metadata area it writes is backed, and an area is never written beyond the data
    frontier (the store grows only at its end)."""
    free = data.draw(free_sets())
    layout = SeedLayout(cb, data.draw(st.integers(1, 3)))
    plan = plan_seeding(byte_ranges(free, cb), layout)
    m = data.draw(st.integers(1, 3 * layout.per_area + 5))
    k = kernel_read_exceptions(plan.metadata(), cb)
    news = kernel_allocate(k.next_free, m + 1, cb)
    table = seeded_cow_table(plain_runs(layout, news[-1] - layout.data_start + 1), layout)
    epa = layout.per_area
    for i, new in enumerate(news[:-1]):
        assert new > layout.data_start and not is_metadata_chunk(new, cb) and table.is_backed(new)
        slot = plan.count + i  # the kernel appends after what it read
        assert table.is_backed(area_location(slot // epa, cb))
        if (slot + 1) % epa == 0:  # full: the kernel zeroes the next area first
            nxt = area_location(slot // epa + 1, cb)
            assert table.is_backed(nxt) and nxt < news[i + 1]


@pytest.mark.parametrize("cb", [4096, 16384, 65536])
@pytest.mark.parametrize("n", [1, 2, 5, 16])
def test_an_aligned_free_region_is_one_in_core_exception_per_window(cb, n):
    """N*256 free chunks on a window boundary cost the kernel N exceptions, not N*256."""
    free = ChunkSet([ChunkRun(7 * WINDOW, n * WINDOW)])
    layout = SeedLayout(cb, areas_for(len(free), cb))
    plan = plan_seeding(byte_ranges(free, cb), layout)
    assert plan.chosen == free
    k = kernel_read_exceptions(plan.metadata(), cb)
    core = kernel_in_core(k.entries)
    assert len(core) == n
    assert sorted((o, c + 1) for o, _, c in core) == [(7 * WINDOW + w * WINDOW, WINDOW) for w in range(n)]
    assert all(new == layout.dummy_start for _, new, _ in core)


def test_an_unaligned_run_costs_one_exception_per_window_it_touches_plus_the_last():
    """A run over three windows: three pieces, and its last chunk moved to D+255."""
    free = ChunkSet([ChunkRun(7 * WINDOW + 100, 2 * WINDOW)])
    layout = SeedLayout(CB, 3)
    plan = plan_seeding(byte_ranges(free, CB), layout)
    k = kernel_read_exceptions(plan.metadata(), CB)
    d = layout.dummy_start
    assert k.entries[-1] == (9 * WINDOW + 99, d + WINDOW - 1)
    assert sorted(kernel_in_core(k.entries)) == [
        (7 * WINDOW + 100, d + 100, WINDOW - 100 - 1),
        (8 * WINDOW, d, WINDOW - 1),
        (9 * WINDOW, d, 98),
        (9 * WINDOW + 99, d + WINDOW - 1, 0),
    ]


def test_a_single_free_chunk_still_pushes_data_past_the_dummy_region():
    """The last entry always names D+255, whatever its window offset."""
    layout = SeedLayout(CB, 1)
    plan = plan_seeding([(5 * CB, CB)], layout)
    assert decode(plan.entries) == [(5, layout.data_start - 1)]
    assert kernel_read_exceptions(plan.metadata(), CB).next_free == layout.data_start + 1


@pytest.mark.parametrize("filled", ["one entry short", "exactly", "exactly one area"])
def test_the_table_ends_where_the_kernel_expects_it(filled):
    """Full seeded areas continue into a zeroed next area; a partial one ends in place."""
    layout = SeedLayout(CB, 2)
    n = {"one entry short": 2 * EPA - 1, "exactly": 2 * EPA, "exactly one area": EPA}[filled]
    plan = plan_seeding([(0, n * CB)], layout)
    k = kernel_read_exceptions(plan.metadata(), CB)
    assert len(k.entries) == n
    assert (k.current_area, k.current_committed) == divmod(n, EPA)
    assert k.next_free == layout.data_start + 1


# -- choose_seeded -------------------------------------------------------------


def test_choose_seeded_takes_the_largest_runs_first():
    free = ChunkSet([ChunkRun(0, 10), ChunkRun(1000, 300), ChunkRun(5000, 50), ChunkRun(2000, 300)])
    assert choose_seeded(free, 620) == ChunkSet([ChunkRun(1000, 300), ChunkRun(2000, 300), ChunkRun(5000, 20)])
    assert choose_seeded(free, 10_000) == free
    assert len(choose_seeded(free, 0)) == 0


@settings(max_examples=150, deadline=None)
@given(free=free_sets(min_size=0), capacity=st.integers(0, 3000))
def test_choose_seeded_properties(free, capacity):
    """A subset of the free set, as large as allowed, never a smaller run before a larger one,
    at most one run cut, and the same answer every time (the merge recomputes it)."""
    chosen = choose_seeded(free, capacity)
    assert all(c in free for c in chosen)
    assert len(chosen) == min(len(free), capacity)
    assert choose_seeded(free, capacity) == chosen
    runs = free.runs
    taken = {r: sum(1 for c in range(r.start, r.end) if c in chosen) for r in runs}
    assert sum(1 for r in runs if 0 < taken[r] < r.count) <= 1
    for big in runs:
        for small in runs:
            if big.count > small.count and taken[small]:
                assert taken[big] == big.count


# -- layout, sizing, encoding ---------------------------------------------------


def test_layout_geometry():
    """Area K is data_start, the dummy region is the 256 chunks before it, after area K-1."""
    lay = SeedLayout(CB, 2)
    assert (lay.per_area, lay.capacity, lay.data_start, lay.dummy_start) == (256, 512, 515, 259)
    assert lay.prefix_backed() == [0, 1, 258]
    assert lay.prefix_segments() == [(0, 2, LINEAR), (2, 256, ERROR), (258, 1, LINEAR), (259, 256, ZERO)]
    assert lay.is_dummy(259) and lay.is_dummy(514) and not lay.is_dummy(258) and not lay.is_dummy(515)
    big = SeedLayout(16384, 1)  # 1024 entries per area: an error gap between area 0 and the dummies
    assert big.prefix_segments() == [(0, 2, LINEAR), (2, 1024 - 256, ERROR), (1026 - 256, 256, ZERO)]
    for cb in (4096, 16384, 65536):
        for k in (1, 2, 7):
            lay = SeedLayout(cb, k)
            assert lay.dummy_start > area_location(k - 1, cb)
            assert lay.data_start == area_location(k, cb)
            segs = lay.prefix_segments()
            assert segs[0][0] == 0 and sum(n for _, n, _ in segs) == lay.data_start
            assert [s + n for s, n, _ in segs[:-1]] == [s for s, _, _ in segs[1:]]


@pytest.mark.parametrize("cb, areas", [(2048, 1), (512, 1), (CB, 0), (CB, -1)])
def test_layout_refuses_what_cannot_work(cb, areas):
    """Under 256 entries per area a window's dummies would not fit one area's data gap."""
    with pytest.raises(ValueError):
        SeedLayout(cb, areas)


def test_areas_for():
    """One area per epa free chunks, one spare, capped; none for nothing."""
    assert areas_for(0, CB) == 0 and areas_for(-5, CB) == 0
    assert areas_for(1, CB) == 2 and areas_for(256, CB) == 2 and areas_for(257, CB) == 3
    assert areas_for(1024, 16384) == 2
    assert areas_for(10**9, CB) == MAX_SEEDED_AREAS
    assert areas_for(10**6, CB, max_areas=5) == 5


def test_encode_seeded_store_refuses_nothing_or_too_much():
    lay = SeedLayout(CB, 1)
    with pytest.raises(ValueError):
        encode_seeded_store(b"", lay)
    with pytest.raises(ValueError):
        encode_seeded_store(_ENTRY.pack(1, 2) * (EPA + 1), lay)
    with pytest.raises(ValueError):
        encode_seeded_store(b"\1" * 15, lay)
    assert len(encode_seeded_store(_ENTRY.pack(1, 2) * EPA, lay)) == 3  # header, area 0, area 1


def test_plan_seeding_uses_whole_free_chunks_only_and_refuses_the_store_file():
    lay = SeedLayout(CB, 1)
    plan = plan_seeding([(CB + 1, 3 * CB), (10 * CB, CB - 1)], lay)
    assert plan.chosen == ChunkSet([ChunkRun(2, 2)]) and plan.count == 2
    assert plan_seeding([], lay).count == 0
    with pytest.raises(ValueError, match="chunk 3 is both free and part of the store file"):
        plan_seeding([(0, 10 * CB)], lay, store=ChunkSet([ChunkRun(3, 4)]))


def test_seeded_entries_empty_and_ordered():
    lay = SeedLayout(CB, 1)
    assert seeded_entries(ChunkSet(), lay) == b""
    got = decode(seeded_entries(ChunkSet([ChunkRun(300, 2), ChunkRun(3, 1)]), lay))
    assert got == [(3, lay.dummy_start + 3), (300, lay.dummy_start + 44), (301, lay.data_start - 1)]


def test_seeded_cow_table_refuses_a_file_without_data_space():
    lay = SeedLayout(CB, 2)
    with pytest.raises(ValueError):
        seeded_cow_table([ChunkRun(STORE_BASE, 3)], lay)  # header + 2 areas, no data
    with pytest.raises(ValueError):
        seeded_cow_table([ChunkRun(STORE_BASE, 2)], lay)


# =========================================================================
# 2. fiesnap's reader on a seeded store with real exceptions
# =========================================================================


def put_entry(disk: dict[int, bytes], cb: int, index: int, old: int, new: int) -> None:
    """Write table entry number `index` (areas in order), as the kernel lays them out."""
    epa = cb // 16
    loc = area_location(index // epa, cb)
    buf = bytearray(disk.get(loc, bytes(cb)))
    _ENTRY.pack_into(buf, (index % epa) * 16, old, new)
    disk[loc] = bytes(buf)


@dataclass
class SeededStore:
    layout: SeedLayout
    plan: SeedPlan
    table: CowTable
    disk: dict[int, bytes]
    real: list[CowException]


def seeded_store(free: ChunkSet, n_real: int, *, cb: int = CB, areas: int = 2) -> SeededStore:
    """A seeded store after the kernel saved `n_real` chunks: real entries follow the
    seeded ones in the same and later areas, their data from area K + 1 on."""
    layout = SeedLayout(cb, areas)
    plan = plan_seeding(byte_ranges(free, cb), layout)
    disk = plan.metadata()
    olds = [c for c in range(ORIGIN) if c not in plan.chosen][:n_real]
    news = kernel_allocate(layout.data_start + 1, n_real + 1, cb)
    real = [CowException(o, w) for o, w in zip(olds, news)]
    for i, e in enumerate(real):
        put_entry(disk, cb, plan.count + i, e.old_chunk, e.new_chunk)
    end = plan.count + n_real
    if end % layout.per_area == 0:  # the kernel zeroed the area after a full one
        disk.setdefault(area_location(end // layout.per_area, cb), bytes(cb))
    table = seeded_cow_table(plain_runs(layout, news[-1] - layout.data_start + 8), layout)
    return SeededStore(layout, plan, table, disk, real)


def read_seeded(s: SeededStore, *, table: CowTable | None = None):
    table = table or s.table

    def read_chunk(n: int) -> bytes:
        assert table.is_backed(n), f"the reader read COW chunk {n}, which is not backed"
        if n in s.disk:
            return s.disk[n]
        return bytes((n * 7 + i) % 251 + 1 for i in range(s.layout.chunk_bytes))  # stale data

    return read_exception_table(
        read_chunk, cow_chunks=table.total_chunks, origin_chunks=ORIGIN,
        chunk_bytes=s.layout.chunk_bytes, seeded=s.plan.entries, seeded_old=s.plan.chosen,
        data_start=s.layout.data_start, is_backed=table.is_backed)


FREE_300 = ChunkSet([ChunkRun(1000, 300)])


@pytest.mark.parametrize("free, n_real", [
    (FREE_300, 0),
    (FREE_300, 5),                                   # real entries share area 1 with seeded ones
    (FREE_300, 2 * EPA - 300),                       # areas 0 and 1 exactly full
    (FREE_300, 3 * EPA),                             # on into area K and K+1
    (ChunkSet([ChunkRun(0, 2 * EPA)]), 0),           # seeded areas exactly full
    (ChunkSet([ChunkRun(0, 2 * EPA)]), EPA + 3),
    (ChunkSet([ChunkRun(0, EPA)]), 1),               # area 0 full of seeded, real in area 1
    (ChunkSet([ChunkRun(5, 1)]), 2 * EPA - 1),
])
def test_read_returns_only_the_real_entries(free, n_real):
    """Seeded entries are checked and counted, not returned; next_free is the kernel's."""
    s = seeded_store(free, n_real)
    t = read_seeded(s)
    assert t.entries == tuple(s.real)
    assert t.seeded == s.plan.count == min(len(free), s.layout.capacity)
    k = kernel_read_exceptions(s.disk, CB)
    assert t.next_free == k.next_free
    assert t.areas_read == k.current_area + 1
    assert t.next_free >= s.layout.data_start + 1


@settings(max_examples=40, deadline=None)
@given(free=free_sets(limit=3000), n_real=st.integers(0, 700), cb=st.sampled_from([4096, 16384]))
def test_read_round_trip(free, n_real, cb):
    s = seeded_store(free, n_real, cb=cb, areas=2)
    t = read_seeded(s)
    assert t.entries == tuple(s.real) and t.seeded == s.plan.count
    assert t.next_free == kernel_read_exceptions(s.disk, cb).next_free


def seeded_slot(s: SeededStore, i: int) -> tuple[int, int]:
    return decode(s.plan.entries)[i]


def test_a_forged_seeded_entry_is_refused():
    """A seeded entry for a chunk that was live: a merge would skip restoring it."""
    s = seeded_store(FREE_300, 10)
    _, new = seeded_slot(s, 17)
    put_entry(s.disk, CB, 17, 5, new)  # chunk 5 was not free
    with pytest.raises(StoreFormatError, match=r"seeded entry .*\(area 0, slot 17: origin chunk 5 "):
        read_seeded(s)


def test_a_seeded_entry_pointing_elsewhere_is_refused():
    s = seeded_store(FREE_300, 10)
    old, _ = seeded_slot(s, 280)
    put_entry(s.disk, CB, 280, old, s.layout.data_start + 1)
    with pytest.raises(StoreFormatError, match="seeded entry"):
        read_seeded(s)


@pytest.mark.parametrize("cut", [0, 1, 150, EPA - 1, EPA, 299])
def test_a_table_cut_short_inside_the_seeded_entries_is_refused(cut):
    """The table ends (new_chunk 0) before every seeded entry was read."""
    s = seeded_store(FREE_300, 0)
    for i in range(cut, s.plan.count):
        put_entry(s.disk, CB, i, 0, 0)
    with pytest.raises(StoreFormatError):
        read_seeded(s)


def test_seeded_entries_reordered_are_refused():
    s = seeded_store(FREE_300, 0)
    a, b = seeded_slot(s, 3), seeded_slot(s, 4)
    put_entry(s.disk, CB, 3, *b)
    put_entry(s.disk, CB, 4, *a)
    with pytest.raises(StoreFormatError, match="seeded entry"):
        read_seeded(s)


def test_a_real_entry_for_a_seeded_chunk_is_refused():
    s = seeded_store(FREE_300, 10)
    put_entry(s.disk, CB, s.plan.count + 4, 1100, s.real[4].new_chunk)
    with pytest.raises(StoreFormatError, match="origin chunk listed twice"):
        read_seeded(s)


@pytest.mark.parametrize("where", ["dummy first", "dummy last", "error hole", "area K", "area 0"])
def test_a_real_entry_outside_the_data_space_is_refused(where):
    s = seeded_store(FREE_300, 10)
    lay = s.layout
    new = {"dummy first": lay.dummy_start, "dummy last": lay.data_start - 1,
           "error hole": area_location(0, CB) + 1, "area K": lay.data_start,
           "area 0": area_location(0, CB)}[where]
    put_entry(s.disk, CB, s.plan.count + 4, s.real[4].old_chunk, new)
    with pytest.raises(StoreFormatError, match=f"slot {s.plan.count + 4 - EPA}"):
        read_seeded(s)


def test_a_real_entry_in_an_unbacked_data_chunk_is_refused():
    """A data chunk the table does not back (a damaged map) holds no saved data."""
    s = seeded_store(FREE_300, 10)
    hole = s.real[4].new_chunk
    segs = [seg for seg in s.table.segments if seg.cow_start < s.layout.data_start]
    n = hole - s.layout.data_start
    segs += [Segment(s.layout.data_start, n, STORE_BASE + 100),
             Segment(hole, 1, 0, ZERO),
             Segment(hole + 1, 50, STORE_BASE + 200)]
    holed = CowTable(CB, tuple(segs))
    assert read_seeded(s).entries == tuple(s.real)  # fine on the real table
    with pytest.raises(StoreFormatError, match="not backed"):
        read_seeded(s, table=holed)


def test_a_table_continuing_into_an_unbacked_area_is_refused():
    s = seeded_store(ChunkSet([ChunkRun(0, EPA)]), 3)  # area 0 full: the table goes on in area 1
    segs = []
    for seg in s.table.segments:
        if seg.cow_start == area_location(1, CB):
            seg = Segment(seg.cow_start, seg.count, 0, ERROR)
        segs.append(seg)
    broken = CowTable(CB, tuple(segs))
    with pytest.raises(StoreFormatError, match="does not back"):
        read_seeded(s, table=broken)


def test_a_plain_read_is_unchanged_by_the_new_arguments():
    """Defaults keep the plain store's rules: data from chunk 2, nothing seeded."""
    disk = {0: struct.pack("<IIII", SNAP_MAGIC, 1, 1, CB // 512).ljust(CB, b"\0"), 1: bytes(CB)}
    put_entry(disk, CB, 0, 7, 2)
    t = read_exception_table(disk.__getitem__, cow_chunks=100, origin_chunks=ORIGIN, chunk_bytes=CB)
    assert t.entries == (CowException(7, 2),) and t.seeded == 0 and t.next_free == 3


# =========================================================================
# 3. The COW table's unbacked segments
# =========================================================================


def seeded_table(areas: int = 2, data: int = 20) -> CowTable:
    return seeded_cow_table([ChunkRun(100, 2), ChunkRun(500, areas - 1 + data)], SeedLayout(CB, areas))


def test_seeded_cow_table_layout():
    t = seeded_table()
    assert t.segments == (
        Segment(0, 2, 100), Segment(2, 256, 0, ERROR), Segment(258, 1, 500),
        Segment(259, 256, 0, ZERO), Segment(515, 20, 501),
    )
    assert t.backed_chunks == 23 and t.total_chunks == 535
    assert t.store_chunks() == ChunkSet([ChunkRun(100, 2), ChunkRun(500, 21)])
    assert [t.is_backed(c) for c in (0, 1, 2, 257, 258, 259, 514, 515, 534, 535, -1)] == [
        True, True, False, False, True, False, False, True, True, False, False]
    assert t.segment_at(300).kind == ZERO and t.segment_at(2).kind == ERROR
    assert t.cow_to_phys(258) == 500 and t.cow_to_phys(515) == 501


@pytest.mark.parametrize("cow", [2, 100, 257, 259, 514])
def test_cow_to_phys_refuses_a_hole(cow):
    with pytest.raises(ValueError, match="not backed"):
        seeded_table().cow_to_phys(cow)


def test_dm_targets_include_zero_and_error():
    cs = CB // 512
    assert seeded_table().dm_targets("8:16") == [
        DmTarget(0, 2 * cs, "linear", f"8:16 {100 * cs}"),
        DmTarget(2 * cs, 256 * cs, "error", ""),
        DmTarget(258 * cs, cs, "linear", f"8:16 {500 * cs}"),
        DmTarget(259 * cs, 256 * cs, "zero", ""),
        DmTarget(515 * cs, 20 * cs, "linear", f"8:16 {501 * cs}"),
    ]


def test_dict_round_trip_keeps_the_kinds():
    t = seeded_table()
    d = json.loads(json.dumps(t.to_dict()))
    assert CowTable.from_dict(d) == t
    assert [s.get("kind") for s in d["segments"]] == [None, ERROR, None, ZERO, None]
    assert all(s["phys_start"] == 0 for s in d["segments"] if "kind" in s)


def test_a_plain_table_dict_has_no_kind():
    """A plain store's saved map, and so its identity checksum, is as before."""
    t = CowTable.from_runs([ChunkRun(100, 3), ChunkRun(7, 2)], CB)
    d = t.to_dict()
    assert all(set(s) == {"cow_start", "count", "phys_start"} for s in d["segments"])
    assert CowTable.from_dict(d) == t and t.backed_chunks == t.total_chunks == 5


@pytest.mark.parametrize("segments", [
    (Segment(0, 2, 10), Segment(2, 5, 0, ZERO)),           # ends unbacked
    (Segment(0, 2, 10), Segment(2, 5, 0, ERROR)),
    (Segment(0, 3, 0, ZERO),),
    (Segment(0, 2, 10), Segment(2, 5, 7, ZERO), Segment(7, 1, 20)),    # a hole naming a chunk
    (Segment(0, 2, 10), Segment(2, 5, 7, ERROR), Segment(7, 1, 20)),
    (Segment(0, 2, 10), Segment(2, 5, 0, "hole"), Segment(7, 1, 20)),  # unknown kind
    (Segment(0, 2, 10), Segment(2, 5, 0, "Zero"), Segment(7, 1, 20)),
])
def test_invalid_tables_with_unbacked_segments(segments):
    with pytest.raises(ValueError):
        CowTable(CB, segments)


def test_holes_may_share_physical_start_zero_with_a_backed_chunk_zero():
    """phys_start 0 of an unbacked segment is no physical chunk: no overlap with chunk 0."""
    t = CowTable(CB, (Segment(0, 2, 0), Segment(2, 5, 0, ZERO), Segment(7, 1, 2)))
    assert t.store_chunks() == ChunkSet([ChunkRun(0, 3)]) and t.backed_chunks == 3


@pytest.mark.parametrize("change", [
    {"kind": "linear"},      # a backed segment is written without a kind
    {"kind": "hole"},
    {"kind": 5},
    {"kind": None},
    {"phys_start": 3},       # a hole naming a chunk
])
def test_from_dict_refuses_bad_kinds(change):
    d = seeded_table().to_dict()
    d["segments"][1].update(change)
    with pytest.raises(StateError, match="malformed"):
        CowTable.from_dict(d)


def test_append_runs_to_a_seeded_table_keeps_the_prefix():
    t = seeded_table()
    g = t.append_runs([ChunkRun(521, 4), ChunkRun(900, 1)])
    assert g.segments[:4] == t.segments[:4]
    assert g.segments[4:] == (Segment(515, 24, 501), Segment(539, 1, 900))
    SeedLayout(CB, 2).check_table(g)


# =========================================================================
# 4. The checkpoint record of a free-aware store
# =========================================================================

FREE_MAP = ((16 * MiB, 4 * MiB), (40 * MiB + 100, 3 * CB))  # 1024 + 2 whole chunks


def _device(**kw) -> CheckpointRecord:
    return CheckpointRecord(name="cp", device="/dev/vdb", device_major=254, device_minor=16,
                            device_bytes=64 * MiB, fstype="ext4", fs_uuid="u-1", **kw)


def _seeded_record(areas: int = 2) -> CheckpointRecord:
    # a 1 MiB store file at device byte 8 MiB, in one extent
    r = _device().with_checkpoint(
        checkpoint_id="c" * 32, store_type="PO", chunk_bytes=CB, store_relpath=".fiesnap/store-cp",
        store_file_bytes=MiB, extents=[Extent(0, 8 * MiB, MiB, 0)], created="now", mode="online",
        seeded_areas=areas)
    count = plan_seeding(FREE_MAP, r.seed_layout, store=r.cow.store_chunks()).count if areas else 0
    return r.with_free_map(FREE_MAP, frozen_seconds=0.2, seeded_chunks=count).with_phase("active")


def test_a_seeded_record():
    r = _seeded_record()
    lay = SeedLayout(CB, 2)
    assert r.free_aware and r.seed_layout == lay and r.seeded_chunks == lay.capacity == 512
    lay.check_table(r.cow)
    assert r.store_bytes == (MiB - CB) == r.cow.backed_chunks * CB  # the file, without its identity block
    assert r.cow.total_chunks == lay.data_start + (MiB // CB - 1) - 3
    assert r.cow.total_sectors * 512 > r.store_bytes


def test_a_seeded_record_round_trips():
    r = _seeded_record()
    d = json.loads(r.to_json())
    assert (d["seeded_areas"], d["seeded_chunks"]) == (2, 512)
    assert CheckpointRecord.from_dict(d) == r
    assert CheckpointRecord.from_dict(d).expected_identity() == r.expected_identity()


def test_a_plain_record_round_trips_with_zero_seeding():
    r = _seeded_record(areas=0)
    assert not r.free_aware and r.seed_layout is None and r.seeded_chunks == 0
    assert r.store_bytes == r.cow.total_chunks * CB
    assert CheckpointRecord.from_dict(json.loads(r.to_json())) == r


def test_an_old_record_without_the_fields_reads_as_plain():
    d = _seeded_record(areas=0).to_dict()
    del d["seeded_areas"], d["seeded_chunks"]
    r = CheckpointRecord.from_dict(d)
    assert (r.seeded_areas, r.seeded_chunks) == (0, 0)


def test_a_seeded_store_too_small_for_its_areas_is_refused():
    with pytest.raises(FilesystemError, match="seeded area"):
        _device().with_checkpoint(
            checkpoint_id="c" * 32, store_type="PO", chunk_bytes=CB, store_relpath=".fiesnap/s",
            store_file_bytes=12 * CB, extents=[Extent(0, 8 * MiB, 12 * CB, 0)], created="now",
            mode="offline", seeded_areas=4)


def _segments(d: dict) -> list[dict]:
    return d["cow_table"]["segments"]


def _kinded(d: dict, kind: str) -> dict:
    return next(s for s in _segments(d) if s.get("kind") == kind)


def _zero_to_linear(d):
    s = _kinded(d, ZERO)
    del s["kind"]
    s["phys_start"] = 100  # physical chunks nobody else uses


def _error_to_zero(d):
    _kinded(d, ERROR)["kind"] = ZERO


def _area_to_error(d):
    s = _segments(d)[2]
    assert "kind" not in s and s["count"] == 1
    s["kind"], s["phys_start"] = ERROR, 0  # joins the error hole before it: still a valid table


@pytest.mark.parametrize("damage", [_zero_to_linear, _error_to_zero, _area_to_error])
def test_a_record_whose_prefix_was_altered_is_refused(damage):
    d = _seeded_record().to_dict()
    damage(d)
    CowTable.from_dict(d["cow_table"])  # still a valid table by itself
    with pytest.raises(StateError, match="field 'cow_table'"):
        CheckpointRecord.from_dict(d)


@pytest.mark.parametrize("areas", [1, 3, 4096])
def test_a_record_whose_area_count_was_altered_is_refused(areas):
    d = _seeded_record().to_dict()
    d["seeded_areas"], d["seeded_chunks"] = areas, 1
    with pytest.raises(StateError, match="field 'cow_table'"):
        CheckpointRecord.from_dict(d)


def test_a_seeded_table_on_a_plain_record_is_refused():
    """A sparse map with seeded_areas 0 would be read as a plain store, seeded entries and all."""
    d = _seeded_record().to_dict()
    d["seeded_areas"], d["seeded_chunks"] = 0, 0
    with pytest.raises(StateError):
        CheckpointRecord.from_dict(d)


def test_a_record_whose_dummy_region_runs_into_the_data_space_is_refused():
    """Area K under a `zero` target: the kernel's metadata writes there would be discarded."""
    d = _seeded_record().to_dict()
    segs = _segments(d)
    zero, data = segs[-2], segs[-1]
    assert zero.get("kind") == ZERO and "kind" not in data
    zero["count"] += 1
    data["cow_start"] += 1
    data["count"] -= 1
    data["phys_start"] += 1
    assert not CowTable.from_dict(d["cow_table"]).is_backed(SeedLayout(CB, 2).data_start)
    with pytest.raises(StateError, match="field 'cow_table'"):
        CheckpointRecord.from_dict(d)


def test_seeded_chunks_above_capacity_is_refused():
    d = _seeded_record().to_dict()
    d["seeded_chunks"] = 2 * EPA
    CheckpointRecord.from_dict(d)  # exactly full is fine
    d["seeded_chunks"] = 2 * EPA + 1
    with pytest.raises(StateError, match="field 'seeded_chunks'"):
        CheckpointRecord.from_dict(d)


def test_seeded_chunks_on_a_plain_record_is_refused():
    d = _seeded_record(areas=0).to_dict()
    d["seeded_chunks"] = 1
    with pytest.raises(StateError, match="field 'seeded_chunks'"):
        CheckpointRecord.from_dict(d)


@pytest.mark.parametrize("field, value", [
    ("seeded_areas", -1), ("seeded_areas", "2"), ("seeded_areas", True), ("seeded_chunks", -1),
    ("seeded_chunks", 1.0),
])
def test_seeding_fields_must_be_integers(field, value):
    d = _seeded_record().to_dict()
    d[field] = value
    with pytest.raises(StateError, match=f"field '{field}'"):
        CheckpointRecord.from_dict(d)


def test_seeded_areas_without_a_store_map_is_refused():
    d = _device(phase="passthrough").to_dict()
    d["seeded_areas"] = 2
    with pytest.raises(StateError, match="field 'seeded_areas'"):
        CheckpointRecord.from_dict(d)


def test_as_passthrough_forgets_the_seeding():
    r = _seeded_record().with_phase("committing").as_passthrough()
    assert (r.seeded_areas, r.seeded_chunks, r.free_aware) == (0, 0, False)
    assert CheckpointRecord.from_dict(r.to_dict()) == r


# =========================================================================
# 5. Status numbers against the backed store
# =========================================================================


@settings(max_examples=100, deadline=None)
@given(total=st.integers(1, 10**12), data=st.data())
def test_backed_leaves_a_plain_store_unchanged(total, data):
    used = data.draw(st.integers(0, total))
    u = SnapshotUsage("active", used, total, 512)
    assert u.backed(total) == u


@settings(max_examples=100, deadline=None)
@given(areas=st.integers(1, 5), data_chunks=st.integers(2, 5000), cb=st.sampled_from([4096, 65536]),
       data=st.data())
def test_backed_of_a_seeded_store_keeps_the_free_space(areas, data_chunks, cb, data):
    """The kernel counts the COW address space; the user should see the store file."""
    lay = SeedLayout(cb, areas)
    t = seeded_cow_table(plain_runs(lay, data_chunks), lay)
    next_free = data.draw(st.integers(lay.data_start + 1, t.total_chunks))  # the kernel's frontier
    k = SnapshotUsage("active", next_free * cb, t.total_chunks * cb, 2 * cb)
    b = k.backed(t.backed_chunks * cb)
    assert b.total_bytes == t.backed_chunks * cb
    assert b.total_bytes - b.used_bytes == k.total_bytes - k.used_bytes
    assert 0 <= b.used_bytes <= b.total_bytes and b.metadata_bytes == k.metadata_bytes
    # what is used of the file: the prefix's backed chunks plus the data space below the frontier
    assert b.used_bytes == (len(lay.prefix_backed()) + next_free - lay.data_start) * cb


@pytest.mark.parametrize("state", ["invalid", "overflowed", "merge-failed"])
def test_backed_leaves_states_without_numbers_alone(state):
    u = SnapshotUsage(state)
    assert u.backed(123) == u


# --------------------------------------------------------------------------- before a reload


def _seeded_store(cb: int = 4096, areas: int = 2):
    """A store holding exactly what start writes: header, seeded areas, area K zeroed."""
    layout = SeedLayout(cb, areas)
    free = [(c * cb, 300 * cb) for c in (10, 5000, 9000)]
    plan = plan_seeding(free, layout)
    return plan, dict(plan.metadata())


def test_the_seeded_areas_start_wrote_pass_the_check_before_a_reload():
    plan, store = _seeded_store()
    check_seeded_areas(lambda n: store.get(n, bytes(4096)), seeded=plan.entries, chunk_bytes=4096)


def test_a_forged_seeded_entry_is_refused_before_the_kernel_loads_it():
    """The kernel never copies a chunk with an exception: a seeded entry for a live chunk must
    be caught before activate loads the table, or that chunk's checkpoint data is lost."""
    plan, store = _seeded_store()
    area = bytearray(store[area_location(1, 4096)])
    old, new = struct.unpack_from("<QQ", area, 16)
    struct.pack_into("<QQ", area, 16, 3, new)  # chunk 3 was not free
    store[area_location(1, 4096)] = bytes(area)
    with pytest.raises(StoreFormatError, match=r"area 1, slot 1: origin chunk 3"):
        check_seeded_areas(lambda n: store.get(n, bytes(4096)), seeded=plan.entries, chunk_bytes=4096)


def test_a_wiped_seeded_area_is_refused_before_a_reload():
    plan, store = _seeded_store()
    store[area_location(0, 4096)] = bytes(4096)
    with pytest.raises(StoreFormatError, match="area 0, slot 0"):
        check_seeded_areas(lambda n: store.get(n, bytes(4096)), seeded=plan.entries, chunk_bytes=4096)


# --------------------------------------------------------------------------- correcting a prepared table


@given(free_sets(), free_sets())
@settings(max_examples=200, deadline=None)
def test_difference_is_set_difference(a, b):
    assert set(difference(a, b)) == set(a) - set(b)


@given(free_sets(min_size=2), free_sets(min_size=0), st.data())
@settings(max_examples=150, deadline=None)
def test_a_prepared_table_corrected_for_the_checkpoint_never_seeds_a_live_chunk(before, freed, data):
    """An online start writes its table from a map read before the freeze; inside it the map
    of the checkpoint may have lost chunks (allocated meanwhile). Those must not keep a seeded
    exception: they become real ones, their data chunks allocated as the kernel would, and the
    kernel then allocates after them."""
    layout = SeedLayout(CB, areas_for(len(before), CB))
    plan = plan_seeding(byte_ranges(before, CB), layout)
    taken = ChunkSet(ChunkRun(c, 1) for c in data.draw(st.lists(st.sampled_from(sorted(before)), max_size=40)))
    at_checkpoint = ChunkSet(list(difference(before, taken).runs) + list(freed.runs))
    fixed = correct_seeding(plan, byte_ranges(at_checkpoint, CB))
    entries = decode(fixed.entries)
    assert [old for old, _ in entries] == sorted(plan.chosen), "no entry moved"
    seeded = {old for old, new in entries if layout.dummy_start <= new < layout.data_start}
    assert seeded <= set(at_checkpoint), "a seeded chunk was live at the checkpoint"
    assert seeded == set(fixed.seeded) and fixed.count == len(seeded)
    converted = dict(fixed.converted)
    assert set(converted) == set(plan.chosen) - set(at_checkpoint)
    datas = [converted[c] for c in sorted(converted)]
    assert datas == kernel_allocate(layout.data_start + 1, len(datas), CB)
    disk = dict(fixed.metadata())
    view = kernel_read_exceptions(disk, CB)
    assert all(view.next_free > d for d in datas) and view.next_free > layout.dummy_start + WINDOW - 1
    # the merge reads it back: the converted entries are real exceptions to copy
    table = seeded_cow_table([ChunkRun(STORE_BASE, layout.data_start + 4 * layout.per_area)], layout)
    read = read_exception_table(lambda n: disk.get(n, bytes(CB)), cow_chunks=table.total_chunks,
                                origin_chunks=ORIGIN + 1000, chunk_bytes=CB, seeded=fixed.entries,
                                seeded_old=fixed.seeded, data_start=layout.data_start,
                                is_backed=table.is_backed, converted=fixed.converted)
    assert sorted((e.old_chunk, e.new_chunk) for e in read.entries) == sorted(fixed.converted)
    assert read.seeded == fixed.count
    if fixed.converted:
        assert set(fixed.changed_areas()) <= set(area_location(k, CB) for k in range(layout.areas))


def test_a_corrected_entry_put_back_into_the_dummy_region_is_refused():
    layout = SeedLayout(CB, 2)
    plan = plan_seeding([(100 * CB, 300 * CB)], layout)
    fixed = correct_seeding(plan, [(100 * CB, 50 * CB), (151 * CB, 249 * CB)])  # chunk 150 was taken
    assert fixed.converted == ((150, layout.data_start + 1),)
    disk = dict(fixed.metadata())
    put_entry(disk, CB, fixed.slot_of(150), 150, layout.dummy_start + 150 % WINDOW)  # forged back
    table = seeded_cow_table([ChunkRun(STORE_BASE, layout.data_start + 600)], layout)
    with pytest.raises(StoreFormatError, match="seeded entry"):
        read_exception_table(lambda n: disk.get(n, bytes(CB)), cow_chunks=table.total_chunks,
                             origin_chunks=ORIGIN, chunk_bytes=CB, seeded=fixed.entries,
                             seeded_old=fixed.seeded, data_start=layout.data_start,
                             is_backed=table.is_backed, converted=fixed.converted)


def test_a_free_map_that_calls_the_store_file_free_stops_the_start_with_one_line():
    """Such a map cannot be the checkpoint's (the store file existed when it was read):
    seeding from it would put seeded exceptions over store chunks."""
    from fiesnap.commands.start import _seeded_count
    r = _seeded_record()
    with pytest.raises(FilesystemError, match=r"internal check failed: chunk \d+ is both free and part of the store file"):
        _seeded_count(r, [(8 * MiB, MiB)])
    assert _seeded_count(r, FREE_MAP) == r.seeded_chunks


@given(st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 3000)), max_size=60), st.integers(1, 8))
def test_copy_runs_cover_every_pair_once_in_order(pairs, max_run):
    """The correction's copies, joined into runs: the same chunk pairs, in order, no run longer
    than allowed, each run consecutive on both sides."""
    runs = copy_runs(pairs, max_run)
    assert [(c + i, d + i) for c, d, n in runs for i in range(n)] == pairs
    assert all(1 <= n <= max_run for _, _, n in runs)


def test_copy_runs_join_a_preallocated_stretch():
    """Chunks allocated in one stretch before the freeze (say an 8 MiB preallocation) are
    handed consecutive data chunks, so they are copied in 1 MiB pieces, not chunk by chunk."""
    layout = SeedLayout(CB, 16)  # room for all 4096
    plan = plan_seeding([(0, 4096 * CB)], layout)
    fixed = correct_seeding(plan, [(0, 1000 * CB), (3048 * CB, 1048 * CB)])  # 2048 chunks taken
    runs = copy_runs(fixed.converted, 256)
    assert sum(n for _, _, n in runs) == 2048 and len(runs) <= 2048 // 256 + 10
