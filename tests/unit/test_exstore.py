import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fiesnap.errors import StoreFormatError
from fiesnap.model.exstore import (
    DISK_VERSION,
    SNAP_MAGIC,
    CowException,
    StoreHeader,
    allocate_new_chunks,
    area_location,
    encode_header,
    encode_store,
    exceptions_per_area,
    is_metadata_chunk,
    parse_header,
    read_exception_table,
)

CB = 512  # smallest chunk: 32 exceptions per area, so areas fill quickly
EPA = 32
ORIGIN = 10_000


def reader(chunks, *, garbage=False):
    """read_chunk over a {chunk: bytes} store; unknown chunks are data the
    reader must never need (or stale garbage, when asked)."""
    calls = []

    def read_chunk(n):
        calls.append(n)
        if n in chunks:
            return chunks[n]
        if garbage:
            return bytes((n * 7 + i) % 251 + 1 for i in range(CB))
        raise AssertionError(f"reader asked for non-metadata chunk {n}")

    read_chunk.calls = calls
    return read_chunk


def cow_size(n, cb=CB):
    """COW chunks needed for n exceptions, plus the next (zeroed) area."""
    epa = cb // 16
    return area_location(n // epa, cb) + epa + 1


def read(chunks, n=None, *, cow_chunks=None, origin=ORIGIN, cb=CB, garbage=False):
    if cow_chunks is None:
        cow_chunks = cow_size(n, cb)
    return read_exception_table(
        reader(chunks, garbage=garbage), cow_chunks=cow_chunks, origin_chunks=origin, chunk_bytes=cb
    )


def kernel_sim(old_chunks, cb):
    """Independent model of the kernel writing a fresh store one exception at
    a time (persistent_read_metadata for a new snapshot, then
    persistent_prepare_exception + persistent_commit_exception)."""
    epa = cb // 16
    disk = {}
    disk[0] = struct.pack("<IIII", SNAP_MAGIC, 1, 1, cb // 512).ljust(cb, b"\0")
    disk[1] = bytes(cb)  # zero_disk_area(ps, 0)
    area, committed, next_free, mem = 0, 0, 2, bytearray(cb)
    for old in old_chunks:
        new = next_free
        next_free += 1
        if next_free % (epa + 1) == 1:
            next_free += 1
        struct.pack_into("<QQ", mem, committed * 16, old, new)
        committed += 1
        if committed == epa:
            disk[1 + (epa + 1) * (area + 1)] = bytes(cb)
        disk[1 + (epa + 1) * area] = bytes(mem)
        if committed == epa:
            area, committed, mem = area + 1, 0, bytearray(cb)
    return disk


def test_constants_and_geometry():
    assert SNAP_MAGIC == 0x70416E53 and DISK_VERSION == 1
    assert exceptions_per_area(512) == 32 and exceptions_per_area(4096) == 256
    assert [area_location(a, 512) for a in range(3)] == [1, 34, 67]
    assert [area_location(a, 4096) for a in range(3)] == [1, 258, 515]
    meta = [c for c in range(100) if is_metadata_chunk(c, 512)]
    assert meta == [0, 1, 34, 67]
    with pytest.raises(ValueError):
        exceptions_per_area(1000)


def test_header_round_trip():
    h = StoreHeader(SNAP_MAGIC, 1, 1, 8)
    raw = encode_header(h)
    assert raw == b"SnAp" + struct.pack("<III", 1, 1, 8)
    assert parse_header(raw + b"\0" * 100) == h
    with pytest.raises(StoreFormatError):
        parse_header(raw[:15])


def test_allocate_new_chunks_skips_areas():
    got = allocate_new_chunks(70, CB)
    assert got[:32] == list(range(2, 34))
    assert got[32:64] == list(range(35, 67))
    assert got[64:] == list(range(68, 74))
    assert not any(is_metadata_chunk(c, CB) for c in got)
    assert allocate_new_chunks(0, CB) == []


@pytest.mark.parametrize("n", [0, 1, 5, 31, 32, 33, 64, 65, 100])
def test_encode_store_matches_kernel_model(n):
    olds = [(i * 37) % ORIGIN for i in range(n)]
    assert encode_store(CB, olds) == kernel_sim(olds, CB)


def test_empty_store_reads_as_empty_table():
    t = read(encode_store(CB, []), 0)
    assert t.entries == () and t.areas_read == 1 and t.next_free == 2 and t.used_chunks == 2


def test_exactly_full_area_continues_into_zeroed_next_area():
    olds = list(range(100, 100 + EPA))
    chunks = encode_store(CB, olds)
    assert set(chunks) == {0, 1, 34} and chunks[34] == bytes(CB)
    t = read(chunks, EPA)
    assert [e.old_chunk for e in t.entries] == olds
    assert t.areas_read == 2
    # last data chunk is 33; 34 is area 1, so the kernel resumes at 35
    assert t.next_free == 35


def test_reads_only_metadata_chunks():
    olds = list(range(70))
    rc = reader(encode_store(CB, olds))
    read_exception_table(rc, cow_chunks=cow_size(70), origin_chunks=ORIGIN, chunk_bytes=CB)
    assert rc.calls == [0, 1, 34, 67]


def test_out_of_order_new_chunks_next_free_is_max():
    olds = [5, 6, 7]
    chunks = encode_store(CB, olds, new_chunks=[4, 2, 3])
    t = read(chunks, 3)
    assert t.entries == (CowException(5, 4), CowException(6, 2), CowException(7, 3))
    assert t.next_free == 5


def test_stale_entries_after_terminator_are_ignored_like_the_kernel():
    chunks = encode_store(CB, [9, 8])
    area = bytearray(chunks[1])
    struct.pack_into("<QQ", area, 5 * 16, 77, 20)  # beyond the terminator at slot 2
    chunks[1] = bytes(area)
    t = read(chunks, 2)
    assert [e.old_chunk for e in t.entries] == [9, 8]


def test_data_chunks_may_hold_garbage():
    t = read(encode_store(CB, list(range(40))), 40, garbage=True)
    assert len(t.entries) == 40


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    cb=st.sampled_from([512, 1024]),
    shape=st.sampled_from(["random", "exactly_full"]),
)
def test_round_trip(data, cb, shape):
    epa = cb // 16
    if shape == "exactly_full":
        n = epa * data.draw(st.integers(1, 4))
    else:
        n = data.draw(st.integers(0, 4 * epa + 3))
    olds = data.draw(st.lists(st.integers(0, ORIGIN - 1), min_size=n, max_size=n, unique=True))
    chunks = encode_store(cb, olds)
    t = read_exception_table(
        reader(chunks), cow_chunks=cow_size(n, cb), origin_chunks=ORIGIN, chunk_bytes=cb
    )
    news = allocate_new_chunks(n + 1, cb)
    assert t.entries == tuple(CowException(o, w) for o, w in zip(olds, news))
    assert t.areas_read == n // epa + 1
    assert t.next_free == news[n]  # where the kernel would put the next one
    assert t.chunk_bytes == cb


# -- refusals ---------------------------------------------------------------


def with_header(chunks, **fields):
    h = parse_header(chunks[0])
    vals = dict(magic=h.magic, valid=h.valid, version=h.version, chunk_sectors=h.chunk_sectors)
    vals.update(fields)
    out = dict(chunks)
    out[0] = encode_header(StoreHeader(**vals)).ljust(CB, b"\0")
    return out


@pytest.mark.parametrize(
    "fields, fragment",
    [
        (dict(magic=0), "blank"),
        (dict(magic=0x12345678), "bad magic"),
        (dict(magic=SNAP_MAGIC ^ 1), "bad magic"),
        (dict(valid=0), "invalidated"),
        (dict(valid=2), "valid flag"),
        (dict(version=2), "version"),
        (dict(version=0), "version"),
        (dict(chunk_sectors=8), "chunks"),
        (dict(chunk_sectors=0), "chunks"),
    ],
)
def test_header_refusals(fields, fragment):
    chunks = with_header(encode_store(CB, [1, 2, 3]), **fields)
    with pytest.raises(StoreFormatError) as ei:
        read(chunks, 3)
    msg = str(ei.value)
    assert fragment in msg and "rollback is impossible" in msg and "\n" not in msg


def test_all_zero_chunk0_is_blank():
    with pytest.raises(StoreFormatError, match="blank"):
        read({0: bytes(CB)}, 0)


def test_truncated_store():
    chunks = encode_store(CB, list(range(EPA)))  # area 0 full: table goes on at chunk 34
    with pytest.raises(StoreFormatError, match="truncated"):
        read(chunks, cow_chunks=34)
    assert len(read(chunks, cow_chunks=35).entries) == EPA
    with pytest.raises(StoreFormatError, match="too small"):
        read(chunks, cow_chunks=1)


def test_short_read():
    chunks = encode_store(CB, [1])
    chunks[1] = chunks[1][:100]
    with pytest.raises(StoreFormatError, match="read back 100 bytes"):
        read(chunks, 1)


def set_entry(chunks, area, slot, old, new):
    out = dict(chunks)
    loc = area_location(area, CB)
    buf = bytearray(out[loc])
    struct.pack_into("<QQ", buf, slot * 16, old, new)
    out[loc] = bytes(buf)
    return out


@pytest.mark.parametrize(
    "old, new, fragment",
    [
        (ORIGIN, 5, "beyond the device"),
        (2**64 - 1, 5, "beyond the device"),
        (5000, 1, "outside"),
        (5000, 2**64 - 1, "outside"),
        (5000, 34, "metadata area"),
        (5000, 67, "metadata area"),
        (0, 4, "origin chunk listed twice"),  # slot 0 has old 0
        (5000, 2, "COW chunk used twice"),  # slot 0 has new 2
    ],
)
def test_entry_refusals(old, new, fragment):
    n = 70
    chunks = set_entry(encode_store(CB, list(range(n))), 1, 3, old, new)
    with pytest.raises(StoreFormatError, match=fragment) as ei:
        read(chunks, n, cow_chunks=200)
    assert "area 1, slot 3" in str(ei.value)


def test_new_chunk_beyond_cow_device():
    chunks = encode_store(CB, [1, 2], new_chunks=[2, 50])
    with pytest.raises(StoreFormatError, match="outside"):
        read(chunks, cow_chunks=50)
    assert len(read(chunks, cow_chunks=51).entries) == 2


CORRUPTIONS = ["magic", "valid", "version", "dup_old", "dup_new", "old_oob", "new_meta", "new_oob", "truncate"]


@settings(max_examples=80, deadline=None)
@given(data=st.data(), kind=st.sampled_from(CORRUPTIONS))
def test_random_corruptions_are_refused(data, kind):
    n = data.draw(st.integers(2, 3 * EPA + 2))
    olds = data.draw(st.lists(st.integers(0, ORIGIN - 1), min_size=n, max_size=n, unique=True))
    chunks = encode_store(CB, olds)
    news = allocate_new_chunks(n, CB)
    cow_chunks = cow_size(n)
    i = data.draw(st.integers(1, n - 1))
    j = data.draw(st.integers(0, i - 1))
    area, slot = divmod(i, EPA)
    if kind == "magic":
        chunks = with_header(chunks, magic=data.draw(st.integers(1, 2**32 - 1).filter(lambda m: m != SNAP_MAGIC)))
    elif kind == "valid":
        chunks = with_header(chunks, valid=0)
    elif kind == "version":
        chunks = with_header(chunks, version=data.draw(st.integers(2, 2**32 - 1)))
    elif kind == "dup_old":
        chunks = set_entry(chunks, area, slot, olds[j], news[i])
    elif kind == "dup_new":
        chunks = set_entry(chunks, area, slot, olds[i], news[j])
    elif kind == "old_oob":
        chunks = set_entry(chunks, area, slot, data.draw(st.integers(ORIGIN, 2**64 - 1)), news[i])
    elif kind == "new_meta":
        meta = data.draw(st.sampled_from([1, 34, 67, 100]))
        chunks = set_entry(chunks, area, slot, olds[i], meta)
    elif kind == "new_oob":
        chunks = set_entry(chunks, area, slot, olds[i], data.draw(st.integers(cow_chunks, 2**64 - 1)))
    elif kind == "truncate":
        cow_chunks = area_location(n // EPA, CB)  # last area read falls off the end
    with pytest.raises(StoreFormatError):
        read(chunks, cow_chunks=cow_chunks)


# -- the whole-area checks agree with the entry-by-entry ones ----------------------------------


def _reference(olds, news, *, cow_chunks, holes, seeded_old):
    """The rules entry by entry, as the reader applied them before areas were checked whole:
    None when every entry passes, else the index of the first that fails."""
    stride = EPA + 1
    seen_o, seen_n = set(), set()
    for i, (o, n) in enumerate(zip(olds, news)):
        if (o >= ORIGIN or n < 2 or n >= cow_chunks or (n - 1) % stride == 0 or n in holes
                or o in seen_o or o in seeded_old or n in seen_n):
            return i
        seen_o.add(o)
        seen_n.add(n)
    return None


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_whole_area_checks_match_the_entry_by_entry_rules(data):
    from fiesnap.model.extents import ChunkRun, ChunkSet

    n = data.draw(st.integers(1, 3 * EPA + 5))
    cow_chunks = cow_size(n) + data.draw(st.integers(0, 40))
    # A valid table over several areas (the kernel's own allocation, origins all different),
    # then now and then one entry changed to anything: both the accepted and the refused paths.
    olds = data.draw(st.lists(st.integers(0, ORIGIN - 1), min_size=n, max_size=n, unique=True))
    news = data.draw(st.permutations(allocate_new_chunks(n, CB)))
    if data.draw(st.booleans()):
        i = data.draw(st.integers(0, n - 1))
        olds[i] = data.draw(st.integers(0, ORIGIN + 3))
        news[i] = data.draw(st.integers(2, cow_chunks + 3))
    hole_starts = data.draw(st.lists(st.integers(2, cow_chunks), max_size=3))
    holes = {c for s in hole_starts for c in range(s, s + 3)} - {area_location(a, CB) for a in range(n // EPA + 2)}
    seeded = ChunkSet(ChunkRun(s, 2) for s in data.draw(st.lists(st.integers(0, ORIGIN), max_size=3)))
    chunks = encode_store(CB, olds, new_chunks=news)
    kw = dict(cow_chunks=cow_chunks, origin_chunks=ORIGIN, chunk_bytes=CB,
              seeded_old=seeded, is_backed=lambda c: c not in holes)
    if data.draw(st.booleans()):  # with and without the span shortcut
        kw["is_span_backed"] = lambda a, b: not any(c in holes for c in range(a, b + 1))
    bad = _reference(olds, news, cow_chunks=cow_chunks, holes=holes, seeded_old=set(seeded))
    if bad is None:
        t = read_exception_table(reader(chunks), **kw)
        assert t.entries == tuple(CowException(o, w) for o, w in zip(olds, news))
    else:
        with pytest.raises(StoreFormatError) as e:
            read_exception_table(reader(chunks), **kw)
        area, slot = divmod(bad, EPA)
        assert f"area {area}, slot {slot}:" in str(e.value)


def test_span_and_many_lookups_helpers():
    from fiesnap.model.extents import ChunkRun, ChunkSet

    s = ChunkSet([ChunkRun(10, 5), ChunkRun(100, 1)])
    assert s.contains_any([3, 200, 14]) and s.contains_any([100])
    assert not s.contains_any([9, 15, 99, 101]) and not ChunkSet().contains_any([1, 2])
