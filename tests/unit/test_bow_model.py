"""The dm-bow state machine: sector 0, backups, the log, chaining, ENOSPC, sub-block I/O."""

import errno
import os
import random

import pytest

from bow_compat.errors import BowStateError, BowUsageError
from bow_compat.format import SECTOR, LogEntry, block_checksum, capacity, decode, encode
from bow_compat.image import MemoryImage
from bow_compat.model import BowDevice, BowNoSpaceError, State
from bow_compat.ranges import RangeType
from bow_compat.restore import restore

R = RangeType


def make(bs=4096, nblocks=64, free=((10, 10),), seed=1, **kw):
    """A device over random content with `free` = (first block, count) runs discarded."""
    base = random.Random(seed).randbytes(bs * nblocks)
    img = MemoryImage(base)
    dev = BowDevice(img, bs, **kw)
    for first, count in free:
        dev.discard(first * bs, count * bs)
    dev.free_at_checkpoint = {b for first, count in free for b in range(first, first + count)}
    return dev, img, base


def blk(buf, i, bs):
    return bytes(buf[i * bs:(i + 1) * bs])


def assert_restores(dev, img, base):
    """restore() on a copy gives `base` back in every block that was not free at the checkpoint."""
    copy = MemoryImage(bytes(img.buf))
    restore(copy)
    bs = dev.block_size
    free = dev.free_at_checkpoint
    for i in range(img.size // bs):
        if i not in free:
            assert blk(copy.buf, i, bs) == blk(base, i, bs), f"block {i}"


class Recording(MemoryImage):
    def __init__(self, data):
        super().__init__(data)
        self.ops = []

    def read(self, offset, length):
        self.ops.append(("r", offset, length))
        return super().read(offset, length)

    def write(self, offset, data):
        self.ops.append(("w", offset, len(data)))
        super().write(offset, data)

    def sync(self):
        self.ops.append(("sync",))


def test_trim_state_discards_free_without_touching_data():
    dev, img, base = make(free=((10, 10),))
    assert img.buf == base            # not forwarded
    assert dev.free_blocks == 10 and dev.state == State.TRIM
    dev.write(12 * 4096, b"x" * 4096)  # a write makes its block used again
    assert dev.free_blocks == 9
    dev.discard(0, 4096 * 2)           # block 0 never becomes free
    dev.checkpoint()
    assert dev.stats.free_blocks_at_checkpoint == 10   # 9 + block 1
    assert dev.ranges.find(0).type == R.SECTOR0


@pytest.mark.parametrize("bs", [512, 1024, 4096])
def test_checkpoint_writes_sector0_copies_and_log(bs):
    dev, img, base = make(bs)
    dev.checkpoint()
    bss = bs // SECTOR
    orig0 = blk(base, 0, bs)
    log = decode(blk(img.buf, 0, bs))
    assert (log.sequence, log.sector0, log.block_size) == (0, 10 * bss, bs)
    assert log.entries == (LogEntry(0, 11 * bss, bs, block_checksum(orig0, 0, bs)),)
    assert blk(img.buf, 10, bs) == orig0 == blk(img.buf, 11, bs)
    assert dev.read(0, bs) == orig0                    # readers still see block 0
    assert [t for _, _, t in dev.ranges][:5] == [R.SECTOR0, R.UNCHANGED, R.SECTOR0_CURRENT,
                                                R.BACKUP, R.TRIMMED]
    assert dev.stats.backup_bytes == 2 * bs and dev.stats.log_bytes == bs
    assert dev.free_blocks == 8
    assert_restores(dev, img, base)


def test_checkpoint_needs_two_free_blocks_and_changes_nothing():
    dev, img, base = make(free=((10, 1),))
    with pytest.raises(BowNoSpaceError):
        dev.checkpoint()
    assert dev.state == State.TRIM and img.buf == base
    assert list(dev.ranges) == [(0, 80, R.UNCHANGED), (80, 88, R.TRIMMED), (88, 512, R.UNCHANGED)]


def test_state_transitions_only_go_forward():
    dev, _, _ = make()
    with pytest.raises(BowStateError):
        dev.commit()
    dev.checkpoint()
    with pytest.raises(BowStateError):
        dev.checkpoint()
    dev.commit()
    with pytest.raises(BowStateError):
        dev.commit()


def test_write_order_copy_sync_log_sync_data():
    base = random.Random(2).randbytes(4096 * 32)
    img = Recording(base)
    dev = BowDevice(img, 4096)
    dev.discard(20 * 4096, 4 * 4096)
    dev.checkpoint()
    img.ops.clear()
    dev.write(5 * 4096, b"n" * 4096)
    assert img.ops == [
        ("r", 5 * 4096, 4096), ("w", 22 * 4096, 4096), ("sync",),   # backup into free block
        ("w", 0, 4096), ("sync",),                                  # log entry
        ("w", 5 * 4096, 4096),                                      # only then the data
    ]
    assert decode(blk(img.buf, 0, 4096)).entries[-1] == LogEntry(
        40, 22 * 8, 4096, block_checksum(blk(base, 5, 4096), 40, 4096))


@pytest.mark.parametrize("bs", [512, 1024, 4096])
def test_block0_io_is_redirected(bs):
    dev, img, base = make(bs)
    dev.checkpoint()
    logblock = blk(img.buf, 0, bs)
    dev.write(0, b"A" * 512)
    assert blk(img.buf, 0, bs) == logblock                          # the log stays
    assert img.buf[10 * bs:10 * bs + 512] == b"A" * 512             # SECTOR0_CURRENT got it
    assert dev.read(0, bs) == b"A" * 512 + blk(base, 0, bs)[512:]
    dev.write(0, b"B" * (2 * bs))                                   # spans blocks 0 and 1
    assert dev.read(0, 2 * bs) == b"B" * (2 * bs)
    assert decode(blk(img.buf, 0, bs)).entries[-1].source == bs // SECTOR  # block 1 backed up
    assert_restores(dev, img, base)


@pytest.mark.parametrize("bs", [512, 1024, 4096])
def test_sub_block_writes_back_up_the_whole_block(bs):
    dev, img, base = make(bs, nblocks=64)
    dev.checkpoint()
    bss = bs // SECTOR
    off = 30 * bs + (bs - 512 if bs > 512 else 0)   # the last sector of block 30
    dev.write(off, b"s" * 512)
    e = decode(blk(img.buf, 0, bs)).entries[-1]
    assert (e.source, e.size) == (30 * bss, bs)
    assert e.checksum == block_checksum(blk(base, 30, bs), 30 * bss, bs)
    assert img.buf[off:off + 512] == b"s" * 512
    assert img.buf[30 * bs:off] == base[30 * bs:off]
    entries = len(decode(blk(img.buf, 0, bs)).entries)
    dev.write(30 * bs, b"t" * 512)                   # same block again: CHANGED, no backup
    assert len(decode(blk(img.buf, 0, bs)).entries) == entries
    assert_restores(dev, img, base)


def test_writes_to_free_and_changed_blocks_need_no_backup():
    dev, img, _ = make()
    dev.checkpoint()
    before = dev.stats.log_entries
    dev.write(15 * 4096, b"f" * 8192)   # free at the checkpoint
    dev.write(15 * 4096, b"g" * 4096)   # now CHANGED
    assert dev.stats.log_entries == before and dev.stats.backup_bytes == 2 * 4096
    assert dev.ranges.find(15 * 8).type == R.CHANGED


def test_one_write_over_fragmented_free_space_needs_several_entries():
    dev, img, base = make(free=((10, 3), (20, 1), (30, 2)))
    dev.checkpoint()  # head range (30, 2) -> both blocks used by the checkpoint
    dev.write(40 * 4096, b"w" * (4 * 4096))
    got = decode(blk(img.buf, 0, 4096)).entries[1:]
    assert [(e.source // 8, e.dest // 8, e.size // 4096) for e in got] == [
        (40, 20, 1), (41, 10, 3)]
    assert_restores(dev, img, base)


def test_backups_and_sector0_current_are_backed_up_again():
    dev, img, base = make()
    dev.checkpoint()
    dev.write(11 * 4096, b"b" * 4096)              # overwrites the block-0 backup
    e = decode(blk(img.buf, 0, 4096)).entries[-1]
    assert (e.source, e.dest) == (88, 96) and e.checksum == block_checksum(blk(base, 0, 4096), 88, 4096)
    dev.write(10 * 4096, b"c" * 4096)              # overwrites SECTOR0_CURRENT: it moves
    e = decode(blk(img.buf, 0, 4096)).entries[-1]
    assert (e.source, e.dest, e.checksum) == (80, 104, 0)
    assert dev.sector0 == 104
    assert decode(blk(img.buf, 0, 4096)).sector0 == 104  # written with the entry (not stale)
    assert dev.read(0, 4096) == blk(base, 0, 4096)
    assert dev.ranges.find(104).type == R.SECTOR0_CURRENT
    assert_restores(dev, img, base)


def test_log_sector_chains_when_full_at_512():
    bs = 512
    dev, img, base = make(bs, nblocks=256, free=((100, 100),))
    dev.checkpoint()
    assert capacity(bs) == 20
    full = None
    for i in range(25):
        if dev.stats.log_entries == 20:
            full = blk(img.buf, 0, bs)
        dev.write((20 + i) * bs, bytes([i]) * bs)
    log = decode(blk(img.buf, 0, bs))
    assert log.sequence == 1 and dev.stats.log_sector_backups == 1
    assert full is not None and decode(full).count == 20
    e0 = log.entries[0]
    assert (e0.source, e0.size) == (0, bs) and e0.checksum == block_checksum(full, 0, bs)
    assert blk(img.buf, e0.dest, bs) == full                  # the old log sector, saved
    assert dev.ranges.find(e0.dest).type == R.BACKUP
    assert log.count == 1 + 25 - 19                          # 19 data entries fit log sector 0
    assert_restores(dev, img, base)


def test_enospc_write_is_not_applied_and_later_writes_go_on():
    dev, img, base = make(free=((10, 4),))
    dev.checkpoint()                                          # 2 free blocks left
    with pytest.raises(BowNoSpaceError):
        dev.write(40 * 4096, b"x" * (3 * 4096))
    assert img.buf[40 * 4096:43 * 4096] == base[40 * 4096:43 * 4096]
    assert dev.stats.failed_ios == 1 and dev.stats.enospc_sector == 42 * 8
    assert dev.stats.data_bytes == 0 and dev.free_blocks == 0
    dev.write(40 * 4096, b"y" * 4096)                         # backed up before the failure
    with pytest.raises(BowNoSpaceError):
        dev.write(50 * 4096, b"z" * 4096)
    assert dev.stats.enospc_sector == 42 * 8                  # the first one is kept
    dev.ranges.check()
    assert_restores(dev, img, base)


def test_enospc_while_chaining_leaves_the_source_unchanged():
    bs = 512
    dev, img, base = make(bs, nblocks=128, free=((100, 2 + 19 + 1),))
    dev.checkpoint()
    for i in range(19):
        dev.write((20 + i) * bs, b"q" * bs)
    assert dev.stats.log_entries == 20 and dev.free_blocks == 1
    with pytest.raises(BowNoSpaceError):
        dev.write(60 * bs, b"r" * bs)   # backup fits, the log sector copy does not
    assert dev.ranges.find(60).type == R.UNCHANGED and img.buf[60 * bs:61 * bs] == base[60 * bs:61 * bs]
    assert decode(blk(img.buf, 0, bs)).count == 20
    dev.ranges.check()
    assert_restores(dev, img, base)


def test_discard_in_checkpoint_is_a_write_without_data():
    dev, img, base = make()
    dev.checkpoint()
    dev.discard(40 * 4096, 2 * 4096)
    assert img.buf[40 * 4096:42 * 4096] == base[40 * 4096:42 * 4096]
    assert dev.ranges.find(40 * 8).type == R.CHANGED
    assert decode(blk(img.buf, 0, 4096)).entries[-1].source == 40 * 8
    assert_restores(dev, img, base)


def test_commit_puts_block0_back_and_passes_through():
    dev, img, base = make()
    dev.checkpoint()
    dev.write(0, b"L" * 4096)
    dev.write(30 * 4096, b"M" * 4096)
    live = dev.read(0, img.size)
    dev.commit()
    assert dev.state == State.COMMITTED and bytes(img.buf) == live
    dev.write(0, b"N" * 512)
    dev.discard(30 * 4096, 4096)
    assert img.buf[:512] == b"N" * 512 and blk(img.buf, 30, 4096) == b"M" * 4096
    with pytest.raises(BowStateError):
        restore(img)   # the log is gone


def test_sync_each_step_syncs_at_every_barrier():
    base = bytes(4096 * 32)
    for sync in (True, False):
        img = Recording(base)
        dev = BowDevice(img, 4096, sync_each_step=sync)
        dev.discard(20 * 4096, 4 * 4096)
        dev.checkpoint()
        dev.write(5 * 4096, b"n" * 4096)
        dev.flush()
        syncs = img.ops.count(("sync",))
        assert syncs == (dev.stats.barriers if sync else 0) and dev.stats.barriers == 6


def test_bad_arguments():
    for bs in (256, 3000, 1 << 17):
        with pytest.raises(BowUsageError):
            BowDevice(MemoryImage(bytes(1 << 20)), bs)
    with pytest.raises(BowUsageError):
        BowDevice(MemoryImage(bytes(4096 * 3 + 512)), 4096)
    dev = BowDevice(MemoryImage(bytes(4096 * 8)), 4096)
    for off, n in ((100, 512), (0, 100), (4096 * 8, 512)):
        with pytest.raises(ValueError):
            dev.write(off, b"x" * n)
    with pytest.raises(ValueError):
        dev.discard(4096 * 7, 8192)


def test_encode_matches_what_the_device_wrote():
    dev, img, _ = make()
    dev.checkpoint()
    dev.write(40 * 4096, b"p" * 4096)
    assert blk(img.buf, 0, 4096) == encode(dev.log_sector())


# ---- replay(): files, the mark, refusals ----

def _trace_files(tmp_path, bs=4096, nblocks=32, mark="checkpoint"):
    from bow_compat.logwrites import LogWritesWriter

    base = random.Random(3).randbytes(bs * nblocks)
    (tmp_path / "base.img").write_bytes(base)
    w = LogWritesWriter(512)
    w.discard(10 * bs, 10 * bs)
    w.write(12 * bs, b"p" * 1024)         # sub-block, before the mark: applied as is
    w.mark("something else")
    w.mark(mark)
    w.write(3 * bs, b"q" * bs)
    w.flush()
    w.write(0, b"r" * 512)
    w.save(tmp_path / "log.img")
    return base


def test_replay_files_end_to_end(tmp_path):
    from bow_compat.replay import replay

    base = _trace_files(tmp_path)
    seen = []
    res = replay(tmp_path / "log.img", tmp_path / "base.img", tmp_path / "out.img",
                 progress=lambda done, total: seen.append((done, total)))
    assert (tmp_path / "base.img").read_bytes() == base           # never modified
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.img", "log.img", "out.img"]
    d = res.to_dict()
    for key in ("backup_bytes", "log_bytes", "copy_io_bytes", "data_bytes", "trace_entries", "enospc",
                "block_size", "checkpoint_image_blocks_free"):
        assert key in d
    assert (d["trace_entries"], d["trace_entries_before_mark"], d["marks"], d["writes"]) == (7, 4, 2, 3)
    assert d["checkpoint_image_blocks_free"] == 9 and d["enospc"] is None
    assert d["log_entries"] == 2 and d["backup_bytes"] == 3 * 4096
    assert seen[-1] == (7, 7)
    out = MemoryImage((tmp_path / "out.img").read_bytes())
    restore(out)
    checkpoint = bytearray(base)
    checkpoint[12 * 4096:12 * 4096 + 1024] = b"p" * 1024
    for i in range(32):
        if not 10 <= i < 20 or i == 12:
            assert blk(out.buf, i, 4096) == blk(checkpoint, i, 4096), i


def test_replay_records_the_first_enospc(tmp_path):
    from bow_compat.logwrites import LogWritesWriter
    from bow_compat.replay import replay

    (tmp_path / "base.img").write_bytes(bytes(4096 * 16))
    w = LogWritesWriter(512)
    w.discard(8 * 4096, 3 * 4096)
    w.mark("checkpoint")
    w.write(2 * 4096, b"a" * 4096)    # takes the last free block
    w.write(3 * 4096, b"b" * 4096)    # ENOSPC
    w.write(4 * 4096, b"c" * 4096)    # ENOSPC again
    w.save(tmp_path / "log.img")
    res = replay(tmp_path / "log.img", tmp_path / "base.img", tmp_path / "out.img")
    assert res.enospc == {"trace_entry": 3, "sector": 24} and res.failed_ios == 2


def test_replay_refusals_leave_no_out(tmp_path):
    from bow_compat.replay import replay

    _trace_files(tmp_path)
    log, base, out = tmp_path / "log.img", tmp_path / "base.img", tmp_path / "out.img"
    with pytest.raises(BowUsageError, match="mark 'nope' is not in the log"):
        replay(log, base, out, mark="nope")
    with pytest.raises(BowUsageError, match="block-size"):
        replay(log, base, out, block_size=1000)
    with pytest.raises(BowUsageError, match="is the base image"):
        replay(log, base, base)
    small = tmp_path / "small.img"
    small.write_bytes(bytes(4096 * 8))
    with pytest.raises(BowUsageError, match="only 32768 bytes"):
        replay(log, small, out)
    odd = tmp_path / "odd.img"
    odd.write_bytes(bytes(4096 * 32 + 512))
    with pytest.raises(BowUsageError, match="whole number"):
        replay(log, odd, out)
    # a failure in the middle (here: too little free space to enter CHECKPOINT) leaves nothing
    from bow_compat.logwrites import LogWritesWriter

    w = LogWritesWriter(512)
    w.discard(10 * 4096, 4096)
    w.mark("checkpoint")
    w.save(log)
    with pytest.raises(BowNoSpaceError):
        replay(log, base, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.img", "log.img", "odd.img", "small.img"]


def test_replay_does_not_replace_an_out_that_appears_while_it_runs(tmp_path):
    """Checked at the start and again at the end, and put in place with a link that fails
    rather than replaces: a file created at OUT meanwhile is kept, and no temporary is left."""
    from bow_compat.replay import replay

    _trace_files(tmp_path)
    out = tmp_path / "out.img"

    def someone_else_writes_out(done, total):
        if not out.exists():
            out.write_bytes(b"theirs")

    with pytest.raises(BowUsageError, match="out.img exists: pass --force"):
        replay(tmp_path / "log.img", tmp_path / "base.img", out, progress=someone_else_writes_out)
    assert out.read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.img", "log.img", "out.img"]
    replay(tmp_path / "log.img", tmp_path / "base.img", out, force=True,
           progress=someone_else_writes_out)
    assert out.stat().st_size == 32 * 4096


@pytest.mark.parametrize("appears", [False, True])
def test_replay_without_hard_links_claims_out_exclusively(tmp_path, monkeypatch, appears):
    """On a filesystem without hard links (vfat): an O_EXCL claim of OUT, then a rename onto it."""
    from bow_compat import replay as replay_mod

    _trace_files(tmp_path)
    out = tmp_path / "out.img"

    def no_links(src, dst, *a, **kw):
        if appears:
            out.write_bytes(b"theirs")
        raise OSError(errno.EPERM, "Operation not permitted", src, None, dst)

    monkeypatch.setattr(replay_mod.os, "link", no_links)
    if appears:
        with pytest.raises(BowUsageError, match="exists"):
            replay_mod.replay(tmp_path / "log.img", tmp_path / "base.img", out)
        assert out.read_bytes() == b"theirs"
    else:
        replay_mod.replay(tmp_path / "log.img", tmp_path / "base.img", out)
        assert out.stat().st_size == 32 * 4096
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.img", "log.img", "out.img"]


def test_replay_write_error_names_out(tmp_path, monkeypatch):
    from bow_compat.replay import replay

    _trace_files(tmp_path)
    out = tmp_path / "out.img"

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OSError) as e:
        replay(tmp_path / "log.img", tmp_path / "base.img", out)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(out)
    assert ".partial" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.img", "log.img"]
