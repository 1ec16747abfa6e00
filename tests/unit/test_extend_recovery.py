"""A crash in the middle of `fiesnap extend` must leave an activatable, mergeable store:
the identity block may still name the previous map, and the live -cow table may be shorter
than the recorded one (the reload never happened)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fiesnap.services import storeid
from fiesnap.services import stack
from fiesnap.model.cowtable import CowTable
from fiesnap.model.dmtable import linear
from fiesnap.errors import DeviceMapperError, RefusedError
from fiesnap.model.extents import ChunkRun
from fiesnap.model.identity import encode_identity
from fiesnap.model.extents import Extent
from fiesnap.model.record import CheckpointRecord, PreviousIdentity

MiB = 1 << 20


def _record(runs) -> CheckpointRecord:
    return CheckpointRecord(
        name="cp", device="/dev/vdb", device_major=254, device_minor=16, device_bytes=64 * MiB,
        fstype="ext4", fs_uuid="u-1", checkpoint_id="c" * 32, chunk_bytes=4096, store_type="PO",
        store_relpath=".fiesnap/s", store_file_bytes=80 * 4096, store_extents=(Extent(0, 4096 * 99, 80 * 4096, 0),),
        cow_table=CowTable.from_runs(runs, 4096), created="now", phase="active",
        identity_offset=4096 * 99, generation=1,
    )


def _grown(record: CheckpointRecord, more) -> CheckpointRecord:
    """What extend records at step 3, before it rewrites the identity block."""
    prev = record.expected_identity()
    grown = record.cow.append_runs(more)
    return replace(record, cow_table=grown, generation=2,
                   previous_identity=PreviousIdentity(1, prev.map_sha256))


def test_activate_accepts_the_previous_identity_while_extend_had_not_rewritten_it(monkeypatch):
    old = _record([ChunkRun(100, 50)])
    new = _grown(old, [ChunkRun(300, 20)])
    monkeypatch.setattr(storeid, "read_identity_block", lambda dev, off: encode_identity(old.expected_identity()))
    storeid.check_store_identity(new, "/dev/vdb")  # previous identity: accepted
    monkeypatch.setattr(storeid, "read_identity_block", lambda dev, off: encode_identity(new.expected_identity()))
    storeid.check_store_identity(new, "/dev/vdb")  # rewritten identity: accepted


def test_without_the_note_the_previous_identity_is_refused(monkeypatch):
    old = _record([ChunkRun(100, 50)])
    new = replace(_grown(old, [ChunkRun(300, 20)]), previous_identity=None)
    monkeypatch.setattr(storeid, "read_identity_block", lambda dev, off: encode_identity(old.expected_identity()))
    with pytest.raises(RefusedError, match="generation|map"):
        storeid.check_store_identity(new, "/dev/vdb")


def _t(start, length, offset):
    return linear(start, length, "254:16", offset)


@pytest.mark.parametrize("live,recorded,grows", [
    ([_t(0, 80, 800)], [_t(0, 80, 800), _t(80, 16, 2400)], True),  # a segment appended
    ([_t(0, 80, 800)], [_t(0, 96, 800)], True),  # the last segment grew
    ([_t(0, 80, 800)], [_t(0, 80, 800)], True),  # equal
    ([_t(0, 80, 800)], [_t(0, 64, 800)], False),  # shrank
    ([_t(0, 80, 800)], [_t(0, 80, 808)], False),  # moved
    ([_t(0, 80, 800), _t(80, 8, 1600)], [_t(0, 80, 800)], False),  # longer than the record
    ([], [_t(0, 80, 800)], False),
])
def test_grows_into(live, recorded, grows):
    assert stack._grows_into(live, recorded) is grows


class _CowDM:
    def __init__(self, live):
        self.live = live
        self.calls = []

    def info(self, name):
        return object()

    def table(self, name):
        return self.live

    def load(self, name, targets):
        self.calls.append(("load", name))
        self.live = targets

    def suspend(self, name, lockfs=True):
        self.calls.append(("suspend", name, lockfs))

    def resume(self, name):
        self.calls.append(("resume", name))

    def node_path(self, name):
        return f"/dev/mapper/{name}"


def test_merge_finishes_an_interrupted_extend_reload():
    old = _record([ChunkRun(100, 50)])
    new = _grown(old, [ChunkRun(300, 20)])
    dm = _CowDM(stack.cow_targets(old))
    assert stack.ensure_cow(dm, new) == "/dev/mapper/cp-cow"
    assert dm.calls == [("load", "cp-cow"), ("suspend", "cp-cow", False), ("resume", "cp-cow")]
    assert dm.live == stack.cow_targets(new)


def test_a_cow_table_that_is_not_a_prefix_is_refused():
    rec = _record([ChunkRun(100, 50)])
    dm = _CowDM(stack.cow_targets(_record([ChunkRun(500, 50)])))
    with pytest.raises(DeviceMapperError, match="differs from the record"):
        stack.ensure_cow(dm, rec)
    assert dm.calls == []
