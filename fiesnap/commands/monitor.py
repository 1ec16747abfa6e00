"""Watermark monitor: grow each checkpoint's store before it fills.

Why polling: the kernel raises a dm event for a snapshot only when it is
invalidated, never as its store fills, so there is nothing to wait on before
it is too late. Reading snapshot status takes the snapshot's lock, which every
origin write needing a new exception also takes, so poll moderately (default
every 2 s) rather than in a tight loop. Growth is decided from the used
fraction (threshold) and from the write rate between two polls, so a fast
writer gets headroom for the time until the next poll and the extension.

The decision is pure (`decide`); `Monitor` only wires it to callables, so the
whole loop is tested without device-mapper, a clock or signals.
"""

from __future__ import annotations

import math
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from fiesnap.errors import FiesnapError, UsageError
from fiesnap.model.units import MAX_SIZE, format_bytes, parse_size

ACTIVE = "active"
BAD_STATES = frozenset({"invalid", "overflowed"})

# Extend when the store would fill within this many poll intervals at the
# current rate (one until the next poll, one for the extension itself) ...
RATE_TRIGGER_INTERVALS = 2
# ... and then by at least what that rate writes in this many intervals.
RATE_GROWTH_INTERVALS = 3
# Longest single sleep, so SIGTERM/SIGINT stop the loop promptly.
SLEEP_SLICE_S = 0.25

_PCT_RE = re.compile(r"\s*(?P<num>[0-9]+(?:\.[0-9]+)?|\.[0-9]+)\s*%\s*", re.ASCII)


def parse_step(text: str) -> tuple[int | None, float | None]:
    """"64M" -> (bytes, None); "50%" -> (None, 50.0): a size or a share of the store."""
    bad = f"invalid step {text!r}: use a size (64M, 1G) or a percentage of the store (50%)"
    if not isinstance(text, str) or not text.strip():
        raise UsageError(bad)
    m = _PCT_RE.fullmatch(text)
    if m is not None:
        pct = float(m.group("num"))
        if not math.isfinite(pct) or pct <= 0:
            raise UsageError(f"invalid step {text!r}: the percentage must be greater than zero")
        return None, pct
    if "%" in text:
        raise UsageError(bad)
    try:
        return parse_size(text), None
    except UsageError:
        raise UsageError(bad) from None


