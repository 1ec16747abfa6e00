"""The free-aware store: a pre-written exception for every chunk free at the checkpoint (pure).

dm-snapshot reads its whole exception table when the snapshot table is
loaded and never copies a chunk that already has an exception. A store whose
table is written beforehand with one "seeded" exception per chunk that was
entirely free at the checkpoint therefore copies nothing when the filesystem
writes into free space (new files, rewrite-by-rename): only overwrites of
checkpoint-time data cost store space, as with dm-bow.

COW address space of a store with K seeded areas (epa = chunk_bytes / 16
entries per area, areas at chunk 1 + k*(epa+1)):

    chunk 0                      header                 backed
    area 0 .. area K-1           the seeded entries     backed, one chunk each
    between them                 never touched          `error`
    [D, D+256), D = area K - 256 where seeded entries point   `zero`
    area K onwards               real exceptions: data and metadata   backed

A seeded entry maps free chunk `w*256 + j` to dummy chunk `D + j`, so a run
of free chunks inside one 256-aligned window of origin chunks is also a run
of consecutive COW chunks, and the kernel keeps it as one in-core exception
(dm_insert_exception joins neighbours whose old and new chunks are both
consecutive; the table's hash groups old chunks by `old >> 8`). The last
entry points at D+255 whatever its window offset: the kernel starts
allocating data after the highest COW chunk it read (read_exceptions:
next_free = max(new_chunk) + 1, then it steps over area K), and data must
never land in the dummy region. Data chunks then follow area K exactly as in
a plain store, so metadata areas never run ahead of the data frontier.

Seeded entries never hold data: the dummy region reads zeros (the checkpoint
view shows zeros where the checkpoint had free space) and nothing writes to
it because the checkpoint view is read-only. A merge skips them, but only
after checking that they are exactly the ones this module computes from the
recorded free-space map: a forged entry would make the merge skip a chunk
that was live at the checkpoint.

Chunks are chosen largest free run first (allocators put large new files
there), up to a capacity of K areas: a free chunk left unseeded is copied on
its first write, as in a plain store, so seeding less is always safe.
"""

from __future__ import annotations

import struct
import sys
from array import array
from dataclasses import dataclass
from typing import Iterable

from fiesnap.model.cowtable import ERROR, LINEAR, ZERO, CowTable, Segment
from fiesnap.model.exstore import (
    DISK_VERSION,
    SNAP_MAGIC,
    StoreHeader,
    area_location,
    encode_header,
    exceptions_per_area,
)
from fiesnap.model.extents import SECTOR_BYTES, ChunkRun, ChunkSet, free_chunks

#: Origin chunks per in-core exception run: the kernel's 8-bit consecutive count
#: and its hash by `old_chunk >> 8` (DM_CHUNK_CONSECUTIVE_BITS).
WINDOW = 256

#: At most this many seeded metadata areas. Each is a backed chunk between
#: two holes, so about two `NAME-cow` targets: thousands are fine for a dm
#: table, a million is not. 4096 areas seed 1 M chunks (4 GiB at 4 KiB chunks,
#: 64 GiB at 64 KiB) and cost 16 MiB of store.
MAX_SEEDED_AREAS = 4096

_ENTRY = struct.Struct("<QQ")


