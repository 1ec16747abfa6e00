"""The online switch and the stack pieces it uses, with a fake device-mapper.

stack.switch_to_origin turns the live pass-through NAME into snapshot-origin
inside a window (the filesystem frozen). The order is the whole point: load
the new table before the window, suspend without a second freeze and resume
inside it, and wait for udev only after the thaw. Every failure -- also one
after the resume went through, the thaw included -- must leave NAME running
its pass-through table (what the record still says) and never leave the
window open. The real kernel runs this in tests/kernel.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import pytest

from fiesnap.model.identity import encode_identity
from fiesnap.services import stack, storeid
from fiesnap.model.cowtable import CowTable
from fiesnap.kernel.dm import DmInfo
from fiesnap.model.dmtable import DmTarget
from fiesnap.errors import DeviceMapperError, FilesystemError
from fiesnap.model.extents import ChunkRun
from fiesnap.model.extents import Extent
from fiesnap.model.record import CheckpointRecord

MiB = 1 << 20


def _record(*, managed: bool = True) -> CheckpointRecord:
    cow = CowTable.from_runs([ChunkRun(100, 50)], 4096)
    return CheckpointRecord(
        name="cp", checkpoint_id="c" * 32, device="/dev/vdb", device_major=254, device_minor=16,
        device_bytes=64 * MiB, fstype="ext4", fs_uuid="u", chunk_bytes=4096, store_type="PO",
        store_relpath=".fiesnap/s", store_file_bytes=51 * 4096, store_extents=(Extent(0, 409600, 208896, 0),),
        cow_table=cow, free_map=(), created="now", identity_offset=405504, phase="starting",
        managed=managed, setup_id="5" * 32 if managed else "", mode="online",
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


class Injected(DeviceMapperError):
    pass


class FakeDM:
    """Logs every call into a shared event list; `fail` names the call that raises."""

    def __init__(self, events: list, fail: str | None = None, *, fail_restore: bool = False) -> None:
        self.events = events
        self.fail = fail
        self.fail_restore = fail_restore
        self.suspended: set[str] = set()
        self.inactive: dict[str, list[DmTarget]] = {}
        # NAME is a live pass-through when an online start begins
        self.live: dict[str, list[DmTarget]] = {"cp": stack.passthrough_targets(_record())}
        self.resumes = 0
        self.finishes = 0

    def info(self, name):
        if name not in self.live:
            return None
        return DmInfo(exists=True, suspended=name in self.suspended, live_table=True,
                      inactive_table=name in self.inactive, open_count=1, event_nr=0, major=253,
                      minor=7, read_only=False, target_count=1)

    def table(self, name):
        return list(self.live.get(name, []))

    def _maybe_fail(self, what: str) -> None:
        if self.fail == what:
            raise Injected(f"device-mapper {what} failed: injected")

    def load(self, name, targets, *, read_only=False):
        self.events.append(("load", name, tuple(targets)))
        self._maybe_fail("load")
        self.inactive[name] = list(targets)

    def clear(self, name):
        self.events.append(("clear", name))
        self.inactive.pop(name, None)

    def suspend(self, name, *, lockfs=True, noflush=False):
        self.events.append(("suspend", name, lockfs))
        self._maybe_fail("suspend")
        self.suspended.add(name)

    def resume(self, name, *, udev_flags=0):
        """Like DeviceMapper.resume: the resume, then the wait for udev and the node check."""
        self.resume_frozen(name, udev_flags=udev_flags).finish()
        return self.info(name)

    def resume_frozen(self, name, *, udev_flags=0):
        """Like DeviceMapper.resume_frozen: no udev wait; the caller finishes it."""
        self.events.append(("resume", name))
        self.resumes += 1
        if self.fail == "resume" and (self.resumes == 1 or self.fail_restore):
            raise Injected("device-mapper resume failed: injected")
        if name in self.inactive:
            self.live[name] = self.inactive.pop(name)
        self.suspended.discard(name)
        if self.fail == "resume_after" and self.resumes == 1:
            raise Injected("device-mapper resume: the kernel resumed, then the library failed: injected")
        return _Pending(self, name)


class _Pending:
    def __init__(self, dm: FakeDM, name: str) -> None:
        self.dm, self.name = dm, name

    def finish(self):
        self.dm.events.append(("udev", self.name))
        self.dm.finishes += 1
        if self.dm.fail == "udev" and self.dm.finishes == 1:
            raise Injected("node check after udev failed: injected")
        return True


def _window(events: list, dm: FakeDM, fail_enter: bool = False, fail_thaw: bool = False):
    """A fake freeze window; records whether NAME was suspended when it closed."""

    @contextmanager
    def window():
        events.append(("enter",))
        if fail_enter:
            raise FilesystemError("cannot freeze: injected")
        try:
            yield
        finally:
            events.append(("exit", "suspended" if dm.suspended else "running"))
            if fail_thaw:
                raise FilesystemError("cannot thaw: injected")

    return window


def _switch(fail: str | None = None, **kw):
    events: list = []
    dm = FakeDM(events, fail if fail not in ("enter", "at_checkpoint", "thaw") else None, **kw)
    record = _record()

    def at_checkpoint():
        events.append(("at_checkpoint",))
        if fail == "at_checkpoint":
            raise FilesystemError("free-space map failed: injected")
        return [(0, 4096)]

    window = _window(events, dm, fail_enter=fail == "enter", fail_thaw=fail == "thaw")
    return events, dm, record, lambda: stack.switch_to_origin(dm, record, window, at_checkpoint)


def _kinds(events: list) -> list[str]:
    return [e[0] for e in events]


# --------------------------------------------------------------------------
# switch_to_origin
# --------------------------------------------------------------------------


def test_switch_order_load_then_window_suspend_resume():
    events, dm, record, run = _switch()
    assert run() == [(0, 4096)]  # what at_checkpoint returned
    assert _kinds(events) == ["load", "enter", "at_checkpoint", "suspend", "resume", "exit", "udev"]
    load = events[0]
    assert load[1] == "cp"
    assert list(load[2]) == stack.origin_targets(record)
    assert load[2][0].target_type == "snapshot-origin"
    assert load[2][0].params == "254:16" and load[2][0].length == 64 * MiB // 512
    assert events[3] == ("suspend", "cp", False)  # no second freeze: the window froze it
    assert events[4] == ("resume", "cp")
    assert events[5] == ("exit", "running")
    assert events[6] == ("udev", "cp")  # udev is awaited only after the thaw
    assert dm.live["cp"] == stack.origin_targets(record) and not dm.inactive
    assert "clear" not in _kinds(events)


def test_switch_default_at_checkpoint_returns_none():
    events: list = []
    dm = FakeDM(events)
    assert stack.switch_to_origin(dm, _record(), _window(events, dm)) is None
    assert _kinds(events) == ["load", "enter", "suspend", "resume", "exit", "udev"]


def test_switch_load_failure_never_enters_the_window():
    # A failed table load leaves no inactive table behind: nothing to clear, nothing frozen.
    events, dm, _, run = _switch("load")
    with pytest.raises(Injected, match="load failed"):
        run()
    assert _kinds(events) == ["load"]
    assert not dm.suspended and dm.live["cp"] == stack.passthrough_targets(_record())


@pytest.mark.parametrize("fail,before,after,error", [
    # before: the calls up to the failure, in order; after: the undoing, in any order
    # (clear must come before any resume, and the resume before the thaw).
    ("enter", ["load", "enter"], ["clear"], FilesystemError),
    ("at_checkpoint", ["load", "enter", "at_checkpoint"], ["exit", "clear"], FilesystemError),
    ("suspend", ["load", "enter", "at_checkpoint", "suspend"], ["exit", "clear"], Injected),
    ("resume", ["load", "enter", "at_checkpoint", "suspend", "resume"], ["exit", "clear", "resume", "udev"], Injected),
])
def test_switch_failure_restores_the_live_table(fail, before, after, error):
    events, dm, _, run = _switch(fail)
    with pytest.raises(error, match="injected") as exc:
        run()
    kinds = _kinds(events)
    assert kinds[:len(before)] == before
    assert sorted(kinds[len(before):]) == sorted(after)
    # the original exception propagates, not something raised while undoing
    assert exc.value.__context__ is None
    assert ("clear", "cp") in events and not dm.inactive
    if fail == "resume":  # suspended: resumed again, after the new table was dropped
        rest = kinds[len(before):]
        assert rest.index("clear") < rest.index("resume")
    else:  # never suspended: nothing to resume
        assert "resume" not in kinds
    assert not dm.suspended  # NAME runs again, on its old (pass-through) table
    assert dm.live["cp"] == stack.passthrough_targets(_record())  # snapshot-origin never went live
    # a window that was entered is exited, exactly once
    assert kinds.count("exit") == (0 if fail == "enter" else 1)


def test_switch_clear_failure_is_ignored():
    events, dm, _, run = _switch("suspend")

    def broken_clear(name):
        events.append(("clear", name))
        raise DeviceMapperError("no inactive table")

    dm.clear = broken_clear
    with pytest.raises(Injected, match="suspend failed"):
        run()
    assert _kinds(events)[-1] == "clear"


def test_switch_resume_failure_resumes_before_the_thaw():
    """ext4's thaw writes the superblock: NAME must run again (old table) before it."""
    events, dm, _, run = _switch("resume")
    with pytest.raises(Injected):
        run()
    assert ("exit", "running") in events


