"""dm-bow's log sector and checksum, against hand-packed bytes and a reference crc32_le."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bow_compat.errors import BowFormatError
from bow_compat.format import (
    BOW_MAGIC,
    ENTRY_SIZE,
    HEADER_SIZE,
    HEADER_VERSION,
    RESTORING_MAGIC,
    LogEntry,
    LogSector,
    block_checksum,
    capacity,
    crc32_le,
    decode,
    encode,
    mark_restoring,
)


def ref_crc32_le(crc: int, data: bytes) -> int:
    """The kernel's lib/crc32.c crc32_le, bit by bit: no inversion in or out."""
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0xEDB88320 if crc & 1 else 0)
    return crc


def test_constants_match_the_sources():
    assert BOW_MAGIC.to_bytes(4, "little") == b"BOW\0"          # dm-bow.c: "MAGIC is BOW"
    assert RESTORING_MAGIC.to_bytes(4, "little") == b"WOB\0"    # vold: "WOB in ascii"
    assert (HEADER_VERSION, HEADER_SIZE, ENTRY_SIZE) == (0x0100, 28, 24)


@pytest.mark.parametrize("bs,cap", [(512, 20), (1024, 41), (4096, 169)])
def test_capacity(bs, cap):
    assert capacity(bs) == cap
    # dm-bow chains when header + (count + 1) * entry > block_size
    assert HEADER_SIZE + cap * ENTRY_SIZE <= bs < HEADER_SIZE + (cap + 1) * ENTRY_SIZE


def test_field_offsets_against_hand_packed_bytes():
    log = LogSector(block_size=512, sequence=3, sector0=0x0102030405060708, entries=(
        LogEntry(source=0, dest=0x10, size=512, checksum=0xDEADBEEF),
        LogEntry(source=0x1122334455667788, dest=0x99, size=0x1000, checksum=0),
    ))
    want = b"".join([
        b"BOW\0",                      # 0  magic
        b"\x00\x01",                   # 4  header_version 0x0100
        b"\x1c\x00",                   # 6  header_size 28
        b"\x00\x02\x00\x00",           # 8  block_size 512
        b"\x02\x00\x00\x00",           # 12 count
        b"\x03\x00\x00\x00",           # 16 sequence
        b"\x08\x07\x06\x05\x04\x03\x02\x01",  # 20 sector0
        bytes(8),                       # 28 entry 0: source (u64)
        b"\x10" + bytes(7),             # 36 dest (u64)
        b"\x00\x02\x00\x00",           # 44 size (u32)
        b"\xef\xbe\xad\xde",           # 48 checksum (u32)
        b"\x88\x77\x66\x55\x44\x33\x22\x11",  # 52 entry 1: source
        b"\x99" + bytes(7),             # 60 dest
        b"\x00\x10\x00\x00",           # 68 size
        bytes(4),                       # 72 checksum
    ])
    assert len(want) == 76
    raw = encode(log)
    assert len(raw) == 512
    assert raw[:len(want)] == want
    assert raw[len(want):] == bytes(512 - len(want))
    assert decode(raw) == log


@settings(max_examples=100, deadline=None)
@given(bs=st.sampled_from([512, 1024, 2048, 4096]), data=st.data())
def test_round_trip(bs, data):
    n = data.draw(st.integers(1, capacity(bs)))
    u64, u32 = st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1)
    entries = tuple(LogEntry(data.draw(u64), data.draw(u64), data.draw(u32), data.draw(u32))
                    for _ in range(n))
    log = LogSector(bs, data.draw(u32), data.draw(u64), entries,
                    magic=data.draw(st.sampled_from([BOW_MAGIC, RESTORING_MAGIC])))
    assert decode(encode(log), expect_block_size=bs) == log


def test_encode_refuses_too_many_entries():
    entries = (LogEntry(0, 8, 512, 0),) * 21
    with pytest.raises(ValueError, match="capacity 20"):
        encode(LogSector(512, 0, 0, entries))


def _raw(**fields) -> bytearray:
    """A hand-packed log sector with one entry; `length` cuts the buffer short."""
    vals = dict(magic=BOW_MAGIC, version=HEADER_VERSION, header_size=HEADER_SIZE,
                block_size=512, count=1, sequence=0, sector0=8)
    vals.update(fields)
    length = vals.pop("length", min(vals["block_size"], 65536))
    buf = bytearray(max(length, 64))
    struct.pack_into("<IHHIIIQ", buf, 0, vals["magic"], vals["version"], vals["header_size"],
                     vals["block_size"], vals["count"], vals["sequence"], vals["sector0"])
    struct.pack_into("<QQII", buf, 28, 0, 16, 512, 1234)
    return buf[:length]


def test_decode_accepts_both_magics():
    assert decode(bytes(_raw())).state == "BOW"
    assert decode(bytes(_raw(magic=RESTORING_MAGIC))).state == "RESTORING"


