"""Which boot this is, and when it began: the kernel's boot id and /proc/stat's btime."""

from __future__ import annotations

BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
STAT_PATH = "/proc/stat"


def boot_id() -> str:
    """A random UUID the kernel draws at every boot."""
    with open(BOOT_ID_PATH, encoding="ascii") as f:
        return f.read().strip()


def boot_time() -> int:
    """Wall-clock time (epoch seconds) the current boot began, as the kernel reckons it now."""
    with open(STAT_PATH, encoding="ascii") as f:
        for line in f:
            if line.startswith("btime "):
                return int(line.split()[1])
    raise OSError(f"{STAT_PATH} has no btime line")