def test_no_udev_wait_inside_the_window():
    """A slow udevd must not keep the filesystem frozen: the wait comes after the thaw."""
    events, dm, _, run = _switch()
    run()
    kinds = _kinds(events)
    assert kinds.index("resume") < kinds.index("exit") < kinds.index("udev")


def test_a_failed_thaw_after_the_resume_puts_the_passthrough_back():
    """The switch went through, then the thaw failed: the caller removes -snap and -cow and
    keeps the record as a pass-through, so NAME must not stay snapshot-origin."""
    events, dm, record, run = _switch("thaw")
    with pytest.raises(FilesystemError, match="cannot thaw"):
        run()
    assert dm.live["cp"] == stack.passthrough_targets(record)
    assert not dm.suspended and not dm.inactive
    kinds = _kinds(events)
    back = kinds.index("exit") + 1
    assert kinds[back:] == ["load", "suspend", "resume", "udev", "udev"]
    assert events[back] == ("load", "cp", tuple(stack.passthrough_targets(record)))
    assert events[back + 1] == ("suspend", "cp", False)  # no lockfs: maybe still frozen


def test_a_resume_that_went_through_and_then_failed_is_undone_before_the_thaw():
    events, dm, record, run = _switch("resume_after")
    with pytest.raises(Injected, match="the kernel resumed"):
        run()
    kinds = _kinds(events)
    assert dm.live["cp"] == stack.passthrough_targets(record) and not dm.suspended
    assert events[kinds.index("exit")] == ("exit", "running")
    assert kinds.index("load", 1) < kinds.index("exit")  # the pass-through is back inside the window
    assert "udev" not in kinds[:kinds.index("exit")]


