"""The table a free-aware store hands to the kernel's merge (model/kernel_merge.py), on an
in-memory store laid out as the kernel and `start` lay it out.

The rewrite must leave a table the kernel's reader walks to exactly the real exceptions, and a
rewrite cut short after any area must be redone, from what is on disk then, to the same table.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fiesnap.model.exstore import CowException, area_location, exceptions_per_area, read_exception_table
from fiesnap.model.extents import ChunkRun, ChunkSet
from fiesnap.model.kernel_merge import (
    areas_to_write,
    compacted_area,
    compaction_refusal,
    grown_refusal,
    merge_complete,
    merge_remaining,
)
from fiesnap.model.seeding import SeedLayout, encode_seeded_store, seeded_entries
from fiesnap.model.snapstatus import SnapshotUsage, parse_snapshot_status

ORIGIN = 1 << 22


def _store(cb: int, areas: int, n_seeded: int, n_real: int):
    """A seeded store image {chunk: bytes}: n_seeded seeded entries, then n_real real ones
    following them in the table (as the kernel appends), data chunks from area K on."""
    layout = SeedLayout(cb, areas)
    chosen = ChunkSet([ChunkRun(10_000, n_seeded)])
    seeded = seeded_entries(chosen, layout)
    image = encode_seeded_store(seeded, layout)
    epa = exceptions_per_area(cb)
    real, new = [], layout.data_start + 1
    for i in range(n_real):
        while (new - 1) % (epa + 1) == 0:  # skip metadata area positions
            new += 1
        real.append(CowException(500 + 3 * i, new))
        new += 1
    slots = bytearray()
    for e in real:
        slots += e.old_chunk.to_bytes(8, "little") + e.new_chunk.to_bytes(8, "little")
    table = bytearray(seeded) + slots + bytes(16)  # then the terminator
    n_areas = -(-len(table) // cb)
    for a in range(n_areas):
        image[area_location(a, cb)] = bytes(table[a * cb:(a + 1) * cb]).ljust(cb, b"\0")
    return layout, chosen, seeded, tuple(real), image


def _reader(image: dict, cb: int):
    return lambda n: image.get(n, bytes(cb))


def _read_plain(image, layout, cb):
    return read_exception_table(_reader(image, cb), cow_chunks=layout.data_start + 100_000,
                                origin_chunks=ORIGIN, chunk_bytes=cb, data_start=layout.data_start)


def _read_skipping_seeded(image, layout, chosen, seeded, cb):
    return read_exception_table(_reader(image, cb), cow_chunks=layout.data_start + 100_000,
                                origin_chunks=ORIGIN, chunk_bytes=cb, seeded=seeded, seeded_old=chosen,
                                data_start=layout.data_start, seeded_unchecked=True)


def _compact(image, entries, cb, upto: int | None = None):
    """Apply the rewrite area by area, stopping (a crash) after `upto` areas."""
    for i, a in enumerate(areas_to_write(len(entries), cb)):
        if upto is not None and i >= upto:
            return
        loc = area_location(a, cb)
        image[loc] = compacted_area(a, image.get(loc, bytes(cb)), entries, cb)


@settings(max_examples=60, deadline=None)
@given(cb=st.sampled_from([4096, 8192]), areas=st.integers(1, 4), data=st.data())
def test_compaction_leaves_exactly_the_real_exceptions_even_when_cut_short(cb, areas, data):
    epa = exceptions_per_area(cb)
    n_seeded = data.draw(st.integers(2, areas * epa))
    n_real = data.draw(st.integers(0, n_seeded - 1))
    layout, chosen, seeded, real, image = _store(cb, areas, n_seeded, n_real)
    before = _read_skipping_seeded(image, layout, chosen, seeded, cb)
    assert before.entries == real
    steps = len(areas_to_write(n_real, cb))
    crash = data.draw(st.integers(0, steps))
    _compact(image, real, cb, upto=crash)
    # what a re-run reads after the crash: the entries to move are all still where they were
    assert _read_skipping_seeded(image, layout, chosen, seeded, cb).entries == real
    _compact(image, real, cb)
    assert _read_plain(image, layout, cb).entries == real


def test_an_exact_number_of_areas_gets_its_terminator_in_the_next():
    cb = 4096
    epa = exceptions_per_area(cb)
    layout, chosen, seeded, real, image = _store(cb, 3, 2 * epa + 10, epa)
    assert list(areas_to_write(epa, cb)) == [0, 1]
    _compact(image, real, cb)
    assert image[area_location(1, cb)][:16] == bytes(16)
    assert _read_plain(image, layout, cb).entries == real


def test_the_slots_after_the_terminator_are_left_as_they_are():
    cb = 4096
    layout, chosen, seeded, real, image = _store(cb, 1, 200, 30)
    area0 = image[area_location(0, cb)]
    new = compacted_area(0, area0, real, cb)
    assert new[31 * 16:] == area0[31 * 16:]  # seeded slots 31.. and the moved entries 200..229
    assert new[30 * 16:31 * 16] == bytes(16)


def test_refusals():
    assert grown_refusal(1) == ""
    assert "grew after the checkpoint" in grown_refusal(2)
    assert compaction_refusal(5, 0) == ""  # a plain store is not rewritten
    assert compaction_refusal(9, 10) == ""
    assert "more than the 10 free chunks" in compaction_refusal(10, 10)


def test_merge_progress_from_the_kernel_status():
    def usage(text):
        return parse_snapshot_status(text)

    # before the first batch: the old data frontier; capped at the entries handed over
    assert merge_remaining(usage("80000/200000 24"), 100, 4096) == 100
    # during: area 0, 40 entries left -> next_free = 1 + 40 + 1 = 42 chunks, metadata 2 chunks
    assert merge_remaining(usage("336/200000 16"), 100, 4096) == 40
    done = usage("16/200000 16")
    assert merge_complete(done) and merge_remaining(done, 100, 4096) == 0
    assert not merge_complete(usage("24/200000 16"))
    assert not merge_complete(SnapshotUsage("merge-failed"))
    assert merge_remaining(SnapshotUsage("invalid"), 100, 4096) is None


@pytest.mark.parametrize("cb", [4096, 65536])
def test_no_area_beyond_the_entries_is_written(cb):
    epa = exceptions_per_area(cb)
    assert list(areas_to_write(0, cb)) == [0]
    assert list(areas_to_write(epa - 1, cb)) == [0]
    assert list(areas_to_write(epa + 1, cb)) == [0, 1]
