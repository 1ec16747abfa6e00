"""Progress of a long copy for a log (a boot, a pipe): one line every tenth, with the rate and
what is left, so whoever reads the journal can tell a slow rollback from a stuck one."""

from __future__ import annotations

import time
from collections.abc import Callable

from fiesnap.commands.guards import Log
from fiesnap.model.units import format_bytes


class LoggedProgress:
    """advance(n) as bytes are copied; a line at 10%, 20%, ... 90%."""

    def __init__(self, label: str, total: int, log: Log, clock: Callable[[], float] = time.monotonic) -> None:
        self.label, self.total, self.log, self.clock = label, total, log, clock
        self.done = self.said = 0
        self.started = clock()

    def advance(self, n: int) -> None:
        self.done += n
        tenth = self.done * 10 // self.total if self.total else 10
        if self.said < tenth < 10:
            self.said = tenth
            self.log(f"{self.label} {tenth * 10}% copied ({format_bytes(self.done)} of "
                     f"{format_bytes(self.total)}{self._rate()})")

    def _rate(self) -> str:
        elapsed = self.clock() - self.started
        if elapsed <= 0:
            return ""
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate else 0
        return f", {format_bytes(int(rate))}/s, about {left:.0f} s left"

    def close(self) -> None:
        pass