@dataclass(frozen=True)
class SeedLayout:
    """Where a free-aware store keeps its seeded areas, dummy region and data."""

    chunk_bytes: int
    areas: int

    def __post_init__(self) -> None:
        if self.areas < 1:
            raise ValueError(f"a free-aware store needs at least one seeded area, not {self.areas}")
        if exceptions_per_area(self.chunk_bytes) < WINDOW:
            raise ValueError(f"{self.chunk_bytes}-byte chunks are too small for a free-aware store")

    @property
    def per_area(self) -> int:
        return exceptions_per_area(self.chunk_bytes)

    @property
    def capacity(self) -> int:
        """Seeded entries the areas hold."""
        return self.areas * self.per_area

    @property
    def data_start(self) -> int:
        """COW chunk of area K: real exceptions' metadata and data start here."""
        return area_location(self.areas, self.chunk_bytes)

    @property
    def dummy_start(self) -> int:
        return self.data_start - WINDOW

    def is_dummy(self, cow_chunk: int) -> bool:
        return self.dummy_start <= cow_chunk < self.data_start

    def prefix_backed(self) -> list[int]:
        """The COW chunks of the prefix that need a physical chunk: header and seeded areas."""
        return [0] + [area_location(k, self.chunk_bytes) for k in range(self.areas)]

    def prefix_segments(self) -> list[tuple[int, int, str]]:
        """(cow_start, count, kind) covering [0, data_start), backed ones as LINEAR."""
        out: list[tuple[int, int, str]] = []

        def add(start: int, count: int, kind: str) -> None:
            if count <= 0:
                return
            if out and out[-1][2] == kind and out[-1][0] + out[-1][1] == start:
                out[-1] = (out[-1][0], out[-1][1] + count, kind)
            else:
                out.append((start, count, kind))

        add(0, 1, LINEAR)
        for k in range(self.areas):
            loc = area_location(k, self.chunk_bytes)
            add(loc, 1, LINEAR)
            end = self.dummy_start if k == self.areas - 1 else area_location(k + 1, self.chunk_bytes)
            add(loc + 1, end - loc - 1, ERROR)
        add(self.dummy_start, WINDOW, ZERO)
        return out

    def check_table(self, cow: CowTable) -> None:
        """ValueError unless `cow` is laid out as this layout says (a damaged record)."""
        if cow.chunk_bytes != self.chunk_bytes:
            raise ValueError("chunk size differs from the layout's")
        if cow.total_chunks <= self.data_start:
            raise ValueError("the store has no data space after its seeded areas")
        got: list[tuple[int, int, str]] = []
        for s in cow.segments:
            start, end = s.cow_start, min(s.cow_end, self.data_start)
            if s.cow_end > self.data_start and not s.backed:
                raise ValueError(f"the data space holds an unbacked stretch at COW chunk {max(start, self.data_start)}")
            if start >= self.data_start:
                continue
            if got and got[-1][2] == s.kind and got[-1][0] + got[-1][1] == start:
                got[-1] = (got[-1][0], got[-1][1] + end - start, s.kind)
            else:
                got.append((start, end - start, s.kind))
        if got != self.prefix_segments():
            raise ValueError("its seeded prefix is not laid out as a free-aware store's")


