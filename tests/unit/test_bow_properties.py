"""Random traces through log-writes -> replay -> restore give the checkpoint back.

Each example builds a dm-log-writes trace (writes of any size and 512-byte alignment, discards,
flushes, decoy marks; some before the checkpoint mark, some after), replays it through the dm-bow
model over a small in-memory image, and checks against a naive per-sector model:
* the device reads as the naive image at the end, wherever that is defined (blocks free at the
  checkpoint hold backups unless written since), when no write failed with ENOSPC;
* restore() gives back, byte for byte, every block that was not free at the checkpoint —
  also when power is cut after any number of image writes following the checkpoint.
"""

import random

from hypothesis import event, given, settings
from hypothesis import strategies as st

from bow_compat.format import SECTOR
from bow_compat.image import MemoryImage
from bow_compat.logwrites import LOG_FUA_FLAG, LogWritesWriter, read_log
from bow_compat.model import BowDevice, BowNoSpaceError
from bow_compat.replay import replay_entries
from bow_compat.restore import restore


@st.composite
def traces(draw):
    bs = draw(st.sampled_from([512, 1024, 4096]))
    nblocks = draw(st.integers(64, 256))
    nsect = nblocks * bs // SECTOR
    sector = st.one_of(st.integers(0, 3 * bs // SECTOR), st.integers(0, nsect - 1))

    write = st.tuples(st.just("write"), sector, st.integers(1, 3 * bs // SECTOR + 1), st.booleans())

    def ops(max_discard, min_size, max_size):
        one = st.one_of(
            write, write,
            st.tuples(st.just("discard"), sector, st.integers(1, max_discard), st.just(False)),
            st.tuples(st.just("flush"), st.just(0), st.just(0), st.just(False)),
            st.tuples(st.just("mark"), st.just(0), st.just(0), st.just(False)),
        )
        return st.lists(one, min_size=min_size, max_size=max_size)

    # mostly enough free space to enter CHECKPOINT (a filesystem's fstrim), not always
    big_discard = st.tuples(st.just("discard"), st.integers(0, nsect // 2),
                            st.integers(3 * bs // SECTOR, 2 * nsect // 3), st.just(False))
    before = [draw(big_discard)] + draw(ops(nsect // 3, 0, 20))
    longest = 120 if bs == 512 else 60  # long enough to fill a 20-entry log sector
    after = draw(ops(4 * bs // SECTOR, draw(st.integers(0, longest)), longest))
    seed = draw(st.integers(0, 2**32))
    return bs, nblocks, before, after, seed


def build(trace):
    """(log image, base, checkpoint image, blocks free at the checkpoint, naive final image,
    sectors whose final contents are defined: not free at the checkpoint, or written since)."""
    bs, nblocks, before, after, seed = trace
    nsect = nblocks * bs // SECTOR
    rnd = random.Random(seed)
    base = rnd.randbytes(nblocks * bs)
    w = LogWritesWriter(SECTOR)
    image = bytearray(base)
    trimmed = set()
    written_after = set()
    checkpoint = None
    for phase, ops in (("before", before), ("after", after)):
        for op, sec, n, fua in ops:
            n = min(n, nsect - sec)
            if op == "write":
                data = rnd.randbytes(n * SECTOR)
                w.write(sec * SECTOR, data, flags=LOG_FUA_FLAG if fua else 0)
                image[sec * SECTOR:(sec + n) * SECTOR] = data
                if phase == "before":
                    trimmed.difference_update(range(sec, sec + n))
                else:
                    written_after.update(range(sec, sec + n))
            elif op == "discard":
                w.discard(sec * SECTOR, n * SECTOR)
                if phase == "before":
                    trimmed.update(range(sec, sec + n))
            elif op == "flush":
                w.flush()
            else:
                w.mark("not-the-checkpoint")
        if phase == "before":
            w.mark("checkpoint")
            checkpoint = bytes(image)
    bss = bs // SECTOR
    free = {b for b in range(1, nblocks) if all(s in trimmed for s in range(b * bss, (b + 1) * bss))}
    undefined = {s for b in free for s in range(b * bss, (b + 1) * bss)} - written_after
    defined = [s for s in range(nsect) if s not in undefined]
    return w.image(), base, checkpoint, free, bytes(image), defined


def assert_restores_checkpoint(buf, checkpoint, free, bs):
    img = MemoryImage(buf)
    restore(img)
    for b in range(len(checkpoint) // bs):
        if b not in free:
            assert img.buf[b * bs:(b + 1) * bs] == checkpoint[b * bs:(b + 1) * bs], f"block {b}"


@settings(max_examples=250, deadline=None)
@given(traces())
def test_replay_then_restore_gives_the_checkpoint(trace):
    bs = trace[0]
    log, base, checkpoint, free, final, defined = build(trace)
    img = MemoryImage(base)
    dev = BowDevice(img, bs)
    if len(free) < 2:  # dm-bow cannot enter CHECKPOINT without two free blocks
        try:
            replay_entries(read_log(log).entries(), dev)
        except BowNoSpaceError:
            event("checkpoint refused: fewer than 2 free blocks")
            return
        raise AssertionError("checkpoint should have failed")
    res = replay_entries(read_log(log).entries(), dev)
    dev.ranges.check()
    event(f"log sectors: {min(res.log_sectors, 3)}{'+' if res.log_sectors >= 3 else ''}")
    event("ENOSPC" if res.enospc else "no ENOSPC")
    assert res.checkpoint_image_blocks_free == len(free)
    assert (res.enospc is None) == (res.failed_ios == 0)
    if res.enospc is None:
        live = dev.read(0, img.size)
        for sec in defined:
            assert live[sec * SECTOR:(sec + 1) * SECTOR] == final[sec * SECTOR:(sec + 1) * SECTOR], sec
    assert res.log_sectors == dev.sequence + 1
    assert res.log_entries == dev.stats.log_entries >= 1
    assert_restores_checkpoint(bytes(img.buf), checkpoint, free, bs)


class PowerCut(Exception):
    pass


class CuttableImage(MemoryImage):
    """Drops dead (raises, writes nothing) once `budget` further writes have been made."""

    budget = None

    def write(self, offset, data):
        if self.budget is not None:
            if self.budget == 0:
                raise PowerCut
            self.budget -= 1
        super().write(offset, data)


@settings(max_examples=200, deadline=None)
@given(traces(), st.integers(0, 300))
def test_power_cut_after_any_write_still_restores_the_checkpoint(trace, budget):
    bs = trace[0]
    log, base, checkpoint, free, _, _ = build(trace)
    if len(free) < 2:
        return
    img = CuttableImage(base)

    def arm_after_checkpoint(entries):
        armed = False
        for e in entries:
            yield e
            if not armed and e.is_mark and e.mark == "checkpoint":
                img.budget, armed = budget, True  # the checkpoint is complete by now

    try:
        replay_entries(arm_after_checkpoint(read_log(log).entries()), BowDevice(img, bs))
        event("trace ran to the end")
    except PowerCut:
        event("power cut")
    assert_restores_checkpoint(bytes(img.buf), checkpoint, free, bs)
