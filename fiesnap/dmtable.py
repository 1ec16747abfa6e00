"""Device-mapper table lines as data (pure).

Devices are always referenced as "major:minor": no udev runs in some
environments, so /dev/mapper paths may not exist when a table is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DmTarget:
    """One table line: `start length target_type params`, in 512-byte sectors."""

    start: int
    length: int
    target_type: str
    params: str
