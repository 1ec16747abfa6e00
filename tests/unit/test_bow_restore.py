"""Restore from dm-bow logs built by hand: exact rollback, crash at every write, refusals.

The images come from a tiny test-local writer that follows dm-bow's write path at block
granularity (drivers/md/dm-bow.c: prepare_log, prepare_unchanged_range, backup_log_sector) and
writes the real on-disk log, independently of bow_compat.model.
"""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from bow_compat.errors import BowFormatError, BowStateError
from bow_compat.format import (
    RESTORING_MAGIC,
    SECTOR,
    LogEntry,
    LogSector,
    block_checksum,
    capacity,
    decode,
    encode,
)
from bow_compat.image import MemoryImage
from bow_compat.inspect import describe, render_text
from bow_compat.restore import Relocations, plan_restore, restore


# ------------------------------------------------------------------ a test-local dm-bow writer

class NoSpace(Exception):
    pass


class BowWriter:
    """dm-bow in CHECKPOINT state over a bytearray, one block per range unit.

    `free` are the blocks trimmed before the checkpoint. `max_entries` lets a test chain log
    sectors earlier than a full block would (restore accepts any count up to capacity).
    """

    def __init__(self, nblocks: int, bs: int, free: set[int], seed: int = 0,
                 max_entries: int | None = None) -> None:
        assert 0 not in free
        self.bs, self.spb, self.n = bs, bs // SECTOR, nblocks
        self.rng = random.Random(seed)
        self.img = bytearray(self.rng.randbytes(nblocks * bs))
        self.checkpoint = bytes(self.img)
        self.free_at_checkpoint = frozenset(free)
        self.type = ["FREE" if b in free else "UNCHANGED" for b in range(nblocks)]
        self.max_entries = max_entries or capacity(bs)
        self.entries: list[LogEntry] = []
        self.sequence = 0
        # prepare_log: block 0 becomes the log; its live copy goes to a free block (no entry),
        # then block 0 is backed up with a checksum and logged as entry 0
        self.type[0] = "SECTOR0"
        s0 = self._alloc(1)[0]
        self._copy(0, s0, 1)
        self.type[s0] = "SECTOR0_CURRENT"
        self.sector0 = s0
        b = self._alloc(1)[0]
        crc = self._copy(0, b, 1, checksum=True)
        self.type[b] = "BACKUP"
        self._add_entry(0, b, 1, crc)

    # -- primitives
    def blk(self, b: int) -> bytes:
        return bytes(self.img[b * self.bs:(b + 1) * self.bs])

    def _alloc(self, n: int) -> tuple[int, int]:
        """First free run, cut to n blocks (find_free_range + split_range)."""
        for f in range(self.n):
            if self.type[f] == "FREE":
                m = 1
                while m < n and f + m < self.n and self.type[f + m] == "FREE":
                    m += 1
                return f, m
        raise NoSpace

    def _copy(self, src: int, dst: int, n: int, *, checksum: bool = False) -> int:
        data = bytes(self.img[src * self.bs:(src + n) * self.bs])
        self.img[dst * self.bs:(dst + n) * self.bs] = data
        return block_checksum(data, src * self.spb, self.bs) if checksum else 0

    def _write_log(self) -> None:
        log = LogSector(self.bs, self.sequence, self.sector0 * self.spb, tuple(self.entries))
        self.img[:self.bs] = encode(log)

    def _add_entry(self, src: int, dst: int, n: int, crc: int) -> None:
        if len(self.entries) == self.max_entries:        # backup_log_sector
            f = self._alloc(1)[0]
            lcrc = self._copy(0, f, 1, checksum=True)
            self.type[f] = "BACKUP"
            self.sequence += 1
            self.entries = [LogEntry(0, f * self.spb, self.bs, lcrc)]
            self._write_log()
        self.entries.append(LogEntry(src * self.spb, dst * self.spb, n * self.bs, crc))
        self._write_log()

    def backup(self, src: int, dst: int, n: int = 1, *, checksum: bool = True) -> None:
        """Raw backup of src to dst, whatever their types (for hand-made overlaps)."""
        self._add_entry(src, dst, n, self._copy(src, dst, n, checksum=checksum))

    def put(self, b: int, n: int = 1) -> None:
        self.img[b * self.bs:(b + n) * self.bs] = self.rng.randbytes(n * self.bs)

    # -- the filesystem's view: write n blocks at block b
    def write(self, b: int, n: int = 1) -> None:
        if sum(t == "FREE" for t in self.type) < n + 2:
            raise NoSpace                                   # dm-bow would fail with ENOSPC
        end = min(b + n, self.n)
        while b < end:
            if b == 0:                                      # handle_sector0: to the live copy
                self.put(self.sector0)
                b += 1
                continue
            t = self.type[b]
            run = 1
            while b + run < end and self.type[b + run] == t:
                run += 1
            if t == "CHANGED":
                self.put(b, run)
            elif t == "FREE":
                for i in range(run):
                    self.type[b + i] = "CHANGED"
                self.put(b, run)
            elif t in ("UNCHANGED", "BACKUP"):
                f, run = self._alloc(run)
                crc = self._copy(b, f, run, checksum=True)
                for i in range(run):
                    self.type[f + i] = "BACKUP"
                self._add_entry(b, f, run, crc)
                for i in range(run):
                    self.type[b + i] = "CHANGED"
                self.put(b, run)
            elif t == "SECTOR0_CURRENT":                    # the live block 0 must move
                run = 1
                f = self._alloc(1)[0]
                self._copy(b, f, 1)
                self.type[f] = "SECTOR0_CURRENT"
                self._add_entry(b, f, 1, 0)                 # checksum 0: not checked
                self.sector0 = f
                self.type[b] = "CHANGED"
                self.put(b)
            else:
                raise AssertionError(t)
            b += run

    def image(self) -> bytes:
        return bytes(self.img)

    def assert_restored(self, data: bytes) -> None:
        for b in range(self.n):
            if b not in self.free_at_checkpoint:
                assert data[b * self.bs:(b + 1) * self.bs] == self.blk_at_checkpoint(b), b

    def blk_at_checkpoint(self, b: int) -> bytes:
        return self.checkpoint[b * self.bs:(b + 1) * self.bs]


