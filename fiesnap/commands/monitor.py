"""`fiesnap monitor`: poll every checkpoint and grow stores before they fill.

Why polling: the kernel raises a dm event for a snapshot only when it is
invalidated, never as its store fills, so there is nothing to wait on before
it is too late. Reading snapshot status takes the snapshot's lock, which every
origin write needing a new exception also takes, so poll moderately (default
every 2 s) rather than in a tight loop. What to do is decided by the pure
policy (model/monitor_policy.py); `Monitor` wires it to injected callables, so
the whole loop is tested without device-mapper, a clock or signals, and
`run_monitor` wires those to the real commands. Signal handlers are installed
only while `Monitor.run` runs.

An extension is judged by what the store maps, not by what the file grew by.
One that mapped nothing (every new block was in use at the checkpoint or holds
saved chunks) is said once at error level, with why, and the checkpoint is
stalled: no further allocation for it while nothing maps, only a retry after a
back-off that doubles (30 s, 60 s, ... at most 30 min) or as soon as the
filesystem's free space has grown by what the failed attempt took
(model/monitor_policy.py `Stall` has the rules). Rounds that want growth and
cannot have it return 1, so `--once` exits 1. One that mapped less than asked
(some chunks unsafe) is a warning, once until an extension maps all it got.
A later extension that maps chunks ends the stall and says so.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from fiesnap.commands.extend import ExtendResult, extend, fs_room
from fiesnap.commands import instant
from fiesnap.commands.guards import require_root
from fiesnap.commands.status import status_of
from fiesnap.errors import FiesnapError, StateBusyError
from fiesnap.model.monitor_policy import BAD_STATES, MonitorPolicy, Sample, Stall, decide, stalled
from fiesnap.model.record import validate_name
from fiesnap.model.units import MAX_SIZE, format_bytes
from fiesnap.services.stack import resume_leftovers, suspended_devices
from fiesnap.services.statedir import StateStore

# Longest single sleep, so SIGTERM/SIGINT stop the loop promptly.
SLEEP_SLICE_S = 0.25

LogFn = Callable[[str, str], None]


@dataclass
class _StopFlag:
    """Set by SIGTERM/SIGINT: finish the current round, then return."""

    stop: bool = False
    signum: int | None = None

    def __call__(self, signum: int, _frame: object) -> None:
        self.stop, self.signum = True, signum


class Monitor:
    """Poll every name, grow stores per `decide`, log what matters.

    Adapters are injected: names_provider (re-read each round, so new
    checkpoints are picked up), sample, extend(name, bytes) -> ExtendResult
    (nothing mapped is a result, not an error), fs_room(name), log(level,
    message) with level in debug/info/warning/error.
    """

    def __init__(
        self,
        policy: MonitorPolicy,
        names_provider: Callable[[], list[str]],
        sample: Callable[[str], Sample],
        extend: Callable[[str, int], ExtendResult],
        fs_room: Callable[[str], int],
        log: LogFn,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._policy = policy
        self._names = names_provider
        self._sample = sample
        self._extend = extend
        self._fs_room = fs_room
        self._log = log
        self._clock = clock
        self._sleep = sleep
        self._prev: dict[str, Sample] = {}
        self._last_warnings: dict[str, tuple[str, ...]] = {}
        self._stalls: dict[str, Stall] = {}  # last extension mapped nothing: backing off
        self._short: set[str] = set()  # last extension mapped less than it allocated: said once

    def run(self, once: bool = False, max_rounds: int | None = None) -> int:
        """Poll until SIGTERM/SIGINT (then 0), or for once/max_rounds rounds.

        Returns the last round's status: 0, or 1 if a checkpoint was
        invalid/overflowed or a sample or extension failed.
        """
        if max_rounds is not None and max_rounds < 1:
            raise ValueError(f"max_rounds must be at least 1, not {max_rounds}")
        rounds = 1 if once else max_rounds
        flag = _StopFlag()
        restore = self._install_handlers(flag)
        try:
            done, status = 0, 0
            while True:
                status = self.round()
                done += 1
                if flag.stop:
                    self._log("info", f"stopping on signal {flag.signum}")
                    return 0
                if rounds is not None and done >= rounds:
                    return status
                self._pause(flag)
                if flag.stop:
                    self._log("info", f"stopping on signal {flag.signum}")
                    return 0
        finally:
            restore()

    def round(self) -> int:
        """Sample and serve every name once; 0, or 1 if any name needs attention."""
        try:
            names = list(self._names())
        except FiesnapError as e:
            self._log("error", f"cannot list checkpoints: {e}")
            return 1
        for gone in (set(self._prev) | set(self._stalls) | self._short) - set(names):
            self._prev.pop(gone, None)
            self._last_warnings.pop(gone, None)
            self._stalls.pop(gone, None)
            self._short.discard(gone)
        statuses = [self._serve(n) for n in names]  # every name, even after a failure
        return max(statuses, default=0)

    def _serve(self, name: str) -> int:
        try:
            cur = self._sample(name)
        except FiesnapError as e:
            self._log("error", f"{name}: cannot read usage: {e}")
            self._prev.pop(name, None)
            return 1
        cur = replace(cur, time=self._clock())
        prev = self._prev.get(name)
        self._prev[name] = cur
        status = 1 if cur.state in BAD_STATES else 0
        stall = self._stalls.get(name)
        if stall is not None and stall.ended_by(cur):
            self._stalls.pop(name)
            stall = None
        # Free space only matters when growth is wanted: ask for it only then.
        d = decide(self._policy, prev, cur, MAX_SIZE)
        room = 0
        if d.extend_bytes > 0:
            try:
                room = self._fs_room(name)
                d = decide(self._policy, prev, cur, room)
            except FiesnapError as e:
                self._log("error", f"{name}: cannot read the filesystem's free space: {e}")
                d, status = replace(d, extend_bytes=0), 1
        for msg in d.errors:
            self._log("error", msg)
        last = self._last_warnings.get(name, ())
        for msg in d.warnings:
            if msg not in last:  # the same alarm every poll would drown the log
                self._log("warning", msg)
        self._last_warnings[name] = d.warnings
        if d.extend_bytes <= 0:
            self._log("debug", f"{name}: {d.reason}")
            return status
        retry = None if stall is None else stall.retry_reason(cur.time, room)
        if stall is not None and retry is None:
            self._log("debug", f"{name}: {d.reason}; not growing: the last extension mapped nothing, "
                               f"{stall.waiting(cur.time)}")
            return 1
        self._log("debug", f"{name}: {d.reason}")
        try:
            result = self._extend(name, d.extend_bytes)
        except FiesnapError as e:
            self._log("error", f"{name}: growing the store by {format_bytes(d.extend_bytes)} failed: {e}")
            return 1
        if result.mapped_bytes <= 0:
            return self._nothing_mapped(name, cur, stall, retry, room, result)
        if stall is not None:
            del self._stalls[name]
            self._log("info", f"{name}: the store grows safely again ({retry}): "
                              f"{format_bytes(result.mapped_bytes)} mapped")
        self._log("info", f"{name}: grew the store by {format_bytes(result.mapped_bytes)} ({d.reason})")
        if result.unsafe_chunks == 0:
            self._short.discard(name)
        elif name not in self._short:  # once, until an extension maps everything it got
            self._short.add(name)
            self._log("warning", f"{name}: the store grew by {format_bytes(result.mapped_bytes)} only, the file "
                                 f"by {format_bytes(result.file_grown_bytes)}: {result.unsafe_chunks} new chunks "
                                 f"were unsafe to map ({result.why_unsafe()}) and stay allocated but unmapped")
        return status

    def _nothing_mapped(self, name: str, cur: Sample, stall: Stall | None, retry: str | None,
                        room: int, result: ExtendResult) -> int:
        """An extension that mapped nothing: stall (or stay stalled, waiting longer); say it once."""
        left = room - result.file_grown_bytes  # what the filesystem has left after the attempt
        if stall is None:
            stall = stalled(self._policy, cur.time, left, result.file_grown_bytes, cur.store_bytes)
            self._log("error", f"{name}: {result.nothing_mapped()}; not growing it again for "
                               f"{stall.wait_s:g} s unless free space grows: commit or merge before it fills")
        else:
            stall = stall.after_failure(self._policy, cur.time, left, result.file_grown_bytes)
            self._log("info", f"{name}: retry ({retry}) mapped nothing again, {stall.failures} extensions "
                              f"in a row ({result.why_unsafe()}); {stall.waiting(cur.time)}")
        self._stalls[name] = stall
        return 1

    def _pause(self, flag: _StopFlag) -> None:
        """Sleep one interval in short slices, so a signal stops the wait early."""
        left = self._policy.interval_s
        while left > 0 and not flag.stop:
            step = min(left, SLEEP_SLICE_S)
            self._sleep(step)
            left -= step

    @staticmethod
    def _install_handlers(flag: _StopFlag) -> Callable[[], None]:
        """Route SIGTERM/SIGINT to flag for the duration of run(); main thread only."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        old = {s: signal.signal(s, flag) for s in (signal.SIGTERM, signal.SIGINT)}

        def restore() -> None:
            for s, h in old.items():
                signal.signal(s, h)

        return restore


