"""dm-snapshot's persistent exception store, read and written in userspace (pure).

Layout (drivers/md/dm-snap-persistent.c), all little-endian, in chunks:

* chunk 0: header {u32 magic, u32 valid, u32 version, u32 chunk_size (sectors)}
* metadata area i at chunk 1 + i*(epa+1), where epa = chunk_bytes / 16;
  each holds epa {u64 old_chunk, u64 new_chunk} entries;
* the first entry with new_chunk == 0 ends the table; an area with no such
  entry is full and the table continues in the next area (the kernel zeroes
  that next area before committing the full one);
* data chunks are allocated from chunk 2 upwards, stepping over area chunks.

The reader validates everything a rollback will rely on before returning,
so a caller that only writes after it returns never acts on a bad table.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import NamedTuple

from fiesnap.errors import StoreFormatError
from fiesnap.model.extents import SECTOR_BYTES, ChunkSet, require_chunk_bytes

SNAP_MAGIC = 0x70416E53  # "SnAp"
DISK_VERSION = 1
HEADER_CHUNKS = 1  # NUM_SNAPSHOT_HDR_CHUNKS
FIRST_DATA_CHUNK = HEADER_CHUNKS + 1  # header, then metadata area 0

_HEADER = struct.Struct("<IIII")
_EXCEPTION = struct.Struct("<QQ")

_NO_CHUNKS = ChunkSet()
_UNTOUCHED = "rollback is impossible; current data was not touched"


def _refuse(what: str) -> StoreFormatError:
    return StoreFormatError(f"snapshot store {what}: {_UNTOUCHED}")


@dataclass(frozen=True)
class StoreHeader:
    magic: int
    valid: int
    version: int
    chunk_sectors: int


def parse_header(buf: bytes) -> StoreHeader:
    """Decode the first 16 bytes of COW chunk 0 (no validation of values)."""
    if len(buf) < _HEADER.size:
        raise _refuse(f"header is truncated ({len(buf)} of {_HEADER.size} bytes)")
    return StoreHeader(*_HEADER.unpack_from(buf, 0))


def encode_header(h: StoreHeader) -> bytes:
    """The 16 header bytes; the kernel zero-fills the rest of chunk 0."""
    return _HEADER.pack(h.magic, h.valid, h.version, h.chunk_sectors)


def exceptions_per_area(chunk_bytes: int) -> int:
    return require_chunk_bytes(chunk_bytes) // _EXCEPTION.size


def area_location(area: int, chunk_bytes: int) -> int:
    """COW chunk holding metadata area `area` (kernel: area_location)."""
    if area < 0:
        raise ValueError(f"negative area index {area}")
    return HEADER_CHUNKS + (exceptions_per_area(chunk_bytes) + 1) * area


def is_metadata_chunk(chunk: int, chunk_bytes: int) -> bool:
    """True for the header chunk and every metadata area chunk."""
    stride = exceptions_per_area(chunk_bytes) + 1
    return chunk == 0 or (chunk >= HEADER_CHUNKS and (chunk - HEADER_CHUNKS) % stride == 0)


def _skip_metadata(next_free: int, stride: int) -> int:
    # kernel: skip_metadata(); an area chunk is never handed out as data
    return next_free + 1 if next_free % stride == HEADER_CHUNKS else next_free


def allocate_new_chunks(n: int, chunk_bytes: int) -> list[int]:
    """The first n data chunks the kernel hands out (persistent_prepare_exception)."""
    if n < 0:
        raise ValueError(f"negative chunk count {n}")
    stride = exceptions_per_area(chunk_bytes) + 1
    out = []
    next_free = FIRST_DATA_CHUNK
    for _ in range(n):
        out.append(next_free)
        next_free = _skip_metadata(next_free + 1, stride)
    return out


class CowException(NamedTuple):
    """Origin chunk `old_chunk` was saved in COW chunk `new_chunk`. A named tuple: a big
    table has hundreds of thousands of them, and a tuple is made many times faster than a
    frozen dataclass."""

    old_chunk: int
    new_chunk: int


@dataclass(frozen=True)
class ExceptionTable:
    """A validated exception table, in on-disk order.

    next_free is what the kernel computes on activation: max(new_chunk)+1
    (at least 2), stepped over a metadata area chunk (read_exceptions ->
    skip_metadata).
    """

    chunk_bytes: int
    entries: tuple[CowException, ...]
    areas_read: int
    next_free: int
    #: seeded entries (model/seeding.py) read before `entries`; checked, not kept.
    seeded: int = 0

    @property
    def used_chunks(self) -> int:
        """COW chunks in use (header, areas, data): chunks [0, next_free).

        The same quantity the kernel reports as allocated; a store extension
        must keep at least this many COW chunks where they are.
        """
        return self.next_free

    @property
    def used_bytes(self) -> int:
        return self.next_free * self.chunk_bytes


def _all_backed(chunk: int) -> bool:
    return True


_ALL_BACKED = _all_backed
_new_tuple = tuple.__new__
_BIG_ENDIAN = sys.byteorder == "big"


def _area_entries(body: bytes) -> tuple[array, array, bool]:
    """(origin chunks, COW chunks, full) of one area's entries up to the first with COW chunk
    0, which ends the table (insert_exceptions); full when there is none."""
    words = array("Q", body[:len(body) - len(body) % _EXCEPTION.size])
    if _BIG_ENDIAN:
        words.byteswap()  # the store is little-endian
    olds, news = words[0::2], words[1::2]
    try:
        end = news.index(0)
    except ValueError:
        return olds, news, True
    return olds[:end], news[:end], False


def read_exception_table(
    read_chunk: Callable[[int], bytes],
    *,
    cow_chunks: int,
    origin_chunks: int,
    chunk_bytes: int,
    seeded: bytes = b"",
    seeded_old: ChunkSet | None = None,
    data_start: int = FIRST_DATA_CHUNK,
    is_backed: Callable[[int], bool] = _all_backed,
    converted: Sequence[tuple[int, int]] = (),
    seeded_unchecked: bool = False,
    is_span_backed: Callable[[int, int], bool] | None = None,
) -> ExceptionTable:
    """Read and fully validate the store, walking it like read_exceptions().

    read_chunk(n) must return the chunk_bytes bytes of COW chunk n.
    cow_chunks is the size of the COW device in chunks; origin_chunks the
    number of origin chunks (round a partial last chunk up, as the kernel's
    sector_to_chunk addresses it).

    Raises StoreFormatError for a blank, foreign, invalidated, other-version,
    other-chunk-size or truncated store, and for any entry a rollback could
    not safely apply (out of range, pointing at metadata, duplicated).
    The kernel itself checks none of the entry properties; refusing is how we
    avoid writing garbage over the user's data.

    A free-aware store passes `seeded` (the seeded entries as they must be on
    disk, computed from the recorded free-space map), `seeded_old` (their
    origin chunks), `data_start` (where its data space starts) and
    `is_backed`: the table must open with exactly those entries, and every
    other entry must name a backed data chunk and an origin chunk with no
    seeded entry. Only the other entries are returned, with `converted` first:
    entries inside `seeded` that are real exceptions (model/seeding.py,
    correct_seeding), checked like any other. `is_span_backed(first, last)`, if given, says
    whether every chunk in that span is backed, so that an area's entries pass at once.
    `seeded_unchecked` skips the seeded slots
    without comparing them: only for a table whose front is being rewritten for the kernel's
    merge (model/kernel_merge.py), where the entries returned are all that is used.
    """
    require_chunk_bytes(chunk_bytes)
    if len(seeded) % _EXCEPTION.size:
        raise ValueError("seeded entries are not whole 16-byte entries")
    n_seeded = len(seeded) // _EXCEPTION.size
    if n_seeded and seeded_old is None:
        raise ValueError("seeded entries need their origin chunks (seeded_old)")
    seeded_old = seeded_old if seeded_old is not None else _NO_CHUNKS
    epa = chunk_bytes // _EXCEPTION.size
    stride = epa + 1
    if cow_chunks < FIRST_DATA_CHUNK:
        raise _refuse(f"is too small ({cow_chunks} chunks) to hold a header and a table")

    def chunk(n: int) -> bytes:
        buf = read_chunk(n)
        if len(buf) != chunk_bytes:
            raise _refuse(f"chunk {n} read back {len(buf)} bytes, expected {chunk_bytes}")
        return buf

    h = parse_header(chunk(0))
    if h.magic == 0:
        raise _refuse(
            "is blank (never initialised by the kernel, so the checkpoint "
            "never became active)"
        )
    if h.magic != SNAP_MAGIC:
        raise _refuse(f"has a bad magic number {h.magic:#010x} (corrupt or not a store)")
    if h.version != DISK_VERSION:
        raise _refuse(f"has on-disk version {h.version}, only {DISK_VERSION} is supported")
    if h.valid == 0:
        raise _refuse(
            "was invalidated by the kernel (it overflowed or had an I/O error), "
            "so it no longer holds every overwritten chunk"
        )
    if h.valid != 1:
        raise _refuse(f"has a corrupt valid flag {h.valid}")
    if h.chunk_sectors * SECTOR_BYTES != chunk_bytes:
        raise _refuse(
            f"uses {h.chunk_sectors * SECTOR_BYTES}-byte chunks, "
            f"but this checkpoint uses {chunk_bytes}-byte chunks"
        )

    entries: list[CowException] = []
    seen_old: set[int] = set()
    seen_new: set[int] = set()

    def check(old: int, new: int, where: str) -> None:
        if old >= origin_chunks:
            raise _refuse(f"{where}: origin chunk beyond the device's {origin_chunks}")
        if new < data_start or new >= cow_chunks:
            raise _refuse(f"{where}: COW chunk outside {data_start}..{cow_chunks - 1}")
        if (new - HEADER_CHUNKS) % stride == 0:
            raise _refuse(f"{where}: COW chunk is a metadata area")
        if not is_backed(new):
            raise _refuse(f"{where}: COW chunk is not backed by the store")
        if old in seen_old or old in seeded_old:
            raise _refuse(f"{where}: origin chunk listed twice")
        if new in seen_new:
            raise _refuse(f"{where}: COW chunk used twice")
        seen_old.add(old)
        seen_new.add(new)
        entries.append(CowException(old, new))

    all_backed = is_backed is _ALL_BACKED

    def area_ok(olds: array, news: array) -> bool:
        """The checks of `check`, for a whole area at once (the common case: all pass)."""
        if not news:
            return True
        lo, hi = min(news), max(news)
        if max(olds) >= origin_chunks or lo < data_start or hi >= cow_chunks:
            return False
        old_set, new_set = set(olds), set(news)
        if len(old_set) != len(olds) or len(new_set) != len(news):
            return False
        first_area = lo - (lo - HEADER_CHUNKS) % stride
        if (hi - first_area) // stride < len(news):  # whichever is shorter: areas in the span,
            if any(m in new_set for m in range(first_area, hi + 1, stride)):
                return False
        elif any((n - HEADER_CHUNKS) % stride == 0 for n in news):  # or the entries themselves
            return False
        if not all_backed and not (is_span_backed is not None and is_span_backed(lo, hi)) \
                and not all(map(is_backed, news)):
            return False
        if seeded_old.contains_any(olds):
            return False
        return seen_old.isdisjoint(old_set) and seen_new.isdisjoint(new_set)

    for old, new in converted:
        check(old, new, f"has a bad converted entry (origin chunk {old} -> COW chunk {new})")
    area = 0
    read = 0
    full = True
    while full:
        loc = HEADER_CHUNKS + stride * area
        if loc >= cow_chunks or not is_backed(loc):
            raise _refuse(
                f"is truncated: the table continues into metadata area {area} "
                f"at chunk {loc}, beyond its {cow_chunks} chunks" if loc >= cow_chunks else
                f"is damaged: the table continues into metadata area {area} at chunk {loc}, "
                "which the store does not back"
            )
        buf = chunk(loc)
        full = True
        first = 0
        if read < n_seeded:
            first = min(n_seeded - read, epa)
            want = seeded[read * _EXCEPTION.size:(read + first) * _EXCEPTION.size]
            got = buf[:first * _EXCEPTION.size]
            if got != want and not seeded_unchecked:
                raise _seeded_mismatch(got, want, area, "a merge would skip a chunk it must restore")
            read += first  # real entries may follow in the same area
        olds, news, full = _area_entries(buf[first * _EXCEPTION.size:])
        if area_ok(olds, news):
            seen_old.update(olds)
            seen_new.update(news)
            entries.extend(map(_new_tuple, repeat(CowException), zip(olds, news)))  # no Python frame each
        else:  # walk it entry by entry: the first bad one is named exactly
            for i, (old, new) in enumerate(zip(olds, news), first):
                check(old, new, f"has a bad entry (area {area}, slot {i}: origin chunk {old} -> COW chunk {new})")
            raise _refuse(f"metadata area {area} failed a check that none of its entries fails "
                          "(please report it)")
        area += 1

    next_free = max(data_start, max(seen_new, default=0) + 1)
    return ExceptionTable(
        chunk_bytes=chunk_bytes,
        entries=tuple(entries),
        areas_read=area,
        next_free=_skip_metadata(next_free, stride),
        seeded=n_seeded - len(converted),
    )


def _seeded_mismatch(got: bytes, want: bytes, area: int, harm: str) -> StoreFormatError:
    """The refusal for seeded entries that differ from what the free map gives: names the
    first differing slot of `area`."""
    size = _EXCEPTION.size
    slot = next(i for i in range(len(want) // size) if got[i * size:(i + 1) * size] != want[i * size:(i + 1) * size])
    old, new = _EXCEPTION.unpack_from(got, slot * size) if len(got) >= (slot + 1) * size else (0, 0)
    return _refuse(
        f"has a seeded entry that does not match the checkpoint's free-space map "
        f"(area {area}, slot {slot}: origin chunk {old} -> COW chunk {new}): forged or damaged, {harm}")


def check_seeded_areas(read_chunk: Callable[[int], bytes], *, seeded: bytes, chunk_bytes: int) -> None:
    """Refuse a store whose seeded entries are not exactly `seeded` (the bytes the checkpoint's
    free map gives). Before the kernel loads a free-aware store again: it would never copy a
    chunk a forged seeded entry names, so the check must come before the load, not only at
    the merge. Reads only the seeded areas; the rest is the merge's to validate."""
    require_chunk_bytes(chunk_bytes)
    stride = chunk_bytes // _EXCEPTION.size + 1
    for area, off in enumerate(range(0, len(seeded), chunk_bytes)):
        want = seeded[off:off + chunk_bytes]
        got = read_chunk(HEADER_CHUNKS + stride * area)[:len(want)]
        if got != want:
            raise _seeded_mismatch(got, want, area, "the kernel would never save that chunk")


