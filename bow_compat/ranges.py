"""dm-bow's map of the device: a sorted set of typed sector ranges plus its free-range list.

This mirrors `struct bow_range`, `split_range`, `set_type`, `find_free_range`, `add_trim` and
`remove_trim` of drivers/md/dm-bow.c (checked: GrapheneOS/kernel_common-6.6 commit
1e6548c8512f, target 1.2.0, and aosp-mirror/kernel_common commit 2b9be6339b5f). dm-bow keeps
the ranges in an rb-tree keyed by start sector; here a sorted list of starts searched with
bisect gives the same O(log n) lookup of the range holding a sector (inserting and deleting are
list moves, cheap at the few thousand ranges a filesystem produces).

Range types, with the names dm-bow's table status prints:
  SECTOR0 "Sector0"                  block 0 during a checkpoint: holds the log sector
  SECTOR0_CURRENT "Sector0_current"  where the live contents of block 0 are kept meanwhile
  UNCHANGED "Unchanged"              data as it was at the checkpoint, not yet backed up
  TRIMMED "Free"                     discarded before the checkpoint: free for backups
  CHANGED "Changed"                  written since the checkpoint (or free): no backup needed
  BACKUP "Backup"                    holds a backup copy (or an old log sector)
  TOP "Top"                          sentinel whose start is the device size
Invariants (dm-bow's): ranges tile [0, top); neighbours differ in type after every set_type.

Free-range choice: dm-bow keeps TRIMMED ranges on a linked list and always takes the FIRST
entry; ranges are pushed at the head (list_add) when they become TRIMMED and when
split_range cuts a leading piece off a TRIMMED range, while a range that is cut from the end
keeps its place. So the choice is well defined and LIFO-like, not lowest-address-first (nor
"first free range after a cursor"): FreeList reproduces it exactly, O(1) per operation, and
tests/unit/test_bow_ranges.py checks it against a literal transliteration of the C.

Deviations (all "better", none changes a choice dm-bow makes):
* split_range gives a freshly cut middle piece type INVALID until the caller retypes it;
  here it keeps its parent's type (list membership is tracked explicitly instead), so a failed
  backup cannot leave an INVALID range behind that would fail later writes with EIO.
* `free_sectors` is exact; dm-bow's trims_total is not updated for pieces cut from the middle.
* set_type on the first range does not dereference a missing predecessor (dm-bow would oops
  on a discard of sector 0 in TRIM state).
* `align_free` (called at the checkpoint) is ours: see its docstring.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum


class RangeType(IntEnum):
    INVALID = 0
    SECTOR0 = 1
    SECTOR0_CURRENT = 2
    UNCHANGED = 3
    TRIMMED = 4
    CHANGED = 5
    BACKUP = 6
    TOP = 7

    @property
    def readable(self) -> str:
        """The name dm-bow's table status uses (readable_type[])."""
        return _READABLE[self]


_READABLE = ("Invalid", "Sector0", "Sector0_current", "Unchanged", "Free", "Changed", "Backup", "Top")


@dataclass(eq=False)
class Range:
    """One bow_range: starts at `start` (512-byte sectors), ends where the next one starts.

    Identity matters (eq=False): the free list holds range objects, as dm-bow's list does.
    """

    start: int
    type: RangeType


class FreeList:
    """bc->trimmed_list: push at the head, take the head, unlink anywhere, all O(1).

    Kept as a dict in reverse order (the head is the last key), since a dict appends and
    deletes in O(1) and iterates backwards, but cannot insert at its front.
    """

    def __init__(self) -> None:
        self._rev: dict[Range, None] = {}

    def push(self, node: Range) -> None:
        """list_add(): becomes the head."""
        self._rev.pop(node, None)
        self._rev[node] = None

    def remove(self, node: Range) -> None:
        """list_del(); a range not on the list is ignored."""
        self._rev.pop(node, None)

    def head(self) -> Range | None:
        return next(reversed(self._rev), None)

    def __iter__(self) -> Iterator[Range]:
        return reversed(self._rev)

    def __len__(self) -> int:
        return len(self._rev)

    def __contains__(self, node: object) -> bool:
        return node in self._rev