# ------------------------------------------------------------------ images that count or crash

class CountingImage(MemoryImage):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.writes = 0
        self.syncs = 0

    def write(self, offset: int, data: bytes) -> None:
        self.writes += 1
        super().write(offset, data)

    def sync(self) -> None:
        self.syncs += 1


class SimulatedPowerCut(Exception):
    pass


class CrashImage:
    """An image behind a volatile write cache. Writes since the last sync() are pending. Every
    write and every sync is a point where the power can go: event number `cut_at` (0-based)
    raises SimulatedPowerCut instead of happening."""

    def __init__(self, data: bytes, cut_at: int | None = None) -> None:
        self.durable = bytearray(data)
        self.pending: list[tuple[int, bytes]] = []
        self.size = len(data)
        self.events = 0
        self.cut_at = cut_at

    def _event(self) -> None:
        if self.events == self.cut_at:
            raise SimulatedPowerCut
        self.events += 1

    def read(self, offset: int, length: int) -> bytes:
        assert 0 <= offset and offset + length <= self.size
        buf = bytearray(self.durable[offset:offset + length])
        for off, data in self.pending:
            lo, hi = max(off, offset), min(off + len(data), offset + length)
            if lo < hi:
                buf[lo - offset:hi - offset] = data[lo - off:hi - off]
        return bytes(buf)

    def write(self, offset: int, data: bytes) -> None:
        assert 0 <= offset and offset + len(data) <= self.size
        self._event()
        self.pending.append((offset, bytes(data)))

    def sync(self) -> None:
        self._event()
        for off, data in self.pending:
            self.durable[off:off + len(data)] = data
        self.pending.clear()

    def after_crash(self, policy: str, rng: random.Random) -> bytes:
        """What the disk holds after the cut: each unsynced write kept or lost (in any mix,
        which also covers reordering)."""
        out = bytearray(self.durable)
        for off, data in self.pending:
            if policy == "keep" or (policy == "random" and rng.random() < 0.5):
                out[off:off + len(data)] = data
        return bytes(out)


def reference_restore(data: bytes) -> tuple[bytes, int]:
    """An uninterrupted restore: final bytes and number of writes and syncs (cut points)."""
    img = CrashImage(data)
    restore(img)
    img.sync()
    return bytes(img.durable), img.events - 1