def test_a_failed_node_check_after_the_switch_puts_the_passthrough_back():
    events, dm, record, run = _switch("udev")
    with pytest.raises(Injected, match="node check"):
        run()
    assert dm.live["cp"] == stack.passthrough_targets(record) and not dm.suspended


# --------------------------------------------------------------------------
# build_store_layers
# --------------------------------------------------------------------------


class LayerDM:
    def __init__(self, events: list, fail_on: str | None = None) -> None:
        self.events = events
        self.fail_on = fail_on
        self.devices: dict[str, DmInfo] = {}
        self.created: list[dict] = []

    def create(self, name, *, uuid=None, targets=None, read_only=False, udev_flags=0):
        self.events.append(("create", name))
        self.created.append(dict(name=name, uuid=uuid, targets=list(targets or ()),
                                 read_only=read_only, udev_flags=udev_flags))
        if name == self.fail_on:
            raise DeviceMapperError(f"device-mapper create {name} failed: injected")
        info = DmInfo(exists=True, suspended=False, live_table=True, inactive_table=False, open_count=0,
                      event_nr=0, major=253, minor=10 + len(self.devices), read_only=read_only,
                      target_count=len(targets or ()))
        self.devices[name] = info
        return info

    def remove(self, name, **kw):
        self.events.append(("remove", name))
        self.devices.pop(name)

    def node_path(self, name):
        return f"/dev/mapper/{name}"


