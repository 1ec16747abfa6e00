"""Watermark monitor policy: when and by how much to grow a store (pure).

Why polling: the kernel raises a dm event for a snapshot only when it is
invalidated, never as its store fills, so there is nothing to wait on before
it is too late. Reading snapshot status takes the snapshot's lock, which every
origin write needing a new exception also takes, so poll moderately (default
every 2 s) rather than in a tight loop. Growth is decided from the used
fraction (threshold) and from the write rate between two polls, so a fast
writer gets headroom for the time until the next poll and the extension.

This module is the policy, pure: what to grow by, and what to warn about, from
two samples, and when to try again after an extension that mapped nothing
(`Stall`). The loop that polls, sleeps, handles signals and calls `extend`
is commands/monitor.py.

Back-off. `extend` maps only new chunks that were free at the checkpoint and
have no exception; when the filesystem hands the store file only other blocks
(freed since the checkpoint: they were in use then, or hold saved chunks), the
file grows and the store does not. Trying again at every poll would turn the
filesystem's free space into allocated-but-unmapped blocks until the margin,
and the checkpoint would overflow anyway. So after such an extension the
checkpoint is stalled: no further allocation for it until either
- the back-off has passed: BACKOFF_FIRST_S after the first failure, doubled
  after every retry that maps nothing again, at most BACKOFF_MAX_S (never
  less than one poll interval); or
- the filesystem's free space has grown notably since the failed attempt: by
  at least what that attempt took (the file's growth). Freed space is where a
  retry can find safe blocks (say a preallocated file that was never written
  is deleted); space that only shrinks cannot help.
An extension that maps at least one chunk ends the stall; so does a store
whose size changed otherwise (an admin's `fiesnap extend` mapped chunks, or a
new checkpoint under the same name) or a checkpoint no longer active. The monitor says the stall loudly once (error
level); retries that fail again are logged at info level with the next wait.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from fiesnap.errors import UsageError
from fiesnap.model.units import format_bytes, parse_size

ACTIVE = "active"
BAD_STATES = frozenset({"invalid", "overflowed"})

# Extend when the store would fill within this many poll intervals at the
# current rate (one until the next poll, one for the extension itself) ...
RATE_TRIGGER_INTERVALS = 2
# ... and then by at least what that rate writes in this many intervals.
RATE_GROWTH_INTERVALS = 3

# After an extension that mapped nothing: wait this long before allocating
# again, doubling after every failed retry, up to BACKOFF_MAX_S.
BACKOFF_FIRST_S = 30.0
BACKOFF_MAX_S = 1800.0

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


#: polls closer than this measure no rate (a division by a hair would be infinite).
MIN_RATE_INTERVAL_S = 1e-3


def _rate(prev: Sample | None, cur: Sample) -> float:
    """Bytes per second written into the store since prev (0 when unknown)."""
    if (prev is None or prev.name != cur.name or prev.state != ACTIVE
            or cur.time - prev.time < MIN_RATE_INTERVAL_S):
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


@dataclass(frozen=True)
class Stall:
    """A checkpoint whose last extension mapped nothing: when to allocate again.

    room_bytes is the filesystem's usable free space right after the failed
    attempt, notable_bytes what that attempt took (the store file's growth):
    free space back above room_bytes + notable_bytes allows a retry at once.
    store_bytes is the store's mapped size then: a store of another size has
    grown after all (or is another checkpoint).
    """

    retry_at: float
    wait_s: float
    room_bytes: int
    notable_bytes: int
    store_bytes: int
    failures: int = 1  # extensions in a row that mapped nothing

    def after_failure(self, policy: MonitorPolicy, now: float, room_bytes: int, took_bytes: int) -> Stall:
        """The stall after a retry that mapped nothing again: a doubled back-off."""
        return stalled(policy, now, room_bytes, took_bytes, self.store_bytes, previous=self)

    def retry_reason(self, now: float, room_bytes: int) -> str | None:
        """Why a retry is allowed now, or None while backing off."""
        if now >= self.retry_at:
            return f"back-off of {self.wait_s:g} s over"
        grown = room_bytes - self.room_bytes
        if grown >= max(1, self.notable_bytes):
            return f"free space grew by {format_bytes(grown)}"
        return None

    def waiting(self, now: float) -> str:
        """What the monitor waits for, for its debug line."""
        return (f"next try in {max(0.0, self.retry_at - now):.0f} s, or once free space grows by "
                f"{format_bytes(max(1, self.notable_bytes))}")

    def ended_by(self, cur: Sample) -> bool:
        """True when cur is no longer the store that stalled (ended, grown by hand, a new one)."""
        return cur.state != ACTIVE or cur.store_bytes != self.store_bytes


def stalled(policy: MonitorPolicy, now: float, room_bytes: int, took_bytes: int, store_bytes: int,
            previous: Stall | None = None) -> Stall:
    """The stall after an extension that mapped nothing (previous: the stall it retried)."""
    if previous is None:
        wait, failures = BACKOFF_FIRST_S, 1
    else:
        wait, failures = previous.wait_s * 2, previous.failures + 1
    wait = max(min(wait, BACKOFF_MAX_S), policy.interval_s)
    return Stall(retry_at=now + wait, wait_s=wait, room_bytes=max(0, room_bytes),
                 notable_bytes=max(0, took_bytes), store_bytes=store_bytes, failures=failures)
