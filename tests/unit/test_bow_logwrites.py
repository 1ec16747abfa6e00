"""dm-log-writes log reader/writer against the layout of drivers/md/dm-log-writes.c."""

import struct

import pytest

from bow_compat.errors import BowFormatError
from bow_compat.image import MemoryImage
from bow_compat.logwrites import (
    LOG_DISCARD_FLAG,
    LOG_FLUSH_FLAG,
    LOG_FUA_FLAG,
    LOG_MARK_FLAG,
    LOG_METADATA_FLAG,
    WRITE_LOG_MAGIC,
    LogWritesWriter,
    read_log,
)


def _super(nr_entries, sectorsize, magic=WRITE_LOG_MAGIC, version=1, pad=b"\0\0\0\0"):
    # struct log_write_super: __le64 magic, version, nr_entries; __le32 sectorsize (+4 padding)
    sb = magic.to_bytes(8, "little") + version.to_bytes(8, "little") \
        + nr_entries.to_bytes(8, "little") + sectorsize.to_bytes(4, "little") + pad
    return sb.ljust(sectorsize, b"\0")


def _entry(sector, nr_sectors, flags, data_len, sectorsize, text=b""):
    # struct log_write_entry: __le64 sector, nr_sectors, flags, data_len; mark text right after
    e = sector.to_bytes(8, "little") + nr_sectors.to_bytes(8, "little") \
        + flags.to_bytes(8, "little") + data_len.to_bytes(8, "little") + text
    return e.ljust(sectorsize, b"\0")


def test_constants_match_the_kernel():
    flags = (LOG_FLUSH_FLAG, LOG_FUA_FLAG, LOG_DISCARD_FLAG, LOG_MARK_FLAG, LOG_METADATA_FLAG)
    assert flags == (1, 2, 4, 8, 16)
    assert WRITE_LOG_MAGIC == 0x6A736677736872
    assert WRITE_LOG_MAGIC.to_bytes(8, "little") == b"rhswfsj\0"