def crash_and_resume(data: bytes, cut_at: int, policy: str, seed: int = 0) -> bytes:
    img = CrashImage(data, cut_at)
    try:
        restore(img)
    except SimulatedPowerCut:
        after = MemoryImage(img.after_crash(policy, random.Random(seed)))
        try:
            restore(after)
        except BowStateError:        # the cut came after the last write had landed
            pass
        return bytes(after.buf)
    img.cut_at = None                # finished: make its last writes durable
    img.sync()
    return bytes(img.durable)


# ------------------------------------------------------------------ scenarios

def chained_512() -> BowWriter:
    """24 single-block backups at 512 bytes: the log fills at 20 entries and chains to
    sequence 1 (block 0 copied out as entry 0 of the new log sector), plus writes to the live
    block 0, to its current location, to free blocks, and a backup of a backup."""
    w = BowWriter(128, 512, set(range(30, 128)), seed=1)
    for b in range(1, 25):
        w.write(b)
    w.write(0)                       # goes to the live copy of block 0
    w.write(w.sector0)               # the filesystem reuses the block holding it: it moves
    w.write(0)
    w.write(26, 3)                   # a 3-block run: one entry, one multi-block checksum
    w.write(31)                      # was used as a backup: backed up again
    w.write(127)                     # free at the checkpoint: no backup
    return w


def overlap() -> BowWriter:
    """vold's "A->B then C->A": restoring the newer entry copies P to Q, the older one then
    overwrites P. Replayed from the start after both, Q would get P's restored data."""
    w = BowWriter(16, 512, {10, 11, 12, 13, 14, 15}, seed=2)
    p, q, r = 3, 4, 12
    w.backup(p, r)                   # older entry: P saved to R, then P overwritten
    w.put(p)
    w.backup(q, p)                   # newer entry: Q saved to P (P reused as a backup)
    w.put(q)
    return w


def test_simple_checkpoint_restores_exactly():
    w = BowWriter(16, 4096, {8, 9, 10, 11, 12, 13, 14, 15})
    w.write(1)
    w.write(2, 2)
    w.write(0)
    img = MemoryImage(w.image())
    result = restore(img)
    w.assert_restored(bytes(img.buf))
    assert bytes(img.buf[:4096]) == w.blk_at_checkpoint(0)       # no log remains
    assert result.entries_restored == 3 and not result.resumed
    with pytest.raises(BowStateError, match="nothing to restore"):
        plan_restore(img)


def test_chained_log_restores_exactly():
    w = chained_512()
    assert w.sequence == 1
    plan = plan_restore(MemoryImage(w.image()))
    assert [s.log.sequence for s in plan.logs] == [1, 0]
    assert plan.logs[0].read_from == 0 and plan.logs[1].read_from != 0
    assert plan.logs[1].log.count == 20
    assert plan.unchecked_entries == 1            # the move of the live block 0
    img = MemoryImage(w.image())
    restore(img)
    w.assert_restored(bytes(img.buf))


def test_overlap_needs_a_progress_record_and_naive_replay_would_be_wrong():
    w = overlap()
    img = CountingImage(w.image())
    result = restore(img)
    w.assert_restored(bytes(img.buf))
    assert result.progress_records == 1
    # what a naive re-run after both copies would do: copy P (now restored) to Q
    assert bytes(img.buf[3 * 512:4 * 512]) != w.blk_at_checkpoint(4)


def test_resume_ignores_checksums_of_entries_already_restored():
    w = overlap()
    data = w.image()
    # crash right after the write that overwrote P (the backup of the newer entry)
    final, writes = reference_restore(data)
    img = CrashImage(data, cut_at=6)   # Q, sync, record, sync, P, sync; cut at block 0
    with pytest.raises(SimulatedPowerCut):
        restore(img)
    after = MemoryImage(img.after_crash("keep", random.Random()))
    top = decode(after.read(0, 512))
    assert top.magic == RESTORING_MAGIC and top.count == 2
    done = w.entries[-1]                           # Q <- P, no longer listed
    assert block_checksum(after.read(done.dest * SECTOR, 512), done.source, 512) != done.checksum
    plan = plan_restore(after)
    assert plan.resumed and plan.entries == 2
    restore(after)
    assert bytes(after.buf) == final


