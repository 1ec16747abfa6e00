"""The checkpoint record: typed, immutable, checked once when it is read, and
moved between phases only along the transition table."""

from __future__ import annotations

import dataclasses
import json

import pytest

from fiesnap.errors import FilesystemError, StateError
from fiesnap.model.cowtable import CowTable
from fiesnap.model.extents import ChunkRun, Extent
from fiesnap.model.identity import IDENTITY_BYTES
from fiesnap.model.record import PHASES, TRANSITIONS, CheckpointRecord, PreviousIdentity
from fiesnap.services.statedir import StateStore

MiB = 1 << 20
CB = 4096


def _device(phase: str = "starting", **kw) -> CheckpointRecord:
    return CheckpointRecord(name="cp", device="/dev/vdb", device_major=254, device_minor=16,
                            device_bytes=64 * MiB, fstype="ext4", fs_uuid="u-1", phase=phase, **kw)


def _started() -> CheckpointRecord:
    # a 1 MiB store file at device byte 8 MiB, in one extent
    return _device().with_checkpoint(
        checkpoint_id="c" * 32, store_type="PO", chunk_bytes=CB, store_relpath=".fiesnap/store-cp",
        store_file_bytes=MiB, extents=[Extent(0, 8 * MiB, MiB, 0)], created="now", mode="offline",
        free_map=[(16 * MiB, 4 * MiB)])


def test_with_checkpoint_maps_the_file_without_its_identity_block():
    r = _started()
    assert r.phase == "starting" and r.identity_offset == 8 * MiB and r.generation == 1
    assert r.cow == CowTable.from_runs([ChunkRun((8 * MiB + IDENTITY_BYTES) // CB, MiB // CB - 1)], CB)
    assert r.store_bytes == MiB - CB and r.free_map == ((16 * MiB, 4 * MiB),)
    assert r.store_extents == (Extent(0, 8 * MiB, MiB, 0),)


def test_with_checkpoint_refuses_a_store_too_small_to_hold_anything():
    with pytest.raises(FilesystemError, match="too fragmented"):
        _device().with_checkpoint(
            checkpoint_id="c" * 32, store_type="PO", chunk_bytes=CB, store_relpath=".fiesnap/s",
            store_file_bytes=4 * CB, extents=[Extent(0, 8 * MiB, 4 * CB, 0)], created="now", mode="offline")


def test_the_record_is_immutable():
    r = _started()
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.phase = "active"  # type: ignore[misc]
    a = r.with_phase("active")
    assert (r.phase, a.phase) == ("starting", "active")


def test_every_phase_has_a_row_and_every_row_names_phases():
    assert set(TRANSITIONS) == set(PHASES)
    for nxt in TRANSITIONS.values():
        assert nxt <= set(PHASES)


@pytest.mark.parametrize("src", PHASES)
@pytest.mark.parametrize("dst", PHASES)
def test_with_phase_follows_the_table(src, dst):
    r = dataclasses.replace(_started().with_phase("active"), phase=src)
    if dst == src or dst in TRANSITIONS[src]:
        assert r.with_phase(dst).phase == dst
    else:
        with pytest.raises(StateError, match=f"cannot go from {src} to {dst}"):
            r.with_phase(dst)


def test_a_rollback_goes_active_merging_copied_passthrough():
    r = _started().with_phase("active").with_phase("merging").with_phase("copied")
    p = r.as_passthrough()
    assert p.phase == "passthrough" and p.cow_table is None and not p.has_checkpoint
    with pytest.raises(StateError):
        _started().with_phase("active").as_passthrough()  # not without merging or committing


def test_grown_keeps_the_previous_identity_until_the_block_is_rewritten():
    r = _started().with_phase("active")
    before = r.expected_identity()
    g = r.grown(r.cow.append_runs([ChunkRun(9000, 10)]))
    assert g.generation == 2 and g.previous_identity == PreviousIdentity(1, before.map_sha256)
    assert g.expected_identity().map_sha256 != before.map_sha256
    assert g.identity_rewritten().previous_identity is None


def test_json_round_trip_through_the_state_folder(tmp_path):
    state = StateStore(str(tmp_path))
    r = _started().with_free_map([(0, 4096)], frozen_seconds=0.12).with_phase("active")
    r = r.grown(r.cow.append_runs([ChunkRun(9000, 10)]))
    state.save(r)
    assert state.load("cp") == r
    data = json.loads((tmp_path / "cp.json").read_text())
    assert data["notes"] == {"frozen_seconds": 0.12, "previous_identity": {
        "generation": 1, "map_sha256": r.previous_identity.map_sha256}}
    assert data["cow_table"] == r.cow.to_dict()


def _damaged(**change) -> dict:
    data = _started().with_phase("active").to_dict()
    for k, v in change.items():
        if v is KeyError:
            del data[k]
        else:
            data[k] = v
    return data


@pytest.mark.parametrize("change, field", [
    ({"name": "../etc"}, "name"),
    ({"name": 5}, "name"),
    ({"device": "vdb"}, "device"),
    ({"device_major": "254"}, "device_major"),
    ({"device_minor": -1}, "device_minor"),
    ({"device_bytes": 0}, "device_bytes"),
    ({"device_bytes": True}, "device_bytes"),
    ({"fs_uuid": KeyError}, "fs_uuid"),
    ({"phase": "rolling"}, "phase"),
    ({"managed": "yes"}, "managed"),
    ({"checkpoint_id": "not hex"}, "checkpoint_id"),
    ({"setup_id": "x" * 32}, "setup_id"),
    ({"store_type": "N"}, "store_type"),
    ({"store_extents": [[0, 1, 2]]}, "store_extents"),
    ({"store_extents": [[0, 1, 2, -1]]}, "store_extents"),
    ({"free_map": [[0, "1"]]}, "free_map"),
    ({"free_map": {}}, "free_map"),
    ({"cow_table": []}, "cow_table"),
    ({"cow_table": {}}, "cow_table"),  # a checkpoint without its map
    ({"chunk_bytes": 8192}, "cow_table"),  # the map says 4096
    ({"identity_offset": -2}, "identity_offset"),
    ({"generation": 0}, "generation"),
    ({"mode": "sideways"}, "mode"),
    ({"notes": {"previous_identity": {"generation": 1, "map_sha256": "zz"}}}, "notes"),
    ({"notes": {"frozen_seconds": "0.1"}}, "notes"),
    ({"notes": []}, "notes"),
])
def test_damaged_records_are_refused_naming_the_field(change, field):
    with pytest.raises(StateError, match=f"field '{field}'"):
        CheckpointRecord.from_dict(_damaged(**change))


def test_a_damaged_cow_table_is_refused():
    cow = _started().cow.to_dict()
    cow["segments"][0]["phys_start"] = None  # a hole: fiesnap never writes one
    with pytest.raises(StateError, match="COW table is malformed"):
        CheckpointRecord.from_dict(_damaged(cow_table=cow))


@pytest.mark.parametrize("data", [[], "x", None, {"version": 2, "name": "cp"}])
def test_not_a_record_at_all(data):
    with pytest.raises(StateError):
        CheckpointRecord.from_dict(data)


def test_a_damaged_file_in_the_state_folder_stops_the_command(tmp_path):
    (tmp_path / "cp.json").write_text(json.dumps(_damaged(phase="rolling")))
    with pytest.raises(StateError, match=r"cp\.json: field 'phase' must be one of"):
        StateStore(str(tmp_path)).load("cp")
