"""The instant rollback's order of saves and device changes (commands/instant.py), with fakes.

The store I/O (reading the table, rewriting it, the store file) is replaced by fakes that
record when they run and what the state folder held then; the decisions, the record and the
state folder are the real code. The kernel side runs in the lab: tests/kernel/test_instant_merge.py
and tests/kernel/instant_boots.py.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from test_activate import _active, _info
from test_seeding import _seeded_record

from fiesnap.commands import instant
from fiesnap.errors import RefusedError
from fiesnap.model.dmtable import linear
from fiesnap.model.exstore import CowException
from fiesnap.model.snapstatus import parse_snapshot_status
from fiesnap.services.stack import passthrough_targets
from fiesnap.services.statedir import StateStore

ENTRIES = (CowException(7, 300), CowException(8, 301))


class Kernel:
    """dm as the commands use it: devices, their tables, a merge target's status line."""

    def __init__(self, events):
        self.events = events
        self.dev = {}
        self.merge_status = "80/20000 16"

    def info(self, name):
        return _info(len(name)) if name in self.dev else None

    def table(self, name):
        return self.dev[name]

    def status(self, name):
        kind = self.dev[name][0].target_type
        return [(0, 1, kind, self.merge_status if kind == "snapshot-merge" else "")]

    def remove(self, name):
        self.events.append(("remove", name))
        del self.dev[name]

    def load(self, name, targets, **kw):
        self.events.append(("load", name, targets[0].target_type))
        self._inactive = targets

    def suspend(self, name, lockfs):
        self.events.append(("suspend", name))

    def resume(self, name, **kw):
        self.events.append(("resume", name))
        self.dev[name] = self._inactive


@pytest.fixture
def env(tmp_path, monkeypatch):
    events: list = []
    k = Kernel(events)
    state = StateStore(str(tmp_path / "state"))

    def seen(what):
        def fake(*a, **kw):
            record = next((x for x in a if hasattr(x, "phase")), None)
            events.append((what, state.load("cp").phase if state.exists("cp") else None))
            if what == "create_merge_device":
                k.dev["cp"] = [replace(linear(0, 1, "254:16", 0), target_type="snapshot-merge")]
            if what == "ensure_cow":
                k.dev["cp-cow"] = [linear(0, 1, "254:16", 0)]
                return "/dev/mapper/cp-cow"
            if what == "real_exceptions":
                return ENTRIES
            return record
        return fake

    for name in ("real_exceptions", "compact", "create_merge_device", "ensure_cow"):
        monkeypatch.setattr(instant, name, seen(name))
    monkeypatch.setattr(instant, "probe_exclusive", lambda dev: True)
    monkeypatch.setattr(instant.storefile, "discard_store", lambda *a: events.append(("discard_store",)))
    monkeypatch.setattr(instant.blockdev, "mounts_of", lambda ma, mi: [])
    return k, state, events


def _stack(k, record):
    k.dev.update({"cp": [linear(0, 1, "254:16", 0)], "cp-snap": [linear(0, 1, "x", 0)]})


def test_a_grown_store_is_refused_before_anything_changes():
    with pytest.raises(RefusedError, match="grew after the checkpoint.*rolls it back offline"):
        instant.refuse_unsafe(replace(_active(), generation=2))
    instant.refuse_unsafe(_active())


@pytest.mark.parametrize("free_aware", [False, True])
def test_the_handover_saves_each_phase_before_the_step_that_needs_it(env, free_aware):
    k, state, events = env
    record = _seeded_record() if free_aware else _active()
    state.save(record)
    _stack(k, record)
    got = instant.hand_over(k, record, state, lambda m: None)
    assert got.phase == "kernel-merging" and got.merge_entries == 2
    order = [e for e in events if e[0] != "load"]
    assert order[:2] == [("remove", "cp"), ("remove", "cp-snap")]  # origin first
    steps = dict((e[0], e[1]) for e in order if len(e) == 2 and e[0] != "remove")
    assert steps["real_exceptions"] == "active"
    if free_aware:
        assert steps["compact"] == "handover"  # the count is saved before the rewrite
    else:
        assert "compact" not in steps
    assert steps["create_merge_device"] == "kernel-merging"  # before NAME shows anything