@pytest.mark.parametrize("ss", [512, 4096])
def test_writer_output_is_byte_for_byte_the_kernel_layout(ss):
    d1 = bytes(range(256)) * (2 * ss // 256)
    d2 = b"\xab" * ss
    w = LogWritesWriter(ss)
    w.write(3 * ss, d1, flags=LOG_METADATA_FLAG)
    w.discard(10 * ss, 7 * ss)
    w.mark("checkpoint")
    w.flush()
    w.write(0, d2, flags=LOG_FUA_FLAG | LOG_FLUSH_FLAG)
    expect = (
        _super(5, ss)
        + _entry(3, 2, LOG_METADATA_FLAG, 0, ss) + d1
        + _entry(10, 7, LOG_DISCARD_FLAG, 0, ss)                    # no data after a discard
        + _entry(0, 0, LOG_MARK_FLAG, 10, ss, b"checkpoint")        # text in the entry sector
        + _entry(0, 0, LOG_FLUSH_FLAG, 0, ss)
        + _entry(0, 1, LOG_FUA_FLAG | LOG_FLUSH_FLAG, 0, ss) + d2
    )
    assert w.getvalue() == expect


@pytest.mark.parametrize("ss", [512, 1024, 4096])
def test_round_trip(ss):
    w = LogWritesWriter(ss)
    payloads = [bytes([i]) * (ss * (i + 1)) for i in range(4)]
    for i, p in enumerate(payloads):
        w.write(i * 8 * ss, p)
    w.discard(ss, 3 * ss)
    w.mark("snap-1")
    w.flush()
    log = read_log(w.image())
    assert (log.version, log.nr_entries, log.sectorsize) == (1, 7, ss)
    got = list(log)
    assert [e.index for e in got] == list(range(7))
    for i, p in enumerate(payloads):
        e = got[i]
        assert e.is_write and not e.is_discard and not e.is_mark
        assert (e.sector, e.nr_sectors, e.offset, e.length) == (i * 8, i + 1, i * 8 * ss, len(p))
        assert e.data == p
    d, m, f = got[4], got[5], got[6]
    assert d.is_discard and not d.is_write and d.data == b"" and (d.offset, d.length) == (ss, 3 * ss)
    assert m.is_mark and m.mark == "snap-1" and not m.is_write
    assert f.is_flush and not f.is_write and f.nr_sectors == 0
    # entry positions: super sector, then metadata sector + data for each entry
    pos = ss
    for e in got:
        assert e.log_offset == pos
        pos += ss + (e.length if e.is_write else 0)
    assert pos == len(w.getvalue())


def test_without_data_and_read_data():
    w = LogWritesWriter()
    w.write(512, b"x" * 1024)
    w.discard(0, 512)
    log = read_log(w.image())
    heads = list(log.entries(with_data=False))
    assert heads[0].data == b"" and log.read_data(heads[0]) == b"x" * 1024
    assert log.read_data(heads[1]) == b""


def test_sector_units_are_the_log_sectorsize():
    ss = 4096
    raw = _super(1, ss) + _entry(5, 2, 0, 0, ss) + b"d" * (2 * ss)
    (e,) = read_log(MemoryImage(raw))
    assert (e.offset, e.length) == (5 * ss, 2 * ss)


def test_kernel_super_padding_is_ignored():
    # the kernel copies sizeof(struct log_write_super) == 32 bytes from an uninitialised stack
    raw = _super(1, 512, pad=b"\xde\xad\xbe\xef") + _entry(0, 0, LOG_MARK_FLAG, 1, 512, b"m")
    assert [e.mark for e in read_log(MemoryImage(raw))] == ["m"]


def test_stale_nr_entries_reads_only_what_the_super_counts():
    w = LogWritesWriter()
    w.write(0, b"a" * 512)
    w.mark("checkpoint")
    raw = bytearray(w.getvalue())
    raw[16:24] = (1).to_bytes(8, "little")  # super written before the mark
    assert [e.is_write for e in read_log(MemoryImage(bytes(raw)))] == [True]


def test_read_from_path(tmp_path):
    w = LogWritesWriter()
    w.write(1024, b"z" * 512)
    p = tmp_path / "log.img"
    w.save(p)
    with read_log(p) as log:
        assert [e.data for e in log] == [b"z" * 512]


def test_mark_text_bytes_round_trip():
    w = LogWritesWriter()
    w.mark("ünïcode mark")
    w.mark("\udcff raw byte")  # a non-UTF-8 byte from dmsetup survives
    assert [e.mark for e in read_log(w.image())] == ["ünïcode mark", "\udcff raw byte"]


# ---- refusals ----

def _refuse(raw, match):
    with pytest.raises(BowFormatError, match=match):
        list(read_log(MemoryImage(raw)))


def test_refuses_short_super():
    _refuse(b"\0" * 27, "too short")


def test_refuses_bad_magic():
    _refuse(_super(0, 512, magic=0x1234), "not a dm-log-writes log")


def test_refuses_bad_version():
    _refuse(_super(0, 512, version=2), "version 2")


@pytest.mark.parametrize("ss", [0, 256, 1000, 1 << 20])
def test_refuses_bad_sectorsize(ss):
    raw = struct.pack("<QQQI", WRITE_LOG_MAGIC, 1, 0, ss).ljust(4096, b"\0")
    _refuse(raw, "sectorsize")


def test_refuses_more_entries_than_fit():
    _refuse(_super(3, 512) + _entry(0, 0, LOG_FLUSH_FLAG, 0, 512), "truncated")


def test_refuses_truncated_data():
    raw = _super(2, 512) + _entry(0, 0, LOG_FLUSH_FLAG, 0, 512) + _entry(8, 4, 0, 0, 512) + b"x" * 1024
    with pytest.raises(BowFormatError, match="entry 1 .*past the end"):
        list(read_log(MemoryImage(raw)))


def test_refuses_missing_entry_sector():
    # room for 3 sectors of entries, but the first entry's data uses two of them
    raw = _super(3, 512) + _entry(8, 2, 0, 0, 512) + b"x" * 1024
    with pytest.raises(BowFormatError, match="truncated in entry 1"):
        list(read_log(MemoryImage(raw)))


def test_refuses_empty_entry():
    _refuse(_super(1, 512) + _entry(0, 0, 0, 0, 512), "empty")


def test_refuses_unpadded_entry():
    raw = bytearray(_super(1, 512) + _entry(0, 0, LOG_FLUSH_FLAG, 0, 512))
    raw[512 + 32] = 1
    _refuse(bytes(raw), "not zero-padded")


def test_refuses_unknown_flags():
    _refuse(_super(1, 512) + _entry(0, 0, 1 << 7, 0, 512), "unknown flags")


def test_refuses_oversized_mark():
    _refuse(_super(1, 512) + _entry(0, 0, LOG_MARK_FLAG, 481, 512), "mark of 481 bytes")


def test_writer_refusals():
    w = LogWritesWriter(4096)
    for call in (lambda: w.write(512, b"x" * 4096), lambda: w.write(0, b"x" * 512),
                 lambda: w.write(0, b""), lambda: w.discard(0, 0), lambda: w.mark(""),
                 lambda: w.mark("x" * (4096 - 32)), lambda: w.write(0, b"x" * 4096, flags=LOG_MARK_FLAG)):
        with pytest.raises(ValueError):
            call()
    with pytest.raises(ValueError):
        LogWritesWriter(1000)
    w.mark("x" * (4096 - 33))  # the longest mark the kernel keeps
    assert w.nr_entries == 1
