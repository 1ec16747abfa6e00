"""The store file's identity header on real ext4 (4k and 1k blocks) and XFS (root, loop devices).

Fixtures and raw-read helpers come from test_host_adapters; these tests skip
the same way when the host cannot run them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_host_adapters import MiB, Fs, _read_raw, _tree, fs, host, mounted  # noqa: F401  (fixtures)

from fiesnap.services import storefile
from fiesnap.errors import FilesystemError, RefusedError, UsageError
from fiesnap.model.extents import Extent, head_location, physical_layout, whole_chunks, without_head
from fiesnap.kernel.fiemap import FIEMAP_EXTENT_UNWRITTEN, file_extents
from fiesnap.model.identity import IDENTITY_BYTES, StoreIdentity, decode_identity, encode_identity, map_checksum
from fiesnap.kernel.fileflags import is_immutable
from fiesnap.services.storefile import create_store_file, read_head, rewrite_head, store_extents


def _ident(generation: int = 1) -> StoreIdentity:
    return StoreIdentity("ab" * 16, "some-uuid", 64 * MiB, 4096, map_checksum({"g": generation}), generation)


class Recorder:
    """A head maker that remembers the extents it was given."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.seen: tuple[Extent, ...] | None = None

    def __call__(self, extents: tuple[Extent, ...]) -> bytes:
        self.seen = extents
        head_location(extents, IDENTITY_BYTES)
        return self.data


def _immutable(path: str) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return is_immutable(fd)
    finally:
        os.close(fd)


@pytest.mark.root
def test_create_with_head(mounted: tuple[Fs, str]) -> None:
    fs, mp = mounted
    data = encode_identity(_ident())
    maker = Recorder(data)
    sf = create_store_file(mp, "cp", 8 * MiB, head=maker)
    assert maker.seen is not None
    print(f"\n{fs.kind}: before {maker.seen}\n{fs.kind}: after  {sf.extents}")
    assert all(e.flags & FIEMAP_EXTENT_UNWRITTEN for e in maker.seen)  # fallocate: nothing written yet
    assert physical_layout(sf.extents) == physical_layout(maker.seen)  # the write moved nothing
    assert not sf.extents[0].flags & FIEMAP_EXTENT_UNWRITTEN  # the head is written now
    assert store_extents(mp, sf.relpath) == sf.extents
    assert sum(e.length for e in sf.extents) == 8 * MiB
    assert _immutable(os.path.join(mp, sf.relpath))

    at = head_location(sf.extents, IDENTITY_BYTES)
    assert at == head_location(maker.seen, IDENTITY_BYTES)
    assert read_head(mp, sf.relpath) == data
    assert _read_raw(fs.dev, at, IDENTITY_BYTES) == data  # O_DIRECT, straight from the device
    assert decode_identity(_read_raw(fs.dev, at, IDENTITY_BYTES), f"{fs.dev} byte {at}") == _ident()
    for run in whole_chunks(without_head(sf.extents, IDENTITY_BYTES), 4096):
        assert run.end * 4096 <= at or at + IDENTITY_BYTES <= run.start * 4096


@pytest.mark.root
def test_rewrite_head(mounted: tuple[Fs, str]) -> None:
    fs, mp = mounted
    sf = create_store_file(mp, "cp", 4 * MiB, head=Recorder(encode_identity(_ident())))
    new = encode_identity(_ident(2))
    rewrite_head(mp, sf.relpath, new)
    after = store_extents(mp, sf.relpath)
    assert physical_layout(after) == physical_layout(sf.extents)
    assert read_head(mp, sf.relpath) == new
    assert _read_raw(fs.dev, head_location(after, IDENTITY_BYTES), IDENTITY_BYTES) == new
    path = os.path.join(mp, sf.relpath)
    assert _immutable(path)
    with pytest.raises(PermissionError):
        os.open(path, os.O_WRONLY)


@pytest.mark.root
def test_create_without_head_is_unchanged(mounted: tuple[Fs, str]) -> None:
    _, mp = mounted
    sf = create_store_file(mp, "plain", 2 * MiB)
    assert all(e.flags & FIEMAP_EXTENT_UNWRITTEN for e in sf.extents)
    assert read_head(mp, sf.relpath) == bytes(IDENTITY_BYTES)  # unwritten blocks read as zeros


@pytest.mark.root
@pytest.mark.parametrize("bad", [b"short", bytes(IDENTITY_BYTES + 1), "text"])
def test_bad_head_leaves_nothing(mounted: tuple[Fs, str], bad: object) -> None:
    _, mp = mounted
    before = _tree(mp)
    with pytest.raises(ValueError, match=f"store header must be {IDENTITY_BYTES} bytes"):
        create_store_file(mp, "cp", 2 * MiB, head=lambda exts: bad)  # type: ignore[arg-type,return-value]
    assert _tree(mp) == before


@pytest.mark.root
def test_head_maker_refusal_leaves_nothing(mounted: tuple[Fs, str]) -> None:
    _, mp = mounted
    create_store_file(mp, "other", 1 * MiB)  # .fiesnap exists: only the new file must go
    before = _tree(mp)

    def refuse(exts: tuple[Extent, ...]) -> bytes:
        return head_location((Extent(0, exts[0].physical, 512),), IDENTITY_BYTES).to_bytes(8, "little")

    with pytest.raises(FilesystemError, match="not one contiguous extent"):
        create_store_file(mp, "cp", 2 * MiB, head=refuse)
    assert _tree(mp) == before


