"""Roll a device back to its dm-bow checkpoint: vold's cp_restoreCheckpoint, made rigorous.

The log in block 0 lists backups newest last; older log sectors were themselves backed up (entry
0 of every log sector copies the previous block 0 away). Restoring replays every entry in
reverse, newest log sector first, copying `dest` back to `source`; the last copy (entry 0 of log
sector 0) puts the original block 0 back, which also removes the log.

What we keep from vold, and why it is safe to re-run after a crash at any write:

* Validation first, read-only. Earlier log sectors and backups are read "as if" the newer entries
  had already been undone, through vold's relocation map, and every non-zero checksum is checked.
  A corrupt or truncated log is refused before the first write (vold would "roll forward"
  instead; we leave that decision to the user).
* Progress records. Replaying entries again is harmless as long as every backup they read is
  still intact. A copy destroys a backup only if it writes over the `dest` of an entry already
  replayed since the last record: vold's example "A->B then C->A" (copy A to B, then C to A)
  replayed from the start after a crash would copy C's data, now in A, to B. So before such a
  write, and only then, we sync, rewrite block 0 with count = index + 1 and the RESTORING
  ("WOB") magic, and sync again: a re-run starts at this entry and never reads the overwritten
  backup. Entry 0 of each log sector writes block 0 itself (the previous log sector, marked
  RESTORING, or finally the original block 0), which is its own progress record.
* On a re-run, block 0 says RESTORING and its count covers only what is still to do.

What we add:

* A sync before every write of block 0, not only after: without it a volatile write cache may
  make the new block 0 durable before the copies it declares done (vold has no such sync before
  entry 0 of a log sector).
* Validation on resume too (vold skips it): only over the entries block 0 still lists and the
  older log sectors. Checksums of entries already restored need not hold any more: their backup
  may have been overwritten since (that is exactly when a progress record is written), and they
  are not listed any more anyway. Those still listed do hold: every backup read since the last
  record is intact (the rule above), and every block they read reflects the copies already made,
  as in the relocated view. So a corrupt log is still refused before any write.
* Stricter entry checks: whole aligned blocks, inside the image, backups never in block 0, entry
  0 always the block-0 backup, a backup never overlapping its own source (such a copy could not be
  replayed twice).

Assumption: one write of block 0 is not torn. Progress records change only bytes 0-3 and 12-15
(the entry table is rewritten byte for byte), so for them a 512-byte sector write suffices; the
entry-0 write replaces the whole block, like vold's.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field

from bow_compat.errors import BowError, BowFormatError, BowStateError
from bow_compat.format import (
    BOW_MAGIC,
    HEADER_SIZE,
    RESTORING_MAGIC,
    SECTOR,
    LogEntry,
    LogSector,
    block_checksum,
    decode,
    mark_restoring,
    peek_block_size,
    peek_magic,
    valid_block_size,
)
from bow_compat.image import Image


# ---------------------------------------------------------------- the relocation map (vold's)

class Relocations:
    """Where the data of each sector would be if the entries walked so far had been undone.

    vold's `Relocations`: sorted keys k -> v mean "sector s (k <= s < next key) is at v + s - k";
    it starts as the identity {0: 0}. Undoing an entry (dest -> source) makes the source range
    read whatever its dest range maps to now.
    """

    def __init__(self) -> None:
        self._keys: list[int] = [0]
        self._vals: list[int] = [0]

    def lookup(self, sector: int) -> int:
        i = bisect_right(self._keys, sector) - 1
        return self._vals[i] + sector - self._keys[i]

    def runs(self, sector: int, count: int) -> list[tuple[int, int]]:
        """(physical sector, length) runs that hold sectors [sector, sector + count)."""
        out: list[tuple[int, int]] = []
        end = sector + count
        while sector < end:
            i = bisect_right(self._keys, sector) - 1
            nxt = self._keys[i + 1] if i + 1 < len(self._keys) else end
            n = min(end, nxt) - sector
            out.append((self._vals[i] + sector - self._keys[i], n))
            sector += n
        return out

    def relocate(self, to: int, frm: int, count: int) -> None:
        """Sectors [to, to + count) now read what [frm, frm + count) reads."""
        keys, vals = self._keys, self._vals
        new = [(to, self.lookup(frm))]
        i = bisect_right(keys, frm)
        while i < len(keys) and keys[i] < frm + count:
            new.append((to + keys[i] - frm, vals[i]))
            i += 1
        new.append((to + count, self.lookup(to + count)))
        lo, hi = bisect_left(keys, to), bisect_right(keys, to + count)
        keys[lo:hi] = [k for k, _ in new]
        vals[lo:hi] = [v for _, v in new]


def _read_mapped(image: Image, rel: Relocations, sector: int, size: int) -> bytes:
    return b"".join(image.read(phys * SECTOR, n * SECTOR)
                    for phys, n in rel.runs(sector, size // SECTOR))


# ---------------------------------------------------------------- walking the log chain

@dataclass(frozen=True)
class EntryCheck:
    """One entry as validation saw it: `ok` is None when the entry carries no checksum (0)."""

    index: int
    entry: LogEntry
    computed: int
    ok: bool | None


@dataclass
class ScannedLog:
    """A log sector of the chain: as decoded, its raw bytes, and where they were read from."""

    log: LogSector
    raw: bytes
    read_from: int                       # sector: 0 for block 0, else the backup copy
    checks: dict[int, EntryCheck] = field(default_factory=dict)


@dataclass
class Scan:
    """Result of walking the chain; `error` is the first problem found (None: restorable)."""

    image_bytes: int
    state: str                           # "BOW", "RESTORING" or "none"
    block_size: int | None = None
    logs: list[ScannedLog] = field(default_factory=list)
    error: BowError | None = None


def scan(image: Image, *, stop_at_first_error: bool = True) -> Scan:
    """Walk every log sector (sequence N down to 0) and every entry, read-only.

    With stop_at_first_error=False (inspect), checksum mismatches are recorded and the walk goes
    on; structural problems still end it, since nothing after them can be located.
    """
    head = image.read(0, min(image.size, HEADER_SIZE))
    magic = peek_magic(head)
    if magic not in (BOW_MAGIC, RESTORING_MAGIC):
        shown = "too small" if magic is None else f"magic 0x{magic:08x}"
        return Scan(image.size, "none", error=BowStateError(
            f"no dm-bow log in block 0 ({shown}): nothing to restore; name the device or image "
            f"dm-bow ran on (if this is it, it was already restored or committed)"))
    out = Scan(image.size, "RESTORING" if magic == RESTORING_MAGIC else "BOW")
    try:
        out.block_size = _block_size(head, image.size)
        _walk(image, out.block_size, out, stop_at_first_error)
    except BowFormatError as e:
        out.error = e
    return out


def _block_size(head: bytes, image_bytes: int) -> int:
    """Block 0's block_size, once the header around it is known to be sound."""
    bs = peek_block_size(head)
    if len(head) < HEADER_SIZE or bs is None or not valid_block_size(bs):
        decode(head)                    # raises the precise reason
        raise BowFormatError("log header in block 0 is unreadable; refusing to restore")
    if image_bytes < bs:
        raise BowFormatError(f"image is {image_bytes} bytes, shorter than its {bs}-byte log "
                             f"sector: truncated; restore from a full copy")
    return bs