@pytest.mark.parametrize("fields,match", [
    (dict(length=20), "truncated"),
    (dict(magic=0x12345678), "bad log sector magic"),
    (dict(magic=0), "bad log sector magic"),
    (dict(version=0x0200), "header version 0x0200"),
    (dict(block_size=768), "invalid block size 768"),
    (dict(block_size=256), "invalid block size 256"),
    (dict(block_size=1 << 20), "invalid block size"),
    (dict(block_size=1024, length=512), "truncated: 512 of 1024"),
    (dict(header_size=27), "header size 27"),
    (dict(header_size=513), "header size 513"),
    (dict(count=0), "entry count 0"),
    (dict(count=21), "entry count 21 .* 1..20"),
])
def test_decode_refusals(fields, match):
    with pytest.raises(BowFormatError, match=match):
        decode(bytes(_raw(**fields)))


def test_decode_refuses_block_size_other_than_expected():
    with pytest.raises(BowFormatError, match="block size 512, block 0 says 4096"):
        decode(bytes(_raw()), expect_block_size=4096)


def test_decode_honours_a_longer_header_as_vold_does():
    buf = _raw(header_size=52, count=1)
    struct.pack_into("<QQII", buf, 52, 8, 24, 512, 7)
    log = decode(bytes(buf))
    assert log.entries == (LogEntry(8, 24, 512, 7),) and log.header_size == 52
    with pytest.raises(BowFormatError, match="entry count 20 .* 1..19"):
        decode(bytes(_raw(header_size=52, count=20)))


def test_error_messages_are_one_line():
    for fields in [dict(magic=1), dict(count=0), dict(length=3)]:
        with pytest.raises(BowFormatError) as e:
            decode(bytes(_raw(**fields)))
        assert "\n" not in str(e.value)
        assert "refus" in str(e.value) or "restore" in str(e.value)


def test_mark_restoring_changes_only_magic_and_count():
    raw = encode(LogSector(512, 2, 8, tuple(LogEntry(8 * i, 8 * i + 4, 512, i)
                                             for i in range(1, 6))))
    out = mark_restoring(raw, 3)
    diff = [i for i in range(512) if raw[i] != out[i]]
    assert set(diff) <= set(range(0, 4)) | set(range(12, 16))
    assert out[0:4] == b"WOB\0" and int.from_bytes(out[12:16], "little") == 3
    assert out[28:] == raw[28:]
    assert decode(out).count == 3 and decode(out).state == "RESTORING"
    assert mark_restoring(raw)[4:] == raw[4:]


# ------------------------------------------------------------------ checksum

def test_crc32_le_is_the_kernels_uninverted_crc():
    # the CRC-32 check value is defined with inversion in and out; crc32_le does neither
    assert ref_crc32_le(0xFFFFFFFF, b"123456789") ^ 0xFFFFFFFF == 0xCBF43926
    assert crc32_le(0xFFFFFFFF, b"123456789") == 0xCBF43926 ^ 0xFFFFFFFF == 0x340BC6D9
    for seed in (0, 1, 5, 0x12345678, 0xFFFFFFFF):
        for data in (b"", b"\x00", b"abc", bytes(range(256)) * 3):
            assert crc32_le(seed, data) == ref_crc32_le(seed, data)


def test_vold_table_is_the_same_polynomial():
    """A few entries of the table in vold's Checkpoint.cpp crc32(): the table of crc32_le."""
    def table(i):
        return ref_crc32_le(i, b"\x00")  # one byte of zeros: eight shifts of i

    assert [table(i) for i in (0, 1, 2, 3, 128, 255)] == [
        0x00000000, 0x77073096, 0xEE0E612C, 0x990951BA, 0xEDB88320, 0x2D02EF8D]


@pytest.mark.parametrize("bs", [512, 1024, 4096])
def test_block_checksum_is_seeded_once_and_chained_over_blocks(bs):
    data = bytes((i * 7 + 3) & 0xFF for i in range(3 * bs))
    source = 5 * (bs // 512)               # block 5
    crc = 5                                # copy_data: *checksum = sector_to_page(source)
    for i in range(3):                     # then crc32(*checksum, block, block_size) per block
        crc = ref_crc32_le(crc, data[i * bs:(i + 1) * bs])
    assert block_checksum(data, source, bs) == crc
    # not one seed per block
    per_block = [ref_crc32_le(5 + i, data[i * bs:(i + 1) * bs]) for i in range(3)]
    assert crc not in per_block


def test_block_checksum_known_vector_and_seed_truncation():
    blk = bytes(range(256)) * 2
    assert block_checksum(blk, 8, 512) == ref_crc32_le(8, blk)
    assert block_checksum(blk, 8, 512) == 0x2D5D994E
    # the sector_t block index is truncated to the u32 checksum
    assert block_checksum(blk, 2**32 + 7, 512) == ref_crc32_le(7, blk)
    assert block_checksum(bytes(4096), (2**32 + 7) * 8, 4096) == ref_crc32_le(7, bytes(4096))
    # a zero block at block 0 checksums to 0, which readers treat as "not checked"
    assert block_checksum(bytes(4096), 0, 4096) == 0


def test_block_checksum_refuses_partial_blocks():
    with pytest.raises(ValueError):
        block_checksum(bytes(100), 0, 512)
    with pytest.raises(ValueError):
        block_checksum(b"", 0, 512)
