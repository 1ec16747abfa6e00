"""Read and write the log of the kernel's dm-log-writes target.

dm-log-writes records every write, discard, flush and user mark that reaches a device, in
completion order, onto a second "log" device. bow_compat replays such a recorded trace through
its dm-bow model, so it reads the log device's image natively (no xfstests replay-log needed).

Format, as checked in torvalds/linux drivers/md/dm-log-writes.c (commit 047218ec904d) and the
userspace reader kdave/xfstests src/log-writes/log-writes.c (commit 00b6ad8f265e); all integers
little-endian; "sectorsize" is the logical block size of the logged device:

* Super block at byte 0, padded with zeros to one sectorsize:
  magic u64 = 0x6a736677736872, version u64 = 1, nr_entries u64, sectorsize u32.
  (The C struct is 28 bytes plus 4 bytes of padding the kernel does not clear: ignored here.)
  nr_entries is only rewritten after FUA and MARK entries and when the target is removed
  (it logs a final "dm-log-writes-end" mark), so it may lag behind the entries on disk; like
  xfstests, we read exactly nr_entries entries.
* Entries follow from byte `sectorsize`, back to back. Each is one sectorsize of metadata —
  sector u64, nr_sectors u64, flags u64, data_len u64 (32 bytes), then for a MARK the mark text
  (data_len bytes, not NUL-terminated, at most sectorsize-33 bytes), zero padding otherwise —
  followed by nr_sectors*sectorsize bytes of data unless the entry is a DISCARD (no data).
  `sector` and `nr_sectors` count sectorsize units, not 512-byte sectors.
* Flags: FLUSH 1<<0 (REQ_PREFLUSH; alone, nr_sectors 0, for an empty flush), FUA 1<<1,
  DISCARD 1<<2, MARK 1<<3, METADATA 1<<4 (REQ_META, informational).
* data_len of a non-MARK entry is ignored: the old DAX path stored inline data there but always
  within nr_sectors. xfstests refuses an all-zero entry (no flags, no sectors) and a non-MARK
  entry whose first byte after the 32-byte header is not zero; so do we.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from bow_compat.errors import BowFormatError
from bow_compat.image import FileImage, Image, MemoryImage

WRITE_LOG_MAGIC = 0x6A736677736872
WRITE_LOG_VERSION = 1

LOG_FLUSH_FLAG = 1 << 0
LOG_FUA_FLAG = 1 << 1
LOG_DISCARD_FLAG = 1 << 2
LOG_MARK_FLAG = 1 << 3
LOG_METADATA_FLAG = 1 << 4
KNOWN_FLAGS = LOG_FLUSH_FLAG | LOG_FUA_FLAG | LOG_DISCARD_FLAG | LOG_MARK_FLAG | LOG_METADATA_FLAG

SUPER = struct.Struct("<QQQI")  # magic, version, nr_entries, sectorsize (28 bytes)
ENTRY = struct.Struct("<QQQQ")  # sector, nr_sectors, flags, data_len (32 bytes)

_MAX_SECTORSIZE = 1 << 16


@dataclass(frozen=True)
class LogWrite:
    """One logged bio (or mark). `sector`/`nr_sectors` are in the log's sectorsize units."""

    index: int
    sector: int
    nr_sectors: int
    flags: int
    sectorsize: int
    data: bytes = b""
    mark: str | None = None
    log_offset: int = 0  # byte offset of this entry's metadata sector in the log

    @property
    def offset(self) -> int:
        """Byte offset on the logged device."""
        return self.sector * self.sectorsize

    @property
    def length(self) -> int:
        """Bytes covered on the logged device."""
        return self.nr_sectors * self.sectorsize

    @property
    def is_mark(self) -> bool:
        return bool(self.flags & LOG_MARK_FLAG)

    @property
    def is_discard(self) -> bool:
        return bool(self.flags & LOG_DISCARD_FLAG)

    @property
    def is_flush(self) -> bool:
        return bool(self.flags & LOG_FLUSH_FLAG)

    @property
    def is_fua(self) -> bool:
        return bool(self.flags & LOG_FUA_FLAG)

    @property
    def is_write(self) -> bool:
        """Carries data to write (a FLUSH or FUA bio may carry data too)."""
        return self.nr_sectors > 0 and not (self.flags & (LOG_DISCARD_FLAG | LOG_MARK_FLAG))


