"""Stack assembly order and unwinding, with a fake device-mapper (the real one is in tests/kernel)."""

from __future__ import annotations

import pytest

from fiesnap.model.identity import encode_identity
from fiesnap.services import stack, storeid
from fiesnap.model.cowtable import CowTable
from fiesnap.kernel.dm import DmInfo
from fiesnap.errors import DeviceMapperError
from fiesnap.model.extents import ChunkRun
from fiesnap.model.extents import Extent
from fiesnap.model.record import CheckpointRecord


def _record() -> CheckpointRecord:
    cow = CowTable.from_runs([ChunkRun(100, 50)], 4096)
    return CheckpointRecord(
        name="cp", checkpoint_id="abc" * 8 + "d" * 8, device="/dev/vdb", device_major=254, device_minor=16,
        device_bytes=64 << 20, fstype="ext4", fs_uuid="u", chunk_bytes=4096, store_type="PO",
        store_relpath=".fiesnap/s", store_file_bytes=50 * 4096, store_extents=(Extent(0, 409600, 204800, 0),),
        cow_table=cow, free_map=(), created="now", identity_offset=405504,
    )


@pytest.fixture(autouse=True)
def store_identity(monkeypatch):
    """The store's identity block, as the raw device would hold it for _record()."""
    reads = []

    def read(device, offset):
        reads.append((device, offset))
        return encode_identity(_record().expected_identity())

    monkeypatch.setattr(storeid, "read_identity_block", read)
    return reads


class FakeDM:
    def __init__(self, fail_on: str | None = None) -> None:
        self.fail_on = fail_on
        self.log: list[tuple] = []
        self.devices: dict[str, DmInfo] = {}

    def create(self, name, *, uuid=None, targets=None, read_only=False, udev_flags=0):
        self.log.append(("create", name, tuple(t.target_type for t in targets or ()), read_only, udev_flags))
        if name == self.fail_on:
            raise DeviceMapperError(f"device-mapper create {name} failed: injected")
        info = DmInfo(exists=True, suspended=False, live_table=True, inactive_table=False, open_count=0,
                      event_nr=0, major=253, minor=len(self.devices), read_only=read_only, target_count=1)
        self.devices[name] = info
        return info

    def remove(self, name, **kw):
        self.log.append(("remove", name))
        self.devices.pop(name)

    def node_path(self, name):
        return f"/dev/mapper/{name}"


@pytest.fixture
def zeroed(monkeypatch):
    calls = []
    monkeypatch.setattr(stack, "zero_range", lambda path, off, n, **kw: calls.append((path, off, n)))
    return calls


def test_order_cow_zero_snapshot_then_origin(zeroed):
    dm = FakeDM()
    stack.build_stack(dm, _record(), zero_header=True)
    assert [e[1] for e in dm.log] == ["cp-cow", "cp-snap", "cp"]
    assert dm.log[0][2] == ("linear",) and dm.log[0][4] == stack.HIDDEN
    assert dm.log[1][2] == ("snapshot",) and dm.log[1][3] is True  # read-only checkpoint view
    assert dm.log[1][4] == stack.CHECKPOINT_VIEW
    assert dm.log[2][2] == ("snapshot-origin",)
    assert zeroed == [("/dev/mapper/cp-cow", 0, 4096)]


def test_rebuild_never_zeroes(zeroed):
    stack.build_stack(FakeDM(), _record(), zero_header=False)
    assert zeroed == []


@pytest.mark.parametrize("fail_on,removed", [
    ("cp-cow", []),
    ("cp-snap", ["cp-cow"]),
    ("cp", ["cp-snap", "cp-cow"]),
])
def test_failure_unwinds_newest_first(zeroed, fail_on, removed):
    dm = FakeDM(fail_on)
    with pytest.raises(DeviceMapperError, match="injected"):
        stack.build_stack(dm, _record(), zero_header=True)
    assert [e[1] for e in dm.log if e[0] == "remove"] == removed
    assert dm.devices == {}


def test_zeroing_failure_unwinds_and_says_so(monkeypatch):
    def broken(path, off, n, **kw):
        raise OSError("read back was not zero")

    monkeypatch.setattr(stack, "zero_range", broken)
    dm = FakeDM()
    with pytest.raises(DeviceMapperError, match="read back was not zero"):
        stack.build_stack(dm, _record(), zero_header=True)
    assert dm.devices == {} and [e[1] for e in dm.log] == ["cp-cow", "cp-cow"]
