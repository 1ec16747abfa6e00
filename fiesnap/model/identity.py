"""The store identity header: the first 4096 bytes of a store file (pure).

`fiesnap activate` after a reboot maps a store file's blocks by the extents
in the record. If the record and the disk disagree (another disk, a re-made
filesystem, a store from another checkpoint, a record from before the store
map grew), mapping would hand dm-snapshot someone else's blocks. So `start`
writes this header into the store file's first block, which is never part of
the mapped COW store, and `activate` reads it raw from the device and checks
it against the record before mapping anything.

Layout (all integers little-endian):

    offset  size  field
         0     8  magic b"FIESNAPI"
         8     4  format version (u32) = 1
        12     4  length of fs_uuid in bytes (u32, 1..64)
        16    16  checkpoint_id (16 raw bytes; 32 lowercase hex in the record)
        32     8  device_bytes (u64)
        40     8  chunk_bytes (u64)
        48     8  generation (u64, >= 1)
        56    32  map_sha256 (32 raw bytes; 64 lowercase hex in the record)
        88    64  fs_uuid (utf-8, zero padded)
       152     4  crc32 (zlib.crc32) of bytes 0..151
       156  3940  zeros

The trailing zeros are checked too, so every byte of the block is covered.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import zlib
from dataclasses import dataclass

from fiesnap.model.units import is_int
from fiesnap.errors import RefusedError, StoreFormatError
from fiesnap.model.extents import SECTOR_BYTES, is_valid_chunk_bytes

IDENTITY_BYTES = 4096
MAGIC = b"FIESNAPI"
VERSION = 1
FS_UUID_MAX_BYTES = 64

_PREFIX = struct.Struct("<8sI")  # magic, version
_BODY = struct.Struct("<8sII16sQQQ32s64s")  # v1 fields, offsets 0..151
_CRC = struct.Struct("<I")
CRC_OFFSET = _BODY.size
END_OFFSET = CRC_OFFSET + _CRC.size
assert (CRC_OFFSET, END_OFFSET) == (152, 156)

_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_U64_MAX = 2**64 - 1


@dataclass(frozen=True)
class StoreIdentity:
    """What a store file's header says it is; must equal what the record says."""

    checkpoint_id: str
    fs_uuid: str
    device_bytes: int
    chunk_bytes: int
    map_sha256: str
    generation: int


def map_checksum(cow_table: dict) -> str:
    """sha256 hex of the store map in canonical JSON, so the header pins the exact map."""
    text = json.dumps(cow_table, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()



def _field_problem(ident: StoreIdentity) -> str | None:
    """What is wrong with the fields, or None: shared by encode (bug) and decode (bad disk)."""
    if not (isinstance(ident.checkpoint_id, str) and _HEX32.fullmatch(ident.checkpoint_id)):
        return f"checkpoint id {ident.checkpoint_id!r} is not 32 lowercase hex digits"
    if not isinstance(ident.fs_uuid, str):
        return f"filesystem uuid {ident.fs_uuid!r} is not a string"
    raw_uuid = ident.fs_uuid.encode("utf-8", "surrogatepass")
    if not 0 < len(raw_uuid) <= FS_UUID_MAX_BYTES or "\0" in ident.fs_uuid:
        return f"filesystem uuid {ident.fs_uuid!r} is empty, longer than {FS_UUID_MAX_BYTES} bytes or has NULs"
    if not (is_int(ident.device_bytes) and 0 < ident.device_bytes <= _U64_MAX
            and ident.device_bytes % SECTOR_BYTES == 0):
        return f"device size {ident.device_bytes!r} is not a positive multiple of {SECTOR_BYTES} bytes"
    if not is_valid_chunk_bytes(ident.chunk_bytes):
        return f"chunk size {ident.chunk_bytes!r} is not a power of two from 512 bytes to 1 GiB"
    if not (isinstance(ident.map_sha256, str) and _HEX64.fullmatch(ident.map_sha256)):
        return f"store map checksum {ident.map_sha256!r} is not 64 lowercase hex digits"
    if not (is_int(ident.generation) and 1 <= ident.generation <= _U64_MAX):
        return f"generation {ident.generation!r} is not an integer >= 1"
    return None


def encode_identity(ident: StoreIdentity) -> bytes:
    """The IDENTITY_BYTES-byte header for `ident`; ValueError for invalid fields (a bug)."""
    problem = _field_problem(ident)
    if problem:
        raise ValueError(f"cannot encode store identity: {problem}")
    try:
        raw_uuid = ident.fs_uuid.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"cannot encode store identity: filesystem uuid {ident.fs_uuid!r} is not utf-8") from e
    buf = bytearray(IDENTITY_BYTES)
    _BODY.pack_into(
        buf, 0, MAGIC, VERSION, len(raw_uuid), bytes.fromhex(ident.checkpoint_id),
        ident.device_bytes, ident.chunk_bytes, ident.generation,
        bytes.fromhex(ident.map_sha256), raw_uuid,
    )
    _CRC.pack_into(buf, CRC_OFFSET, zlib.crc32(buf[:CRC_OFFSET]))
    return bytes(buf)


