"""Crash-consistency replay of a dm-log-writes recording (used by test_crash_replay.py).

The raw device is recorded beneath everything with the kernel's dm-log-writes target while
fiesnap runs its own sequence; the log is then replayed to many flush/FUA/mark points, and at
each point the device as it was at that instant, together with the state folder as it was at
that instant, goes through what an admin runs after a crash. This module holds the parts that
are not the test itself: the fiesnap wrapper that ties every record save to a log position,
log reading and point selection, the replay image, byte comparisons, and the pytest option
that picks how many points to replay.

Point count: ``--crash-points N`` when this module is loaded as a pytest plugin
(``-p tests.kernel.crash_replay``; the lab passes no environment into its guests, pytest
arguments do reach them), else ``$FIESNAP_CRASH_POINTS``, else ``DEFAULT_POINTS``. 0 = every
point.
"""

from __future__ import annotations

import bisect
import json
import mmap
import os
import random
from dataclasses import dataclass, field

from bow_compat.logwrites import LogWrite, read_log

from .helpers import MiB

DEFAULT_POINTS = 12
SEED = 482  # xfstests generic/482 replays an fsstress run the same way

#: Runs fiesnap's CLI with StateStore.save and .delete wrapped: after each one succeeds, the
#: record as it now is on disk (or a deletion note) is copied into a side folder as K.json and
#: a dm-log-writes mark "save-K" is logged. The mark ties the state folder to a position in the
#: device's log: at replay point N, the state folder is the last save whose mark precedes N.
#: The save's own fsync happens before its mark, so a point between a save and its mark is
#: replayed with the previous record: a crash just before the rename reached the disk, which
#: is a state a real crash can produce too (fiesnap wrote nothing to the device in between).
SAVE_MARKS = r"""
import json, os, shutil, subprocess, sys
from fiesnap.services.statedir import StateStore
side, logdev = sys.argv[1], sys.argv[2]
def _mark(payload):
    k = len([n for n in os.listdir(side) if n.endswith(".json")]) + 1
    with open(os.path.join(side, f"{k:04d}.json.tmp"), "w") as f:
        json.dump(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(os.path.join(side, f"{k:04d}.json.tmp"), os.path.join(side, f"{k:04d}.json"))
    p = subprocess.run(["dmsetup", "message", logdev, "0", "mark", f"save-{k:04d}"],
                       capture_output=True, text=True)
    if p.returncode != 0:
        sys.stderr.write(f"wrapper: mark save-{k} failed: {p.stderr}\n")
        os._exit(70)
real_save, real_delete = StateStore.save, StateStore.delete
def save(self, record):
    real_save(self, record)
    with open(os.path.join(self.path, f"{record.name}.json")) as f:
        _mark({"name": record.name, "record": json.load(f)})
def delete(self, name):
    real_delete(self, name)
    _mark({"name": name, "record": None})
StateStore.save, StateStore.delete = save, delete
from fiesnap.cli import main
sys.argv = ["fiesnap", *sys.argv[3:]]
main()
"""


def pytest_addoption(parser):
    parser.addoption("--crash-points", type=int, default=None,
                     help="crash-replay: how many log points to replay (0 = all); default "
                          f"$FIESNAP_CRASH_POINTS or {DEFAULT_POINTS}")


def wanted_points(config) -> int:
    opt = config.getoption("--crash-points", default=None)
    if opt is not None:
        return opt
    return int(os.environ.get("FIESNAP_CRASH_POINTS", DEFAULT_POINTS))


# --------------------------------------------------------------------------- the log


@dataclass
class Save:
    """One state-folder save, as the wrapper copied it, with its mark's log index."""

    k: int
    entry: int  # index of the "save-K" mark in the log
    record: dict | None  # None: the record was deleted

    @property
    def phase(self) -> str:
        return "deleted" if self.record is None else self.record["phase"]


@dataclass
class Recording:
    entries: list[LogWrite]
    saves: list[Save]
    log: object  # LogWritesLog, kept open to read data lazily
    sectorsize: int
    marks: dict[str, int] = field(default_factory=dict)

    def save_at(self, n: int) -> Save | None:
        """The state folder at point n: the last save whose mark is at or before entry n."""
        i = bisect.bisect_right([s.entry for s in self.saves], n)
        return self.saves[i - 1] if i else None


def load_recording(log_device: str, side: str) -> Recording:
    log = read_log(log_device)
    entries = list(log.entries(with_data=False))
    marks = {e.mark: e.index for e in entries if e.is_mark}
    saves = []
    for fn in sorted(os.listdir(side)):
        if not fn.endswith(".json"):
            continue
        k = int(fn[:-5])
        with open(os.path.join(side, fn)) as f:
            data = json.load(f)
        mark = f"save-{k:04d}"
        assert mark in marks, f"the log has no mark {mark} (marks: {sorted(marks)})"
        saves.append(Save(k, marks[mark], data["record"]))
    saves.sort(key=lambda s: s.entry)
    return Recording(entries, saves, log, log.sectorsize, marks)


def crash_points(rec: Recording) -> list[int]:
    """Every entry after which a crash is worth replaying: flushes, FUAs and marks (what a
    filesystem may rely on, as in xfstests), plus every write of the merge's copy (between the
    `merging` and `copied` saves): the copy runs without flushes, and a crash in the middle
    leaves any part of it on the device, which the next merge must finish exactly."""
    copy_from = next((s.entry for s in rec.saves if s.phase == "merging"), None)
    copy_to = next((s.entry for s in rec.saves if s.phase == "copied"), None)
    out = []
    for e in rec.entries:
        if e.is_flush or e.is_fua or e.is_mark:
            out.append(e.index)
        elif copy_from is not None and copy_to is not None and copy_from < e.index < copy_to and e.is_write:
            out.append(e.index)
    return out