def _walk(image: Image, bs: int, out: Scan, stop: bool) -> None:
    rel = Relocations()
    raw = image.read(0, bs)
    top = decode(raw)
    for seq in range(top.sequence, -1, -1):
        if seq == top.sequence:
            log, where = top, 0
        else:
            where = rel.lookup(0)
            raw = _read_mapped(image, rel, 0, bs)
            log = decode(raw, expect_block_size=bs)
            if log.magic != BOW_MAGIC:
                raise BowFormatError(f"log sector {log.sequence} (saved at sector {where}) has "
                                     f"the RESTORING magic, which only block 0 may have: log "
                                     f"chain is corrupt; refusing to restore")
        if log.sequence != seq:
            raise BowFormatError(f"expected log sector {seq} but found sequence {log.sequence} "
                                 f"(at sector {where}): log chain is corrupt; refusing to restore")
        scanned = ScannedLog(log, raw, where)
        out.logs.append(scanned)
        for index in range(log.count - 1, -1, -1):
            e = log.entries[index]
            _check_entry(e, index, log, image.size)
            data = _read_mapped(image, rel, e.dest, e.size)
            computed = block_checksum(data, e.source, bs)
            ok = None if e.checksum == 0 else computed == e.checksum
            scanned.checks[index] = EntryCheck(index, e, computed, ok)
            if ok is False:
                err = BowFormatError(
                    f"checksum mismatch in log sector {log.sequence} entry {index}: backup of "
                    f"sector {e.source} at sector {e.dest} ({e.size} bytes) has crc "
                    f"0x{computed:08x}, log says 0x{e.checksum:08x}; backup data is corrupt, "
                    f"refusing to restore")
                if stop:
                    raise err
                out.error = out.error or err
            rel.relocate(e.source, e.dest, e.size // SECTOR)


def _check_entry(e: LogEntry, index: int, log: LogSector, image_bytes: int) -> None:
    bs, spb = log.block_size, log.block_size // SECTOR
    where = f"log sector {log.sequence} entry {index} (source {e.source}, dest {e.dest}, " \
            f"{e.size} bytes)"
    if e.size < bs or e.size % bs:
        problem = f"size is not a positive multiple of the {bs}-byte block"
    elif e.source % spb or e.dest % spb:
        problem = f"sectors are not aligned to the {bs}-byte block"
    elif max(e.source, e.dest) * SECTOR + e.size > image_bytes:
        raise BowFormatError(f"{where} reaches past the end of the {image_bytes}-byte image: "
                             f"image truncated or log corrupt; refusing to restore")
    elif index == 0 and (e.source != 0 or e.size != bs):
        problem = "entry 0 is not the backup of block 0"
    elif index != 0 and e.source == 0:
        problem = "only entry 0 may restore block 0"
    elif e.dest == 0:
        problem = "a backup cannot live in block 0"
    elif e.source < e.dest + e.size // SECTOR and e.dest < e.source + e.size // SECTOR:
        problem = "backup overlaps its own source"
    else:
        return
    raise BowFormatError(f"{where}: {problem}; log is corrupt, refusing to restore")


# ---------------------------------------------------------------- plan and restore

@dataclass(frozen=True)
class RestorePlan:
    """What restore() will do, validated: log sectors in restore order (block 0's first)."""

    block_size: int
    resumed: bool
    logs: tuple[ScannedLog, ...]
    image_bytes: int

    @property
    def entries(self) -> int:
        return sum(s.log.count for s in self.logs)

    @property
    def bytes_to_copy(self) -> int:
        return sum(e.size for s in self.logs for e in s.log.entries)

    @property
    def unchecked_entries(self) -> int:
        return sum(1 for s in self.logs for e in s.log.entries if e.checksum == 0)

    def to_dict(self) -> dict:
        return {
            "state": "RESTORING" if self.resumed else "BOW",
            "resumed": self.resumed,
            "block_size": self.block_size,
            "image_bytes": self.image_bytes,
            "log_sectors": [_log_dict(s) for s in self.logs],
            "entries": self.entries,
            "bytes_to_copy": self.bytes_to_copy,
            "checked_entries": self.entries - self.unchecked_entries,
            "unchecked_entries": self.unchecked_entries,
        }


def _log_dict(s: ScannedLog) -> dict:
    return {
        "sequence": s.log.sequence, "state": s.log.state, "count": s.log.count,
        "sector0": s.log.sector0, "read_from_sector": s.read_from,
        "entries": [{"index": i, "source": e.source, "dest": e.dest, "size": e.size,
                     "checksum": e.checksum} for i, e in enumerate(s.log.entries)],
    }


@dataclass(frozen=True)
class RestoreResult:
    plan: RestorePlan
    entries_restored: int
    bytes_copied: int
    progress_records: int          # block-0 rewrites made for the "A->B then C->A" rule

    @property
    def resumed(self) -> bool:
        return self.plan.resumed

    def to_dict(self) -> dict:
        return {
            "resumed": self.resumed,
            "block_size": self.plan.block_size,
            "log_sectors": len(self.plan.logs),
            "entries_restored": self.entries_restored,
            "bytes_copied": self.bytes_copied,
            "progress_records": self.progress_records,
        }


def plan_restore(image: Image) -> RestorePlan:
    """Validate the whole remaining log without writing anything; raise what is wrong.

    BowStateError if block 0 holds no dm-bow log, BowFormatError for anything corrupt,
    truncated or unknown.
    """
    s = scan(image)
    if s.error is not None:
        raise s.error
    assert s.block_size is not None
    return RestorePlan(s.block_size, s.state == "RESTORING", tuple(s.logs), image.size)


class _Used:
    """Sector ranges read as backups since the last progress record (vold's Used_Sectors)."""

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] = []

    def overlaps(self, start: int, end: int) -> bool:
        return any(s < end and start < e for s, e in self.ranges)

    def add(self, start: int, end: int) -> None:
        self.ranges.append((start, end))