@pytest.fixture
def zeroing(monkeypatch):
    events: list = []
    monkeypatch.setattr(stack, "zero_range", lambda path, off, n, **kw: events.append(("zero", path, off, n)))
    return events


def test_store_layers_order_cow_zero_snap(zeroing):
    events = zeroing
    dm = LayerDM(events)
    record = _record()
    logged: list[str] = []
    made = stack.build_store_layers(dm, record, zero_header=True, log=logged.append)
    assert made == ["cp-cow", "cp-snap"]
    assert events == [("create", "cp-cow"), ("zero", "/dev/mapper/cp-cow", 0, 4096), ("create", "cp-snap")]
    cow, snap = dm.created
    assert cow["uuid"] == f"FIESNAP-{'c' * 32}-cow" and cow["udev_flags"] == stack.HIDDEN
    assert cow["targets"] == stack.cow_targets(record) and not cow["read_only"]
    assert snap["uuid"] == f"FIESNAP-{'c' * 32}-snap"
    assert snap["read_only"] is True and snap["udev_flags"] == stack.CHECKPOINT_VIEW
    # the snapshot names the cow device by the numbers it just got
    assert snap["targets"] == [DmTarget(0, 64 * MiB // 512, "snapshot", "254:16 253:10 PO 8")]
    assert "cp" not in dm.devices  # the origin is not this function's business
    assert len(logged) == 3


def test_store_layers_rebuild_never_zeroes(zeroing):
    dm = LayerDM(zeroing)
    assert stack.build_store_layers(dm, _record(), zero_header=False) == ["cp-cow", "cp-snap"]
    assert [e[0] for e in zeroing] == ["create", "create"]


@pytest.mark.parametrize("fail_on,removed", [("cp-cow", []), ("cp-snap", ["cp-cow"])])
def test_store_layers_unwind(zeroing, fail_on, removed):
    dm = LayerDM(zeroing, fail_on)
    with pytest.raises(DeviceMapperError, match="injected"):
        stack.build_store_layers(dm, _record(), zero_header=True)
    assert [e[1] for e in zeroing if e[0] == "remove"] == removed
    assert dm.devices == {}


def test_store_layers_zero_failure_unwinds_and_wraps(monkeypatch):
    events: list = []

    def broken(path, off, n, **kw):
        events.append(("zero", path))
        raise OSError(5, "read back was not zero")

    monkeypatch.setattr(stack, "zero_range", broken)
    dm = LayerDM(events)
    with pytest.raises(DeviceMapperError, match="building the checkpoint stack failed: .*read back was not zero"):
        stack.build_store_layers(dm, _record(), zero_header=True)
    assert events == [("create", "cp-cow"), ("zero", "/dev/mapper/cp-cow"), ("remove", "cp-cow")]
    assert dm.devices == {}


def test_store_layers_keyboard_interrupt_unwinds_and_propagates(zeroing):
    dm = LayerDM(zeroing)
    real_create = dm.create

    def create(name, **kw):
        if name == "cp-snap":
            raise KeyboardInterrupt
        return real_create(name, **kw)

    dm.create = create
    with pytest.raises(KeyboardInterrupt):
        stack.build_store_layers(dm, _record(), zero_header=False)
    assert dm.devices == {}


# --------------------------------------------------------------------------
# origin_uuid, create_passthrough
# --------------------------------------------------------------------------


def test_origin_uuid_managed_uses_the_setup_id():
    r = _record(managed=True)
    assert stack.origin_uuid(r) == f"FIESNAP-{'5' * 32}-dev"
    # it survives the checkpoint: the same UUID with no checkpoint at all
    assert stack.origin_uuid(r.as_passthrough()) == f"FIESNAP-{'5' * 32}-dev"


def test_origin_uuid_unmanaged_uses_the_checkpoint_id():
    assert stack.origin_uuid(_record(managed=False)) == f"FIESNAP-{'c' * 32}-origin"


def test_create_passthrough_one_linear_over_the_whole_device():
    dm = LayerDM([])
    r = _record().as_passthrough()
    stack.create_passthrough(dm, r)
    (made,) = dm.created
    assert made["name"] == "cp"
    assert made["uuid"] == f"FIESNAP-{'5' * 32}-dev"
    assert made["targets"] == [DmTarget(0, 64 * MiB // 512, "linear", "254:16 0")]
    assert made["targets"] == stack.passthrough_targets(r)
    assert not made["read_only"]
    assert made["udev_flags"] == 0  # users mount it: udev must see it


# --------------------------------------------------------------------------
# reload_as_passthrough (commit, and the end of an instant rollback)
# --------------------------------------------------------------------------


def _reload(monkeypatch, fail: str | None = None, *, mounted: bool = True):
    """A live checkpoint (NAME on snapshot-origin), mounted here or not, switched back."""
    events: list = []
    dm = FakeDM(events, fail if fail != "frozen" else None)
    record = _record()
    dm.live["cp"] = stack.origin_targets(record)
    monkeypatch.setattr(stack.blockdev, "mounts_of",
                        lambda ma, mi: ["/mnt/data"] if mounted and (ma, mi) == (253, 7) else [])

    def refuse_frozen(mountpoints, dev):
        assert dev == os.makedev(253, 7)  # the origin's own device
        events.append(("probe", *mountpoints))
        if fail == "frozen":
            raise FilesystemError(f"{mountpoints[0]} is already frozen (by another tool?): injected")

    return events, dm, record, lambda: stack.reload_as_passthrough(
        dm, record, refuse_frozen=refuse_frozen, on_switch=lambda: events.append(("on_switch",)))


@pytest.mark.parametrize("mounted", [True, False])
def test_reload_checks_for_a_foreign_freeze_then_switches_with_a_lockfs_suspend(monkeypatch, mounted):
    """lockfs: a kill -9 between suspend and resume leaves a freeze the next resume releases."""
    events, dm, record, run = _reload(monkeypatch, mounted=mounted)
    run()
    probe = [("probe", "/mnt/data")] if mounted else [("probe",)]
    assert events == [*probe, ("on_switch",), ("load", "cp", tuple(stack.passthrough_targets(record))),
                      ("suspend", "cp", True), ("resume", "cp"), ("udev", "cp")]
    assert dm.live["cp"] == stack.passthrough_targets(record) and not dm.suspended and not dm.inactive


def test_reload_refused_by_a_foreign_freeze_changes_nothing(monkeypatch):
    """Another tool froze the filesystem: refused before any table is loaded (and before the
    commit's record says committing)."""
    events, dm, record, run = _reload(monkeypatch, "frozen")
    with pytest.raises(FilesystemError, match="already frozen"):
        run()
    assert events == [("probe", "/mnt/data")]
    assert dm.live["cp"] == stack.origin_targets(record) and not dm.inactive and not dm.suspended


@pytest.mark.parametrize("fail", ["suspend", "resume"])
def test_a_failed_reload_leaves_the_origin_live_with_no_table_waiting(monkeypatch, fail):
    events, dm, record, run = _reload(monkeypatch, fail)
    with pytest.raises(Injected):
        run()
    assert dm.live["cp"] == stack.origin_targets(record)  # still saving every overwrite
    assert not dm.inactive, "a pass-through left inactive would go live at the next resume"
    assert not dm.suspended