def run_monitor(name: str | None, policy: MonitorPolicy, dm_factory, state: StateStore,
                say: Callable[[str], None], *, verbose: bool = False, once: bool = False) -> int:
    """Monitor NAME, or every active checkpoint (re-read each round) when NAME is None."""
    require_root()
    if name is not None:
        state.load(validate_name(name))  # an unknown name is the user's mistake (exit 6), not a lost checkpoint
    dm = dm_factory()

    def names() -> list[str]:
        finish_kernel_merges()
        if name:
            return [name]
        return [r.name for r in state.load_all() if r.phase == "active"]

    def finish_kernel_merges() -> None:
        """An instant rollback the kernel has completed is finished here (commands/instant.py)."""
        for r in state.load_all():
            if r.phase != "kernel-merging" or name not in (None, r.name):
                continue
            try:
                with state.locked():
                    instant.finish_if_complete(dm, state, r.name, lambda m: log("info", m))
            except StateBusyError:
                pass  # a command holds the lock (a waiting 'fiesnap merge' finishes it itself)
            except FiesnapError as e:
                log("error", f"{r.name}: the kernel merge could not be finished: {e}")

    def sample(n: str) -> Sample:
        if suspended_devices(dm, state.load(n)):
            heal(n)
        st = status_of(dm, state.load(n))
        u = st.usage
        return Sample(n, st.state, u.total_bytes if u and u.total_bytes else 0, u.used_bytes if u else 0)

    def log(level: str, msg: str) -> None:
        if level != "debug" or verbose:
            say(f"fiesnap monitor: {level}: {msg}")

    def heal(n: str) -> None:
        """A device left suspended by a killed command holds every write: resume it."""
        try:
            with state.locked():
                resume_leftovers(dm, state.load(n), lambda m: log("warning", m))
        except StateBusyError:
            pass  # another command holds the lock: the suspend is its own, and brief

    def grow(n: str, nbytes: int) -> ExtendResult:
        return extend(n, lambda: dm, state, lambda m: log("info", m), by=nbytes)

    return Monitor(policy, names, sample, grow, lambda n: fs_room(dm, state.load(n)), log).run(once=once)
