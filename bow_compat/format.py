"""dm-bow's on-disk log sector and its checksum, byte for byte (pure: no I/O).

The layout is Android's `struct log_sector` / `struct log_entry` (drivers/md/dm-bow.c, both
`__packed`), which vold's Checkpoint.cpp reads back as `log_sector_v1_0`. The kernel memcpy()s
the struct to disk, so the fields are in the CPU's byte order; every Android CPU (arm, arm64,
x86, x86_64, riscv64) is little-endian, and so is everything here: we read and write
little-endian whatever the host. A log written by a big-endian kernel would show up as bad magic.

Units as on disk: `source`, `dest`, `sector0` in 512-byte sectors, `size` in bytes.
See docs/bow-format.md for the tables and the sources checked.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from bow_compat.errors import BowFormatError

SECTOR = 512
BOW_MAGIC = 0x00574F42          # "BOW\0" on disk: dm-bow's MAGIC
RESTORING_MAGIC = 0x00424F57    # "WOB\0" on disk: vold's kPartialRestoreMagic
HEADER_VERSION = 0x0100
HEADER_SIZE = 28                # sizeof(struct log_sector), packed, flexible array excluded
ENTRY_SIZE = 24                 # sizeof(struct log_entry), packed
MIN_BLOCK_SIZE = 512
MAX_BLOCK_SIZE = 65536          # dm-bow 1.2.0 caps block_size:N at 4096; the default (the
                                # device's logical block size) is at most a page

_HEADER = struct.Struct("<IHHIIIQ")  # magic, header_version, header_size, block_size, count,
                                     # sequence, sector0
_ENTRY = struct.Struct("<QQII")      # source, dest, size, checksum
assert _HEADER.size == HEADER_SIZE and _ENTRY.size == ENTRY_SIZE

_MAGIC_NAMES = {BOW_MAGIC: "BOW", RESTORING_MAGIC: "RESTORING"}


@dataclass(frozen=True)
class LogEntry:
    """One backup: `size` bytes at sector `source` were copied to sector `dest` before being
    overwritten. `checksum` covers the copied data (see block_checksum); 0 means not checked
    (dm-bow writes 0 when moving the live copy of block 0, whose content may change at any time)."""

    source: int
    dest: int
    size: int
    checksum: int


@dataclass(frozen=True)
class LogSector:
    """Block 0 of a device in dm-bow's CHECKPOINT state, or an older one saved by chaining."""

    block_size: int
    sequence: int
    sector0: int
    entries: tuple[LogEntry, ...]
    magic: int = BOW_MAGIC
    header_version: int = HEADER_VERSION
    header_size: int = HEADER_SIZE

    @property
    def count(self) -> int:
        return len(self.entries)

    @property
    def state(self) -> str:
        """"BOW" (as dm-bow wrote it) or "RESTORING" (vold's partial-restore mark)."""
        return _MAGIC_NAMES.get(self.magic, f"0x{self.magic:08x}")


