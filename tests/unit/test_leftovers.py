"""Devices a killed command left suspended are resumed by the next command, with nothing
unknown swapped in. The fake keeps the kernel's rules for a device's two tables: LOAD fills
the inactive slot, CLEAR empties it, RESUME swaps it in (if any) and un-suspends."""

from __future__ import annotations

from dataclasses import replace

from fiesnap.kernel.dm import DmInfo
from fiesnap.model.cowtable import CowTable
from fiesnap.model.dmtable import DmTarget
from fiesnap.model.extents import ChunkRun, Extent
from fiesnap.model.record import CheckpointRecord
from fiesnap.services.stack import cow_targets, origin_targets, passthrough_targets, resume_leftovers

MiB = 1 << 20


class KernelLikeDM:
    def __init__(self) -> None:
        self.dev: dict[str, dict] = {}
        self.calls: list[tuple[str, str]] = []

    def add(self, name, live, *, inactive=None, suspended=False) -> None:
        self.dev[name] = {"live": list(live), "inactive": inactive, "suspended": suspended}

    def info(self, name):
        d = self.dev.get(name)
        if d is None:
            return None
        return DmInfo(exists=True, suspended=d["suspended"], live_table=True,
                      inactive_table=d["inactive"] is not None, open_count=0, event_nr=0,
                      major=253, minor=list(self.dev).index(name), read_only=False, target_count=1)

    def table(self, name):
        return list(self.dev[name]["live"])

    def load(self, name, targets):
        self.calls.append(("load", name))
        self.dev[name]["inactive"] = list(targets)

    def clear(self, name):
        self.calls.append(("clear", name))
        self.dev[name]["inactive"] = None

    def resume(self, name, **kw):
        self.calls.append(("resume", name))
        d = self.dev[name]
        if d["inactive"] is not None:
            d["live"], d["inactive"] = d["inactive"], None
        d["suspended"] = False


def _record() -> CheckpointRecord:
    return CheckpointRecord(
        name="cp", device="/dev/vdb", device_major=254, device_minor=16, device_bytes=64 * MiB,
        fstype="ext4", fs_uuid="u", phase="active", checkpoint_id="c" * 32, chunk_bytes=4096,
        store_type="PO", store_relpath=".fiesnap/s", store_file_bytes=80 * 4096,
        store_extents=(Extent(0, 4096 * 99, 80 * 4096, 0),),
        cow_table=CowTable.from_runs([ChunkRun(100, 50)], 4096), created="now", identity_offset=4096 * 99)


def _stack(dm: KernelLikeDM, rec: CheckpointRecord, cow_live=None) -> None:
    dm.add("cp-cow", cow_live or cow_targets(rec))
    dm.add("cp-snap", [DmTarget(0, 131072, "snapshot", "253:0 253:0 PO 8")])
    dm.add("cp", origin_targets(rec))


def test_nothing_suspended_nothing_done():
    dm, rec = KernelLikeDM(), _record()
    _stack(dm, rec)
    assert resume_leftovers(dm, rec, print) == [] and dm.calls == []


def test_an_extend_killed_after_suspending_the_store_gets_the_recorded_map():
    first = _record()
    grown = first.grown(first.cow.append_runs([ChunkRun(300, 20)])).identity_rewritten()
    dm = KernelLikeDM()
    _stack(dm, grown, cow_live=cow_targets(first))
    dm.dev["cp-cow"].update(inactive=cow_targets(grown), suspended=True)  # load + suspend, then SIGKILL
    said = []
    assert resume_leftovers(dm, grown, said.append) == ["cp-cow"]
    assert dm.dev["cp-cow"] == {"live": cow_targets(grown), "inactive": None, "suspended": False}
    assert dm.calls == [("clear", "cp-cow"), ("load", "cp-cow"), ("resume", "cp-cow")]
    assert said == ["resumed /dev/mapper/cp-cow: an interrupted fiesnap command had left it suspended, "
                    "holding every write"]


def test_an_unknown_inactive_table_is_dropped_never_swapped_in():
    dm, rec = KernelLikeDM(), _record()
    _stack(dm, rec)
    stranger = [DmTarget(0, 8, "linear", "254:16 0")]
    dm.dev["cp-cow"].update(inactive=stranger, suspended=True)
    dm.dev["cp"].update(inactive=passthrough_targets(rec), suspended=True)  # commit killed mid-switch
    assert resume_leftovers(dm, rec, lambda m: None) == ["cp-cow", "cp"]
    assert dm.dev["cp-cow"]["live"] == cow_targets(rec)
    assert dm.dev["cp"]["live"] == origin_targets(rec)  # the record still says active
    assert not any(d["suspended"] or d["inactive"] for d in dm.dev.values())


def test_a_store_table_that_is_not_a_prefix_of_the_record_is_left_as_it_is():
    rec = _record()
    other = replace(rec, cow_table=CowTable.from_runs([ChunkRun(500, 50)], 4096))
    dm = KernelLikeDM()
    _stack(dm, rec, cow_live=cow_targets(other))
    dm.dev["cp-cow"]["suspended"] = True
    resume_leftovers(dm, rec, lambda m: None)
    assert dm.dev["cp-cow"]["live"] == cow_targets(other) and not dm.dev["cp-cow"]["suspended"]
