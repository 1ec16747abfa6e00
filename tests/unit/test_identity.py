"""The store identity header: layout, round trips, corruption, mismatches (pure)."""

from __future__ import annotations

import dataclasses
import random
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fiesnap.errors import RefusedError, StoreFormatError
from fiesnap.model.identity import (
    IDENTITY_BYTES,
    MAGIC,
    StoreIdentity,
    check_identity,
    decode_identity,
    encode_identity,
    map_checksum,
)

WHERE = "/dev/loop0 byte 1048576"

IDENT = StoreIdentity(
    checkpoint_id="0123456789abcdef0123456789abcdef",
    fs_uuid="6f1c3a52-58a1-4a8e-9d0e-3c1f1b2a4d5e",
    device_bytes=64 << 20,
    chunk_bytes=4096,
    map_sha256=map_checksum({"chunk_bytes": 4096, "segments": [[0, 10, 7]]}),
    generation=1,
)

identities = st.builds(
    StoreIdentity,
    checkpoint_id=st.binary(min_size=16, max_size=16).map(bytes.hex),
    fs_uuid=st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
                    min_size=1, max_size=16).filter(lambda s: len(s.encode()) <= 64),
    device_bytes=st.integers(1, 2**55 - 1).map(lambda n: n * 512),
    chunk_bytes=st.integers(9, 30).map(lambda k: 2**k),
    map_sha256=st.binary(min_size=32, max_size=32).map(bytes.hex),
    generation=st.integers(1, 2**64 - 1),
)


def test_layout_is_the_documented_one() -> None:
    buf = encode_identity(IDENT)
    assert len(buf) == IDENTITY_BYTES
    assert buf[0:8] == MAGIC == b"FIESNAPI"
    assert struct.unpack_from("<II", buf, 8) == (1, len(IDENT.fs_uuid))
    assert buf[16:32].hex() == IDENT.checkpoint_id
    assert struct.unpack_from("<QQQ", buf, 32) == (IDENT.device_bytes, IDENT.chunk_bytes, IDENT.generation)
    assert buf[56:88].hex() == IDENT.map_sha256
    assert buf[88:152].rstrip(b"\0").decode() == IDENT.fs_uuid
    assert struct.unpack_from("<I", buf, 152)[0] == zlib.crc32(buf[:152])
    assert not any(buf[156:])


@settings(max_examples=300)
@given(identities)
def test_round_trip(ident: StoreIdentity) -> None:
    buf = encode_identity(ident)
    assert len(buf) == IDENTITY_BYTES
    assert decode_identity(buf, WHERE) == ident
    check_identity(decode_identity(buf, WHERE), ident, WHERE)


def test_round_trip_limits() -> None:
    ident = dataclasses.replace(IDENT, fs_uuid="é" * 32, chunk_bytes=2**30, device_bytes=512, generation=2**64 - 1)
    assert decode_identity(encode_identity(ident), WHERE) == ident


def _flip(buf: bytes, offset: int, xor: int) -> bytes:
    b = bytearray(buf)
    b[offset] ^= xor
    return bytes(b)


@settings(max_examples=300)
@given(identities, st.integers(0, IDENTITY_BYTES - 1), st.integers(1, 255))
def test_any_single_byte_corruption_is_refused(ident: StoreIdentity, offset: int, xor: int) -> None:
    with pytest.raises(StoreFormatError, match=f"at {WHERE}"):
        decode_identity(_flip(encode_identity(ident), offset, xor), WHERE)


def test_every_byte_of_the_covered_region_is_checked() -> None:
    buf = encode_identity(IDENT)
    rng = random.Random(7)
    for offset in list(range(160)) + rng.sample(range(160, IDENTITY_BYTES), 200):
        with pytest.raises(StoreFormatError):
            decode_identity(_flip(buf, offset, rng.randrange(1, 256)), WHERE)


def test_bad_magic_says_zeros_or_other_data() -> None:
    with pytest.raises(StoreFormatError) as e:
        decode_identity(bytes(IDENTITY_BYTES), WHERE)
    assert str(e.value).startswith(f"no fiesnap store identity at {WHERE} (found zeros): this is not the recorded store; ")
    with pytest.raises(StoreFormatError, match=r"\(found other data\): this is not the recorded store"):
        decode_identity(b"\xff" * IDENTITY_BYTES, WHERE)
    with pytest.raises(StoreFormatError, match=r"no fiesnap store identity"):
        decode_identity(_flip(encode_identity(IDENT), 0, 0x20), WHERE)


def test_unknown_version() -> None:
    buf = bytearray(encode_identity(IDENT))
    struct.pack_into("<I", buf, 8, 2)
    with pytest.raises(StoreFormatError, match=f"store identity at {WHERE} has format version 2, this fiesnap knows only 1"):
        decode_identity(bytes(buf), WHERE)


def test_bad_checksum_and_dirty_padding() -> None:
    buf = encode_identity(IDENT)
    for offset in (20, 152, 156, IDENTITY_BYTES - 1):
        with pytest.raises(StoreFormatError, match=f"store identity at {WHERE} fails its checksum"):
            decode_identity(_flip(buf, offset, 1), WHERE)