def _pct_ok(value: float, lo_exclusive: float, hi: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and lo_exclusive < value <= hi


@dataclass(frozen=True)
class MonitorPolicy:
    """When and by how much to grow a store.

    Give at most one of step_bytes / step_pct; with neither, the step is 100%
    (double the store), so a store grown at 50% full drops back to 25%.
    """

    threshold_pct: float = 50.0
    step_bytes: int | None = None
    step_pct: float | None = None
    max_bytes: int | None = None
    interval_s: float = 2.0
    warn_levels: tuple[float, ...] = (80.0, 90.0, 95.0)

    def __post_init__(self) -> None:
        if self.step_bytes is None and self.step_pct is None:
            object.__setattr__(self, "step_pct", 100.0)
        elif self.step_bytes is not None and self.step_pct is not None:
            raise UsageError("give the step as a size or as a percentage, not both")
        if not _pct_ok(self.threshold_pct, 0.0, 100.0):
            raise UsageError(f"invalid threshold {self.threshold_pct!r}: use a percentage above 0, at most 100")
        if self.step_bytes is not None and (not isinstance(self.step_bytes, int) or self.step_bytes <= 0):
            raise UsageError(f"invalid step {self.step_bytes!r}: must be a positive number of bytes")
        if self.step_pct is not None and not _pct_ok(self.step_pct, 0.0, math.inf):
            raise UsageError(f"invalid step {self.step_pct!r}%: the percentage must be greater than zero")
        if self.max_bytes is not None and (not isinstance(self.max_bytes, int) or self.max_bytes <= 0):
            raise UsageError(f"invalid --max {self.max_bytes!r}: must be a positive number of bytes")
        if not _pct_ok(self.interval_s, 0.0, 86400.0):
            raise UsageError(f"invalid interval {self.interval_s!r}: use seconds above 0, at most 86400")
        levels = tuple(float(v) for v in self.warn_levels)
        if any(not _pct_ok(v, 0.0, 100.0) for v in levels):
            raise UsageError(f"invalid warning levels {self.warn_levels!r}: use percentages above 0, at most 100")
        object.__setattr__(self, "warn_levels", tuple(sorted(set(levels))))

    def step_for(self, store_bytes: int) -> int:
        """The configured step in bytes for a store of this size."""
        if self.step_bytes is not None:
            return self.step_bytes
        assert self.step_pct is not None
        return math.ceil(store_bytes * self.step_pct / 100)


@dataclass(frozen=True)
class Sample:
    """One reading of a checkpoint. `time` is monotonic seconds (Monitor stamps it)."""

    name: str
    state: str
    store_bytes: int
    used_bytes: int
    time: float = 0.0

    @property
    def used_pct(self) -> float:
        if self.store_bytes <= 0:
            return 100.0 if self.used_bytes > 0 else 0.0
        return 100.0 * self.used_bytes / self.store_bytes


@dataclass(frozen=True)
class Decision:
    """What to do about one sample: grow by extend_bytes (0: nothing), and what to log.

    `warnings` are logged at warning level, `errors` (a checkpoint already
    lost) at error level.
    """

    extend_bytes: int
    reason: str
    warnings: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()


def _fmt_pct(p: float) -> str:
    return f"{p:g}%"


def _rate(prev: Sample | None, cur: Sample) -> float:
    """Bytes per second written into the store since prev (0 when unknown)."""
    if prev is None or prev.name != cur.name or prev.state != ACTIVE or cur.time <= prev.time:
        return 0.0
    return max(0.0, (cur.used_bytes - prev.used_bytes) / (cur.time - prev.time))


def _crossed_level(policy: MonitorPolicy, prev: Sample | None, cur: Sample) -> float | None:
    """Highest warning level reached by cur and not by prev (upward crossing)."""
    before = prev.used_pct if prev is not None and prev.name == cur.name and prev.state == ACTIVE else 0.0
    now = cur.used_pct
    crossed = [lvl for lvl in policy.warn_levels if before < lvl <= now]
    return crossed[-1] if crossed else None


def decide(policy: MonitorPolicy, prev: Sample | None, cur: Sample, fs_room_bytes: int) -> Decision:
    """Whether and by how much to grow cur's store; pure.

    fs_room_bytes is what the filesystem can still give the store file.
    """
    name = cur.name
    if cur.state != ACTIVE:
        errors: tuple[str, ...] = ()
        if cur.state in BAD_STATES and (prev is None or prev.name != name or prev.state != cur.state):
            errors = (f"{name}: checkpoint is {cur.state}, its changes are no longer all saved: "
                      f"a rollback is impossible, only 'fiesnap commit {name}' remains",)
        return Decision(0, f"{cur.state}: nothing to grow", errors=errors)
    if cur.store_bytes <= 0:
        return Decision(0, "store size unknown: nothing to grow")

    pct = cur.used_pct
    whole = math.floor(pct)  # never round up to a level not yet reached
    warnings: list[str] = []
    level = _crossed_level(policy, prev, cur)
    if level is not None:
        warnings.append(f"{name}: store {whole}% full (above {_fmt_pct(level)})")

    rate = _rate(prev, cur)
    horizon = RATE_TRIGGER_INTERVALS * policy.interval_s
    projected = cur.used_bytes + rate * horizon
    reasons = []
    if pct >= policy.threshold_pct:
        reasons.append(f"store {pct:.1f}% full (threshold {_fmt_pct(policy.threshold_pct)})")
    if rate > 0 and projected >= cur.store_bytes:
        reasons.append(f"at {format_bytes(int(rate))}/s it fills within {horizon:g} s")
    if not reasons:
        return Decision(0, f"store {pct:.1f}% full", tuple(warnings))
    reason = "; ".join(reasons)

    want = max(policy.step_for(cur.store_bytes),
               math.ceil(rate * RATE_GROWTH_INTERVALS * policy.interval_s))
    max_room = math.inf if policy.max_bytes is None else policy.max_bytes - cur.store_bytes
    fs_room = max(0, fs_room_bytes)
    amount = int(max(0, min(want, max_room, fs_room)))
    if amount == 0:
        if max_room <= 0:
            assert policy.max_bytes is not None
            warnings.append(f"{name}: store {whole}% full and already at --max "
                            f"{format_bytes(policy.max_bytes)}: commit now or raise --max")
        else:
            warnings.append(f"{name}: store {whole}% full and the filesystem has no room left "
                            f"to grow it: commit or free space now")
        return Decision(0, reason + "; cannot grow", tuple(warnings))
    if amount < want:
        if fs_room < max_room and amount == fs_room:
            warnings.append(f"{name}: only {format_bytes(fs_room)} left on the filesystem: growing the "
                            f"store by that, not {format_bytes(want)}: free space soon")
            reason += "; capped by free space"
        else:
            reason += f"; capped at --max {format_bytes(policy.max_bytes or 0)}"
    return Decision(amount, reason, tuple(warnings))


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
    checkpoints are picked up), sample, extend(name, bytes), fs_room(name),
    log(level, message) with level in debug/info/warning/error.
    """

    def __init__(
        self,
        policy: MonitorPolicy,
        names_provider: Callable[[], list[str]],
        sample: Callable[[str], Sample],
        extend: Callable[[str, int], object],
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
        for gone in set(self._prev) - set(names):
            del self._prev[gone]
            self._last_warnings.pop(gone, None)
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
        # Free space only matters when growth is wanted: ask for it only then.
        d = decide(self._policy, prev, cur, MAX_SIZE)
        if d.extend_bytes > 0:
            try:
                d = decide(self._policy, prev, cur, self._fs_room(name))
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
        self._log("debug", f"{name}: {d.reason}")
        if d.extend_bytes > 0:
            try:
                self._extend(name, d.extend_bytes)
            except FiesnapError as e:
                self._log("error", f"{name}: growing the store by {format_bytes(d.extend_bytes)} failed: {e}")
                return 1
            self._log("info", f"{name}: grew the store by {format_bytes(d.extend_bytes)} ({d.reason})")
        return status

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
