from fiesnap.model.exstore import encode_store, scan_frontier, StoreHeader, encode_header, SNAP_MAGIC


def _reader(chunks, cb):
    return lambda n: chunks.get(n, bytes(cb))


def test_frontier_of_valid_and_invalidated_store():
    cb = 512
    chunks = encode_store(cb, list(range(100)))
    f = scan_frontier(_reader(chunks, cb), cow_chunks=1000, chunk_bytes=cb)
    assert f is not None and f > 100  # 100 data chunks plus skipped metadata areas
    # The kernel invalidates by rewriting the header with valid=0; the table stays.
    chunks[0] = encode_header(StoreHeader(SNAP_MAGIC, 0, 1, cb // 512)).ljust(cb, b"\0")
    assert scan_frontier(_reader(chunks, cb), cow_chunks=1000, chunk_bytes=cb) == f


def test_no_header_means_no_frontier():
    assert scan_frontier(lambda n: bytes(512), cow_chunks=100, chunk_bytes=512) is None


def test_empty_store_frontier_is_first_data_chunk():
    cb = 512
    chunks = encode_store(cb, [])
    assert scan_frontier(_reader(chunks, cb), cow_chunks=100, chunk_bytes=cb) == 2