class RangeMap:
    """The sorted range set and the free list of one dm-bow device."""

    def __init__(self, total_sectors: int) -> None:
        if total_sectors <= 0:
            raise ValueError("a device needs at least one sector")
        self.total_sectors = total_sectors
        self._starts: list[int] = [0, total_sectors]
        self._nodes: list[Range] = [Range(0, RangeType.UNCHANGED), Range(total_sectors, RangeType.TOP)]
        self._fl = FreeList()
        self.free_sectors = 0

    # ---- lookup ----

    def _index(self, node: Range) -> int:
        i = bisect_left(self._starts, node.start)
        if i >= len(self._nodes) or self._nodes[i] is not node:
            raise KeyError(f"range at sector {node.start} is not in the map")
        return i

    def find(self, sector: int) -> Range:
        """The range holding `sector` (find_first_overlapping_range)."""
        if not 0 <= sector < self.total_sectors:
            raise ValueError(f"sector {sector} is outside the {self.total_sectors}-sector device")
        return self._nodes[bisect_right(self._starts, sector) - 1]

    def end(self, node: Range) -> int:
        """range_top(): the first sector after `node`."""
        return self._starts[self._index(node) + 1]

    def first(self) -> Range:
        return self._nodes[0]

    def __len__(self) -> int:
        """Number of ranges, TOP excluded."""
        return len(self._nodes) - 1

    def __iter__(self) -> Iterator[tuple[int, int, RangeType]]:
        """(start, end, type) for every range in sector order, TOP excluded."""
        for i in range(len(self._nodes) - 1):
            yield self._starts[i], self._starts[i + 1], self._nodes[i].type

    # ---- free list (bc->trimmed_list) ----

    def first_free(self) -> Range | None:
        """find_free_range(): the head of the free list, or None (dm-bow: -ENOSPC)."""
        return self._fl.head()

    def free_ranges(self) -> Iterator[tuple[int, int]]:
        """(start, end) of the free ranges in the order dm-bow would hand them out."""
        for node in self._fl:
            yield node.start, self.end(node)

    # ---- dm-bow primitives ----

    def split(self, node: Range, start: int, end: int) -> tuple[Range, int]:
        """split_range(): cut `node` so a range starts at `start`; end it at `end` if inside.

        Returns the range now starting at `start` and its end (min(end, old end)). A leading
        piece keeps the old start and, when free, is pushed at the head of the free list; the
        original range object stays last (the trailing piece), keeping its list place.
        """
        i = self._index(node)
        if not node.start <= start < self._starts[i + 1] or end <= start:
            raise ValueError(f"cannot split [{node.start}, {self._starts[i + 1]}) at [{start}, {end})")
        if start > node.start:
            leading = Range(node.start, node.type)
            self._starts.insert(i, node.start)
            self._nodes.insert(i, leading)
            i += 1
            self._starts[i] = node.start = start
            if leading.type == RangeType.TRIMMED:
                self._fl.push(leading)
        top = self._starts[i + 1]
        if end >= top:
            return node, top
        middle = Range(start, node.type)
        self._starts.insert(i, start)
        self._nodes.insert(i, middle)
        self._starts[i + 1] = node.start = end
        return middle, end

    def retype(self, node: Range, rtype: RangeType) -> None:
        """A bare `br->type = X` (no merge). Only between non-free types."""
        if RangeType.TRIMMED in (node.type, rtype):
            raise ValueError("free ranges change type through set_type()")
        node.type = rtype

    def set_type(self, node: Range, rtype: RangeType) -> None:
        """set_type(): retype `node`, then merge it with a neighbour of the same type."""
        i = self._index(node)
        size = self._starts[i + 1] - node.start
        if node.type == RangeType.TRIMMED:
            self.free_sectors -= size
            self._fl.remove(node)
        if rtype == RangeType.TRIMMED:
            self.free_sectors += size
            self._fl.push(node)
        node.type = rtype
        nxt = self._nodes[i + 1]
        if nxt.type == rtype:
            if rtype == RangeType.TRIMMED:
                self._fl.remove(nxt)
            del self._starts[i + 1], self._nodes[i + 1]
        if i > 0 and self._nodes[i - 1].type == rtype:
            if rtype == RangeType.TRIMMED:
                self._fl.remove(node)
            del self._starts[i], self._nodes[i]

    # ---- TRIM-state operations ----

    def add_trim(self, start: int, end: int) -> None:
        """add_trim(): a discard before the checkpoint frees [start, end)."""
        for node, piece_end in self._pieces(start, end):
            if node.type == RangeType.UNCHANGED:
                node, _ = self.split(node, max(start, node.start), piece_end)
                self.set_type(node, RangeType.TRIMMED)
            elif node.type != RangeType.TRIMMED:
                raise ValueError(f"add_trim over a {node.type.readable} range: only legal in TRIM state")

    def remove_trim(self, start: int, end: int) -> None:
        """remove_trim(): a write before the checkpoint makes [start, end) used again."""
        for node, piece_end in self._pieces(start, end):
            if node.type == RangeType.TRIMMED:
                node, _ = self.split(node, max(start, node.start), piece_end)
                self.set_type(node, RangeType.UNCHANGED)
            elif node.type != RangeType.UNCHANGED:
                raise ValueError(f"remove_trim over a {node.type.readable} range: only legal in TRIM state")

    def _pieces(self, start: int, end: int) -> Iterator[tuple[Range, int]]:
        """The range holding each successive sector of [start, end), with the piece's end.

        Re-looks-up after each step (the caller may split or merge), as dm-bow's loops do.
        """
        if not 0 <= start < end <= self.total_sectors:
            raise ValueError(f"[{start}, {end}) is not inside the {self.total_sectors}-sector device")
        cur = start
        while cur < end:
            node = self.find(cur)
            piece_end = min(self.end(node), end)
            yield node, piece_end
            cur = piece_end

    def align_free(self, block_sectors: int, reserved: int) -> None:
        """Keep only whole free blocks, none below sector `reserved` (ours, at the checkpoint).

        dm-bow frees exactly the discarded sectors and relies on the block layer (logical
        block size = block_size) never sending it a partial block; a trace recorded with a
        smaller sector size can, and a partly free block still holds live data. Block 0 is
        reserved for the log sector (dm-bow fails the checkpoint if it was discarded). Each
        surviving range keeps its place in the free list.
        """
        for node in list(self._fl):
            i = self._index(node)
            s, e = node.start, self._starts[i + 1]
            a = max(-(-s // block_sectors) * block_sectors, reserved)
            b = e // block_sectors * block_sectors
            if a == s and b == e:
                continue
            if b <= a:
                self.set_type(node, RangeType.UNCHANGED)
                continue
            self.free_sectors -= (a - s) + (e - b)
            if b < e:
                self._starts.insert(i + 1, b)
                self._nodes.insert(i + 1, Range(b, RangeType.UNCHANGED))
                self._merge_with_next(i + 1)
            if a > s:
                self._starts.insert(i, s)
                self._nodes.insert(i, Range(s, RangeType.UNCHANGED))
                self._starts[i + 1] = node.start = a
                if i > 0 and self._nodes[i - 1].type == RangeType.UNCHANGED:
                    del self._starts[i], self._nodes[i]

    def _merge_with_next(self, i: int) -> None:
        if self._nodes[i + 1].type == self._nodes[i].type:
            del self._starts[i + 1], self._nodes[i + 1]

    # ---- checks ----

    def check(self) -> None:
        """dm_bow_tablestatus()'s consistency checks; AssertionError if one fails."""
        assert self._starts[0] == 0, "first range does not start at sector 0"
        assert self._nodes[-1].type == RangeType.TOP and self._starts[-1] == self.total_sectors
        assert all(n.start == s for n, s in zip(self._nodes, self._starts))
        assert all(a < b for a, b in zip(self._starts, self._starts[1:])), "sectors out of order"
        assert all(n.type != RangeType.TOP for n in self._nodes[:-1]), "top range is not last"
        trimmed = [n for n in self._nodes if n.type == RangeType.TRIMMED]
        assert set(trimmed) == set(self._fl) and len(self._fl) == len(trimmed), \
            "free list and free ranges differ"
        assert self.free_sectors == sum(e - s for s, e, t in self if t == RangeType.TRIMMED)
