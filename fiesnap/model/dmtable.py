"""Device-mapper table lines as data (pure).

Devices are always referenced as "major:minor": no udev runs in some
environments, so /dev/mapper paths may not exist when a table is loaded.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

SNAPSHOT_STORE_TYPES = ("P", "PO")


@dataclass(frozen=True)
class DmTarget:
    """One table line: `start length target_type params`, in 512-byte sectors."""

    start: int
    length: int
    target_type: str
    params: str


def _check_device(device: str) -> str:
    # A space would split into two table arguments and shift every later one.
    if not device or any(c.isspace() for c in device):
        raise ValueError(f"invalid device reference {device!r}")
    return device


def _check_span(start: int, length: int) -> None:
    if start < 0 or length <= 0:
        raise ValueError(f"invalid target span start={start} length={length}")


def linear(start: int, length: int, device: str, offset: int) -> DmTarget:
    """`start length linear device offset`: sectors [start, start+length) map
    to device sectors from offset."""
    _check_span(start, length)
    if offset < 0:
        raise ValueError(f"negative linear offset {offset}")
    return DmTarget(start, length, "linear", f"{_check_device(device)} {offset}")


def zero_target(start: int, length: int) -> DmTarget:
    """`start length zero`: reads return zeros, writes are discarded."""
    _check_span(start, length)
    return DmTarget(start, length, "zero", "")


def error_target(start: int, length: int) -> DmTarget:
    """`start length error`: every I/O fails."""
    _check_span(start, length)
    return DmTarget(start, length, "error", "")


def snapshot_origin(length: int, device: str) -> DmTarget:
    """The whole-device snapshot-origin target that the filesystem is mounted on."""
    _check_span(0, length)
    return DmTarget(0, length, "snapshot-origin", _check_device(device))


def snapshot(
    length: int,
    origin_device: str,
    cow_device: str,
    store_type: str,
    chunk_sectors: int,
) -> DmTarget:
    """`0 length snapshot origin cow P|PO chunk_sectors`.

    "PO" (overflow) only changes what happens when writes to the *snapshot*
    device run out of space; origin writes that overflow still invalidate the
    snapshot (dm-snap.c __origin_write), so both store types are safe here.
    """
    _check_span(0, length)
    if store_type not in SNAPSHOT_STORE_TYPES:
        raise ValueError(f"snapshot store type must be P or PO, not {store_type!r}")
    if chunk_sectors <= 0 or chunk_sectors & (chunk_sectors - 1):
        raise ValueError(f"chunk size {chunk_sectors} sectors is not a power of two")
    params = (
        f"{_check_device(origin_device)} {_check_device(cow_device)} "
        f"{store_type} {chunk_sectors}"
    )
    return DmTarget(0, length, "snapshot", params)


def snapshot_merge(length: int, origin_device: str, cow_device: str, chunk_sectors: int) -> DmTarget:
    """`0 length snapshot-merge origin cow P chunk_sectors`: the device itself, showing the
    snapshot's content while the kernel merges it back (persistent stores only). It takes the
    place of snapshot-origin, which must not be loaded for the same origin at the same time."""
    t = snapshot(length, origin_device, cow_device, "P", chunk_sectors)
    return DmTarget(0, length, "snapshot-merge", t.params)


def format_table(targets: Iterable[DmTarget]) -> str:
    """dmsetup-style table text: one `start length type params` line per
    target, newline-separated, no trailing newline."""
    lines = []
    for t in targets:
        line = f"{t.start} {t.length} {t.target_type}"
        if t.params:
            line += f" {t.params}"
        lines.append(line)
    return "\n".join(lines)
