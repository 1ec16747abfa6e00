"""validate_extents: what FIEMAP output fiesnap accepts as a store's map (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fiesnap.errors import FilesystemError
from fiesnap.model.extents import Extent
from fiesnap.kernel.fiemap import (
    FIEMAP_EXTENT_DATA_ENCRYPTED,
    FIEMAP_EXTENT_DATA_INLINE,
    FIEMAP_EXTENT_DATA_TAIL,
    FIEMAP_EXTENT_DELALLOC,
    FIEMAP_EXTENT_ENCODED,
    FIEMAP_EXTENT_LAST,
    FIEMAP_EXTENT_MERGED,
    FIEMAP_EXTENT_NOT_ALIGNED,
    FIEMAP_EXTENT_SHARED,
    FIEMAP_EXTENT_UNKNOWN,
    FIEMAP_EXTENT_UNWRITTEN,
    validate_extents,
)

K = 4096
LAST = FIEMAP_EXTENT_LAST
UNWRITTEN = FIEMAP_EXTENT_UNWRITTEN


def test_single_extent_ok() -> None:
    exts = [Extent(0, 100 * K, 16 * K, LAST)]
    assert validate_extents(exts, 16 * K) == exts


def test_unwritten_accepted() -> None:
    exts = [Extent(0, 100 * K, 8 * K, UNWRITTEN), Extent(8 * K, 500 * K, 8 * K, UNWRITTEN | LAST)]
    assert validate_extents(exts, 16 * K) == exts


def test_returned_in_logical_order() -> None:
    a = Extent(0, 900 * K, 4 * K)
    b = Extent(4 * K, 100 * K, 4 * K, LAST)
    assert validate_extents([b, a], 8 * K) == [a, b]


@pytest.mark.parametrize(
    "flag",
    [
        FIEMAP_EXTENT_UNKNOWN,
        FIEMAP_EXTENT_DELALLOC | FIEMAP_EXTENT_UNKNOWN,
        FIEMAP_EXTENT_ENCODED,
        FIEMAP_EXTENT_DATA_ENCRYPTED,
        FIEMAP_EXTENT_DATA_INLINE | FIEMAP_EXTENT_NOT_ALIGNED,
        FIEMAP_EXTENT_DATA_TAIL | FIEMAP_EXTENT_NOT_ALIGNED,
        FIEMAP_EXTENT_NOT_ALIGNED,
        FIEMAP_EXTENT_SHARED,
        FIEMAP_EXTENT_MERGED,
        0x8000_0000,  # a flag this code doesn't know: refused, not ignored
    ],
)
@pytest.mark.parametrize("where", [0, 1])
def test_bad_flags_refused(flag: int, where: int) -> None:
    exts = [Extent(0, 100 * K, 4 * K), Extent(4 * K, 200 * K, 4 * K, LAST)]
    e = exts[where]
    exts[where] = Extent(e.logical, e.physical, e.length, e.flags | flag)
    with pytest.raises(FilesystemError, match="flags"):
        validate_extents(exts, 8 * K)


def test_missing_last_refused() -> None:
    with pytest.raises(FilesystemError, match="last extent"):
        validate_extents([Extent(0, 100 * K, 8 * K)], 8 * K)


def test_last_not_last_refused() -> None:
    exts = [Extent(0, 100 * K, 4 * K, LAST), Extent(4 * K, 200 * K, 4 * K, LAST)]
    with pytest.raises(FilesystemError, match="LAST"):
        validate_extents(exts, 8 * K)


def test_hole_in_middle_refused() -> None:
    exts = [Extent(0, 100 * K, 4 * K), Extent(8 * K, 200 * K, 4 * K, LAST)]
    with pytest.raises(FilesystemError, match=f"hole at byte {4 * K}\\b"):
        validate_extents(exts, 12 * K)


def test_hole_at_start_refused() -> None:
    with pytest.raises(FilesystemError, match="hole at byte 0"):
        validate_extents([Extent(4 * K, 100 * K, 4 * K, LAST)], 8 * K)


def test_hole_at_end_refused() -> None:
    with pytest.raises(FilesystemError, match=f"hole at byte {4 * K}\\b"):
        validate_extents([Extent(0, 100 * K, 4 * K, LAST)], 8 * K)


def test_no_extents_for_nonempty_file_refused() -> None:
    with pytest.raises(FilesystemError, match="no extents"):
        validate_extents([], 4 * K)


def test_empty_file_has_empty_map() -> None:
    assert validate_extents([], 0) == []


def test_logical_overlap_refused() -> None:
    exts = [Extent(0, 100 * K, 8 * K), Extent(4 * K, 200 * K, 4 * K, LAST)]
    with pytest.raises(FilesystemError, match="overlap"):
        validate_extents(exts, 8 * K)


def test_physical_overlap_refused() -> None:
    exts = [Extent(0, 100 * K, 8 * K), Extent(8 * K, 104 * K, 4 * K, LAST)]
    with pytest.raises(FilesystemError, match="share physical"):
        validate_extents(exts, 12 * K)


@pytest.mark.parametrize(
    "ext",
    [
        Extent(0, 100 * K + 1, 4 * K, LAST),  # physical
        Extent(0, 100 * K, 4 * K + 100, LAST),  # length
    ],
)
def test_unaligned_refused(ext: Extent) -> None:
    with pytest.raises(FilesystemError, match="512-byte aligned"):
        validate_extents([ext], 4 * K)


def test_zero_length_refused() -> None:
    with pytest.raises(FilesystemError, match="length 0"):
        validate_extents([Extent(0, 100 * K, 0, LAST)], 0)


def test_physical_zero_refused() -> None:
    with pytest.raises(FilesystemError, match="physical byte 0"):
        validate_extents([Extent(0, 0, 4 * K, LAST)], 4 * K)


def test_tail_block_clipped_to_sector_after_eof() -> None:
    # 5000-byte file in one 8 KiB extent: only what holds the file is handed out.
    out = validate_extents([Extent(0, 100 * K, 8 * K, LAST)], 5000)
    assert out == [Extent(0, 100 * K, 5120, LAST)]


def test_extents_past_eof_dropped() -> None:
    # Speculative preallocation past EOF can be freed by the filesystem at any time.
    exts = [
        Extent(0, 100 * K, 4 * K, UNWRITTEN),
        Extent(4 * K, 200 * K, 4 * K),
        Extent(64 * K, 300 * K, 64 * K, UNWRITTEN | LAST),
    ]
    assert validate_extents(exts, 8 * K) == [exts[0], Extent(4 * K, 200 * K, 4 * K, LAST)]


def test_flags_checked_past_eof_too() -> None:
    exts = [Extent(0, 100 * K, 4 * K), Extent(4 * K, 200 * K, 4 * K, FIEMAP_EXTENT_SHARED | LAST)]
    with pytest.raises(FilesystemError):
        validate_extents(exts, 4 * K)


@st.composite
def _tilings(draw: st.DrawFn) -> tuple[list[Extent], int]:
    lengths = draw(st.lists(st.integers(1, 64), min_size=1, max_size=20))
    gaps = draw(st.lists(st.integers(0, 8), min_size=len(lengths), max_size=len(lengths)))
    exts, logical, physical = [], 0, 8
    for n, gap in zip(lengths, gaps):
        physical += gap
        exts.append(Extent(logical * 512, physical * 512, n * 512, draw(st.sampled_from([0, UNWRITTEN]))))
        logical += n
        physical += n
    last = exts[-1]
    exts[-1] = Extent(last.logical, last.physical, last.length, last.flags | LAST)
    return draw(st.permutations(exts)), logical * 512


@given(_tilings())
def test_any_complete_tiling_accepted(case: tuple[list[Extent], int]) -> None:
    exts, size = case
    out = validate_extents(exts, size)
    assert out == sorted(exts, key=lambda e: e.logical)
    assert sum(e.length for e in out) == size


@given(_tilings(), st.data())
def test_removing_any_extent_refused(case: tuple[list[Extent], int], data: st.DataObject) -> None:
    exts, size = case
    ordered = sorted(exts, key=lambda e: e.logical)
    victim = data.draw(st.integers(0, len(ordered) - 1))
    if len(ordered) == 1:
        rest: list[Extent] = []
    else:
        rest = ordered[:victim] + ordered[victim + 1 :]
        if victim == len(ordered) - 1:
            last = rest[-1]
            rest[-1] = Extent(last.logical, last.physical, last.length, last.flags | LAST)
    with pytest.raises(FilesystemError):
        validate_extents(rest, size)
