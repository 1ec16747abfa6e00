"""dm-bow's range map: split/merge, lookup, the free list's order, against naive models."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bow_compat.ranges import RangeMap, RangeType

U, T, C, B = RangeType.UNCHANGED, RangeType.TRIMMED, RangeType.CHANGED, RangeType.BACKUP


class CBow:
    """dm-bow.c's split_range / set_type / add_trim / remove_trim / find_free_range, literally:
    a new middle piece is INVALID, the trimmed list is a Python list with list_add at index 0.
    Slow and obvious; the reference for which free range dm-bow hands out."""

    def __init__(self, n):
        self.nodes = [[0, U], [n, RangeType.TOP]]  # [sector, type], sorted
        self.trimmed = []

    def _i(self, node):
        return next(i for i, x in enumerate(self.nodes) if x is node)

    def top(self, node):
        return self.nodes[self._i(node) + 1][0]

    def find(self, sector):
        return next(x for x in reversed(self.nodes) if x[0] <= sector)

    def split(self, br, start, end):
        if start > br[0]:
            leading = [br[0], br[1]]
            if leading[1] == T:
                self.trimmed.insert(0, leading)
            self.nodes.insert(self._i(br), leading)
            br[0] = start
        if end >= self.top(br):
            return br
        new = [br[0], RangeType.INVALID]
        self.nodes.insert(self._i(br), new)
        br[0] = end
        return new

    def set_type(self, br, t):
        i = self._i(br)
        prev = self.nodes[i - 1] if i else None
        nxt = self.nodes[i + 1]
        if br[1] == T:
            self.trimmed.remove(br)
        if t == T:
            self.trimmed.insert(0, br)
        br[1] = t
        if nxt[1] == t:
            if t == T:
                self.trimmed.remove(nxt)
            self.nodes.remove(nxt)
        if prev is not None and prev[1] == t:
            if t == T:
                self.trimmed.remove(br)
            self.nodes.remove(br)

    def _loop(self, start, end, want, to):
        cur = start
        while cur < end:
            br = self.find(cur)
            piece_end = min(self.top(br), end)
            if br[1] == want:
                self.set_type(self.split(br, cur, piece_end), to)
            cur = piece_end

    def add_trim(self, s, e):
        self._loop(s, e, U, T)

    def remove_trim(self, s, e):
        self._loop(s, e, T, U)

    def take(self, size, to):
        """prepare_unchanged_range's use of the head free range."""
        if not self.trimmed:
            return None
        fr = self.trimmed[0]
        start = fr[0]
        n = min(self.top(fr) - start, size)
        self.set_type(self.split(fr, start, start + n), to)
        return start, n

    def free(self):
        return [(x[0], self.top(x)) for x in self.trimmed]


def take(m, size, to):
    fr = m.first_free()
    if fr is None:
        return None
    start = fr.start
    n = min(m.end(fr) - start, size)
    node, _ = m.split(fr, start, start + n)
    m.set_type(node, to)
    return start, n


def test_initial_map_and_lookup():
    m = RangeMap(100)
    assert list(m) == [(0, 100, U)] and len(m) == 1
    assert m.find(0) is m.find(99) is m.first()
    assert m.first_free() is None and m.free_sectors == 0
    for bad in (-1, 100):
        with pytest.raises(ValueError):
            m.find(bad)
    m.check()


def test_readable_names_are_dm_bows():
    assert [t.readable for t in RangeType] == [
        "Invalid", "Sector0", "Sector0_current", "Unchanged", "Free", "Changed", "Backup", "Top"]


def test_split_leading_middle_trailing():
    m = RangeMap(100)
    node, end = m.split(m.first(), 10, 20)
    assert (node.start, end) == (10, 20)
    assert list(m) == [(0, 10, U), (10, 20, U), (20, 100, U)]  # unmerged until set_type
    m.set_type(node, C)
    assert list(m) == [(0, 10, U), (10, 20, C), (20, 100, U)]
    m.check()
    # a split running past the range's end is truncated to it
    node, end = m.split(m.find(15), 12, 50)
    assert (node.start, end) == (12, 20)


def test_set_type_merges_both_neighbours():
    m = RangeMap(30)
    a, _ = m.split(m.first(), 10, 20)
    m.set_type(a, C)
    m.set_type(m.find(10), U)
    assert list(m) == [(0, 30, U)]
    m.check()


def test_add_and_remove_trim_merge_and_count():
    m = RangeMap(64)
    m.add_trim(8, 16)
    m.add_trim(16, 24)   # merges into the previous free range
    m.add_trim(4, 10)    # overlapping
    assert list(m) == [(0, 4, U), (4, 24, T), (24, 64, U)] and m.free_sectors == 20
    m.remove_trim(10, 12)
    assert list(m) == [(0, 4, U), (4, 10, T), (10, 12, U), (12, 24, T), (24, 64, U)]
    assert m.free_sectors == 18
    m.remove_trim(0, 64)
    assert list(m) == [(0, 64, U)] and m.free_sectors == 0 and m.first_free() is None
    m.check()