@pytest.mark.root
def test_blocks_moving_at_head_write_leave_nothing(mounted: tuple[Fs, str], monkeypatch: pytest.MonkeyPatch) -> None:
    _, mp = mounted
    calls: list[int] = []

    def drifting(fd: int) -> list[Extent]:
        calls.append(fd)
        exts = file_extents(fd)
        if len(calls) == 2:  # the read right after the header write
            e = exts[-1]
            exts[-1] = Extent(e.logical, e.physical + 1 * MiB, e.length, e.flags)
        return exts

    monkeypatch.setattr(storefile, "file_extents", drifting)
    before = _tree(mp)
    with pytest.raises(FilesystemError, match="moved when its header was written: .*; retry"):
        create_store_file(mp, "cp", 2 * MiB, head=Recorder(encode_identity(_ident())))
    assert _tree(mp) == before


@pytest.mark.root
def test_head_needs_room(mounted: tuple[Fs, str]) -> None:
    _, mp = mounted
    with pytest.raises(UsageError, match="choose a larger --size"):
        create_store_file(mp, "cp", IDENTITY_BYTES, head=Recorder(bytes(IDENTITY_BYTES)))


@pytest.mark.root
def test_rewrite_head_failures_keep_it_immutable(mounted: tuple[Fs, str], monkeypatch: pytest.MonkeyPatch) -> None:
    _, mp = mounted
    old = encode_identity(_ident())
    sf = create_store_file(mp, "cp", 2 * MiB, head=Recorder(old))
    path = os.path.join(mp, sf.relpath)

    with pytest.raises(ValueError):
        rewrite_head(mp, sf.relpath, b"short")

    def broken(*args: object) -> None:
        raise FilesystemError("cannot write the header: Input/output error; check dmesg")

    monkeypatch.setattr(storefile, "_write_head", broken)
    with pytest.raises(FilesystemError, match="Input/output error"):
        rewrite_head(mp, sf.relpath, encode_identity(_ident(2)))
    assert _immutable(path)
    assert read_head(mp, sf.relpath) == old
    monkeypatch.undo()

    real = file_extents
    calls: list[int] = []

    def drifting(fd: int) -> list[Extent]:
        calls.append(fd)
        exts = real(fd)
        if len(calls) == 2:  # the read after the rewrite
            e = exts[0]
            exts[0] = Extent(e.logical, e.physical + 1 * MiB, e.length, e.flags)
        return exts

    monkeypatch.setattr(storefile, "file_extents", drifting)
    with pytest.raises(FilesystemError, match="moved when its header was rewritten"):
        rewrite_head(mp, sf.relpath, encode_identity(_ident(2)))
    assert _immutable(path)


@pytest.mark.root
def test_head_io_refuses_unsafe_paths(mounted: tuple[Fs, str]) -> None:
    _, mp = mounted
    data = encode_identity(_ident())
    with pytest.raises(RefusedError, match="is missing"):
        read_head(mp, ".fiesnap/none")  # no .fiesnap at all
    create_store_file(mp, "cp", 1 * MiB, head=Recorder(data))
    for op in (lambda p: read_head(mp, p), lambda p: rewrite_head(mp, p, data)):
        with pytest.raises(RefusedError, match="is missing"):
            op(".fiesnap/none")
        with pytest.raises(RefusedError, match="not inside .fiesnap/"):
            op("etc/passwd")
    outside = Path(mp, "victim")
    outside.write_bytes(b"keep")
    os.symlink("../victim", os.path.join(mp, ".fiesnap", "link"))
    os.mkdir(os.path.join(mp, ".fiesnap", "dir"))
    for op in (lambda p: read_head(mp, p), lambda p: rewrite_head(mp, p, data)):
        with pytest.raises(RefusedError, match="is a symlink"):
            op(".fiesnap/link")
        with pytest.raises(RefusedError, match="is not a regular file"):
            op(".fiesnap/dir")
    assert outside.read_bytes() == b"keep"
    os.chmod(os.path.join(mp, ".fiesnap"), 0o755)
    with pytest.raises(RefusedError, match="not owned by root with mode 0700"):
        rewrite_head(mp, ".fiesnap/cp", data)


@pytest.mark.root
def test_leftover_stores_are_this_names_own_files_only(mounted: tuple[Fs, str]) -> None:
    """What an interrupted start left: store-NAME-<8 hex> with a fiesnap identity of this
    filesystem. Another name, another pattern, a foreign identity or none: never listed."""
    fs, mp = mounted
    ours = encode_identity(_ident())
    theirs = encode_identity(StoreIdentity("cd" * 16, "other-fs", 64 * MiB, 4096, map_checksum({}), 1))
    create_store_file(mp, "store-cp-0123abcd", 2 * MiB, head=lambda e: ours)
    create_store_file(mp, "store-cp-89abcdef", 2 * MiB, head=lambda e: ours)
    create_store_file(mp, "store-cpx-0123abcd", 2 * MiB, head=lambda e: ours)   # another name
    create_store_file(mp, "store-cp-0123", 2 * MiB, head=lambda e: ours)        # another pattern
    create_store_file(mp, "store-cp-fedcba98", 2 * MiB, head=lambda e: theirs)  # another filesystem
    create_store_file(mp, "store-cp-00000000", 2 * MiB)                         # no identity at all
    found = storefile.leftover_stores(mp, "cp", "some-uuid")
    assert found == [".fiesnap/store-cp-0123abcd", ".fiesnap/store-cp-89abcdef"]
    for relpath in found:
        storefile.remove_store_file(mp, relpath)
    assert storefile.leftover_stores(mp, "cp", "some-uuid") == []
    assert sorted(os.listdir(os.path.join(mp, ".fiesnap"))) == [
        "store-cp-00000000", "store-cp-0123", "store-cp-fedcba98", "store-cpx-0123abcd"]
    assert storefile.leftover_stores(os.path.join(mp), "nobody", "some-uuid") == []
