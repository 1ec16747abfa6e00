"""The merge's copy: the store read in its own order in large reads, several in flight.

`plan_batches` is pure and checked as a property: every copy lands in exactly one batch, whole,
read by that batch's one read. The threaded copy itself runs here on real files with O_DIRECT
(the same DirectDevice the merge uses on block devices) against an independent reference
copy; its kernel-level tests (kill -9 and power cuts mid-merge) are in tests/kernel.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fiesnap.kernel.directio import DirectDevice
from fiesnap.model.merge_plan import plan_batches
from fiesnap.services import cowio

CB = 4096


def _copies(draw_chunks: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """(dest, src, length) in bytes from (dest chunk, src chunk, count), made disjoint."""
    out, used_d, used_s = [], set(), set()
    for d, s, n in draw_chunks:
        dc, sc = set(range(d, d + n)), set(range(s, s + n))
        if dc & used_d or sc & used_s:
            continue
        used_d |= dc
        used_s |= sc
        out.append((d * CB, s * CB, n * CB))
    return out


copies = st.lists(st.tuples(st.integers(0, 2000), st.integers(2, 2000), st.integers(1, 8)), max_size=60).map(_copies)


@settings(max_examples=200, deadline=None)
@given(ranges=copies, max_read=st.sampled_from([CB, 3 * CB, 64 * CB]), max_gap=st.sampled_from([0, CB, 16 * CB]))
def test_every_copy_lands_in_exactly_one_batch_whole(ranges, max_read, max_gap):
    batches = plan_batches(ranges, max_read_bytes=max_read, max_gap_bytes=max_gap)
    seen = []
    prev_src = -1
    for b in batches:
        assert b.src > prev_src  # the store is read in its own order
        prev_src = b.src
        assert [w.dest for w in b.writes] == sorted(w.dest for w in b.writes)
        if len(b.writes) > 1:
            assert b.length <= max_read
        for w in b.writes:
            assert 0 <= w.buf_offset and w.buf_offset + w.length <= b.length
            seen.append((w.dest, b.src + w.buf_offset, w.length))
    assert sorted(seen) == sorted(ranges)


def test_contiguous_sources_become_one_read_and_gaps_split_them():
    ranges = [(100 * CB, 10 * CB, CB), (5 * CB, 11 * CB, CB), (900 * CB, 13 * CB, 2 * CB), (50 * CB, 40 * CB, CB)]
    (one, two) = plan_batches(ranges, max_read_bytes=1 << 20, max_gap_bytes=CB)
    assert (one.src, one.length) == (10 * CB, 5 * CB)  # chunks 10, 11, (12 read and dropped), 13-14
    assert [w.dest for w in one.writes] == [5 * CB, 100 * CB, 900 * CB]
    assert (two.src, two.length, len(two.writes)) == (40 * CB, CB, 1)


def _direct_ok(tmp_path: Path) -> bool:
    try:
        fd = os.open(tmp_path / "probe", os.O_CREAT | os.O_RDWR | os.O_DIRECT)
        os.close(fd)
        return True
    except OSError:
        return False


@pytest.mark.parametrize("workers", [1, 4])
def test_threaded_copy_matches_a_reference_copy(tmp_path: Path, workers: int) -> None:
    if not _direct_ok(tmp_path):
        pytest.skip("this filesystem has no O_DIRECT")
    rng = random.Random(7)
    store = bytearray(rng.randbytes(1000 * CB))
    device = bytearray(rng.randbytes(3000 * CB))
    dests = rng.sample(range(0, 2990, 10), 200)
    ranges, src = [], 2
    for d in dests:
        n = rng.randint(1, 6)
        ranges.append((d * CB, src * CB, n * CB))
        src += n + (1 if rng.random() < 0.2 else 0)  # now and then a gap, like a metadata area
    want = bytearray(device)
    for d, s, n in ranges:
        want[d:d + n] = store[s:s + n]
    (tmp_path / "store").write_bytes(store)
    (tmp_path / "device").write_bytes(device)
    batches = plan_batches(ranges, max_read_bytes=64 * CB, max_gap_bytes=4 * CB)
    assert len(batches) < len(ranges) / 3
    done: list[int] = []
    with DirectDevice.open(str(tmp_path / "store"), write=False) as s, \
            DirectDevice.open(str(tmp_path / "device"), write=True) as d:
        copied = cowio._copy_batches(batches, s, d, 64 * CB, done.append, workers)
    assert copied == sum(n for _, _, n in ranges) == sum(done)
    assert (tmp_path / "device").read_bytes() == bytes(want)
    assert (tmp_path / "store").read_bytes() == bytes(store)  # the store is only read


def test_a_failed_write_stops_the_copy_with_that_error(tmp_path: Path, monkeypatch) -> None:
    if not _direct_ok(tmp_path):
        pytest.skip("this filesystem has no O_DIRECT")
    (tmp_path / "store").write_bytes(bytes(400 * CB))
    (tmp_path / "device").write_bytes(bytes(400 * CB))
    ranges = [(i * 2 * CB, (2 + i * 3) * CB, CB) for i in range(100)]
    batches = plan_batches(ranges, max_read_bytes=2 * CB, max_gap_bytes=0)
    real = os.pwritev
    calls = []

    def failing(fd, bufs, off):
        calls.append(off)
        if len(calls) == 5:
            raise OSError(5, "Input/output error")
        return real(fd, bufs, off)

    monkeypatch.setattr(os, "pwritev", failing)
    with DirectDevice.open(str(tmp_path / "store"), write=False) as s, \
            DirectDevice.open(str(tmp_path / "device"), write=True) as d:
        with pytest.raises(OSError, match="Input/output error"):
            cowio._copy_batches(batches, s, d, 2 * CB, lambda n: None, 4)
    assert len(calls) < len(ranges)  # what had not started did not run


def test_logged_progress_says_rate_and_time_left_every_tenth() -> None:
    from fiesnap.commands.progress import LoggedProgress

    now = [100.0]
    lines: list[str] = []
    p = LoggedProgress("'cp': rollback", 100 << 20, lines.append, clock=lambda: now[0])
    for _ in range(10):
        now[0] += 1.0
        p.advance(10 << 20)
    assert len(lines) == 9  # 10% .. 90%; the end is said by the merge itself
    assert lines[0] == "'cp': rollback 10% copied (10.0 MiB of 100.0 MiB, 10.0 MiB/s, about 9 s left)"
    assert lines[-1].startswith("'cp': rollback 90% copied") and lines[-1].endswith("about 1 s left)")


def test_an_interrupt_drops_the_batches_not_started(tmp_path: Path, monkeypatch) -> None:
    """^C lands in the main thread, waiting for batches: those not started never run (a re-run
    of the merge copies everything again anyway)."""
    if not _direct_ok(tmp_path):
        pytest.skip("this filesystem has no O_DIRECT")
    (tmp_path / "store").write_bytes(bytes(400 * CB))
    (tmp_path / "device").write_bytes(bytes(400 * CB))
    ranges = [(i * 2 * CB, (2 + i * 3) * CB, CB) for i in range(100)]
    batches = plan_batches(ranges, max_read_bytes=CB, max_gap_bytes=0)
    writes = []
    real = os.pwritev
    monkeypatch.setattr(os, "pwritev", lambda fd, bufs, off: writes.append(off) or real(fd, bufs, off))

    def interrupted(n: int) -> None:
        raise KeyboardInterrupt

    with DirectDevice.open(str(tmp_path / "store"), write=False) as s, \
            DirectDevice.open(str(tmp_path / "device"), write=True) as d:
        with pytest.raises(KeyboardInterrupt):
            cowio._copy_batches(batches, s, d, CB, interrupted, 4)
    assert len(writes) <= 2 * 4 + 4  # at most what was queued or running when it came


def test_copy_back_restores_a_clipped_last_chunk_exactly(tmp_path: Path, monkeypatch) -> None:
    """The whole copy_back, buffer sizing and the origin's partial last chunk included: the
    device's size is not a multiple of the chunk, so its last copy is clipped (a regular file
    stands in for the device: the device-number check is the kernel tests' to prove)."""
    if not _direct_ok(tmp_path):
        pytest.skip("this filesystem has no O_DIRECT")
    from types import SimpleNamespace

    from fiesnap.model.exstore import CowException, ExceptionTable
    from fiesnap.model.extents import ChunkSet
    from fiesnap.model.merge_plan import plan_merge

    device_bytes = 300 * CB + 1024  # the last chunk, 300, is 1 KiB long
    rng = random.Random(3)
    store = rng.randbytes(400 * CB)
    device = bytearray(rng.randbytes(device_bytes))
    pairs = [(c, 2 + i) for i, c in enumerate(sorted(rng.sample(range(299), 120)) + [300])]
    table = ExceptionTable(CB, tuple(CowException(o, n) for o, n in pairs), 1, 200)
    plan = plan_merge(table, forbidden=ChunkSet(), max_run_chunks=256)
    want = bytearray(device)
    for o, n in pairs:
        end = min((o + 1) * CB, device_bytes)
        want[o * CB:end] = store[n * CB:n * CB + end - o * CB]
    (tmp_path / "store").write_bytes(store)
    (tmp_path / "device").write_bytes(device)
    real_open = cowio.DirectDevice.open
    monkeypatch.setattr(cowio.DirectDevice, "open",
                        classmethod(lambda cls, path, *, write, expect_rdev=None, exclusive=False:
                                    real_open(path, write=write)))
    record = SimpleNamespace(device_bytes=device_bytes, device_major=0, device_minor=0)
    result = cowio.copy_back(plan, record, str(tmp_path / "store"), str(tmp_path / "device"))
    assert (tmp_path / "device").read_bytes() == bytes(want)
    assert result.chunks == len(pairs) and result.bytes_copied == 120 * CB + 1024


def test_a_progress_display_that_fails_does_not_stop_the_copy(tmp_path: Path) -> None:
    """stderr closed under a merge (a pipe whose reader went away): the rollback goes on."""
    if not _direct_ok(tmp_path):
        pytest.skip("this filesystem has no O_DIRECT")
    rng = random.Random(5)
    store = rng.randbytes(200 * CB)
    (tmp_path / "store").write_bytes(store)
    (tmp_path / "device").write_bytes(bytes(200 * CB))
    ranges = [(i * 3 * CB, (2 + i) * CB, CB) for i in range(40)]
    batches = plan_batches(ranges, max_read_bytes=4 * CB, max_gap_bytes=0)

    def broken_pipe(n: int) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    with DirectDevice.open(str(tmp_path / "store"), write=False) as s, \
            DirectDevice.open(str(tmp_path / "device"), write=True) as d:
        assert cowio._copy_batches(batches, s, d, 4 * CB, broken_pipe, 4) == 40 * CB
    device = (tmp_path / "device").read_bytes()
    assert all(device[dest:dest + n] == store[src:src + n] for dest, src, n in ranges)