def restore(image: Image, *,
            progress: Callable[[int, int], None] | None = None) -> RestoreResult:
    """Copy every backup back, newest first; safe to re-run after a crash at any point.

    Plans first, so a corrupt log is refused before any write. `progress(done, total)` gets
    bytes copied so far and the total.
    """
    plan = plan_restore(image)
    bs, total, done, records, restored = plan.block_size, plan.bytes_to_copy, 0, 0, 0
    if progress:
        progress(0, total)
    for n, scanned in enumerate(plan.logs):
        log, used = scanned.log, _Used()
        for index in range(log.count - 1, -1, -1):
            e = log.entries[index]
            data = image.read(e.dest * SECTOR, e.size)
            if e.checksum and block_checksum(data, e.source, bs) != e.checksum:
                raise BowStateError(f"backup at sector {e.dest} changed during the restore "
                                    f"(checksum); stop every writer to the device and re-run")
            if index == 0:
                if log.sequence > 0:
                    if data != plan.logs[n + 1].raw:
                        raise BowStateError("saved log sector changed during the restore; stop "
                                            "every writer to the device and re-run")
                    data = mark_restoring(data)
                image.sync()            # the copies this block 0 declares done come first
                image.write(0, data)
                image.sync()
            else:
                nsect = e.size // SECTOR
                if used.overlaps(e.source, e.source + nsect):
                    image.sync()
                    image.write(0, mark_restoring(scanned.raw, index + 1))
                    image.sync()
                    records += 1
                    used = _Used()
                used.add(e.dest, e.dest + nsect)
                image.write(e.source * SECTOR, data)
            done += e.size
            restored += 1
            if progress:
                progress(done, total)
    return RestoreResult(plan, restored, done, records)