def test_after_entry_0_block_0_holds_the_previous_log_marked_restoring():
    w = chained_512()
    data = w.image()
    n_top = decode(data[:512]).count
    img = CrashImage(data, cut_at=n_top + 2)  # n-1 copies, sync, block 0, sync; cut
    with pytest.raises(SimulatedPowerCut):
        restore(img)
    after = MemoryImage(img.after_crash("keep", random.Random()))
    top = decode(after.read(0, 512))
    assert (top.sequence, top.magic, top.count) == (0, RESTORING_MAGIC, 20)
    plan = plan_restore(after)
    assert plan.resumed and [s.log.sequence for s in plan.logs] == [0]
    restore(after)
    w.assert_restored(bytes(after.buf))


@pytest.mark.parametrize("policy", ["keep", "lose", "random"])
@pytest.mark.parametrize("scenario", [chained_512, overlap])
def test_power_cut_at_every_write_then_rerun_is_exact(scenario, policy):
    w = scenario()
    data = w.image()
    final, total = reference_restore(data)
    w.assert_restored(final)
    for n in range(total + 1):
        assert crash_and_resume(data, n, policy, seed=n) == final, n


def test_two_power_cuts_in_a_row():
    data = overlap().image()
    final, total = reference_restore(data)
    for n in range(total):
        first = CrashImage(data, n)
        with pytest.raises(SimulatedPowerCut):
            restore(first)
        mid = first.after_crash("random", random.Random(n))
        if describe(MemoryImage(mid))["state"] == "none":
            assert mid == final         # cut at the last sync, the last write kept
            continue
        _, remaining = reference_restore(mid)
        for m in range(remaining + 1):
            assert crash_and_resume(mid, m, "random", seed=m) == final, (n, m)


def test_progress_and_json():
    w = chained_512()
    seen: list[tuple[int, int]] = []
    img = MemoryImage(w.image())
    plan = plan_restore(img)
    result = restore(img, progress=lambda done, total: seen.append((done, total)))
    assert seen[0] == (0, plan.bytes_to_copy) and seen[-1] == (plan.bytes_to_copy,) * 2
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    d = json.loads(json.dumps(plan.to_dict()))
    assert d["entries"] == plan.entries and len(d["log_sectors"]) == 2 and not d["resumed"]
    r = json.loads(json.dumps(result.to_dict()))
    assert r["bytes_copied"] == plan.bytes_to_copy and r["entries_restored"] == plan.entries


# ------------------------------------------------------------------ refusals: no write at all

def _patch(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new):]


def _refused(data: bytes, exc: type, match: str) -> None:
    img = CountingImage(data)
    with pytest.raises(exc, match=match):
        restore(img)
    assert img.writes == 0 and bytes(img.buf) == data


def _resign_entry0(w: BowWriter, data: bytes) -> bytes:
    """Recompute block 0's entry 0 checksum after tampering with the saved log sector."""
    e = decode(data[:w.bs]).entries[0]
    crc = block_checksum(data[e.dest * SECTOR:e.dest * SECTOR + w.bs], 0, w.bs)
    return _patch(data, 28 + 20, crc.to_bytes(4, "little"))


def test_refuses_bad_magic_in_a_saved_log_sector():
    w = chained_512()
    data = w.image()
    saved = decode(data[:512]).entries[0].dest * SECTOR
    data = _resign_entry0(w, _patch(data, saved, b"XXXX"))
    _refused(data, BowFormatError, "bad log sector magic")


def test_no_log_in_block_0_is_a_state_error():
    _refused(bytes(8192), BowStateError, "nothing to restore")
    w = BowWriter(8, 512, {5, 6, 7})
    _refused(_patch(w.image(), 0, b"XXXX"), BowStateError, "no dm-bow log")


def test_refuses_bad_checksum_of_a_backup():
    w = chained_512()
    data = w.image()
    e = next(e for e in w.entries if e.checksum and e.source)
    data = _patch(data, e.dest * SECTOR + 100, bytes([data[e.dest * SECTOR + 100] ^ 1]))
    _refused(data, BowFormatError, "checksum mismatch")


def test_refuses_count_beyond_capacity():
    data = chained_512().image()
    _refused(_patch(data, 12, (21).to_bytes(4, "little")), BowFormatError, "entry count 21")


def test_refuses_image_shorter_than_a_backup():
    w = BowWriter(32, 1024, set(range(16, 32)))
    w.write(1)
    w.write(2)
    data = w.image()
    last = max(e.dest for e in w.entries) * SECTOR
    _refused(data[:last + 512], BowFormatError, "past the end")
    _refused(data[:600], BowFormatError, "truncated")


