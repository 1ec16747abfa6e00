"""The store header's extent helpers: without_head, head_location, physical_layout (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fiesnap.errors import FilesystemError
from fiesnap.model.extents import Extent, head_location, physical_layout, whole_chunks, without_head

HEAD = 4096
UNWRITTEN = 0x800
LAST = 0x1


def test_without_head_trims_and_keeps_flags() -> None:
    exts = [Extent(0, 1 << 20, 3 * HEAD, UNWRITTEN), Extent(3 * HEAD, 9 << 20, HEAD, UNWRITTEN | LAST)]
    assert without_head(exts, HEAD) == [
        Extent(HEAD, (1 << 20) + HEAD, 2 * HEAD, UNWRITTEN),
        Extent(3 * HEAD, 9 << 20, HEAD, UNWRITTEN | LAST),
    ]
    assert without_head(exts, 0) == exts


def test_without_head_drops_whole_extents_and_splits_later_ones() -> None:
    # 1k-block filesystem: the head is spread over three extents.
    exts = [Extent(0, 100 << 10, 1024), Extent(1024, 50 << 10, 1024), Extent(2048, 10 << 20, 8192, LAST)]
    assert without_head(exts, HEAD) == [Extent(HEAD, (10 << 20) + 2048, 6144, LAST)]
    assert without_head(exts, 10240) == []
    with pytest.raises(ValueError):
        without_head(exts, -1)


def test_head_location() -> None:
    assert head_location([Extent(0, 1 << 20, 8 * HEAD, UNWRITTEN | LAST)], HEAD) == 1 << 20
    # FIEMAP after the header write: written head, unwritten rest, same blocks.
    split = [Extent(0, 1 << 20, HEAD), Extent(HEAD, (1 << 20) + HEAD, 7 * HEAD, UNWRITTEN | LAST)]
    assert head_location(split, HEAD) == 1 << 20
    # Two extents that continue each other physically are one run of blocks.
    assert head_location([Extent(0, 8192, 1024), Extent(1024, 9216, 8192, LAST)], HEAD) == 8192


@pytest.mark.parametrize(
    "exts",
    [
        [],
        [Extent(0, 1 << 20, 2048), Extent(2048, 5 << 20, 1 << 20, LAST)],  # head straddles a jump
        [Extent(0, 1 << 20, 2048, LAST)],  # file shorter than the head
        [Extent(HEAD, 1 << 20, 1 << 20, LAST)],  # no extent at byte 0
    ],
)
def test_head_location_refuses_a_split_head(exts: list[Extent]) -> None:
    with pytest.raises(FilesystemError) as e:
        head_location(exts, HEAD)
    assert str(e.value).startswith(f"the store file's first {HEAD} bytes are not one contiguous extent: ")
    assert "choose a larger --size" in str(e.value)


def test_head_location_bad_size() -> None:
    with pytest.raises(ValueError):
        head_location([Extent(0, 4096, 4096)], 0)


def test_physical_layout_merges_only_true_continuations() -> None:
    before = [Extent(0, 1 << 20, 16 * HEAD, UNWRITTEN | LAST)]
    after = [
        Extent(0, 1 << 20, HEAD),
        Extent(HEAD, (1 << 20) + HEAD, 15 * HEAD, UNWRITTEN | LAST),
    ]
    assert physical_layout(before) == physical_layout(after) == ((0, 1 << 20, 16 * HEAD),)
    moved = [Extent(0, 2 << 20, HEAD), Extent(HEAD, (1 << 20) + HEAD, 15 * HEAD, UNWRITTEN | LAST)]
    assert physical_layout(moved) != physical_layout(before)
    # Physically adjacent but logically not: kept apart (and out-of-order input is sorted).
    gap = [Extent(2 * HEAD, (1 << 20) + HEAD, HEAD), Extent(0, 1 << 20, HEAD)]
    assert physical_layout(gap) == ((0, 1 << 20, HEAD), (2 * HEAD, (1 << 20) + HEAD, HEAD))
    assert physical_layout([]) == ()


@st.composite
def file_maps(draw: st.DrawFn) -> list[Extent]:
    """A fully mapped file of 512-byte-aligned extents at distinct physical places."""
    lengths = draw(st.lists(st.integers(1, 64).map(lambda n: n * 512), min_size=1, max_size=8))
    gaps = draw(st.lists(st.integers(0, 16).map(lambda n: n * 512), min_size=len(lengths), max_size=len(lengths)))
    order = draw(st.permutations(range(len(lengths))))
    phys, pos = {}, 1 << 20
    for i in order:  # place extents physically in a random order, with gaps
        phys[i] = pos + gaps[i]
        pos = phys[i] + lengths[i]
    exts, logical = [], 0
    for i, n in enumerate(lengths):
        exts.append(Extent(logical, phys[i], n, UNWRITTEN))
        logical += n
    return exts


@settings(max_examples=500)
@given(file_maps(), st.sampled_from([512, 1024, 4096, 8192, 65536]), st.sampled_from([512, 1024, 4096, 8192]))
def test_no_store_chunk_touches_the_head(exts: list[Extent], chunk: int, head: int) -> None:
    # Device bytes holding the file's first `head` bytes.
    head_spans = [(e.physical, e.physical + min(e.length, head - e.logical)) for e in exts if e.logical < head]
    rest = without_head(exts, head)
    assert sum(e.length for e in rest) == max(0, sum(e.length for e in exts) - head)
    assert all(e.logical >= head for e in rest)
    for run in whole_chunks(rest, chunk):
        lo, hi = run.start * chunk, run.end * chunk
        for a, b in head_spans:
            assert b <= lo or hi <= a, (run, a, b)
    try:
        at = head_location(exts, head)
    except FilesystemError:
        return
    assert exts[0].physical == at
    for run in whole_chunks(rest, chunk):
        assert run.end * chunk <= at or at + head <= run.start * chunk
