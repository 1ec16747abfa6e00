"""Parse the dm-snapshot status line (pure).

The kernel reports `<allocated>/<total> <metadata>` in sectors (allocated
includes the header and metadata chunks), or `Invalid`, `Overflow` (store type
PO, target >= 1.15) or `Merge failed`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from fiesnap.model.units import SECTOR_BYTES



@dataclass(frozen=True)
class SnapshotUsage:
    state: str  # "active", "overflowed", "invalid", "merge-failed"
    used_bytes: int | None = None
    total_bytes: int | None = None
    metadata_bytes: int | None = None

    @property
    def percent_used(self) -> float | None:
        if self.used_bytes is None or not self.total_bytes:
            return None
        return round(100.0 * self.used_bytes / self.total_bytes, 2)

    def backed(self, backed_bytes: int) -> SnapshotUsage:
        """The same usage against what the store occupies on disk.

        The kernel counts its COW device's address space: `total` is its size and
        `allocated` everything below its data frontier. A free-aware store's
        address space opens with holes (model/seeding.py), but everything from the
        frontier to the end is backed, so the free part is the same either way.
        """
        if self.used_bytes is None or self.total_bytes is None:
            return self
        free = max(0, self.total_bytes - self.used_bytes)
        return replace(self, used_bytes=max(0, backed_bytes - free), total_bytes=backed_bytes)


def parse_snapshot_status(params: str) -> SnapshotUsage:
    text = params.strip()
    if text == "Invalid":
        return SnapshotUsage("invalid")
    if text == "Overflow":
        return SnapshotUsage("overflowed")
    if text == "Merge failed":
        return SnapshotUsage("merge-failed")
    try:
        ratio, meta = text.split()
        used, total = ratio.split("/")
        return SnapshotUsage("active", int(used) * SECTOR_BYTES, int(total) * SECTOR_BYTES, int(meta) * SECTOR_BYTES)
    except ValueError:
        raise ValueError(f"unrecognised snapshot status {text!r}") from None