def test_refuses_wrong_sequence():
    data = chained_512().image()
    _refused(_patch(data, 16, (2).to_bytes(4, "little")), BowFormatError,
             "expected log sector 1 but found sequence 0")


def test_refuses_unknown_header_version():
    data = chained_512().image()
    _refused(_patch(data, 4, b"\x00\x02"), BowFormatError, "header version")


def test_refuses_entry_0_that_is_not_block_0():
    w = BowWriter(16, 512, set(range(8, 16)))
    w.write(1)
    data = w.image()
    _refused(_patch(data, 28, (8).to_bytes(8, "little")), BowFormatError, "entry 0")


def test_resume_still_refuses_a_corrupt_remaining_backup():
    w = overlap()
    data = w.image()
    img = CrashImage(data, cut_at=6)
    with pytest.raises(SimulatedPowerCut):
        restore(img)
    after = img.after_crash("keep", random.Random())
    assert decode(after[:512]).magic == RESTORING_MAGIC
    r = w.entries[1].dest * SECTOR                  # the still-listed older entry's backup
    _refused(_patch(after, r, bytes([after[r] ^ 0xFF])), BowFormatError, "checksum mismatch")


# ------------------------------------------------------------------ inspect

def test_describe_reports_chain_and_checksums():
    w = chained_512()
    d = describe(MemoryImage(w.image()))
    assert d["state"] == "BOW" and d["valid"] and d["block_size"] == 512
    assert [s["sequence"] for s in d["log_sectors"]] == [1, 0]
    assert d["checksums"]["bad"] == 0 and d["checksums"]["unchecked"] == 1
    assert d["entries"] == sum(s["count"] for s in d["log_sectors"])
    json.dumps(d)
    text = render_text(d)
    assert "log sector 1 (block 0)" in text and "restorable" in text


def test_describe_reports_a_bad_checksum_and_goes_on():
    w = chained_512()
    data = bytearray(w.image())
    e = next(e for e in w.entries if e.checksum and e.source)
    data[e.dest * SECTOR] ^= 1
    d = describe(MemoryImage(bytes(data)))
    assert not d["valid"] and d["error_kind"] == "BowFormatError"
    assert d["checksums"]["bad"] == 1 and len(d["log_sectors"]) == 2
    assert "NOT restorable" in render_text(d)


def test_describe_no_log():
    d = describe(MemoryImage(bytes(4096)))
    assert d["state"] == "none" and not d["valid"]
    text = render_text(d)
    assert text == "state none, image 4096 bytes: no dm-bow log in block 0 (magic 0x00000000)\n"
    assert "nothing to restore" in d["error"] and d["error"].count("no dm-bow log") == 1


# ------------------------------------------------------------------ properties

@settings(max_examples=200, deadline=None)
@given(ops=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40), st.integers(0, 40)),
                    max_size=12))
def test_relocations_match_a_per_sector_model(ops):
    rel, model = Relocations(), list(range(128))
    for to, frm, n in ops:
        n = n % 8 + 1
        snapshot = model[:]
        for i in range(n):
            model[to + i] = snapshot[frm + i]
        rel.relocate(to, frm, n)
        assert [rel.lookup(s) for s in range(128)] == model


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bs=st.sampled_from([512, 1024, 4096]), nblocks=st.integers(8, 40),
       max_entries=st.sampled_from([None, 1, 2, 3]), seed=st.integers(0, 2**16),
       writes=st.lists(st.tuples(st.integers(0, 39), st.integers(1, 3)), max_size=30),
       cut=st.integers(0, 10**6), policy=st.sampled_from(["keep", "lose", "random"]))
def test_random_scenarios_restore_exactly_even_after_a_power_cut(
        bs, nblocks, max_entries, seed, writes, cut, policy):
    """Any writes dm-bow accepts, any block size, chained or not: restore gives back every
    block that was not free at the checkpoint, and a power cut anywhere changes nothing."""
    rng = random.Random(seed)
    free = set(rng.sample(range(1, nblocks), k=(nblocks - 1) * 2 // 3))
    try:
        w = BowWriter(nblocks, bs, free, seed=seed, max_entries=max_entries)
    except NoSpace:
        return
    for b, n in writes:
        try:
            w.write(b % nblocks, n)
        except NoSpace:
            break
    data = w.image()
    event(f"log sectors: {w.sequence + 1}")
    final, total = reference_restore(data)
    w.assert_restored(final)
    assert crash_and_resume(data, cut % (total + 1), policy, seed) == final