class LogWritesLog:
    """An opened dm-log-writes log: header fields plus a lazy entry iterator."""

    def __init__(self, image: Image, *, owned: bool = False) -> None:
        self.image = image
        self._owned = owned
        self.size = image.size
        if self.size < SUPER.size:
            raise BowFormatError(f"log-writes log is {self.size} bytes: too short for the super block")
        magic, version, nr_entries, sectorsize = SUPER.unpack(image.read(0, SUPER.size))
        if magic != WRITE_LOG_MAGIC:
            raise BowFormatError(f"not a dm-log-writes log: magic {magic:#x}, expected {WRITE_LOG_MAGIC:#x}")
        if version != WRITE_LOG_VERSION:
            raise BowFormatError(
                f"dm-log-writes log version {version} is not supported (only {WRITE_LOG_VERSION})")
        if sectorsize < 512 or sectorsize > _MAX_SECTORSIZE or sectorsize & (sectorsize - 1):
            raise BowFormatError(f"dm-log-writes log has an invalid sectorsize {sectorsize}")
        if (nr_entries + 1) * sectorsize > self.size:
            raise BowFormatError(
                f"dm-log-writes log is truncated: the super block counts {nr_entries} entries, "
                f"the {self.size}-byte log has room for at most {self.size // sectorsize - 1}"
            )
        self.version = version
        self.nr_entries = nr_entries
        self.sectorsize = sectorsize

    def entries(self, *, with_data: bool = True) -> Iterator[LogWrite]:
        """Entries in log order; with_data=False skips reading write payloads (data=b"")."""
        ss = self.sectorsize
        pos = ss
        for index in range(self.nr_entries):
            if pos + ss > self.size:
                raise BowFormatError(f"dm-log-writes log is truncated in entry {index} (byte {pos})")
            meta = self.image.read(pos, ss)
            sector, nr_sectors, flags, data_len = ENTRY.unpack_from(meta)
            where = f"dm-log-writes entry {index} (byte {pos})"
            if flags == 0 and nr_sectors == 0:
                raise BowFormatError(f"{where} is empty (no flags, no sectors): not a log entry")
            if flags & ~KNOWN_FLAGS:
                raise BowFormatError(f"{where} has unknown flags {flags:#x}")
            mark = None
            if flags & LOG_MARK_FLAG:
                if data_len > ss - ENTRY.size:
                    raise BowFormatError(f"{where}: mark of {data_len} bytes does not fit its sector")
                mark = meta[ENTRY.size:ENTRY.size + data_len].decode("utf-8", "surrogateescape")
            elif ss > ENTRY.size and meta[ENTRY.size] != 0:
                raise BowFormatError(f"{where} is not zero-padded: not a log entry")
            data_pos = pos + ss
            length = 0 if flags & (LOG_DISCARD_FLAG | LOG_MARK_FLAG) else nr_sectors * ss
            if data_pos + length > self.size:
                raise BowFormatError(f"{where}: its {length} bytes of data run past the end of the log")
            data = self.image.read(data_pos, length) if with_data and length else b""
            yield LogWrite(index, sector, nr_sectors, flags, ss, data, mark, pos)
            pos = data_pos + length

    def read_data(self, entry: LogWrite) -> bytes:
        """The payload of an entry obtained with with_data=False."""
        if not entry.is_write:
            return b""
        return self.image.read(entry.log_offset + self.sectorsize, entry.length)

    def __iter__(self) -> Iterator[LogWrite]:
        return self.entries()

    def close(self) -> None:
        if self._owned and isinstance(self.image, FileImage):
            self.image.close()

    def __enter__(self) -> LogWritesLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_log(source: str | os.PathLike | Image) -> LogWritesLog:
    """Open a log-device image (path, opened read-only) or an Image; validates the super block."""
    if isinstance(source, (str, os.PathLike)):
        image = FileImage(source, writable=False)
        try:
            return LogWritesLog(image, owned=True)
        except BaseException:
            image.close()
            raise
    return LogWritesLog(source)


class LogWritesWriter:
    """Builds a valid dm-log-writes log in memory, laid out exactly as the kernel writes it.

    Used by tests to make synthetic traces; reading its output back proves the reader.
    Offsets and lengths are in bytes and must be multiples of sectorsize.
    """

    def __init__(self, sectorsize: int = 512) -> None:
        if sectorsize < 512 or sectorsize & (sectorsize - 1):
            raise ValueError(f"sectorsize must be a power of two >= 512, not {sectorsize}")
        self.sectorsize = sectorsize
        self.nr_entries = 0
        self._body = bytearray()

    def _units(self, nbytes: int, what: str) -> int:
        if nbytes < 0 or nbytes % self.sectorsize:
            raise ValueError(f"{what} {nbytes} is not a multiple of the sectorsize {self.sectorsize}")
        return nbytes // self.sectorsize

    def _entry(self, sector: int, nr_sectors: int, flags: int, text: bytes = b"") -> None:
        meta = ENTRY.pack(sector, nr_sectors, flags, len(text)) + text
        self._body += meta.ljust(self.sectorsize, b"\0")
        self.nr_entries += 1

    def write(self, offset: int, data: bytes, *, flags: int = 0) -> None:
        """A write bio (flags may add FLUSH, FUA, METADATA)."""
        nr = self._units(len(data), "write length")
        if nr == 0:
            raise ValueError("a write needs data; use flush() for an empty flush")
        if flags & (LOG_DISCARD_FLAG | LOG_MARK_FLAG):
            raise ValueError("use discard() or mark()")
        self._entry(self._units(offset, "write offset"), nr, flags)
        self._body += data

    def discard(self, offset: int, length: int) -> None:
        nr = self._units(length, "discard length")
        if nr == 0:
            raise ValueError("an empty discard is not logged")
        self._entry(self._units(offset, "discard offset"), nr, LOG_DISCARD_FLAG)

    def flush(self) -> None:
        """An empty REQ_PREFLUSH bio."""
        self._entry(0, 0, LOG_FLUSH_FLAG)

    def mark(self, text: str) -> None:
        """`dmsetup message DEV 0 mark TEXT`; the kernel keeps at most sectorsize-33 bytes."""
        raw = text.encode("utf-8", "surrogateescape")
        if not raw or b"\0" in raw or len(raw) > self.sectorsize - ENTRY.size - 1:
            raise ValueError(f"mark text must be 1..{self.sectorsize - ENTRY.size - 1} bytes without NUL")
        self._entry(0, 0, LOG_MARK_FLAG, raw)

    def getvalue(self) -> bytes:
        """The whole log device image: super block sector, then the entries."""
        sb = SUPER.pack(WRITE_LOG_MAGIC, WRITE_LOG_VERSION, self.nr_entries, self.sectorsize)
        return sb.ljust(self.sectorsize, b"\0") + bytes(self._body)

    def image(self) -> MemoryImage:
        return MemoryImage(self.getvalue())

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "wb") as f:
            f.write(self.getvalue())
