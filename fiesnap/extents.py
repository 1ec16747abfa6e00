"""Extent and chunk arithmetic (pure).

All offsets here are in bytes (Extent) or in chunks of the checkpoint's chunk
size (ChunkRun). Physical chunk N covers device bytes [N*chunk, (N+1)*chunk):
dm-snapshot copies whole origin chunks, so the store may only use chunks that
lie entirely inside the store file (a chunk shared with another file would get
an exception when that file is written, and the merge would overwrite store
data with it).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Extent:
    """One FIEMAP extent of a file, in bytes."""

    logical: int
    physical: int
    length: int
    flags: int = 0


@dataclass(frozen=True)
class ChunkRun:
    """A run of `count` consecutive physical chunks starting at chunk `start`."""

    start: int
    count: int

    @property
    def end(self) -> int:
        return self.start + self.count
