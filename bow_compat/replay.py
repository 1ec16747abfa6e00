"""Replay a recorded dm-log-writes trace through the dm-bow model onto a copy of an image.

Entries before the first MARK whose text is the checkpoint mark run in dm-bow's TRIM state
(writes applied, discards make free space: nothing is free until something is discarded); the
mark enters CHECKPOINT; later entries run with backup-on-write. The result is the image a real
dm-bow device would hold at the end of the trace, whose block 0 is the dm-bow log that
bow_compat.restore rolls back to the checkpoint.

The base image is only read. OUT is built as a hidden temporary file next to it and renamed
into place at the end, so a failed replay leaves no OUT (and no half-written one).
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from bow_compat.errors import BowUsageError
from bow_compat.format import SECTOR, valid_block_size
from bow_compat.image import FileImage, copy_prefix
from bow_compat.logwrites import LogWrite, read_log
from bow_compat.model import BowDevice, BowNoSpaceError, State

Progress = Callable[[int, int], None]  # (entries done, entries in the log)


@dataclass
class ReplayResult:
    """What a replay did; to_dict() for --json."""

    block_size: int
    entries: int = 0              # log-writes entries processed
    entries_before_mark: int = 0
    writes: int = 0
    discards: int = 0
    flushes: int = 0
    marks: int = 0
    data_bytes: int = 0
    backup_bytes: int = 0
    log_bytes: int = 0
    copy_io_bytes: int = 0
    log_entries: int = 0          # dm-bow log entries written
    log_sectors: int = 0          # dm-bow log sectors used (sequence + 1)
    failed_ios: int = 0           # writes/discards refused with ENOSPC after the mark
    enospc: dict[str, int] | None = None  # first refusal: {"entry": i, "sector": s (512-byte)}
    checkpoint_image_blocks_free: int = 0  # whole free blocks at the checkpoint
    blocks_free_end: int = 0
    image_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def replay_entries(entries: Iterable[LogWrite], device: BowDevice, *, mark: str = "checkpoint",
                   total: int = 0, progress: Progress | None = None) -> ReplayResult:
    """Drive `device` (in TRIM state) with log-writes entries; checkpoint at the first `mark`.

    Marks with other texts, and later marks with the same text, are counted and ignored.
    A FLUSH flag is a barrier before the entry's data, FUA one after (REQ_PREFLUSH / REQ_FUA).
    Raises BowUsageError if the mark never came (the device is then left in TRIM state).
    """
    if device.state != State.TRIM:
        raise BowUsageError("replay needs a device in TRIM state")
    res = ReplayResult(block_size=device.block_size, image_bytes=device.image.size)
    for i, e in enumerate(entries):
        res.entries += 1
        if device.state == State.TRIM:
            res.entries_before_mark += 1
        if e.is_mark:
            res.marks += 1
            if e.mark == mark and device.state == State.TRIM:
                device.checkpoint()
                res.checkpoint_image_blocks_free = device.stats.free_blocks_at_checkpoint or 0
        else:
            if e.is_flush:
                device.flush()
            try:
                if e.is_discard:
                    res.discards += 1
                    device.discard(e.offset, e.length)
                elif e.is_write:
                    res.writes += 1
                    device.write(e.offset, e.data)
            except BowNoSpaceError:
                if res.enospc is None:
                    res.enospc = {"entry": i, "sector": e.offset // SECTOR}
            if e.is_flush and not e.nr_sectors:
                res.flushes += 1
            if e.is_fua:
                device.flush()
        if progress is not None and (i % 256 == 0):
            progress(i + 1, total or i + 1)
    if device.state == State.TRIM:
        raise BowUsageError(f"mark {mark!r} is not in the log: nothing to checkpoint at")
    st = device.stats
    res.data_bytes, res.backup_bytes = st.data_bytes, st.backup_bytes
    res.log_bytes, res.copy_io_bytes = st.log_bytes, st.copy_io_bytes
    res.log_entries, res.log_sectors = st.log_entries, device.sequence + 1
    res.failed_ios = st.failed_ios
    res.blocks_free_end = device.free_blocks
    if progress is not None:
        progress(res.entries, total or res.entries)
    return res


def replay(log: str | os.PathLike, base: str | os.PathLike, out: str | os.PathLike, *,
           mark: str = "checkpoint", block_size: int = 4096,
           progress: Progress | None = None) -> ReplayResult:
    """Copy BASE to OUT and replay LOG onto OUT through dm-bow (see module docstring)."""
    if not valid_block_size(block_size):
        raise BowUsageError(f"--block-size {block_size}: must be a power of two from 512 to 65536")
    log, base, out = os.fspath(log), os.fspath(base), os.fspath(out)
    if os.path.exists(out) and os.path.samefile(out, base):
        raise BowUsageError(f"{out} is the base image: the base is never modified, name another OUT")
    with read_log(log) as trace:
        base_size = os.stat(base).st_size if not _is_blockdev(base) else _dev_size(base)
        _precheck(trace.entries(with_data=False), mark, base_size, block_size, base)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(out)),
                                   prefix="." + os.path.basename(out) + ".", suffix=".partial")
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # as a plain open() would have made OUT, not mkstemp's 0600
        os.close(fd)
        try:
            copy_prefix(base, tmp, base_size)
            with FileImage(tmp) as image:
                device = BowDevice(image, block_size, sync_each_step=False)
                result = replay_entries(trace.entries(), device, mark=mark,
                                        total=trace.nr_entries, progress=progress)
                image.sync()
            os.replace(tmp, out)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
    _fsync_dir(os.path.dirname(os.path.abspath(out)))
    return result


def _precheck(entries: Iterable[LogWrite], mark: str, base_size: int, block_size: int,
              base: str) -> None:
    """Refuse before writing anything: no such mark, or I/O past the end of the base image."""
    if base_size % block_size or base_size < 3 * block_size:
        raise BowUsageError(f"{base} is {base_size} bytes: not a whole number of "
                            f"{block_size}-byte blocks (at least 3)")
    found = False
    top = 0
    for e in entries:
        found = found or (e.is_mark and e.mark == mark)
        if e.nr_sectors and not e.is_mark:
            top = max(top, e.offset + e.length)
    if not found:
        raise BowUsageError(f"mark {mark!r} is not in the log: nothing to checkpoint at "
                            f"(record it with: dmsetup message DEV 0 mark {mark})")
    if top > base_size:
        raise BowUsageError(f"the log writes up to byte {top} (sector {top // SECTOR}) but {base} "
                            f"is only {base_size} bytes: wrong base image?")


def _is_blockdev(path: str) -> bool:
    return stat.S_ISBLK(os.stat(path).st_mode)


def _dev_size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
