"""dm-bow's state machine over an Image: TRIM -> CHECKPOINT -> COMMITTED.

A line-by-line port of the I/O paths of drivers/md/dm-bow.c (target 1.2.0; checked in
GrapheneOS/kernel_common-6.6 commit 1e6548c8512f and aosp-mirror/kernel_common commit
2b9be6339b5f): add_trim/remove_trim, prepare_log, prepare_one_range and its three cases,
add_log_entry, backup_log_sector, handle_sector0 and the COMMITTED copy. Free space is chosen as
dm-bow chooses it (bow_compat.ranges), so the blocks used and the log written are dm-bow's.

What dm-bow does, and so do we:
* TRIM: a discard marks its sectors free and is not forwarded (the data stay); a write makes its
  sectors used again.
* Entering CHECKPOINT: block 0 becomes SECTOR0 (the log sector); its live contents are copied to
  a free block (SECTOR0_CURRENT, no checksum) and backed up to another (BACKUP, checksummed);
  then log sector 0 is written to block 0 with entry #0 = (0 -> backup).
* CHECKPOINT writes: CHANGED passes, free (TRIMMED) becomes CHANGED without a copy, UNCHANGED,
  BACKUP and SECTOR0_CURRENT pieces are copied into the head free range (as much as fits: one
  write may need several entries), the entry is logged, and only then is the data written. Each
  copy and each log-sector write is followed by a barrier (dm_bufio_write_dirty_buffers).
  Moving SECTOR0_CURRENT logs checksum 0. Discards are writes here (bio_data_dir is WRITE).
  I/O at block 0 goes to the SECTOR0_CURRENT block instead.
* A full log sector (header + (count+1) entries > block_size: 20 entries at 512, 169 at 4096)
  is copied to a free block; the new log sector has sequence+1 and its entry #0 records that copy.
* No free block: the bio fails with BLK_STS_NOSPC, its data is not written (except a part in
  block 0: handle_sector0 submits that split-off part at once); backups already made for
  earlier pieces of it stay (harmless). Later writes are tried again.
* COMMITTED: SECTOR0_CURRENT is copied back to block 0; everything passes through.

Where we differ (dm-bow's behaviour, then ours):
* Sub-block I/O: dm-bow assumes I/O in whole blocks (it sets the logical block size) and a
  1 KiB write into a 4 KiB block backs up nothing (copy_data copies size >> block_shift blocks).
  Here a write or discard in CHECKPOINT is widened to whole blocks for the backup, then only its
  own bytes are written; at the checkpoint only whole free blocks stay free (ranges.align_free).
* A discard of block 0 in TRIM makes dm-bow fail the checkpoint (or oops); block 0 is never free.
* prepare_log's aosp-mirror variant types SECTOR0_CURRENT without set_type and leaves it on the
  free list; the GrapheneOS fix (set_type after the copy) is what we do.
* Moving SECTOR0_CURRENT: dm-bow writes the log sector with the OLD sector0, then updates it in
  memory, so until the next log write the on-disk header points at a block the write just
  overwrote (a roll-forward then would copy garbage to block 0). We write the new location in
  that same log-sector write.
* Entering CHECKPOINT without two free blocks: dm-bow leaves a half-built SECTOR0 range and
  stays in TRIM; we check first and change nothing.
* Discarded data: we keep the bytes (a device may or may not zero them; restore does not care).
* The COMMITTED copy moves exactly one block (dm-bow's range-size check can refuse the commit
  after a failed SECTOR0_CURRENT move left two adjacent SECTOR0_CURRENT blocks).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import IntEnum
from typing import Any

from bow_compat.errors import BowStateError, BowUsageError
from bow_compat.format import (
    ENTRY_SIZE,
    HEADER_SIZE,
    SECTOR,
    LogEntry,
    LogSector,
    block_checksum,
    crc32_le,
    encode,
    valid_block_size,
)
from bow_compat.image import Image
from bow_compat.ranges import Range, RangeMap, RangeType

_COPY_CHUNK = 1 << 20   # copy (and checksum) large pieces in 1 MiB steps
_U32 = (1 << 32) - 1    # log_entry.size is a u32 of bytes


class State(IntEnum):
    """dm-bow's sysfs `state` values."""

    TRIM = 0
    CHECKPOINT = 1
    COMMITTED = 2


