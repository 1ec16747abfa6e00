"""Replay a recorded dm-log-writes trace through the dm-bow model onto a copy of an image.

Entries before the first MARK whose text is the checkpoint mark run in dm-bow's TRIM state
(writes applied, discards make free space: nothing is free until something is discarded); the
mark enters CHECKPOINT; later entries run with backup-on-write. The result is the image a real
dm-bow device would hold at the end of the trace, whose block 0 is the dm-bow log that
bow_compat.restore rolls back to the checkpoint.

The base image is only read. OUT is built as a hidden temporary file next to it and put in
place at the end, so a failed replay leaves no OUT (and no half-written one). Before anything is
read or written, replay refuses an OUT that is the log or the base (the same file, also through a
symlink or a hard link), that is not a regular file (a device node, a directory, a fifo), or that
exists without `force`; every error about OUT names it as given, never the temporary.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from bow_compat.errors import BowUsageError
from bow_compat.format import SECTOR, valid_block_size
from bow_compat.image import FileImage, kind_of
from bow_compat.logwrites import LogWrite, read_log
from bow_compat.model import BowDevice, BowNoSpaceError, State

Progress = Callable[[int, int], None]  # (entries done, entries in the log)


@dataclass
class ReplayResult:
    """What a replay did; to_dict() for --json."""

    block_size: int
    # trace_*, writes ... marks: the dm-log-writes trace (LOG); log_*: the dm-bow log it produced
    trace_entries: int = 0        # log-writes entries processed
    trace_entries_before_mark: int = 0
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
    enospc: dict[str, int] | None = None  # first refusal: {"trace_entry": i, "sector": s (512 B)}
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
        res.trace_entries += 1
        if device.state == State.TRIM:
            res.trace_entries_before_mark += 1
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
                    res.enospc = {"trace_entry": i, "sector": e.offset // SECTOR}
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
        progress(res.trace_entries, total or res.trace_entries)
    return res


def replay(log: str | os.PathLike, base: str | os.PathLike, out: str | os.PathLike, *,
           mark: str = "checkpoint", block_size: int = 4096, force: bool = False,
           progress: Progress | None = None) -> ReplayResult:
    """Copy BASE to OUT and replay LOG onto OUT through dm-bow (see module docstring).

    `force` lets OUT replace an existing regular file (never LOG, BASE or anything else)."""
    if not valid_block_size(block_size):
        raise BowUsageError(f"--block-size {block_size}: must be a power of two from 512 to 65536")
    log, base, out = os.fspath(log), os.fspath(base), os.fspath(out)
    target = _check_out(out, log, base, force=force)
    with read_log(log) as trace, FileImage(base, writable=False) as src:
        _precheck(trace.entries(with_data=False), mark, src.size, block_size, base)
        partial = _PartialOut(out, target, src.size)
        try:
            for offset in range(0, src.size, _COPY_CHUNK):
                partial.write(offset, src.read(offset, min(_COPY_CHUNK, src.size - offset)))
            device = BowDevice(partial, block_size, sync_each_step=False)
            result = replay_entries(trace.entries(), device, mark=mark,
                                    total=trace.nr_entries, progress=progress)
            partial.sync()
            partial.close()
            _check_out(out, log, base, force=force)  # again: the replay took a while
            partial.publish(replace=force and os.path.lexists(target))
        except BaseException:
            partial.discard()
            raise
    _fsync_dir(os.path.dirname(target))
    return result


_COPY_CHUNK = 1 << 22

def _check_out(out: str, log: str, base: str, *, force: bool) -> str:
    """Refuse an OUT replay must not write, with BowUsageError naming OUT as given; return the
    path to create (OUT with symlinks resolved: through a symlink, the file it points to)."""
    try:
        st = os.stat(out)
    except FileNotFoundError:
        if os.path.islink(out):  # writing through it would create a file wherever it points
            raise BowUsageError(f"{out} is a symbolic link to {os.readlink(out)}, which does not "
                                f"exist: remove the link or name another --out") from None
        return os.path.realpath(out)
    for path, what in ((log, "the log being replayed"), (base, "the base image")):
        if _same_file(st, os.stat(path)):
            raise BowUsageError(f"{out} is {what}: replay never writes it, name another --out")
    if not stat.S_ISREG(st.st_mode):
        kind = kind_of(st.st_mode)
        hint = (" (copy the finished image onto the device afterwards)"
                if stat.S_ISBLK(st.st_mode) else "")
        raise BowUsageError(f"{out} is {kind}: replay only creates image files, name a new file "
                            f"for --out{hint}")
    if not force:
        raise _exists(out)
    return os.path.realpath(out)


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    """The same inode, or two nodes of the same block device."""
    if stat.S_ISBLK(a.st_mode) and stat.S_ISBLK(b.st_mode):
        return a.st_rdev == b.st_rdev
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _exists(out: str) -> BowUsageError:
    return BowUsageError(f"{out} exists: pass --force to replace it, or name another --out")


class _PartialOut:
    """OUT while it is built: a hidden temporary next to it (an Image for BowDevice).

    Every OSError it raises names OUT as the user gave it, never the temporary.

    publish() puts it in place. Without --force that must fail, not replace, if OUT appeared
    after _check_out(): os.link() of the temporary to OUT fails with EEXIST and is atomic on
    every filesystem with hard links (NFS included, where renameat2's RENAME_NOREPLACE is not
    supported, and without ctypes); the temporary is then unlinked. Where there are no hard
    links (vfat, exfat), OUT is claimed with O_CREAT|O_EXCL, which fails as well, and the
    temporary renamed over that empty claim. With --force, rename() replaces OUT atomically.
    """

    def __init__(self, out: str, target: str, size: int) -> None:
        self.out, self.target, self.tmp, self.size = out, target, "", size
        self.image: FileImage | None = None
        with self._naming_out():
            fd, self.tmp = tempfile.mkstemp(dir=os.path.dirname(target),
                                            prefix="." + os.path.basename(target) + ".",
                                            suffix=".partial")
        try:
            with self._naming_out():
                umask = os.umask(0)
                os.umask(umask)
                os.fchmod(fd, 0o666 & ~umask)  # as open() would make OUT, not mkstemp's 0600
                os.ftruncate(fd, size)
                self.image = FileImage(self.tmp)
        except BaseException:
            self.discard()
            raise
        finally:
            os.close(fd)

    @contextmanager
    def _naming_out(self) -> Iterator[None]:
        try:
            yield
        except OSError as e:
            text = e.strerror or str(e)
            raise OSError(e.errno, text.replace(self.tmp, self.out) if self.tmp else text,
                          self.out) from e

    def read(self, offset: int, length: int) -> bytes:
        with self._naming_out():
            return self.image.read(offset, length)

    def write(self, offset: int, data: bytes) -> None:
        with self._naming_out():
            self.image.write(offset, data)

    def sync(self) -> None:
        with self._naming_out():
            self.image.sync()

    def close(self) -> None:
        if self.image is not None:
            image, self.image = self.image, None
            image.close()

    def publish(self, *, replace: bool) -> None:
        with self._naming_out():
            if replace:
                os.replace(self.tmp, self.target)
                return
            try:
                os.link(self.tmp, self.target)
            except FileExistsError:
                raise _exists(self.out) from None
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self._claim_and_rename()
                return
            os.unlink(self.tmp)

    def _claim_and_rename(self) -> None:
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            os.close(os.open(self.target, flags, 0o600))
        except FileExistsError:
            raise _exists(self.out) from None
        try:
            os.replace(self.tmp, self.target)
        except BaseException:
            os.unlink(self.target)
            raise

    def discard(self) -> None:
        """Close and remove the temporary (after a failure); OUT is left as it was."""
        self.close()
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


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


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