def test_free_list_order_is_dm_bows_not_lowest_address():
    m = RangeMap(64)
    m.add_trim(40, 48)
    m.add_trim(8, 16)
    assert list(m.free_ranges()) == [(8, 16), (40, 48)]      # newest first
    m.add_trim(16, 20)                                       # merged into (8, 16): keeps its place
    assert list(m.free_ranges()) == [(8, 20), (40, 48)]
    m.add_trim(48, 50)                                       # node pushed, then (40,48) absorbs it
    assert list(m.free_ranges()) == [(8, 20), (40, 50)]
    m.remove_trim(10, 12)                                    # leading piece (8,10) goes to the head
    assert list(m.free_ranges()) == [(8, 10), (12, 20), (40, 50)]
    assert take(m, 4, B) == (8, 2)                           # the head, even if too small
    assert list(m.free_ranges()) == [(12, 20), (40, 50)]
    assert take(m, 4, B) == (12, 4)                          # tail (16, 20) keeps the place
    assert list(m.free_ranges()) == [(16, 20), (40, 50)]
    m.check()


def test_align_free_keeps_whole_blocks_and_order():
    m = RangeMap(64)
    m.add_trim(40, 51)   # 8-sector blocks: (40, 48) survives
    m.add_trim(0, 12)    # block 0 reserved, (8, 12) is a partial block: nothing survives
    m.add_trim(19, 36)   # (24, 32) survives
    m.align_free(8, 8)
    assert list(m.free_ranges()) == [(24, 32), (40, 48)]
    assert list(m) == [(0, 24, U), (24, 32, T), (32, 40, U), (40, 48, T), (48, 64, U)]
    assert m.free_sectors == 16
    m.check()


def test_retype_refuses_free_ranges():
    m = RangeMap(16)
    m.add_trim(8, 16)
    with pytest.raises(ValueError):
        m.retype(m.find(8), C)
    with pytest.raises(ValueError):
        m.retype(m.find(0), T)


def test_pieces_out_of_range():
    m = RangeMap(16)
    for s, e in ((0, 17), (-1, 4), (4, 4)):
        with pytest.raises(ValueError):
            m.add_trim(s, e)


SIZE = 96
trim_ops = st.lists(st.tuples(st.sampled_from(["trim", "untrim"]),
                              st.integers(0, SIZE - 1), st.integers(1, 40)), max_size=40)
checkpoint_ops = st.lists(st.tuples(st.sampled_from(["take", "change"]),
                                    st.integers(0, SIZE - 1), st.integers(1, 40)), max_size=30)


def change(m, start, end):
    """prepare_free_range over the free pieces of [start, end) (a write in CHECKPOINT)."""
    cur = start
    while cur < end:
        node = m.find(cur)
        piece_end = min(m.end(node), end)
        if node.type == T:
            node, _ = m.split(node, cur, piece_end)
            m.set_type(node, C)
        cur = piece_end


def check_against(m, ref, per_sector):
    m.check()
    assert list(m.free_ranges()) == ref.free()
    assert [t for s, e, t in m for _ in range(s, e)] == per_sector
    assert all(a[2] != b[2] for a, b in zip(list(m), list(m)[1:]))  # neighbours differ
    assert m.free_sectors == per_sector.count(T)
    for s in range(SIZE):
        node = m.find(s)
        assert node.start <= s < m.end(node) and node.type == per_sector[s]


@settings(max_examples=300, deadline=None)
@given(trim_ops, checkpoint_ops)
def test_matches_naive_models(trims, writes):
    m, ref = RangeMap(SIZE), CBow(SIZE)
    per_sector = [U] * SIZE
    for op, start, n in trims:           # TRIM state
        end = min(SIZE, start + n)
        frm, to = (U, T) if op == "trim" else (T, U)
        (m.add_trim if op == "trim" else m.remove_trim)(start, end)
        (ref.add_trim if op == "trim" else ref.remove_trim)(start, end)
        for s in range(start, end):
            if per_sector[s] == frm:
                per_sector[s] = to
        check_against(m, ref, per_sector)
    for op, start, n in writes:          # CHECKPOINT state: free space gets used
        end = min(SIZE, start + n)
        if op == "take":
            got, want = take(m, n, B), ref.take(n, B)
            assert got == want           # the same free range, the same piece of it
            if got:
                per_sector[got[0]:got[0] + got[1]] = [B] * got[1]
        else:
            change(m, start, end)
            ref._loop(start, end, T, C)
            for s in range(start, end):
                if per_sector[s] == T:
                    per_sector[s] = C
        check_against(m, ref, per_sector)
