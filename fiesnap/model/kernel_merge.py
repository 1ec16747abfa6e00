"""Instant rollback through the kernel's snapshot-merge target (pure).

`fiesnap merge NAME --instant` takes the stack down and makes NAME a `snapshot-merge`
device over the device and the store: NAME shows the checkpoint at once and may be mounted,
while the kernel copies the saved chunks back in the background (dm-snap.c: a write to a
chunk not merged yet goes to its saved copy, which is merged later; the merge walks the table
from its last entry back, clearing entries as their chunks reach the origin, so a power cut
resumes where it stopped). Two kinds of chunk make that unsafe, and this module says which
stores may be handed over and what table the kernel must get:

- A grown store: chunks added by `extend` were free space at the checkpoint. The filesystem
  mounted on the merging device is the checkpoint's, which believes them free and may write
  there, over store data (even metadata) not merged yet. Refused (the offline merge, which
  nothing writes during, stays possible). The store file made before the checkpoint is
  allocated in the checkpoint's filesystem, and safe.
- A free-aware store's seeded entries (model/seeding.py): the kernel would "merge" each one,
  copying the zero dummy region over every chunk that was free, and until then it would send
  the filesystem's writes into free space to that dummy region, which drops them. The table
  is rewritten first to hold only the real exceptions (`compacted_area`): they move to the
  front, a terminator follows. Only slots below the first real entry's slot are written, so
  the entries being moved stay where they are until the rewrite is over, and a rewrite a
  crash cut short is simply done again from them. That needs fewer real exceptions than
  seeded ones; with more, the store is refused for the instant rollback.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from fiesnap.model.exstore import CowException, exceptions_per_area
from fiesnap.model.snapstatus import SnapshotUsage

_ENTRY = struct.Struct("<QQ")


def grown_refusal(generation: int) -> str:
    """Why a store's map that changed since the checkpoint cannot go to the kernel ("" if not)."""
    if generation == 1:
        return ""
    return ("its store grew after the checkpoint (extend or the monitor), and the chunks it gained "
            "were free space in the checkpoint's filesystem: mounted during a kernel merge, that "
            "filesystem could write over saved data not merged yet")


def compaction_refusal(real: int, seeded: int) -> str:
    """Why a free-aware table cannot be rewritten in place for the kernel ("" if it can)."""
    if seeded == 0 or real < seeded:
        return ""
    return (f"it saved {real} chunks, more than the {seeded} free chunks it seeded, so its table "
            "cannot be rewritten without moving entries over each other")


def areas_to_write(real: int, chunk_bytes: int) -> range:
    """The metadata areas a compacted table of `real` entries (and its terminator) occupies."""
    return range(real // exceptions_per_area(chunk_bytes) + 1)


def compacted_area(area: int, current: bytes, entries: Sequence[CowException], chunk_bytes: int) -> bytes:
    """Area `area` of the compacted table: `entries` from slot 0 on, a zero terminator after
    them, and every later slot as it is now (`current`), where the entries being moved may
    still lie."""
    epa = exceptions_per_area(chunk_bytes)
    if len(current) != chunk_bytes:
        raise ValueError(f"an area is {chunk_bytes} bytes, not {len(current)}")
    first = area * epa
    out = bytearray(current)
    for slot in range(epa):
        i = first + slot
        if i < len(entries):
            _ENTRY.pack_into(out, slot * _ENTRY.size, entries[i].old_chunk, entries[i].new_chunk)
        elif i == len(entries):
            _ENTRY.pack_into(out, slot * _ENTRY.size, 0, 0)
        else:
            break
    return bytes(out)


def merge_complete(usage: SnapshotUsage) -> bool:
    """The kernel's merge is over: allocated equals metadata (snapshot.rst, "How to determine
    when a merging is complete"). Only this ends an instant rollback, never a count of ours."""
    return usage.state == "active" and usage.used_bytes is not None and usage.used_bytes == usage.metadata_bytes


def merge_remaining(usage: SnapshotUsage, total: int, chunk_bytes: int) -> int | None:
    """Exceptions the kernel has still to merge, for progress only (None: it says nothing).

    While merging, dm-snap-persistent sets its data frontier to just after the entries left
    (area_location(area) + committed + 1), so allocated minus metadata is the entries left;
    before the first batch is committed the frontier is the table's old one, so the count is
    capped at `total`."""
    if usage.used_bytes is None or usage.metadata_bytes is None:
        return None
    if merge_complete(usage):
        return 0
    return max(1, min(total, (usage.used_bytes - usage.metadata_bytes) // chunk_bytes))