def is_mid_copy(rec: Recording, n: int) -> bool:
    e = rec.entries[n]
    s = rec.save_at(n)
    return s is not None and s.phase == "merging" and e.is_write and not (e.is_flush or e.is_fua)


def choose_points(rec: Recording, points: list[int], n: int, seed: int = SEED) -> list[int]:
    """All points when n is 0 or covers them; else a seeded sample that first takes the last
    point of each stretch between two saves (and of the merge's copy) -- the work of a step
    done, its record not yet saved, where a crash hurts most -- so every phase is visited,
    then random ones."""
    if n <= 0 or n >= len(points):
        return list(points)
    rnd = random.Random(seed)
    groups: dict[tuple[int, bool], list[int]] = {}
    for p in points:
        s = rec.save_at(p)
        groups.setdefault((s.k if s else 0, is_mid_copy(rec, p)), []).append(p)
    chosen: set[int] = set()
    for k in sorted(groups):
        if len(chosen) < n:
            chosen.add(groups[k][-1])
    rest = [p for p in points if p not in chosen]
    chosen.update(rnd.sample(rest, n - len(chosen)))
    return sorted(chosen)


class ReplayImage:
    """The logged device's image, advanced entry by entry (held in memory: it is small)."""

    def __init__(self, base: bytearray, rec: Recording):
        self.buf = base  # taken over, not copied
        self.rec = rec
        self.next = 0  # index of the next entry to apply
        self.writes = self.discards = 0

    def advance_to(self, n: int) -> None:
        """Apply entries up to and including n."""
        assert n >= self.next - 1, "the replay only goes forward"
        while self.next <= n:
            e = self.rec.entries[self.next]
            if e.is_discard:
                self.buf[e.offset:e.offset + e.length] = bytes(e.length)  # the disks unmap: zeros
                self.discards += 1
            elif e.is_write:
                data = self.rec.log.read_data(e)
                assert e.offset + len(data) <= len(self.buf), f"entry {e.index} writes past the device"
                self.buf[e.offset:e.offset + len(data)] = data
                self.writes += 1
            self.next += 1


# --------------------------------------------------------------------------- raw bytes


def read_region(dev: str, offset: int, length: int) -> bytearray:
    """length bytes of dev from offset, read with O_DIRECT in 4 MiB pieces."""
    out = bytearray()
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 4 * MiB)
    try:
        done = 0
        while done < length:
            n = os.preadv(fd, [memoryview(buf)[:min(4 * MiB, length - done)]], offset + done)
            assert n > 0, f"short read of {dev} at {offset + done}"
            out += buf[:n]
            done += n
    finally:
        buf.close()
        os.close(fd)
    return out


def write_region(dev: str, offset: int, data: bytes | bytearray) -> None:
    """Write data at offset with O_DIRECT, then fsync."""
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 4 * MiB)
    try:
        view = memoryview(data)
        done = 0
        while done < len(data):
            n = min(4 * MiB, len(data) - done)
            buf[:n] = view[done:done + n]
            w = os.pwritev(fd, [memoryview(buf)[:n]], offset + done)
            assert w > 0
            done += w
        os.fsync(fd)
    finally:
        buf.close()
        os.close(fd)


def copy_region(src: str, dst: str, length: int, *, src_off: int = 0, dst_off: int = 0) -> None:
    write_region(dst, dst_off, read_region(src, src_off, length))


class Region:
    """length bytes of a block device from offset, or of a buffer in memory."""

    def __init__(self, source: str | bytearray, offset: int = 0, length: int | None = None):
        self.source, self.offset = source, offset
        self.length = len(source) - offset if length is None else length

    def read(self, off: int, n: int) -> bytes | bytearray | memoryview:
        if isinstance(self.source, str):
            return read_region(self.source, self.offset + off, n)
        return memoryview(self.source)[self.offset + off:self.offset + off + n]


def masked_diff(a: Region, b: Region, exclude: list[tuple[int, int]] = ()) -> list[tuple[int, int]]:
    """(MiB offset, first differing byte) of every MiB where a and b differ outside `exclude`
    (byte ranges relative to the regions' start). Read in 8 MiB pieces: nothing big in memory."""
    assert a.length == b.length, (a.length, b.length)
    out = []
    step = 8 * MiB
    for base in range(0, a.length, step):
        n = min(step, a.length - base)
        pa, pb = a.read(base, n), b.read(base, n)
        if pa == pb:
            continue
        for off in range(base, base + n, MiB):
            end = min(off + MiB, base + n)
            xa, xb = bytearray(pa[off - base:end - base]), bytearray(pb[off - base:end - base])
            if xa == xb:
                continue
            for s, ln in exclude:
                lo, hi = max(s, off), min(s + ln, end)
                if lo < hi:
                    xa[lo - off:hi - off] = xb[lo - off:hi - off] = bytes(hi - lo)
            if xa != xb:
                first = next(i for i in range(len(xa)) if xa[i] != xb[i])
                out.append((off, off + first))
    return out


def one_line(msg: str) -> bool:
    return bool(msg.strip()) and "\n" not in msg.strip()
