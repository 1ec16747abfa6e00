"""The watermark monitor's core (fiesnap/monitor.py), with a fake clock and a fake world.

The world is a dict of checkpoints whose writers fill the store as fake time
passes; the kernel's rule is modelled exactly: a store that fills invalidates
the checkpoint.
"""

from __future__ import annotations

import math
import signal
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fiesnap.errors import DeviceMapperError, FilesystemError, FiesnapError, UsageError
from fiesnap.commands.extend import ExtendResult
from fiesnap.commands.monitor import Monitor
from fiesnap.model.extend_plan import ExtensionPlan
from fiesnap.model.extents import ChunkRun
from fiesnap.model.monitor_policy import (BACKOFF_FIRST_S, BACKOFF_MAX_S, Decision, MonitorPolicy, Sample,
                                          decide, parse_step, stalled)

M = 1024**2
G = 1024**3


# -- parse_step ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("64M", (64 * M, None)),
        ("1G", (G, None)),
        ("4096", (4096, None)),
        ("1.5GiB", (3 * G // 2, None)),
        ("50%", (None, 50.0)),
        (" 12.5 % ", (None, 12.5)),
        ("200%", (None, 200.0)),
    ],
)
def test_parse_step(text: str, expected: tuple[int | None, float | None]) -> None:
    assert parse_step(text) == expected


@pytest.mark.parametrize("text", ["", "  ", "abc", "0%", "0.0%", "-5%", "%", "5%%", "%5", "0", "-1G", "1X", "5 %M"])
def test_parse_step_refuses(text: str) -> None:
    with pytest.raises(UsageError) as e:
        parse_step(text)
    assert "\n" not in str(e.value)
    assert "step" in str(e.value)


# -- MonitorPolicy ---------------------------------------------------------------------------


def test_policy_defaults_double_the_store() -> None:
    p = MonitorPolicy()
    assert (p.threshold_pct, p.step_bytes, p.step_pct, p.max_bytes, p.interval_s) == (50.0, None, 100.0, None, 2.0)
    assert p.warn_levels == (80.0, 90.0, 95.0)
    assert p.step_for(8 * M) == 8 * M


def test_policy_step_bytes_alone_is_the_step() -> None:
    p = MonitorPolicy(step_bytes=64 * M)
    assert p.step_pct is None and p.step_for(G) == 64 * M