def encode_store(
    chunk_bytes: int,
    old_chunks: Sequence[int],
    *,
    valid: int = 1,
    new_chunks: Sequence[int] | None = None,
) -> dict[int, bytes]:
    """The metadata chunks the kernel would have written: {cow_chunk: bytes}.

    Header plus every metadata area in use. new_chunks default to the
    kernel's allocation order (allocate_new_chunks); passing them lets tests
    build out-of-order or deliberately corrupt tables. When the last area is
    exactly full the following area is included, zeroed, as the kernel
    zeroes it before committing (persistent_commit_exception). No validation:
    this is also used to plant bad stores.
    """
    require_chunk_bytes(chunk_bytes)
    epa = chunk_bytes // _EXCEPTION.size
    if new_chunks is None:
        new_chunks = allocate_new_chunks(len(old_chunks), chunk_bytes)
    if len(new_chunks) != len(old_chunks):
        raise ValueError("old_chunks and new_chunks differ in length")
    header = encode_header(
        StoreHeader(SNAP_MAGIC, valid, DISK_VERSION, chunk_bytes // SECTOR_BYTES)
    )
    out = {0: header.ljust(chunk_bytes, b"\0")}
    pairs = list(zip(old_chunks, new_chunks))
    for area in range(len(pairs) // epa + 1):
        body = b"".join(_EXCEPTION.pack(o, n) for o, n in pairs[area * epa : (area + 1) * epa])
        out[area_location(area, chunk_bytes)] = body.ljust(chunk_bytes, b"\0")
    return out


def scan_frontier(read_chunk: Callable[[int], bytes], *, cow_chunks: int,
                  chunk_bytes: int) -> int | None:
    """The store's allocation frontier (next free chunk) as committed on disk, ignoring `valid`.

    Used only to explain an invalidated snapshot: the kernel reports an origin
    write that found the store full as plain `Invalid` (dm-snap.c
    __invalidate_snapshot), so a frontier at the store's end is how we tell an
    overflow from an I/O error. Returns None when there is no SnAp header.
    Never used to decide what a merge writes.
    """
    require_chunk_bytes(chunk_bytes)
    stride = chunk_bytes // _EXCEPTION.size + 1
    if cow_chunks < FIRST_DATA_CHUNK:
        return None
    h = parse_header(read_chunk(0))
    if h.magic != SNAP_MAGIC:
        return None
    highest = FIRST_DATA_CHUNK - 1
    area = 0
    full = True
    while full:
        loc = HEADER_CHUNKS + stride * area
        if loc >= cow_chunks:
            break
        full = True
        for _old, new in _EXCEPTION.iter_unpack(read_chunk(loc)):
            if new == 0:
                full = False
                break
            if new < cow_chunks:
                highest = max(highest, new)
        area += 1
    return _skip_metadata(highest + 1, stride)