def areas_for(chunks: int, chunk_bytes: int, *, max_areas: int = MAX_SEEDED_AREAS) -> int:
    """Seeded areas to reserve for about `chunks` free chunks: one spare for what frees up
    before the checkpoint; 0 when there is nothing to seed."""
    if chunks <= 0:
        return 0
    epa = exceptions_per_area(chunk_bytes)
    return min(max_areas, -(-chunks // epa) + 1)


def choose_seeded(free: ChunkSet, capacity: int) -> ChunkSet:
    """The free chunks to seed: largest runs first, the last one cut to fit `capacity`.

    Deterministic in (free, capacity): the merge recomputes it to check the table.
    """
    chosen: list[ChunkRun] = []
    left = capacity
    for run in sorted(free.runs, key=lambda r: (-r.count, r.start)):
        if left <= 0:
            break
        take = min(run.count, left)
        chosen.append(ChunkRun(run.start, take))
        left -= take
    return ChunkSet(chosen)


def seeded_entries(chosen: ChunkSet, layout: SeedLayout) -> bytes:
    """The seeded entries as on disk (16 bytes each), ordered by origin chunk.

    Built run by run with C-level array operations: an online start computes this inside
    the freeze, for up to MAX_SEEDED_AREAS * chunk_bytes / 16 entries.
    """
    d = layout.dummy_start
    window = array("Q", range(d, d + WINDOW))
    out = array("Q")
    for run in chosen.runs:
        n = run.count
        pair = array("Q", bytes(16 * n))
        pair[0::2] = array("Q", range(run.start, run.end))
        first = run.start % WINDOW
        news = window[first:] + window * ((n + first) // WINDOW)
        pair[1::2] = news[:n]
        out.extend(pair)
    if out:
        out[-1] = d + WINDOW - 1
    if sys.byteorder != "little":
        out.byteswap()
    return out.tobytes()


def encode_seeded_store(entries: bytes, layout: SeedLayout) -> dict[int, bytes]:
    """{COW chunk: bytes} to write before the snapshot is loaded: a valid header,
    the K seeded areas, and area K zeroed (the kernel reads it when area K-1 is full)."""
    cb = layout.chunk_bytes
    if len(entries) % _ENTRY.size or not 0 < len(entries) // _ENTRY.size <= layout.capacity:
        raise ValueError(f"{len(entries) // _ENTRY.size} seeded entries do not fit {layout.areas} areas")
    header = encode_header(StoreHeader(SNAP_MAGIC, 1, DISK_VERSION, cb // SECTOR_BYTES))
    out = {0: header.ljust(cb, b"\0")}
    for k in range(layout.areas):
        out[area_location(k, cb)] = entries[k * cb:(k + 1) * cb].ljust(cb, b"\0")
    out[layout.data_start] = bytes(cb)
    return out


def seeded_cow_table(runs: Iterable[ChunkRun], layout: SeedLayout) -> CowTable:
    """The COW table over the store file's whole chunks (file order): the first
    K+1 physical chunks back the header and the seeded areas, the rest is data."""
    wanted = layout.prefix_backed()
    it = iter(runs)
    phys: list[int] = []
    rest: list[ChunkRun] = []
    for r in it:
        take = min(r.count, len(wanted) - len(phys))
        phys.extend(range(r.start, r.start + take))
        if take < r.count:
            rest.append(ChunkRun(r.start + take, r.count - take))
            break
    rest.extend(it)
    if len(phys) < len(wanted) or not rest:
        raise ValueError("the store file is too small for its seeded areas")
    segs: list[Segment] = []
    backed = iter(zip(wanted, phys))
    for start, count, kind in layout.prefix_segments():
        if kind != LINEAR:
            segs.append(Segment(start, count, 0, kind))
            continue
        for cow, p in (next(backed) for _ in range(count)):
            last = segs[-1] if segs else None
            if last is not None and last.backed and last.cow_end == cow and last.phys_start + last.count == p:
                segs[-1] = Segment(last.cow_start, last.count + 1, last.phys_start)
            else:
                segs.append(Segment(cow, 1, p))
    pos = layout.data_start
    for r in rest:
        last = segs[-1]
        if last.backed and last.cow_end == pos and last.phys_start + last.count == r.start:
            segs[-1] = Segment(last.cow_start, last.count + r.count, last.phys_start)
        else:
            segs.append(Segment(pos, r.count, r.start))
        pos += r.count
    return CowTable(layout.chunk_bytes, tuple(segs))


@dataclass(frozen=True)
class SeedPlan:
    """The seeded chunks for a free map, and the metadata to write.

    A plan made from a map read before the checkpoint (an online start prepares its table
    before the freeze) is corrected for the checkpoint-time map by `correct_seeding`: its
    chunks that are no longer free keep their slots, as real exceptions (`converted`) whose
    data chunks get the chunk's checkpoint content copied in.
    """

    layout: SeedLayout
    chosen: ChunkSet
    entries: bytes
    converted: tuple[tuple[int, int], ...] = ()  # (origin chunk, data chunk), by origin chunk

    @property
    def count(self) -> int:
        """Seeded exceptions (those pointing into the dummy region)."""
        return len(self.entries) // _ENTRY.size - len(self.converted)

    @property
    def seeded(self) -> ChunkSet:
        """The origin chunks with a seeded exception."""
        if not self.converted:
            return self.chosen
        return difference(self.chosen, ChunkSet(ChunkRun(c, 1) for c, _ in self.converted))

    def metadata(self) -> dict[int, bytes]:
        return encode_seeded_store(self.entries, self.layout)

    def changed_areas(self) -> dict[int, bytes]:
        """The metadata area chunks a correction rewrote (with their new bytes)."""
        cb = self.layout.chunk_bytes
        areas = sorted({self.slot_of(c) // self.layout.per_area for c, _ in self.converted})
        return {area_location(a, cb): self.entries[a * cb:(a + 1) * cb].ljust(cb, b"\0") for a in areas}

    def slot_of(self, chunk: int) -> int:
        """Index of `chunk`'s entry (its rank among the chosen chunks)."""
        before = 0
        for r in self.chosen.runs:
            if r.start <= chunk < r.end:
                return before + chunk - r.start
            before += r.count
        raise ValueError(f"chunk {chunk} was not chosen")


def difference(a: ChunkSet, b: ChunkSet) -> ChunkSet:
    """The chunks of `a` not in `b`, run by run."""
    out: list[ChunkRun] = []
    bruns = b.runs
    j = 0
    for r in a.runs:
        start = r.start
        while j < len(bruns) and bruns[j].end <= start:
            j += 1
        k = j
        while start < r.end:
            if k < len(bruns) and bruns[k].start < r.end:
                if bruns[k].start > start:
                    out.append(ChunkRun(start, bruns[k].start - start))
                start = max(start, bruns[k].end)
                k += 1
            else:
                out.append(ChunkRun(start, r.end - start))
                break
    return ChunkSet(out)


def copy_runs(pairs: Iterable[tuple[int, int]], max_run: int) -> list[tuple[int, int, int]]:
    """(origin chunk, data chunk, count): `pairs` joined where both sides run on, at most
    `max_run` chunks each (a correction copies them inside the freeze: fewer, larger I/Os)."""
    out: list[tuple[int, int, int]] = []
    for c, d in pairs:
        if out and out[-1][2] < max_run and out[-1][0] + out[-1][2] == c and out[-1][1] + out[-1][2] == d:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((c, d, 1))
    return out


def correct_seeding(plan: SeedPlan, free_map: Iterable[tuple[int, int]]) -> SeedPlan:
    """`plan` (made from an earlier free map) for the checkpoint-time `free_map`.

    A chunk allocated in between would otherwise keep a seeded exception and never be
    saved. Its entry keeps its slot (no later entry moves, so only the areas holding such
    entries change) and points at a data chunk instead, handed out in origin-chunk order
    from the first data chunk as the kernel would (the kernel then allocates after the
    highest one). The caller copies each chunk's content at the checkpoint there. Chunks
    free now but not then stay unseeded: safe, they are copied on their first write.
    """
    layout = plan.layout
    stale = difference(plan.chosen, free_chunks(free_map, layout.chunk_bytes))
    if not len(stale):
        return plan
    stride = layout.per_area + 1
    data = layout.data_start + 1
    entries = bytearray(plan.entries)
    converted = []
    for c in stale:
        converted.append((c, data))
        _ENTRY.pack_into(entries, plan.slot_of(c) * _ENTRY.size, c, data)
        data += 1
        if data % stride == 1:  # a metadata area position (kernel: skip_metadata)
            data += 1
    return SeedPlan(layout, plan.chosen, bytes(entries), tuple(converted))


def plan_seeding(free_map: Iterable[tuple[int, int]], layout: SeedLayout, *,
                 store: ChunkSet = ChunkSet()) -> SeedPlan:
    """Seed whole chunks free in `free_map` (byte ranges), up to the layout's capacity.

    `store` (the store file's chunks) cannot be free in a map read after the
    store file was made; a hit means the map is not the checkpoint's, and
    seeding it would corrupt the store: ValueError.
    """
    chosen = choose_seeded(free_chunks(free_map, layout.chunk_bytes), layout.capacity)
    for run in store.runs:
        hit = chosen.first_overlap(run.start, run.count)
        if hit is not None:
            raise ValueError(f"chunk {hit} is both free and part of the store file")
    return SeedPlan(layout, chosen, seeded_entries(chosen, layout))


def recorded_plan(layout: SeedLayout, free_map: Iterable[tuple[int, int]],
                  seed_map: Iterable[tuple[int, int]] = ()) -> SeedPlan:
    """The seeded table a checkpoint record describes: made from `seed_map` (the map it was
    prepared from) and corrected for `free_map` (the checkpoint's), or made from `free_map`
    when both are one map."""
    seed_map = tuple(seed_map)
    if seed_map:
        return correct_seeding(plan_seeding(seed_map, layout), free_map)
    return plan_seeding(free_map, layout)