class BowNoSpaceError(BowStateError):
    """BLK_STS_NOSPC: no free block left to back data up to; the I/O was not done."""

    def __init__(self, message: str, sector: int) -> None:
        super().__init__(message)
        self.sector = sector


@dataclass
class BowStats:
    """What the device did, in bytes and counts; to_dict() for JSON."""

    data_bytes: int = 0          # user data written (applied writes)
    backup_bytes: int = 0        # bytes copied into free space (data, block 0, old log sectors)
    log_bytes: int = 0           # log-sector writes to block 0
    copy_io_bytes: int = 0       # read + write bytes of every copy (incl. the commit copy)
    log_entries: int = 0
    log_sector_backups: int = 0  # chaining events (= final sequence)
    writes: int = 0
    discards: int = 0
    flushes: int = 0
    barriers: int = 0            # ordering points (a sync when the device syncs each step)
    failed_ios: int = 0          # writes/discards refused with ENOSPC
    enospc_sector: int | None = None        # first sector whose backup found no free block
    free_blocks_at_checkpoint: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class BowDevice:
    """A dm-bow target over `image` (offsets in bytes, multiples of 512)."""

    def __init__(self, image: Image, block_size: int = 4096, *, sync_each_step: bool = True) -> None:
        if not valid_block_size(block_size):
            raise BowUsageError(f"block size {block_size} is not a power of two from 512 to 65536")
        if image.size < 3 * block_size or image.size % block_size:
            raise BowUsageError(
                f"the image ({image.size} bytes) must be a whole number of {block_size}-byte "
                f"blocks, at least 3")
        self.image = image
        self.block_size = block_size
        self.bss = block_size // SECTOR  # sectors per block
        self.ranges = RangeMap(image.size // SECTOR)
        self.state = State.TRIM
        self.stats = BowStats()
        self.sequence = 0
        self.sector0 = 0  # where block 0's live contents are (SECTOR0_CURRENT) in CHECKPOINT
        self._entries: list[LogEntry] = []
        self._sync = sync_each_step
        self._max_piece = (_U32 // block_size) * self.bss

    # ---- public I/O ----

    @property
    def free_blocks(self) -> int:
        return self.ranges.free_sectors // self.bss

    def log_sector(self) -> LogSector:
        """The log sector as last written to block 0 (CHECKPOINT only)."""
        return LogSector(self.block_size, self.sequence, self.sector0, tuple(self._entries))

    def read(self, offset: int, length: int) -> bytes:
        """What a reader of the dm-bow device sees (block 0 redirected in CHECKPOINT)."""
        self._check_io(offset, length)
        if self.state != State.CHECKPOINT or offset >= self.block_size or not length:
            return self.image.read(offset, length)
        n = min(length, self.block_size - offset)
        head = self.image.read(self.sector0 * SECTOR + offset, n)
        return head + self.image.read(offset + n, length - n)

    def write(self, offset: int, data: bytes) -> None:
        """A write bio. Raises BowNoSpaceError (data not written) when a backup finds no room."""
        self._check_io(offset, len(data))
        self.stats.writes += 1
        if not data:
            return
        if self.state == State.TRIM:
            self.ranges.remove_trim(offset // SECTOR, (offset + len(data)) // SECTOR)
            self._write_data(offset, data)
        elif self.state == State.CHECKPOINT:
            self._checkpoint_io(offset, len(data), data)
        else:
            self._write_data(offset, data)

    def discard(self, offset: int, length: int) -> None:
        """A discard bio: frees space in TRIM, is a (data-less) write in CHECKPOINT."""
        self._check_io(offset, length)
        self.stats.discards += 1
        if not length:
            return
        if self.state == State.TRIM:
            self.ranges.add_trim(offset // SECTOR, (offset + length) // SECTOR)
        elif self.state == State.CHECKPOINT:
            self._checkpoint_io(offset, length, None)

    def flush(self) -> None:
        """An empty REQ_PREFLUSH: passes through, so only a barrier here."""
        self.stats.flushes += 1
        self._barrier()

    def checkpoint(self) -> None:
        """state 0 -> 1 (prepare_log)."""
        if self.state != State.TRIM:
            raise BowStateError(f"cannot enter CHECKPOINT from {self.state.name}: states only go 0 -> 1 -> 2")
        bss, ranges = self.bss, self.ranges
        ranges.align_free(bss, bss)
        self.stats.free_blocks_at_checkpoint = self.free_blocks
        if self.free_blocks < 2:
            raise BowNoSpaceError(
                f"entering CHECKPOINT needs 2 free blocks, {self.free_blocks} were discarded "
                f"before the checkpoint", 0)
        first, _ = ranges.split(ranges.first(), 0, bss)
        ranges.retype(first, RangeType.SECTOR0)
        live = self._take_free_block()
        self._copy(0, live.start, bss, checksum=False, to_free=True)
        self.sector0 = live.start
        ranges.set_type(live, RangeType.SECTOR0_CURRENT)
        backup = self._take_free_block()
        dest = backup.start
        crc = self._copy(0, dest, bss, checksum=True, to_free=True)
        self.sequence, self._entries = 0, []
        self._add_log_entry(0, dest, self.block_size, crc)
        ranges.set_type(backup, RangeType.BACKUP)
        self.state = State.CHECKPOINT

    def commit(self) -> None:
        """state 1 -> 2: block 0 gets its live contents back; pass-through from now on."""
        if self.state != State.CHECKPOINT:
            raise BowStateError(f"cannot commit from {self.state.name}: only a CHECKPOINT can be committed")
        self._copy(self.sector0, 0, self.bss, checksum=False, to_free=False)
        self.state = State.COMMITTED

    # ---- CHECKPOINT write path ----

    def _checkpoint_io(self, offset: int, length: int, data: bytes | None) -> None:
        """dm_bow_map + handle_sector0 + bow_write for a write (data) or discard (None)."""
        bs = self.block_size
        end = offset + length
        if offset < bs:  # handle_sector0: the block-0 part goes to SECTOR0_CURRENT, at once
            n = min(length, bs - offset)
            if data is not None:
                self._write_data(self.sector0 * SECTOR + offset, data[:n])
            if end <= bs:
                return
        lo = max(offset, bs)
        try:
            self._prepare(lo // bs * self.bss, -(-end // bs) * self.bss)
        except BowNoSpaceError as e:
            self.stats.failed_ios += 1
            if self.stats.enospc_sector is None:
                self.stats.enospc_sector = e.sector
            raise
        if data is not None:
            self._write_data(lo, data[lo - offset:])

    def _prepare(self, start: int, end: int) -> None:
        """bow_write's loop over prepare_one_range (sectors, block aligned)."""
        ranges = self.ranges
        cur = start
        while cur < end:
            node = ranges.find(cur)
            piece_end = min(ranges.end(node), end)
            kind = node.type
            if kind == RangeType.CHANGED:
                cur = piece_end
            elif kind == RangeType.TRIMMED:  # prepare_free_range
                node, _ = ranges.split(node, cur, piece_end)
                ranges.set_type(node, RangeType.CHANGED)
                cur = piece_end
            elif kind in (RangeType.UNCHANGED, RangeType.BACKUP):
                cur = self._backup(node, cur, piece_end, checksum=True)
            elif kind == RangeType.SECTOR0_CURRENT:  # may change at any time: no checksum
                cur = self._backup(node, cur, piece_end, checksum=False)
            else:
                raise AssertionError(f"write reached a {kind.readable} range at sector {cur}")

    def _backup(self, node: Range, start: int, end: int, *, checksum: bool) -> int:
        """prepare_unchanged_range: back up the head of [start, end); returns where it stopped."""
        ranges = self.ranges
        free = ranges.first_free()
        if free is None:
            raise BowNoSpaceError(f"no free block left to back up sector {start} to", start)
        dest = free.start
        size = min(ranges.end(free) - dest, end - start, self._max_piece)
        backup, _ = ranges.split(free, dest, dest + size)
        src, src_end = ranges.split(node, start, start + size)
        assert src_end == start + size
        crc = self._copy(start, dest, size, checksum=checksum, to_free=True)
        original = src.type
        moving_sector0 = original == RangeType.SECTOR0_CURRENT
        # Both final types before either set_type, which merges neighbours (as dm-bow does).
        ranges.retype(src, RangeType.CHANGED)
        ranges.set_type(backup, RangeType.SECTOR0_CURRENT if moving_sector0 else RangeType.BACKUP)
        try:
            self._add_log_entry(start, dest, size * SECTOR, crc, sector0=dest if moving_sector0 else None)
        except BowNoSpaceError:
            ranges.retype(src, original)
            raise
        if moving_sector0:
            self.sector0 = dest
        ranges.set_type(src, RangeType.CHANGED)
        return start + size

    # ---- the log ----

    def _add_log_entry(self, source: int, dest: int, size: int, crc: int, *,
                       sector0: int | None = None) -> None:
        """add_log_entry(): chain if full, append, rewrite block 0, barrier.

        `sector0` puts a moved SECTOR0_CURRENT into this very header (see module docstring).
        """
        if HEADER_SIZE + ENTRY_SIZE * (len(self._entries) + 1) > self.block_size:
            self._backup_log_sector()
        self._entries.append(LogEntry(source, dest, size, crc))
        header = LogSector(self.block_size, self.sequence,
                           self.sector0 if sector0 is None else sector0, tuple(self._entries))
        self.image.write(0, encode(header))
        self.stats.log_bytes += self.block_size
        self.stats.log_entries += 1
        self._barrier()

    def _backup_log_sector(self) -> None:
        """The full log sector in block 0 is copied to a free block; a new one starts."""
        first = self.ranges.first()
        assert first.type == RangeType.SECTOR0 and self.ranges.end(first) == self.bss
        backup = self._take_free_block()
        dest = backup.start
        crc = self._copy(0, dest, self.bss, checksum=True, to_free=True)
        self._entries = []
        self.sequence += 1
        self.stats.log_sector_backups += 1
        self._add_log_entry(0, dest, self.block_size, crc)
        self.ranges.set_type(backup, RangeType.BACKUP)

    # ---- helpers ----

    def _take_free_block(self) -> Range:
        """Carve one block off the head free range (raises BowNoSpaceError if none)."""
        free = self.ranges.first_free()
        if free is None:
            raise BowNoSpaceError("no free block left for the log", 0)
        block, end = self.ranges.split(free, free.start, free.start + self.bss)
        assert end - block.start == self.bss
        return block

    def _copy(self, src: int, dest: int, sectors: int, *, checksum: bool, to_free: bool) -> int:
        """copy_data(): whole blocks, then a barrier; returns dm-bow's checksum (0 if none)."""
        crc = 0
        nbytes = sectors * SECTOR
        done = 0
        while done < nbytes:
            n = min(_COPY_CHUNK, nbytes - done)
            data = self.image.read(src * SECTOR + done, n)
            self.image.write(dest * SECTOR + done, data)
            if checksum:
                crc = block_checksum(data, src, self.block_size) if done == 0 else crc32_le(crc, data)
            done += n
        self.stats.copy_io_bytes += 2 * nbytes
        if to_free:
            self.stats.backup_bytes += nbytes
        self._barrier()
        return crc

    def _write_data(self, offset: int, data: bytes) -> None:
        self.image.write(offset, data)
        self.stats.data_bytes += len(data)

    def _barrier(self) -> None:
        self.stats.barriers += 1
        if self._sync:
            self.image.sync()

    def _check_io(self, offset: int, length: int) -> None:
        if offset % SECTOR or length % SECTOR or offset < 0 or length < 0:
            raise ValueError(f"I/O at byte {offset}, {length} bytes, is not in whole 512-byte sectors")
        if offset + length > self.image.size:
            raise ValueError(
                f"I/O at byte {offset}, {length} bytes, runs past the {self.image.size}-byte device")
