"""commit's switch of a live, mounted checkpoint to the pass-through, with a fake device-mapper.

What the order guarantees: a filesystem another tool froze is refused before anything
changes (the record stays active, so the checkpoint can still be rolled back); otherwise the
record says `committing` before the origin's table is touched, because from the switch on
the store misses overwrites and a rollback would be wrong. The real kernel runs the same in
tests/kernel/test_checkpoint.py on each kernel series.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from fiesnap.commands import commit
from fiesnap.errors import FilesystemError
from fiesnap.kernel.dm import DmInfo
from fiesnap.model.cowtable import CowTable
from fiesnap.model.extents import ChunkRun, Extent
from fiesnap.model.record import CheckpointRecord
from fiesnap.services import stack
from fiesnap.services.statedir import StateStore

MiB = 1 << 20


def _record(*, managed: bool) -> CheckpointRecord:
    return CheckpointRecord(
        name="cp", device="/dev/vdb", device_major=254, device_minor=16, device_bytes=64 * MiB,
        fstype="ext4", fs_uuid="u", phase="active", managed=managed, setup_id="5" * 32 if managed else "",
        checkpoint_id="c" * 32, chunk_bytes=4096, store_type="PO", store_relpath=".fiesnap/store-cp",
        store_file_bytes=51 * 4096, store_extents=(Extent(0, 405504, 208896, 0),),
        cow_table=CowTable.from_runs([ChunkRun(100, 50)], 4096), created="now", identity_offset=405504,
        generation=1, mode="online",
    )


class FakeDM:
    """Live tables, an inactive slot, suspension: what commit and the switch look at."""

    def __init__(self, record: CheckpointRecord, events: list, state: StateStore) -> None:
        self.events, self.state = events, state
        self.live = {"cp": stack.origin_targets(record), "cp-snap": [], "cp-cow": []}
        self.inactive: dict = {}
        self.suspended: set[str] = set()

    def info(self, name):
        if name not in self.live:
            return None
        return DmInfo(exists=True, suspended=name in self.suspended, live_table=True,
                      inactive_table=name in self.inactive, open_count=1, event_nr=0, major=253,
                      minor=7 if name == "cp" else 8, read_only=False, target_count=1)

    def table(self, name):
        return list(self.live[name])

    def load(self, name, targets, **kw):
        # What the record said when the origin's table was first touched.
        self.events.append(("load", name, self.state.load("cp").phase))
        self.inactive[name] = list(targets)

    def clear(self, name):
        self.inactive.pop(name, None)

    def suspend(self, name, *, lockfs=True, noflush=False):
        self.events.append(("suspend", name, lockfs))
        self.suspended.add(name)

    def resume(self, name, **kw):
        self.events.append(("resume", name))
        if name in self.inactive:
            self.live[name] = self.inactive.pop(name)
        self.suspended.discard(name)
        return self.info(name)

    def remove(self, name, **kw):
        self.events.append(("remove", name))
        del self.live[name]


@pytest.fixture
def setup(monkeypatch, tmp_path):
    def make(managed: bool, frozen_by_another_tool: bool = False):
        state = StateStore(str(tmp_path / "state"))
        record = _record(managed=managed)
        state.save(record)
        events: list = []
        dm = FakeDM(record, events, state)

        def refuse_frozen(mountpoints, dev):
            events.append(("probe", *mountpoints))
            if frozen_by_another_tool:
                raise FilesystemError(f"{mountpoints[0]} is already frozen (by another tool?): thaw it with "
                                      f"'fsfreeze -u {mountpoints[0]}' and retry")

        monkeypatch.setattr(stack.freeze, "refuse_frozen", refuse_frozen)
        monkeypatch.setattr(stack.blockdev, "mounts_of", lambda ma, mi: ["/srv/data"] if (ma, mi) == (253, 7) else [])
        monkeypatch.setattr(commit.blockdev, "mounts_of", stack.blockdev.mounts_of)
        monkeypatch.setattr(commit, "verify_device", lambda record: None)
        monkeypatch.setattr(commit, "resume_leftovers", lambda dm, record, log: [])
        monkeypatch.setattr(commit, "mount_source", lambda record: "/dev/mapper/cp")
        monkeypatch.setattr(commit.storefile, "discard_store", lambda *a: events.append(("discard_store",)))
        return dm, state, record, events
    return make


@pytest.mark.parametrize("managed", [False, True])
def test_a_filesystem_another_tool_froze_is_refused_with_nothing_changed(setup, managed):
    dm, state, record, events = setup(managed, frozen_by_another_tool=True)
    with pytest.raises(FilesystemError, match="already frozen"):
        commit._commit_locked(dm, state.load("cp"), state, lambda s: None)
    assert events == [("probe", "/srv/data")]
    assert state.load("cp").phase == "active"  # still a checkpoint that can be rolled back
    assert dm.live["cp"] == stack.origin_targets(record) and not dm.inactive and not dm.suspended


@pytest.mark.parametrize("managed", [False, True])
def test_the_record_says_committing_before_the_origin_table_changes(setup, managed):
    dm, state, record, events = setup(managed)
    result = commit._commit_locked(dm, state.load("cp"), state, lambda s: None)
    assert result == "passthrough"
    assert events[:4] == [("probe", "/srv/data"), ("load", "cp", "committing"), ("suspend", "cp", True),
                          ("resume", "cp")]
    assert dm.live["cp"] == stack.passthrough_targets(record)
    assert "cp-snap" not in dm.live and "cp-cow" not in dm.live
    assert ("discard_store",) in events
    assert state.load("cp").phase == "passthrough"


def test_a_commit_rerun_after_the_switch_finishes_without_switching_again(setup):
    """Killed after the switch: the record says committing and NAME is already linear."""
    dm, state, record, events = setup(True)
    state.save(replace(state.load("cp"), phase="committing"))
    dm.live["cp"] = stack.passthrough_targets(record)
    assert commit._commit_locked(dm, state.load("cp"), state, lambda s: None) == "passthrough"
    assert not [e for e in events if e[0] in ("probe", "load", "suspend")]
    assert state.load("cp").phase == "passthrough"