def capacity(block_size: int, header_size: int = HEADER_SIZE) -> int:
    """Entries a log sector holds: dm-bow chains to a new log sector when
    header + (count + 1) * entry would exceed block_size (169 at 4096, 41 at 1024, 20 at 512)."""
    return max(0, (block_size - header_size) // ENTRY_SIZE)


def valid_block_size(block_size: int) -> bool:
    return (MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE
            and block_size & (block_size - 1) == 0)


def encode(log: LogSector) -> bytes:
    """The log sector exactly as dm-bow writes it: block_size bytes, zero padded."""
    if not valid_block_size(log.block_size):
        raise ValueError(f"block size {log.block_size} is not a power of two in "
                         f"{MIN_BLOCK_SIZE}..{MAX_BLOCK_SIZE}")
    if not HEADER_SIZE <= log.header_size <= log.block_size:
        raise ValueError(f"header size {log.header_size} outside {HEADER_SIZE}..{log.block_size}")
    cap = capacity(log.block_size, log.header_size)
    if len(log.entries) > cap:
        raise ValueError(f"{len(log.entries)} entries do not fit a {log.block_size}-byte log "
                         f"sector (capacity {cap})")
    buf = bytearray(log.block_size)
    _HEADER.pack_into(buf, 0, log.magic, log.header_version, log.header_size, log.block_size,
                      len(log.entries), log.sequence, log.sector0)
    for i, e in enumerate(log.entries):
        _ENTRY.pack_into(buf, log.header_size + i * ENTRY_SIZE, e.source, e.dest, e.size,
                         e.checksum)
    return bytes(buf)


def peek_magic(buf: bytes) -> int | None:
    """The first u32 of block 0, or None if there are not 4 bytes (no log can be there)."""
    return int.from_bytes(buf[:4], "little") if len(buf) >= 4 else None


def peek_block_size(buf: bytes) -> int | None:
    """The block_size field, which says how much of block 0 to read before decode()."""
    return int.from_bytes(buf[8:12], "little") if len(buf) >= 12 else None


def decode(buf: bytes, *, expect_block_size: int | None = None) -> LogSector:
    """Parse one log sector, refusing anything dm-bow could not have written.

    Checks what vold checks (magic, block size, 28 <= header_size <= block_size,
    1 <= count <= capacity) plus the header version, which vold ignores. Entries start at
    header_size as in vold, so a longer future header would still be read correctly.
    """
    refuse = "refusing to restore"
    if len(buf) < HEADER_SIZE:
        raise BowFormatError(f"log sector truncated: {len(buf)} bytes, the header alone is "
                             f"{HEADER_SIZE}; image cut short, {refuse}")
    magic, version, header_size, block_size, count, sequence, sector0 = _HEADER.unpack_from(buf)
    if magic not in _MAGIC_NAMES:
        raise BowFormatError(f"bad log sector magic 0x{magic:08x} (expected 0x{BOW_MAGIC:08x} "
                             f"BOW or 0x{RESTORING_MAGIC:08x} WOB): not a dm-bow log or "
                             f"corrupt, {refuse}")
    if version != HEADER_VERSION:
        raise BowFormatError(f"unknown log header version 0x{version:04x} (only "
                             f"0x{HEADER_VERSION:04x} is known): {refuse} a layout we would "
                             f"have to guess")
    if not valid_block_size(block_size):
        raise BowFormatError(f"invalid block size {block_size} in log sector (must be a power "
                             f"of two in {MIN_BLOCK_SIZE}..{MAX_BLOCK_SIZE}): log is corrupt, "
                             f"{refuse}")
    if expect_block_size is not None and block_size != expect_block_size:
        raise BowFormatError(f"log sector {sequence} says block size {block_size}, block 0 says "
                             f"{expect_block_size}: log chain is corrupt, {refuse}")
    if len(buf) < block_size:
        raise BowFormatError(f"log sector truncated: {len(buf)} of {block_size} bytes; image "
                             f"cut short, {refuse}")
    if not HEADER_SIZE <= header_size <= block_size:
        raise BowFormatError(f"invalid log header size {header_size} (must be "
                             f"{HEADER_SIZE}..{block_size}): log is corrupt, {refuse}")
    cap = capacity(block_size, header_size)
    if not 1 <= count <= cap:
        raise BowFormatError(f"invalid entry count {count} in log sector {sequence} (must be "
                             f"1..{cap} at block size {block_size}): log is corrupt, {refuse}")
    entries = tuple(LogEntry(*_ENTRY.unpack_from(buf, header_size + i * ENTRY_SIZE))
                    for i in range(count))
    return LogSector(block_size=block_size, sequence=sequence, sector0=sector0, entries=entries,
                     magic=magic, header_version=version, header_size=header_size)


def mark_restoring(raw: bytes, count: int | None = None) -> bytes:
    """`raw` (an encoded log sector) with vold's partial-restore magic and, if given, a new count.

    Only the magic and count bytes change, as in vold's restore: the entry table stays byte
    for byte, so a torn write of this block cannot mix two different entry tables.
    """
    buf = bytearray(raw)
    buf[0:4] = RESTORING_MAGIC.to_bytes(4, "little")
    if count is not None:
        buf[12:16] = count.to_bytes(4, "little")
    return bytes(buf)


def crc32_le(crc: int, data: bytes) -> int:
    """The kernel's crc32_le(crc, data, len) (also vold's table-driven crc32()): reflected
    polynomial 0xEDB88320, the caller's initial value, no final inversion. zlib inverts on the
    way in and out, so inverting around it gives the raw register update."""
    return zlib.crc32(data, crc ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


def block_checksum(data: bytes, source_sector: int, block_size: int) -> int:
    """dm-bow's checksum of a backup, as copy_data() computes it and vold checks it.

    Seeded once with the source's block index (sector >> (block_shift - 9), truncated to u32),
    then crc32_le chained over each block in turn: one seed for the whole range, not one per
    block, so it equals crc32_le(seed, data) over the concatenation.
    """
    if block_size <= 0 or not data or len(data) % block_size:
        raise ValueError(f"{len(data)} bytes is not a whole number of {block_size}-byte blocks")
    seed = (source_sector // (block_size // SECTOR)) & 0xFFFFFFFF
    return crc32_le(seed, data)