def _resealed(mutate) -> bytes:  # type: ignore[no-untyped-def]
    """A header with a field changed and the crc recomputed: passes the checksum, fails field checks."""
    buf = bytearray(encode_identity(IDENT))
    mutate(buf)
    struct.pack_into("<I", buf, 152, zlib.crc32(bytes(buf[:152])))
    return bytes(buf)


@pytest.mark.parametrize(
    "mutate, what",
    [
        (lambda b: struct.pack_into("<I", b, 12, 0), "filesystem uuid field"),
        (lambda b: struct.pack_into("<I", b, 12, 65), "filesystem uuid field"),
        (lambda b: struct.pack_into("<I", b, 12, 3), "filesystem uuid field"),  # bytes after the length
        (lambda b: b.__setitem__(slice(88, 90), b"\xff\xfe"), "filesystem uuid field"),
        (lambda b: struct.pack_into("<Q", b, 32, 0), "device size 0"),
        (lambda b: struct.pack_into("<Q", b, 32, 1000), "device size 1000"),
        (lambda b: struct.pack_into("<Q", b, 40, 3000), "chunk size 3000"),
        (lambda b: struct.pack_into("<Q", b, 40, 2**31), "chunk size"),
        (lambda b: struct.pack_into("<Q", b, 48, 0), "generation 0"),
    ],
)
def test_bad_fields(mutate, what: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(StoreFormatError) as e:
        decode_identity(_resealed(mutate), WHERE)
    msg = str(e.value)
    assert msg.startswith(f"store identity at {WHERE} ")
    assert what in msg and "\n" not in msg


def test_short_and_long_buffers() -> None:
    buf = encode_identity(IDENT)
    with pytest.raises(StoreFormatError, match=f"cut short \\(512 of {IDENTITY_BYTES} bytes\\)"):
        decode_identity(buf[:512], WHERE)
    with pytest.raises(ValueError):
        decode_identity(buf + b"\0", WHERE)
    assert decode_identity(memoryview(bytearray(buf)), WHERE) == IDENT  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "change",
    [
        {"checkpoint_id": "ABCDEF0123456789abcdef0123456789"},
        {"checkpoint_id": "abc"},
        {"fs_uuid": ""},
        {"fs_uuid": "x" * 65},
        {"fs_uuid": "é" * 33},
        {"fs_uuid": "a\0b"},
        {"fs_uuid": "\udcff"},
        {"device_bytes": 0},
        {"device_bytes": 513},
        {"device_bytes": 2**64},
        {"device_bytes": True},
        {"chunk_bytes": 256},
        {"chunk_bytes": 4097},
        {"map_sha256": "00" * 31},
        {"map_sha256": "AB" * 32},
        {"generation": 0},
        {"generation": 2**64},
        {"generation": 1.0},
    ],
)
def test_encode_rejects_bad_fields(change: dict) -> None:
    with pytest.raises(ValueError, match="cannot encode store identity"):
        encode_identity(dataclasses.replace(IDENT, **change))


def test_map_checksum_is_canonical() -> None:
    a = {"chunk_bytes": 4096, "segments": [[0, 3, None], [3, 2, 100]]}
    b = {"segments": [[0, 3, None], [3, 2, 100]], "chunk_bytes": 4096}
    assert map_checksum(a) == map_checksum(b)
    assert len(map_checksum(a)) == 64 and map_checksum(a) == map_checksum(a).lower()
    assert map_checksum(a) != map_checksum({**a, "chunk_bytes": 8192})
    assert map_checksum({}) == "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"  # sha256(b"{}")


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("checkpoint_id", "f" * 32, f"is for checkpoint {'f' * 32}, the record says {IDENT.checkpoint_id}"),
        ("fs_uuid", "other", f"is for filesystem other, the record says {IDENT.fs_uuid}"),
        ("device_bytes", 512, f"is for a device of 512 bytes, the record says {IDENT.device_bytes}"),
        ("chunk_bytes", 8192, "has chunk size 8192 bytes, the record says 4096"),
        ("map_sha256", "0" * 64, f"has store map checksum {'0' * 64}, the record says {IDENT.map_sha256}"),
        ("generation", 2, "has store map generation 2, the record says 1"),
    ],
)
def test_each_mismatch_refuses(field: str, value: object, words: str) -> None:
    found = dataclasses.replace(IDENT, **{field: value})
    with pytest.raises(RefusedError) as e:
        check_identity(found, IDENT, WHERE)
    assert not isinstance(e.value, StoreFormatError)
    assert str(e.value) == (
        f"store identity at {WHERE} {words}: refusing to map the store; the store or the record is not the one you think"
    )


def test_first_differing_field_is_named() -> None:
    found = dataclasses.replace(IDENT, generation=9, chunk_bytes=8192)
    with pytest.raises(RefusedError, match="chunk size 8192"):
        check_identity(found, IDENT, WHERE)
    check_identity(IDENT, dataclasses.replace(IDENT), WHERE)