def test_too_many_real_exceptions_for_the_seeded_slots_is_refused_and_the_store_put_back(env):
    k, state, events = env
    record = replace(_seeded_record(), seeded_chunks=2)  # 2 real, 2 seeded: refused
    state.save(_seeded_record())
    _stack(k, record)
    with pytest.raises(RefusedError, match="more than the 2 free chunks.*'fiesnap activate cp'"):
        instant.hand_over(k, record, state, lambda m: None)
    assert state.load("cp").phase == "active"
    assert "cp-cow" not in k.dev and ("compact", "active") not in events


def test_finish_waits_for_the_kernel_then_goes_passthrough_first(env):
    k, state, events = env
    record = replace(_active(), phase="kernel-merging", merge_entries=2, managed=False, setup_id="")
    state.save(record)
    k.dev["cp"] = [replace(linear(0, 1, "254:16", 0), target_type="snapshot-merge")]
    k.dev["cp-cow"] = [linear(0, 1, "254:16", 0)]
    assert not instant.finish_if_complete(k, state, "cp", lambda m: None)
    assert state.load("cp").phase == "kernel-merging" and events == []
    k.merge_status = "16/20000 16"  # allocated == metadata: complete
    assert instant.finish_if_complete(k, state, "cp", lambda m: None)
    kinds = [e[0] for e in events]
    assert kinds.index("load") < kinds.index("discard_store")  # NAME linear before anything goes
    assert ("remove", "cp-cow") in events and ("remove", "cp") in events  # unmanaged, unused: removed
    assert not state.exists("cp")


def test_a_finish_cut_short_after_the_pass_through_is_completed_without_the_kernel(env):
    k, state, events = env
    record = replace(_active(), phase="kernel-merging", merge_entries=2)
    state.save(record)
    k.dev["cp"] = passthrough_targets(record)  # finish got this far
    assert instant.finish_if_complete(k, state, "cp", lambda m: None)
    assert state.load("cp").phase == "passthrough"  # a device under fiesnap stays, as a pass-through
    assert "cp" in k.dev


def test_progress_of_a_merge():
    from fiesnap.services.kernelmerge import progress_of

    r = replace(_active(), phase="kernel-merging", merge_entries=100)
    assert progress_of(parse_snapshot_status("336/200000 16"), r) == {
        "entries": 100, "remaining": 40, "complete": False, "state": "active", "percent_done": 60.0}
    assert progress_of(None, r) is None


def test_the_monitor_finishes_a_completed_kernel_merge_by_itself(env, monkeypatch):
    from fiesnap.commands import monitor
    from fiesnap.model.monitor_policy import MonitorPolicy

    k, state, events = env
    monkeypatch.setattr(monitor, "require_root", lambda: None)
    state.save(replace(_active(), phase="kernel-merging", merge_entries=2))
    k.dev["cp"] = [replace(linear(0, 1, "254:16", 0), target_type="snapshot-merge")]
    k.dev["cp-cow"] = [linear(0, 1, "254:16", 0)]
    said: list[str] = []
    policy = MonitorPolicy(threshold_pct=50.0, step_bytes=None, step_pct=100.0, max_bytes=None, interval_s=0.01)
    assert monitor.run_monitor(None, policy, lambda: k, state, said.append, once=True) == 0
    assert state.load("cp").phase == "kernel-merging"  # still merging: left alone
    k.merge_status = "16/20000 16"
    assert monitor.run_monitor(None, policy, lambda: k, state, said.append, once=True) == 0
    assert state.load("cp").phase == "passthrough" and "cp-cow" not in k.dev
    assert any("kernel merge" in m for m in said), said