def test_policy_step_pct_rounds_up() -> None:
    assert MonitorPolicy(step_pct=25.0).step_for(10) == 3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"step_bytes": M, "step_pct": 50.0},
        {"step_bytes": 0},
        {"step_pct": 0.0},
        {"step_pct": math.nan},
        {"threshold_pct": 0.0},
        {"threshold_pct": 100.5},
        {"threshold_pct": math.nan},
        {"max_bytes": 0},
        {"interval_s": 0.0},
        {"interval_s": -1.0},
        {"interval_s": math.inf},
        {"warn_levels": (80.0, 120.0)},
    ],
)
def test_policy_refuses(kwargs: dict[str, object]) -> None:
    with pytest.raises(UsageError) as e:
        MonitorPolicy(**kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(e.value)


def test_policy_sorts_warn_levels() -> None:
    assert MonitorPolicy(warn_levels=(95, 80, 90, 80)).warn_levels == (80.0, 90.0, 95.0)


# -- decide ----------------------------------------------------------------------------------

ROOM = 100 * G


def s(used: int, store: int = 100 * M, t: float = 0.0, state: str = "active", name: str = "data") -> Sample:
    return Sample(name, state, store, used, t)


def test_below_threshold_does_nothing() -> None:
    d = decide(MonitorPolicy(), None, s(49 * M), ROOM)
    assert d == Decision(0, d.reason) and "49.0%" in d.reason


def test_threshold_crossing_extends_by_step_bytes() -> None:
    p = MonitorPolicy(step_bytes=64 * M)
    d = decide(p, s(40 * M, t=0), s(50 * M, t=2), ROOM)
    assert d.extend_bytes == 64 * M
    assert "threshold 50%" in d.reason and d.warnings == () and d.errors == ()


def test_percent_step() -> None:
    assert decide(MonitorPolicy(), None, s(60 * M), ROOM).extend_bytes == 100 * M  # default: double
    assert decide(MonitorPolicy(step_pct=25.0), None, s(60 * M), ROOM).extend_bytes == 25 * M
    assert decide(MonitorPolicy(step_pct=10.0), None, s(7, store=10), ROOM).extend_bytes == 1


def test_custom_threshold() -> None:
    p = MonitorPolicy(threshold_pct=75.0, step_bytes=M)
    assert decide(p, None, s(74 * M), ROOM).extend_bytes == 0
    assert decide(p, None, s(75 * M), ROOM).extend_bytes == M


def test_fast_writer_below_threshold_extends_for_three_intervals() -> None:
    # 10% -> 40% in 2 s: 15 MiB/s; in the next 2 intervals (4 s) it writes 60 MiB and fills the store.
    p = MonitorPolicy(step_bytes=8 * M)
    d = decide(p, s(10 * M, t=0.0), s(40 * M, t=2.0), ROOM)
    assert d.extend_bytes == 15 * M * 3 * 2  # what the rate needs for 3 intervals, above the step
    assert "fills within 4 s" in d.reason and "threshold" not in d.reason


def test_rate_need_only_when_larger_than_step() -> None:
    p = MonitorPolicy(step_bytes=8 * M)
    # 1 MiB/s into a nearly full store: the step is larger than 3 intervals of writes
    d = decide(p, s(97 * M, t=0.0), s(99 * M, t=2.0), ROOM)
    assert d.extend_bytes == 8 * M


def test_slow_writer_below_threshold_does_nothing() -> None:
    p = MonitorPolicy(step_bytes=8 * M)
    assert decide(p, s(10 * M, t=0.0), s(12 * M, t=2.0), ROOM).extend_bytes == 0


def test_rate_ignores_other_names_unordered_times_and_inactive_prev() -> None:
    p = MonitorPolicy(step_bytes=8 * M)
    cur = s(40 * M, t=2.0)
    assert decide(p, s(0, t=0.0, name="other"), cur, ROOM).extend_bytes == 0
    assert decide(p, s(0, t=2.0), cur, ROOM).extend_bytes == 0
    assert decide(p, s(0, t=5.0), cur, ROOM).extend_bytes == 0
    assert decide(p, s(0, t=0.0, state="inactive"), cur, ROOM).extend_bytes == 0
    # usage that went down (a new checkpoint under the same name) is no rate either
    assert decide(p, s(90 * M, t=0.0), cur, ROOM).extend_bytes == 0


def test_max_caps_the_extension() -> None:
    p = MonitorPolicy(max_bytes=150 * M)
    d = decide(p, None, s(60 * M), ROOM)
    assert d.extend_bytes == 50 * M
    assert "--max" in d.reason and d.warnings == ()


def test_at_max_warns_loudly_and_does_not_extend() -> None:
    p = MonitorPolicy(max_bytes=100 * M)
    for store in (100 * M, 120 * M):  # at or (after a policy change) past --max
        d = decide(p, None, s(60 * M, store=store), ROOM)
        assert d.extend_bytes == 0
        (w,) = d.warnings
        assert w.startswith("data: store ") and "at --max 100.0 MiB" in w and "commit" in w


def test_no_fs_room_warns_loudly_and_does_not_extend() -> None:
    d = decide(MonitorPolicy(), None, s(60 * M), 0)
    assert d.extend_bytes == 0
    assert d.warnings == (
        "data: store 60% full and the filesystem has no room left to grow it: commit or free space now",
    )
    assert decide(MonitorPolicy(), None, s(60 * M), -5).extend_bytes == 0


def test_little_fs_room_grows_by_what_is_left_and_warns() -> None:
    d = decide(MonitorPolicy(), None, s(60 * M), 10 * M)
    assert d.extend_bytes == 10 * M
    (w,) = d.warnings
    assert "only 10.0 MiB left on the filesystem" in w and "100.0 MiB" in w


def test_no_fs_room_is_quiet_when_no_growth_is_needed() -> None:
    assert decide(MonitorPolicy(), None, s(10 * M), 0) == decide(MonitorPolicy(), None, s(10 * M), ROOM)


@pytest.mark.parametrize(
    ("prev_pct", "cur_pct", "level"),
    [
        (75, 82, "80%"),
        (85, 90, "90%"),
        (90, 97, "95%"),
        (70, 96, "95%"),  # several levels at once: one warning, the highest
        (None, 85, "80%"),  # first sample already above a level
        (95, 99, None),
        (82, 85, None),
        (85, 82, None),  # going down is no crossing
        (10, 79, None),
    ],
)
def test_warnings_only_when_crossing_upward(prev_pct: int | None, cur_pct: int, level: str | None) -> None:
    p = MonitorPolicy(threshold_pct=100.0)  # keep growth out of it
    prev = None if prev_pct is None else s(prev_pct * M, t=0.0)
    d = decide(p, prev, s(cur_pct * M, t=1000.0), ROOM)
    if level is None:
        assert d.warnings == ()
    else:
        assert d.warnings == (f"data: store {cur_pct}% full (above {level})",)


def test_warning_and_growth_together() -> None:
    d = decide(MonitorPolicy(), s(70 * M, t=0.0), s(85 * M, t=100.0), ROOM)
    assert d.extend_bytes == 100 * M and d.warnings == ("data: store 85% full (above 80%)",)


@pytest.mark.parametrize("state", ["invalid", "overflowed"])
def test_lost_checkpoint_errors_once_and_never_extends(state: str) -> None:
    d = decide(MonitorPolicy(), None, s(100 * M, state=state), ROOM)
    assert d.extend_bytes == 0 and d.warnings == ()
    (e,) = d.errors
    assert e.startswith(f"data: checkpoint is {state}") and "fiesnap commit data" in e and "\n" not in e
    # once: not again while it stays so; again after a change of state
    assert decide(MonitorPolicy(), s(0, state=state), s(0, state=state), ROOM).errors == ()
    assert decide(MonitorPolicy(), s(90 * M), s(0, state=state), ROOM).errors == (e,)


@pytest.mark.parametrize("state", ["inactive", "passthrough", "merging", "starting"])
def test_other_states_are_left_alone_quietly(state: str) -> None:
    d = decide(MonitorPolicy(), s(10 * M, t=0), s(99 * M, t=1, state=state), ROOM)
    assert d == Decision(0, d.reason) and state in d.reason


def test_zero_store_size_is_not_grown() -> None:
    assert decide(MonitorPolicy(), None, s(0, store=0), ROOM).extend_bytes == 0


# -- decide: properties ----------------------------------------------------------------------

STATES = st.sampled_from(["active", "active", "active", "invalid", "overflowed", "inactive", "passthrough"])
SIZES = st.integers(min_value=0, max_value=2**50)


@st.composite
def policies(draw: st.DrawFn) -> MonitorPolicy:
    by_bytes = draw(st.booleans())
    return MonitorPolicy(
        threshold_pct=draw(st.floats(min_value=0.5, max_value=100.0)),
        step_bytes=draw(st.integers(min_value=1, max_value=2**45)) if by_bytes else None,
        step_pct=None if by_bytes else draw(st.floats(min_value=0.1, max_value=1000.0)),
        max_bytes=draw(st.none() | st.integers(min_value=1, max_value=2**50)),
        interval_s=draw(st.floats(min_value=0.01, max_value=600.0)),
    )


@st.composite
def samples(draw: st.DrawFn) -> Sample:
    return Sample("n", draw(STATES), draw(SIZES), draw(SIZES), draw(st.floats(min_value=0, max_value=1e6)))


def _check(p: MonitorPolicy, cur: Sample, room: int, d: Decision) -> None:
    assert isinstance(d.extend_bytes, int) and d.extend_bytes >= 0
    assert d.extend_bytes <= max(0, room)
    if p.max_bytes is not None:
        assert d.extend_bytes <= max(0, p.max_bytes - cur.store_bytes)
        assert d.extend_bytes == 0 or cur.store_bytes + d.extend_bytes <= p.max_bytes
    if cur.state != "active":
        assert d.extend_bytes == 0
    assert all("\n" not in m for m in (d.reason, *d.warnings, *d.errors))


def test_two_polls_a_hair_apart_measure_no_rate() -> None:
    """Samples taken closer than the clock can tell apart: the rate is unknown, not infinite."""
    p = MonitorPolicy(threshold_pct=1.0, step_bytes=None, step_pct=1.0, max_bytes=None, interval_s=1.0)
    prev = Sample("n", "active", 0, 0, 0.0)
    cur = Sample("n", "active", 1, 1, 2.225073858507e-311)
    _check(p, cur, 0, decide(p, prev, cur, 0))


@settings(max_examples=400, deadline=None)
@given(policies(), st.none() | samples(), samples(), st.integers(min_value=-(2**40), max_value=2**50))
def test_decide_never_exceeds_max_or_room(p: MonitorPolicy, prev: Sample | None, cur: Sample, room: int) -> None:
    _check(p, cur, room, decide(p, prev, cur, room))


@settings(max_examples=200, deadline=None)
@given(
    policies(),
    st.integers(min_value=1, max_value=2**40),
    st.lists(st.tuples(STATES, st.integers(min_value=0, max_value=2**40),
                       st.integers(min_value=0, max_value=2**40)), min_size=1, max_size=30),
)
def test_store_grown_by_decisions_stays_within_max(p: MonitorPolicy, store: int,
                                                    steps: list[tuple[str, int, int]]) -> None:
    if p.max_bytes is not None:
        store = min(store, p.max_bytes)
    prev, used, t = None, 0, 0.0
    for state, written, room in steps:
        used += written
        t += p.interval_s
        cur = Sample("n", state, store, used, t)
        d = decide(p, prev, cur, room)
        _check(p, cur, room, d)
        store += d.extend_bytes
        if p.max_bytes is not None:
            assert store <= p.max_bytes
        prev = cur


# -- Monitor with a fake world ---------------------------------------------------------------


CHUNK = 4096


@dataclass
class Checkpoint:
    store: int  # what the store maps (its usable size)
    used: int = 0
    rate: float = 0.0  # bytes per second of new exceptions
    state: str = "active"
    file: int = 0  # the store file's size: the store, plus blocks left unmapped

    def __post_init__(self) -> None:
        self.file = max(self.file, self.store)


@dataclass
class World:
    """Fake checkpoints, filesystem and time; writers advance with the fake clock.

    `unsafe_free` bytes of the free space were freed since the checkpoint (in use then, or
    saved chunks): the filesystem hands them out first, and extend, like the real one, grows
    the file over them but maps only the rest, and returns that result (it does not raise).
    `unsafe_share` of whatever else an extension gets is unsafe too (interleaved blocks).
    """

    cps: dict[str, Checkpoint]
    fs_free: int = 100 * G
    unsafe_free: int = 0
    unsafe_share: float = 0.0
    now: float = 1000.0
    slept: list[float] = field(default_factory=list)
    extends: list[tuple[str, int]] = field(default_factory=list)
    extend_times: list[float] = field(default_factory=list)
    logs: list[tuple[str, str]] = field(default_factory=list)
    fail_extend: set[str] = field(default_factory=set)
    fail_sample: set[str] = field(default_factory=set)
    room_calls: int = 0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        for cp in self.cps.values():
            if cp.state == "active":
                cp.used += int(cp.rate * seconds)
                if cp.used > cp.store:  # the kernel drops the checkpoint
                    cp.used, cp.state = cp.store, "invalid"

    def names(self) -> list[str]:
        return sorted(self.cps)

    def sample(self, name: str) -> Sample:
        if name in self.fail_sample:
            raise DeviceMapperError(f"{name}: no such device")
        cp = self.cps[name]
        return Sample(name, cp.state, cp.store, cp.used)

    def extend(self, name: str, nbytes: int) -> ExtendResult:
        if name in self.fail_extend:
            raise DeviceMapperError(f"{name}-cow: reload failed")
        if nbytes > self.fs_free:
            raise FilesystemError("no space left")
        cp = self.cps[name]
        unsafe = min(nbytes, self.unsafe_free)
        unsafe += int((nbytes - unsafe) * self.unsafe_share) // CHUNK * CHUNK
        mapped = nbytes - unsafe
        self.extends.append((name, nbytes))
        self.extend_times.append(self.now)
        result = ExtendResult(
            name, cp.file, cp.file + nbytes, cp.store, cp.store + mapped,
            ExtensionPlan((ChunkRun(0, mapped // CHUNK),) if mapped else (), mapped // CHUNK,
                          live_at_checkpoint=unsafe // CHUNK, excepted=0, already_mapped=0),
            CHUNK)
        cp.file, cp.store = result.file_bytes_after, result.store_bytes_after
        self.fs_free -= nbytes
        self.unsafe_free -= min(unsafe, self.unsafe_free)
        return result

    def fs_room(self, name: str) -> int:
        self.room_calls += 1
        return self.fs_free

    def log(self, level: str, message: str) -> None:
        assert level in ("debug", "info", "warning", "error")
        assert "\n" not in message
        self.logs.append((level, message))

    def monitor(self, policy: MonitorPolicy | None = None) -> Monitor:
        return Monitor(policy or MonitorPolicy(), self.names, self.sample, self.extend, self.fs_room,
                       self.log, clock=self.clock, sleep=self.sleep)

    def at(self, level: str) -> list[str]:
        return [m for lv, m in self.logs if lv == level]


def test_once_extends_at_threshold_and_does_not_sleep() -> None:
    w = World({"data": Checkpoint(store=8 * M, used=5 * M)})
    assert w.monitor(MonitorPolicy(step_bytes=64 * M)).run(once=True) == 0
    assert w.extends == [("data", 64 * M)] and w.slept == []
    assert any("data: grew the store by 64.0 MiB" in m for m in w.at("info"))


def test_once_healthy_is_zero_and_quiet() -> None:
    w = World({"a": Checkpoint(store=8 * M, used=M), "b": Checkpoint(store=8 * M)})
    assert w.monitor().run(once=True) == 0
    assert w.extends == [] and w.at("warning") == [] and w.at("error") == []
    assert w.room_calls == 0  # free space is only read when growth is wanted


@pytest.mark.parametrize("state", ["invalid", "overflowed"])
def test_once_lost_checkpoint_is_an_error_and_exit_1(state: str) -> None:
    w = World({"a": Checkpoint(store=8 * M, used=7 * M), "b": Checkpoint(store=8 * M, used=8 * M, state=state)})
    assert w.monitor().run(once=True) == 1
    assert w.extends == [("a", 8 * M)]  # the healthy one is still served
    (err,) = w.at("error")
    assert err.startswith(f"b: checkpoint is {state}")


def test_passthrough_and_inactive_are_exit_0() -> None:
    w = World({"a": Checkpoint(store=0, state="passthrough"), "b": Checkpoint(store=8 * M, state="inactive")})
    assert w.monitor().run(once=True) == 0
    assert w.extends == [] and w.at("error") == []


def test_extend_failure_is_logged_and_others_still_served() -> None:
    w = World({"a": Checkpoint(store=8 * M, used=6 * M), "b": Checkpoint(store=8 * M, used=6 * M)},
              fail_extend={"a"})
    assert w.monitor().run(once=True) == 1
    assert w.extends == [("b", 8 * M)]
    assert w.at("error") == ["a: growing the store by 8.0 MiB failed: a-cow: reload failed"]


def test_sample_failure_is_logged_and_others_still_served() -> None:
    w = World({"a": Checkpoint(store=8 * M), "b": Checkpoint(store=8 * M, used=6 * M)}, fail_sample={"a"})
    assert w.monitor().run(once=True) == 1
    assert w.extends == [("b", 8 * M)]
    assert w.at("error") == ["a: cannot read usage: a: no such device"]


def test_fs_room_failure_is_logged_and_nothing_extended() -> None:
    w = World({"a": Checkpoint(store=8 * M, used=6 * M)})

    def broken(name: str) -> int:
        raise FilesystemError("statfs failed")

    m = Monitor(MonitorPolicy(), w.names, w.sample, w.extend, broken, w.log, clock=w.clock, sleep=w.sleep)
    assert m.run(once=True) == 1
    assert w.extends == [] and w.at("error") == ["a: cannot read the filesystem's free space: statfs failed"]


def test_names_provider_failure_is_logged() -> None:
    w = World({})

    def broken() -> list[str]:
        raise FiesnapError("state folder locked")

    m = Monitor(MonitorPolicy(), broken, w.sample, w.extend, w.fs_room, w.log, clock=w.clock, sleep=w.sleep)
    assert m.run(once=True) == 1
    assert w.at("error") == ["cannot list checkpoints: state folder locked"]


def test_unexpected_exceptions_propagate() -> None:
    # a bug must crash the daemon (systemd restarts it), not be swallowed
    w = World({"a": Checkpoint(store=8 * M, used=6 * M)})

    def buggy(name: str, nbytes: int) -> None:
        raise ZeroDivisionError

    m = Monitor(MonitorPolicy(), w.names, w.sample, buggy, w.fs_room, w.log, clock=w.clock, sleep=w.sleep)
    with pytest.raises(ZeroDivisionError):
        m.run(once=True)


def test_sleeps_one_interval_between_rounds_in_short_slices() -> None:
    w = World({"a": Checkpoint(store=8 * M)})
    assert w.monitor(MonitorPolicy(interval_s=2.0)).run(max_rounds=3) == 0
    assert sum(w.slept) == pytest.approx(4.0)
    assert all(0 < x <= 0.25 for x in w.slept)


def test_max_rounds_must_be_positive() -> None:
    with pytest.raises(ValueError):
        World({}).monitor().run(max_rounds=0)


def test_fast_writer_never_overflows() -> None:
    # 8 MiB store, 3 MiB/s writer, 2 s polls, 4 MiB step: growing by the step at the threshold
    # alone loses the checkpoint (next test); the rate headroom keeps it.
    w = World({"data": Checkpoint(store=8 * M, rate=3 * M)})
    w.monitor(MonitorPolicy(step_bytes=4 * M)).run(max_rounds=60)  # 118 s, ~350 MiB written
    cp = w.cps["data"]
    assert cp.state == "active" and cp.used >= 300 * M
    assert w.extends[0] == ("data", 3 * M * 3 * 2)  # sized by the rate, not the step
    assert w.at("error") == [] and not any("(above" in m for m in w.at("warning"))


def test_fast_writer_overflows_without_rate_headroom(monkeypatch: pytest.MonkeyPatch) -> None:
    import fiesnap.model.monitor_policy

    monkeypatch.setattr(fiesnap.model.monitor_policy, "RATE_TRIGGER_INTERVALS", 0)
    monkeypatch.setattr(fiesnap.model.monitor_policy, "RATE_GROWTH_INTERVALS", 0)
    w = World({"data": Checkpoint(store=8 * M, rate=3 * M)})
    w.monitor(MonitorPolicy(step_bytes=4 * M)).run(max_rounds=60)
    assert w.cps["data"].state == "invalid"


def test_full_filesystem_warns_loudly_once_per_change_then_overflow_is_an_error() -> None:
    w = World({"data": Checkpoint(store=8 * M, used=5 * M, rate=M // 4)}, fs_free=0)
    status = w.monitor().run(max_rounds=30)
    assert status == 1 and w.extends == []
    loud = [m for m in w.at("warning") if "no room left" in m]
    assert loud and len(loud) == len(set(loud))  # repeated only when the percentage changes
    assert loud[0] == "data: store 62% full and the filesystem has no room left to grow it: commit or free space now"
    levels = [m for m in w.at("warning") if "(above" in m]
    # 0.5 MiB per poll into 8 MiB: 62.5, 68.75, 75, 81.25, 87.5, 93.75, 100%, then invalid
    assert levels == ["data: store 81% full (above 80%)", "data: store 93% full (above 90%)",
                      "data: store 100% full (above 95%)"]
    (err,) = w.at("error")  # once, although every later round still sees it
    assert err.startswith("data: checkpoint is invalid")


def test_identical_warning_is_not_repeated_every_poll() -> None:
    w = World({"data": Checkpoint(store=8 * M, used=6 * M)}, fs_free=0)  # idle writer
    w.monitor().run(max_rounds=10)
    assert len([m for m in w.at("warning") if "no room left" in m]) == 1


def test_max_stops_growth_and_says_so() -> None:
    w = World({"data": Checkpoint(store=8 * M, rate=M)})
    w.monitor(MonitorPolicy(max_bytes=20 * M)).run(max_rounds=20)
    assert w.cps["data"].store == 20 * M
    assert [n for _, n in w.extends] == [8 * M, 4 * M]
    assert any("at --max 20.0 MiB" in m for m in w.at("warning"))


def test_names_come_and_go() -> None:
    w = World({"a": Checkpoint(store=8 * M)})
    m = w.monitor()
    assert m.run(once=True) == 0
    w.cps["b"] = Checkpoint(store=8 * M, used=7 * M)
    del w.cps["a"]
    assert m.run(once=True) == 0
    assert w.extends == [("b", 8 * M)]


def test_samples_are_stamped_with_the_monitor_clock() -> None:
    # the sample adapter leaves time at 0: the rate must still come from the monitor's clock
    w = World({"data": Checkpoint(store=100 * M, used=10 * M, rate=15 * M)})
    w.monitor(MonitorPolicy(step_bytes=M)).run(max_rounds=2)
    assert w.extends == [("data", 15 * M * 3 * 2)]


# -- extensions that map nothing: one loud error, back-off, recovery -------------------------


def test_fake_extend_returns_zero_growth_like_the_real_one() -> None:
    w = World({"data": Checkpoint(store=8 * M)}, unsafe_free=G)
    r = w.extend("data", 8 * M)  # no exception: a result whose store did not grow
    assert (r.mapped_bytes, r.file_grown_bytes, r.plan.added_chunks, r.unsafe_chunks) == (0, 8 * M, 0, 2048)
    d = r.to_dict()
    assert (d["store_bytes_before"], d["store_bytes_after"], d["store_bytes_added"]) == (8 * M, 8 * M, 0)
    assert (d["file_bytes_before"], d["file_bytes_after"], d["file_bytes_added"]) == (8 * M, 16 * M, 8 * M)
    assert (d["added_chunks"], d["skipped_chunks"], d["skipped_live_at_checkpoint"],
            d["skipped_with_exception"]) == (0, 2048, 2048, 0)
    msg = r.nothing_mapped()
    assert "cannot grow safely" in msg and "2048 were in use at the checkpoint, 0 hold saved chunks" in msg
    assert "\n" not in msg


def test_nothing_mapped_is_one_loud_error_and_exit_1() -> None:
    w = World({"data": Checkpoint(store=8 * M, used=5 * M)}, unsafe_free=G)
    assert w.monitor(MonitorPolicy(step_bytes=64 * M)).run(once=True) == 1
    assert w.extends == [("data", 64 * M)]
    (err,) = w.at("error")
    assert err.startswith("data: the store of 'data' cannot grow safely: none of the 16384 new chunks")
    assert "16384 were in use at the checkpoint, 0 hold saved chunks" in err
    assert "the file grew by 64.0 MiB" in err and "the store stays 8.0 MiB" in err
    assert "not growing it again for 30 s" in err and "commit or merge" in err
    assert not any("grew the store" in m for m in w.at("info"))


def test_nothing_mapped_allocates_no_more_on_the_next_polls() -> None:
    w = World({"data": Checkpoint(store=8 * M, used=5 * M, rate=M // 64)}, unsafe_free=G)
    free = w.fs_free
    assert w.monitor(MonitorPolicy(interval_s=2.0)).run(max_rounds=14) == 1  # 26 s < the back-off
    assert w.extends == [("data", 8 * M)]  # once, not at every poll
    assert w.fs_free == free - 8 * M
    assert len(w.at("error")) == 1
    waiting = [m for m in w.at("debug") if "not growing: the last extension mapped nothing" in m]
    assert len(waiting) == 13 and "next try in 28 s, or once free space grows by 8.0 MiB" in waiting[0]


def test_backoff_doubles_up_to_its_cap() -> None:
    w = World({"data": Checkpoint(store=8 * M, used=5 * M)}, unsafe_free=100 * G)
    w.monitor(MonitorPolicy(interval_s=2.0)).run(max_rounds=500)  # 998 s
    gaps = [b - a for a, b in zip(w.extend_times, w.extend_times[1:])]
    assert gaps == [30.0, 60.0, 120.0, 240.0, 480.0]
    assert len(w.at("error")) == 1  # loud once; the retries are info lines
    again = [m for m in w.at("info") if "mapped nothing again" in m]
    assert len(again) == 5
    assert again[0].startswith("data: retry (back-off of 30 s over) mapped nothing again, 2 extensions in a row "
                               "(2048 were in use at the checkpoint, 0 hold saved chunks); next try in 60 s")
    waits = []
    st = None
    for _ in range(12):
        st = stalled(MonitorPolicy(), 0.0, 0, M, 8 * M, previous=st)
        waits.append(st.wait_s)
    assert waits[:4] == [BACKOFF_FIRST_S, 60.0, 120.0, 240.0] and waits[-1] == BACKOFF_MAX_S
    assert stalled(MonitorPolicy(interval_s=3600.0), 0.0, 0, M, 8 * M).wait_s == 3600.0  # >= one poll


def test_free_space_growing_notably_allows_an_early_retry() -> None:
    w = World({"data": Checkpoint(store=8 * M, used=5 * M)}, unsafe_free=8 * M)
    m = w.monitor(MonitorPolicy(interval_s=2.0))
    assert m.run(max_rounds=3) == 1 and len(w.extends) == 1
    w.fs_free += 4 * M  # less than the failed attempt took: not notable
    assert m.run(max_rounds=2) == 1 and len(w.extends) == 1
    w.fs_free += 4 * M  # now 8 MiB more than after the attempt (say, an unwritten file deleted)
    assert m.run(once=True) == 0
    assert len(w.extends) == 2 and w.now - w.extend_times[0] < BACKOFF_FIRST_S
    assert any("grows safely again (free space grew by 8.0 MiB)" in x for x in w.at("info"))


def test_a_later_extension_that_maps_chunks_ends_the_stall() -> None:
    # the first 8 MiB the filesystem hands out are unsafe, then safe blocks again
    w = World({"data": Checkpoint(store=8 * M, used=5 * M, rate=M // 32)}, unsafe_free=8 * M)
    status = w.monitor(MonitorPolicy(interval_s=2.0)).run(max_rounds=20)
    assert status == 0  # the last round is healthy again
    assert w.extends == [("data", 8 * M), ("data", 8 * M)]
    assert w.extend_times[1] - w.extend_times[0] == BACKOFF_FIRST_S
    cp = w.cps["data"]
    assert (cp.store, cp.file, cp.state) == (16 * M, 24 * M, "active")
    assert len(w.at("error")) == 1
    info = w.at("info")
    assert "data: the store grows safely again (back-off of 30 s over): 8.0 MiB mapped" in info
    assert any(x.startswith("data: grew the store by 8.0 MiB (") for x in info)
    # growth works normally afterwards: no back-off left over
    cp.used = 12 * M
    assert w.monitor(MonitorPolicy(interval_s=2.0)).run(once=True) == 0 and len(w.extends) == 3


def test_partial_mapping_is_one_warning_and_counts_mapped_bytes() -> None:
    w = World({"data": Checkpoint(store=8 * M, used=7 * M)}, unsafe_share=0.5)
    m = w.monitor(MonitorPolicy(step_bytes=4 * M, interval_s=2.0))
    assert m.run(max_rounds=5) == 0  # half of each extension maps: 8 -> 10 -> 12 -> 14 -> 16 MiB
    assert w.extends == [("data", 4 * M)] * 4 and w.cps["data"].store == 16 * M
    info = [x for x in w.at("info") if "grew the store by" in x]
    assert [x.split(" (")[0] for x in info] == ["data: grew the store by 2.0 MiB"] * 4  # mapped, not 4 MiB
    short = [x for x in w.at("warning") if "only" in x]
    assert short == ["data: the store grew by 2.0 MiB only, the file by 4.0 MiB: 512 new chunks were unsafe "
                     "to map (512 were in use at the checkpoint, 0 hold saved chunks) and stay allocated but "
                     "unmapped"]  # once, not at each of the four
    assert w.at("error") == []
    w.unsafe_share, w.cps["data"].used = 0.0, 9 * M  # a full extension ends the episode ...
    assert m.run(once=True) == 0 and w.cps["data"].store == 20 * M
    w.unsafe_share, w.cps["data"].used = 0.5, 15 * M  # ... so the next short one is said again
    assert m.run(once=True) == 0
    assert len([x for x in w.at("warning") if "only" in x]) == 2


def test_a_new_checkpoint_under_the_same_name_is_not_held_back() -> None:
    w = World({"data": Checkpoint(store=8 * M, used=5 * M)}, unsafe_free=8 * M)
    m = w.monitor(MonitorPolicy(interval_s=2.0))
    assert m.run(max_rounds=2) == 1 and len(w.extends) == 1
    w.cps["data"] = Checkpoint(store=4 * M, used=3 * M)  # committed and started again
    assert m.run(once=True) == 0 and len(w.extends) == 2


def test_cli_extend_that_maps_nothing_prints_json_and_exits_7(monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    import json

    import fiesnap.cli

    w = World({"data": Checkpoint(store=8 * M)}, unsafe_free=G)
    import fiesnap.commands.extend

    monkeypatch.setattr(fiesnap.commands.extend, "extend", lambda name, *a, by=None, to=None: w.extend(name, by))
    monkeypatch.setattr(fiesnap.cli, "_ready", lambda **kw: None)  # the extend above stands in for dm
    for args, shown in ((["--json"], True), ([], False)):
        monkeypatch.setattr(sys, "argv", ["fiesnap", "extend", "data", "--by", "16M", *args])
        with pytest.raises(SystemExit) as e:
            fiesnap.cli.main()
        assert e.value.code == 7
        out, errout = capsys.readouterr()
        if shown:
            d = json.loads(out)
            assert (d["store_bytes_added"], d["file_bytes_added"], d["added_chunks"]) == (0, 16 * M, 0)
            assert d["store_bytes_before"] == d["store_bytes_after"] == 8 * M
        else:
            assert out == ""
        assert errout.count("\n") == 1 and errout.startswith("fiesnap: error: the store of 'data' cannot grow safely")
        assert errout.rstrip().endswith("commit or merge before it fills")


# -- signals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_a_round_finishes_it_then_returns_0(signum: int) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    w = World({"a": Checkpoint(store=8 * M), "b": Checkpoint(store=8 * M, used=7 * M),
               "c": Checkpoint(store=8 * M, state="invalid")})
    seen: list[str] = []

    def sample(name: str) -> Sample:
        seen.append(name)
        if name == "a" and seen.count("a") == 2:
            signal.raise_signal(signum)
        return w.sample(name)

    m = Monitor(MonitorPolicy(), w.names, sample, w.extend, w.fs_room, w.log, clock=w.clock, sleep=w.sleep)
    assert m.run() == 0  # would loop forever without the signal; 0 despite "c" being invalid
    assert seen == ["a", "b", "c", "a", "b", "c"]  # the second round was completed
    assert w.extends == [("b", 8 * M)]
    assert {s: signal.getsignal(s) for s in before} == before  # handlers restored


def test_signal_during_the_sleep_stops_the_wait() -> None:
    w = World({"a": Checkpoint(store=8 * M)})

    def sleep(seconds: float) -> None:
        w.sleep(seconds)
        signal.raise_signal(signal.SIGTERM)

    m = Monitor(MonitorPolicy(interval_s=60.0), w.names, w.sample, w.extend, w.fs_room, w.log,
                clock=w.clock, sleep=sleep)
    assert m.run() == 0
    assert len(w.slept) == 1  # not 240 slices of 0.25 s


def test_import_installs_no_signal_handler() -> None:
    code = ("import signal, fiesnap.commands.monitor; "
            "assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL; "
            "assert signal.getsignal(signal.SIGINT) is signal.default_int_handler")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_run_outside_the_main_thread_installs_nothing() -> None:
    import threading

    w = World({"a": Checkpoint(store=8 * M)})
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(w.monitor().run(once=True)))
    t.start()
    t.join(30)
    assert result == [0]