def decode_identity(buf: bytes, where: str) -> StoreIdentity:
    """Parse a header read from `where` (a device and offset, for messages).

    Raises StoreFormatError if it is not a valid fiesnap header: the caller
    must then refuse to map the store. A buffer longer than IDENTITY_BYTES is
    a bug (ValueError); a shorter one is a short read (StoreFormatError).
    """
    buf = bytes(buf)
    if len(buf) > IDENTITY_BYTES:
        raise ValueError(f"store identity buffer is {len(buf)} bytes, not {IDENTITY_BYTES}")
    if len(buf) < IDENTITY_BYTES:
        raise StoreFormatError(
            f"store identity at {where} is cut short ({len(buf)} of {IDENTITY_BYTES} bytes): "
            "the device is smaller than recorded; check that the right disk is attached"
        )
    magic, version = _PREFIX.unpack_from(buf, 0)
    if magic != MAGIC:
        found = "other data" if any(buf) else "zeros"
        raise StoreFormatError(
            f"no fiesnap store identity at {where} (found {found}): this is not the recorded store; "
            "check that the right disk is attached and do not activate this checkpoint"
        )
    if version != VERSION:
        raise StoreFormatError(
            f"store identity at {where} has format version {version}, this fiesnap knows only {VERSION}: "
            "use the fiesnap version that took the checkpoint"
        )
    (stored_crc,) = _CRC.unpack_from(buf, CRC_OFFSET)
    if zlib.crc32(buf[:CRC_OFFSET]) != stored_crc or any(buf[END_OFFSET:]):
        raise StoreFormatError(
            f"store identity at {where} fails its checksum: the store's first block is damaged "
            "or overwritten; do not activate this checkpoint"
        )
    _, _, uuid_len, cid, device_bytes, chunk_bytes, generation, digest, raw_uuid = _BODY.unpack_from(buf, 0)
    try:
        if not 0 < uuid_len <= FS_UUID_MAX_BYTES or any(raw_uuid[uuid_len:]):
            raise ValueError("bad length")
        fs_uuid = raw_uuid[:uuid_len].decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        raise StoreFormatError(
            f"store identity at {where} has an invalid filesystem uuid field: "
            "it was not written by this fiesnap; do not activate this checkpoint"
        ) from None
    ident = StoreIdentity(cid.hex(), fs_uuid, device_bytes, chunk_bytes, digest.hex(), generation)
    problem = _field_problem(ident)
    if problem:
        raise StoreFormatError(
            f"store identity at {where} is invalid ({problem}): "
            "it was not written by this fiesnap; do not activate this checkpoint"
        )
    return ident


_CHECKED = (
    ("checkpoint_id", "is for checkpoint {found}, the record says {expected}"),
    ("fs_uuid", "is for filesystem {found}, the record says {expected}"),
    ("device_bytes", "is for a device of {found} bytes, the record says {expected}"),
    ("chunk_bytes", "has chunk size {found} bytes, the record says {expected}"),
    ("map_sha256", "has store map checksum {found}, the record says {expected}"),
    ("generation", "has store map generation {found}, the record says {expected}"),
)


def check_identity(found: StoreIdentity, expected: StoreIdentity, where: str) -> None:
    """Raise RefusedError naming the first field where the header and the record differ."""
    for name, text in _CHECKED:
        a, b = getattr(found, name), getattr(expected, name)
        if a != b:
            raise RefusedError(
                f"store identity at {where} {text.format(found=a, expected=b)}: "
                "refusing to map the store; the store or the record is not the one you think"
            )
