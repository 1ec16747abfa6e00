"""The update lifecycle: boot attempts counted by activate, rollback when they are spent,
commit when boot-complete.target is reached (model/lifecycle.py, commands/activate.py,
commands/commit.py), with the fakes of test_activate.

The merge and the commit are replaced by fakes that move the record through the phases the
real ones save (the real ones run in the lab: tests/kernel/update_boots.py); everything
else, the decision, the record and the state folder, is the real code.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_activate import BOOT, OLD_BOOT, Env, _active, _passthrough

from fiesnap.commands import activate, commit, start
from fiesnap.errors import DeviceError, RefusedError, StateError, UsageError
from fiesnap.model.lifecycle import COUNT, EXPOSE, ROLL_BACK, attempts_of, commits_at_boot_complete, decide_at_boot
from fiesnap.model.record import MAX_BOOT_ATTEMPTS, CheckpointRecord
from fiesnap.services.statedir import StateStore

THIRD_BOOT = "0a1b2c3d-0000-4000-8000-00000000000c"


def _update(attempts: int = 2, used: int = 0, *, attempt_boot: str = "", built_boot: str = OLD_BOOT,
            name: str = "cp", phase: str = "active", auto: str = "") -> CheckpointRecord:
    r = _active(name).with_boot_attempts(attempts)
    return replace(r, attempts_used=used, attempt_boot=attempt_boot, built_boot=built_boot,
                   built_at=1_000 if built_boot else 0, phase=phase, auto_rollback=auto)


# -------------------------------------------------------------------- the decision (pure)

def test_a_checkpoint_without_boot_attempts_is_only_exposed():
    assert decide_at_boot(_active(), BOOT) == EXPOSE
    assert attempts_of(_active(), BOOT) is None


def test_each_new_boot_counts_until_the_attempts_are_spent():
    assert decide_at_boot(_update(2, 0), BOOT) == COUNT
    assert decide_at_boot(_update(2, 1, attempt_boot=OLD_BOOT), BOOT) == COUNT
    assert decide_at_boot(_update(2, 2, attempt_boot=OLD_BOOT), BOOT) == ROLL_BACK


def test_the_boot_that_counted_or_started_it_counts_nothing_more():
    assert decide_at_boot(_update(2, 1, attempt_boot=BOOT), BOOT) == EXPOSE
    assert decide_at_boot(_update(1, 1, attempt_boot=BOOT), BOOT) == EXPOSE  # its last attempt: still up
    assert decide_at_boot(_update(2, 0, built_boot=BOOT), BOOT) == EXPOSE  # started in this boot


def test_a_rollback_once_decided_is_never_exposed_again():
    r = _update(2, 2, attempt_boot=OLD_BOOT, auto="spent")
    assert decide_at_boot(r, BOOT) == ROLL_BACK
    assert decide_at_boot(replace(r, attempt_boot=BOOT), BOOT) == ROLL_BACK


@given(allowed=st.integers(1, 6), boots=st.lists(st.sampled_from([BOOT, OLD_BOOT, THIRD_BOOT]), max_size=20))
def test_no_boot_id_is_ever_counted_twice_and_no_more_than_allowed(allowed, boots):
    """Boots in any order (an id seen again is activate run again in that boot): the count
    is the number of boot changes, capped, and what follows the cap is a rollback."""
    r = _update(allowed, 0, built_boot="")
    counted = []
    for b in boots:
        d = decide_at_boot(r, b)
        if d == COUNT:
            assert b != r.attempt_boot
            r = r.attempt_counted(b)
            counted.append(b)
        elif d == ROLL_BACK:
            assert r.attempts_used == allowed and b != r.attempt_boot
    assert len(counted) <= allowed
    assert all(a != b for a, b in zip(counted, counted[1:]))


def test_boot_complete_commits_only_what_this_boot_counted():
    assert commits_at_boot_complete(_update(2, 1, attempt_boot=BOOT), BOOT)
    assert not commits_at_boot_complete(_update(2, 1, attempt_boot=OLD_BOOT), BOOT)
    assert not commits_at_boot_complete(_update(2, 0, built_boot=BOOT), BOOT)  # started now: untried
    assert not commits_at_boot_complete(_active(), BOOT)
    assert not commits_at_boot_complete(_update(2, 2, attempt_boot=BOOT, auto="x"), BOOT)
    assert attempts_of(_update(3, 1, attempt_boot=BOOT), BOOT).to_dict() == {
        "allowed": 3, "used": 1, "left": 2, "on_trial": True}


# -------------------------------------------------------------------- the record

def test_boot_fields_round_trip_and_vanish_with_the_checkpoint():
    r = _update(3, 2, attempt_boot=BOOT, auto="why")
    back = CheckpointRecord.from_dict(r.to_dict())
    assert (back.boot_attempts, back.attempts_used, back.attempt_boot, back.auto_rollback) == (3, 2, BOOT, "why")
    done = r.with_phase("merging").with_phase("copied").as_passthrough()
    assert (done.boot_attempts, done.attempts_used, done.attempt_boot, done.auto_rollback) == (0, 0, "", "")
    fresh = replace(r, phase="starting").with_checkpoint(checkpoint_id="d" * 32, store_type="PO", chunk_bytes=4096,
                              store_relpath="s", store_file_bytes=r.store_file_bytes,
                              extents=r.store_extents, created="t", mode="online")
    assert fresh.boot_attempts == 0 and fresh.attempt_boot == ""


@pytest.mark.parametrize("n", [0, -1, MAX_BOOT_ATTEMPTS + 1, True, 2.0])
def test_boot_attempts_out_of_range_is_a_usage_error(n):
    with pytest.raises(UsageError, match="--boot-attempts must be a whole number"):
        _active().with_boot_attempts(n)


def test_no_attempt_is_counted_past_the_last():
    with pytest.raises(StateError):
        _update(1, 1).attempt_counted(BOOT)


@pytest.mark.parametrize("change, field", [
    ({"boot_attempts_used": 3}, "boot_attempts_used"),
    ({"boot_attempts": MAX_BOOT_ATTEMPTS + 1}, "boot_attempts"),
    ({"attempt_boot": "../../x"}, "attempt_boot"),
    ({"boot_attempts": 0, "boot_attempts_used": 0}, "attempt_boot"),
    ({"managed": False}, "boot_attempts"),
    ({"phase": "committing"}, "auto_rollback"),
])
def test_the_parser_refuses_inconsistent_boot_fields(change, field):
    data = {**_update(2, 1, attempt_boot=BOOT, auto="why").to_dict(), **change}
    with pytest.raises(StateError, match=f"field {field!r}"):
        CheckpointRecord.from_dict(data)


def test_records_written_before_boot_attempts_existed_still_load():
    data = _active().to_dict()
    for k in ("boot_attempts", "boot_attempts_used", "attempt_boot", "auto_rollback"):
        del data[k]
    assert CheckpointRecord.from_dict(data).boot_attempts == 0


# -------------------------------------------------------------------- activate

class FakeMerge:
    """merge_locked as the real one moves the record: refusals before `merging` change nothing;
    otherwise merging, copied, then the pass-through (a device under fiesnap)."""

    def __init__(self, env: Env, refuse: Exception | None = None, die_after_merging: bool = False):
        self.env, self.refuse, self.die = env, refuse, die_after_merging
        self.calls: list[CheckpointRecord] = []

    def __call__(self, dm, record, state: StateStore, log, *, keep_store=False, progress_factory=None):
        assert dm is self.env.dm
        self.calls.append(record)
        assert state.load(record.name) == record, "the decision must be saved before the merge"
        if record.phase == "active":
            if self.refuse is not None:
                raise self.refuse
            record = record.with_phase("merging")
            state.save(record)
            if self.die:
                raise KeyboardInterrupt  # the power cut
        progress = progress_factory(100)
        progress.advance(55)
        progress.advance(45)
        progress.close()
        state.save(record.with_phase("copied"))
        state.save(record.with_phase("copied").as_passthrough())
        self.env.events.append(("merged", record.name))
        return None


@pytest.fixture
def env(monkeypatch, tmp_path) -> Env:
    e = Env(monkeypatch, tmp_path)
    e.merge = FakeMerge(e)
    monkeypatch.setattr(activate, "merge_locked", lambda *a, **kw: e.merge(*a, **kw))
    return e


def test_activate_counts_the_attempt_durably_before_building(env, monkeypatch):
    env.state.save(_update(2, 0))
    saved_at_build = []
    build = env._build_stack

    def build_stack(dm, record, **kw):
        saved_at_build.append(env.state.load(record.name))
        return build(dm, record, **kw)

    monkeypatch.setattr(activate, "build_stack", build_stack)
    (res,) = env.activate("cp")
    assert (res.result, res.attempts.used, res.attempts.left, res.attempts.on_trial) == ("activated", 1, 1, True)
    assert saved_at_build[0].attempts_used == 1 and saved_at_build[0].attempt_boot == BOOT
    assert "'cp': boot attempt 1 of 2 of the update" in env.logged
    assert res.to_dict()["boot_attempts"] == {"allowed": 2, "used": 1, "left": 1, "on_trial": True}


def test_activate_twice_in_one_boot_counts_once(env):
    env.state.save(_update(2, 0))
    env.activate("cp")
    env.dm.present.clear()  # taken down (deactivate), brought up again in the same boot
    env.activate("cp")
    assert env.state.load("cp").attempts_used == 1
    assert env.kinds().count("build_stack") == 2


def test_activate_of_a_checkpoint_started_in_this_boot_counts_nothing(env):
    env.state.save(_update(2, 0, built_boot=BOOT))
    (res,) = env.activate("cp")
    assert res.result == "activated" and env.state.load("cp").attempts_used == 0
    assert not res.attempts.on_trial


def test_a_failed_identity_check_spends_no_attempt(env):
    env.state.save(_update(2, 0))
    env.blocks["/dev/vdcp"] = b"\0" * 4096
    with pytest.raises(Exception):
        env.activate("cp")
    assert env.state.load("cp").attempts_used == 0


def test_spent_attempts_roll_back_instead_of_exposing(env):
    env.state.save(_update(2, 2, attempt_boot=OLD_BOOT))
    (res,) = env.activate("cp")
    assert res.result == "rolled back" and "all 2 boot attempts of the update were used" in res.detail
    assert "build_stack" not in env.kinds() and ("merged", "cp") in env.events
    assert env.merge.calls[0].auto_rollback  # saved before the merge began
    assert env.state.load("cp").phase == "passthrough"
    assert any(line.startswith("'cp': rollback 50% copied (55 B of 100 B, ") for line in env.logged)  # how far, how fast


def test_a_rollback_cut_short_is_finished_by_the_next_activate(env):
    env.state.save(_update(1, 1, attempt_boot=OLD_BOOT))
    env.merge.die = True
    with pytest.raises(KeyboardInterrupt):
        env.activate("cp")
    r = env.state.load("cp")
    assert (r.phase, bool(r.auto_rollback)) == ("merging", True)
    env.merge.die = False
    env.boot = (THIRD_BOOT, 3_000)
    (res,) = env.activate("cp")
    assert res.result == "rolled back" and env.state.load("cp").phase == "passthrough"
    assert "build_stack" not in env.kinds()


def test_a_manual_rollback_cut_short_is_still_left_to_merge(env):
    env.state.save(_update(1, 1, attempt_boot=OLD_BOOT, phase="merging"))
    with pytest.raises(RefusedError, match="run 'fiesnap merge cp' to finish it"):
        env.activate("cp")
    assert env.merge.calls == []


def test_a_refused_rollback_exposes_nothing_and_says_what_to_do(env):
    env.state.save(_update(1, 1, attempt_boot=OLD_BOOT))
    env.merge.refuse = RefusedError("checkpoint 'cp' is invalid: the store did not keep every change")
    with pytest.raises(RefusedError) as e:
        env.activate("cp")
    msg = str(e.value)
    assert "cannot be rolled back" in msg and "'fiesnap commit cp' keeps the update's data" in msg
    assert "\n" not in msg
    r = env.state.load("cp")
    assert r.phase == "active" and r.auto_rollback and r.attempts_used == 1
    assert "build_stack" not in env.kinds()
    # the next boot decides nothing anew: it tries the rollback again, never exposes
    env.boot = (THIRD_BOOT, 3_000)
    with pytest.raises(RefusedError):
        env.activate("cp")
    assert "build_stack" not in env.kinds() and len(env.merge.calls) == 2


def test_activate_all_rolls_back_one_and_counts_another(env):
    env.state.save(_update(1, 1, attempt_boot=OLD_BOOT, name="a"))
    env.state.save(replace(_update(3, 1, attempt_boot=OLD_BOOT, name="b"), device_minor=17, device="/dev/vdb"))
    env.state.save(_passthrough("c", minor=18))
    got = {r.name: r.result for r in env.activate(None)}
    assert got == {"a": "rolled back", "b": "activated", "c": "activated"}
    assert env.state.load("b").attempts_used == 2


# -------------------------------------------------------------------- commit --boot-complete

@pytest.fixture
def committed(monkeypatch, env):
    done = []

    def fake_commit(dm, record, state, log):
        state.save(record.with_phase("committing"))
        state.save(record.with_phase("committing").as_passthrough())
        done.append(record.name)
        return "passthrough"

    monkeypatch.setattr(commit, "_commit_locked", fake_commit)
    monkeypatch.setattr(commit, "require_root", lambda: None)
    return done


def _boot_complete(env):
    return {v.name: (v.result, v.detail) for v in commit.commit_boot_complete(lambda: env.dm, env.state,
                                                                               env.logged.append)}


def test_boot_complete_commits_the_checkpoints_this_boot_tried(env, committed):
    env.state.save(_update(2, 1, attempt_boot=BOOT, name="tried"))
    env.state.save(_update(2, 1, attempt_boot=OLD_BOOT, name="earlier"))
    env.state.save(_update(2, 0, built_boot=BOOT, name="new"))
    env.state.save(_active("plain"))
    env.state.save(_passthrough("idle"))
    got = _boot_complete(env)
    assert committed == ["tried"]
    assert got["tried"] == ("committed", "boot attempt 1 of 2 succeeded")
    assert got["earlier"][0] == got["new"][0] == "skipped"
    assert "plain" not in got and "idle" not in got
    assert env.state.load("tried").phase == "passthrough"
    assert env.state.load("earlier").boot_attempts == 2


def test_boot_complete_with_nothing_to_do_changes_nothing(env, committed):
    env.state.save(_active("plain"))
    assert _boot_complete(env) == {}
    assert committed == []


def test_boot_complete_goes_on_past_a_failure(env, committed, monkeypatch):
    env.state.save(_update(2, 1, attempt_boot=BOOT, name="a"))
    env.state.save(_update(2, 1, attempt_boot=BOOT, name="b"))

    def commit_b_fails(dm, record, state, log):
        if record.name == "a":
            raise RefusedError("injected")
        committed.append(record.name)
        state.save(record.with_phase("committing").as_passthrough())
        return "passthrough"

    monkeypatch.setattr(commit, "_commit_locked", commit_b_fails)
    with pytest.raises(RefusedError, match="1 update checkpoints could not be committed; first: injected"):
        _boot_complete(env)
    assert committed == ["b"] and env.state.load("a").phase == "active"


# -------------------------------------------------------------------- start

def test_boot_attempts_need_a_device_under_fiesnap(env, monkeypatch, tmp_path):
    monkeypatch.setattr(start, "require_root", lambda: None)
    dev = tmp_path / "disk"
    dev.write_bytes(b"")
    req = start.StartRequest(str(dev), 64 << 20, boot_attempts=2)
    with pytest.raises(UsageError, match="--boot-attempts needs a device under fiesnap"):
        start.start(req, lambda: env.dm, env.state, env.logged.append)
    with pytest.raises(UsageError, match="from 1 to"):
        start.start(replace(req, boot_attempts=0), lambda: env.dm, env.state, env.logged.append)
    assert env.events == [] and env.state.names() == []


def test_unless_active_leaves_a_checkpoint_as_it_is(env, monkeypatch):
    monkeypatch.setattr(start, "require_root", lambda: None)
    before = _update(3, 1, attempt_boot=OLD_BOOT)
    env.state.save(before)
    record, started = start.start_unless_active(
        start.StartRequest("cp", 64 << 20, boot_attempts=3, unless_active=True),
        lambda: env.dm, env.state, env.logged.append)
    assert not started and record == before and env.state.load("cp") == before
    assert env.events == []
    assert any("holds a checkpoint already" in m for m in env.logged)
    with pytest.raises(RefusedError, match="has a checkpoint already"):
        start.start(start.StartRequest("cp", 64 << 20), lambda: env.dm, env.state, env.logged.append)


def test_a_retried_activate_does_not_count_the_same_boot_again(env, monkeypatch):
    """--wait retries a name whose device was not ready: the try that failed after counting
    must not make the retry count a second attempt (records are read again per try)."""
    env.state.save(_update(3, 0))
    build = env._build_stack
    fails = [DeviceError("/dev/vdcp is not there yet")]

    def build_stack(dm, record, **kw):
        if fails:
            raise fails.pop()
        return build(dm, record, **kw)

    monkeypatch.setattr(activate, "build_stack", build_stack)
    (res,) = env.activate(None, wait_seconds=5)
    assert res.result == "activated" and ("sleep", 0.5) in env.events
    assert env.state.load("cp").attempts_used == 1
    assert sum("boot attempt" in m for m in env.logged) == 1, env.logged  # counted once, not recounted


@pytest.mark.parametrize("phase", ["starting", "merging", "committing"])
def test_unless_active_refuses_a_checkpoint_that_cannot_roll_back(env, monkeypatch, phase):
    """An update hook must stop on an interrupted checkpoint, not go on unprotected."""
    monkeypatch.setattr(start, "require_root", lambda: None)
    env.state.save(_update(3, 0, phase=phase))
    with pytest.raises(RefusedError, match=f"not active \\({phase}\\)"):
        start.start(start.StartRequest("cp", 64 << 20, boot_attempts=3, unless_active=True),
                    lambda: env.dm, env.state, env.logged.append)
    assert env.state.load("cp").phase == phase


def test_unless_active_refuses_a_store_the_kernel_gave_up(env, monkeypatch):
    from test_activate import _info

    monkeypatch.setattr(start, "require_root", lambda: None)
    env.state.save(_update(3, 0))
    env.dm.present.update({"cp": _info(1), "cp-snap": _info(2), "cp-cow": _info(3)})
    env.dm.status = lambda name: [(0, 100, "snapshot", "Overflow")]
    with pytest.raises(RefusedError, match="holds a checkpoint that is overflowed"):
        start.start(start.StartRequest("cp", 64 << 20, unless_active=True),
                    lambda: env.dm, env.state, env.logged.append)
