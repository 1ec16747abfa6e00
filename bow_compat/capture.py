"""Record a workload's block trace with the kernel's dm-log-writes target (lab helper).

The trace is what `bow-compat replay` and the benchmarks feed to the dm-bow model, so it is taken
the way Android takes a checkpoint: the filesystem is mounted on the logged device, `fstrim`
tells the device which blocks are free (dm-bow's TRIM state; here the discards land in the log),
then a mark named `checkpoint` starts backup-on-write, then the workload runs.

The mark is sent with the filesystem frozen, so the device image at the mark is a clean,
consistent filesystem (ext4's freeze clears its needs_recovery flag): the image a rollback must
give back. Needs root and dm-log-writes (no udev needed: fiesnap's libdevmapper layer makes the
node itself). Uses fiesnap's ctypes libdevmapper layer, never dmsetup.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from typing import Callable

from fiesnap.kernel.dm import DeviceMapper
from fiesnap.model.dmtable import DmTarget
from fiesnap.kernel.freeze import frozen


@dataclass(frozen=True)
class CaptureResult:
    """What a capture recorded: the logged device's size and the log device."""

    data_device: str
    log_device: str
    sectors: int
    mark: str


def _devref(path: str) -> str:
    st = os.stat(path)
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def _run(*argv: str) -> None:
    p = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} -> exit {p.returncode}: {p.stderr.strip()}")


def capture(
    data_device: str,
    log_device: str,
    mountpoint: str,
    workload: Callable[[str], None],
    *,
    sectors: int,
    mark: str = "checkpoint",
    fstype: str = "ext4",
    at_checkpoint: Callable[[str], None] | None = None,
    name: str = "bowcap",
    dm: DeviceMapper | None = None,
) -> CaptureResult:
    """Log everything written to the first `sectors` of `data_device` into `log_device`:
    mount, fstrim, freeze, mark, [at_checkpoint(mountpoint) while frozen], thaw, workload, umount.

    The device beneath must already hold the filesystem; its image before this call is the
    replay's base image. The dm device is always removed again, also on failure."""
    dm = dm or DeviceMapper()
    if dm.info(name) is not None:
        raise RuntimeError(f"dm device {name} already exists: remove it first")
    table = [DmTarget(0, sectors, "log-writes", f"{_devref(data_device)} {_devref(log_device)}")]
    dm.create(name, targets=table)
    node = dm.node_path(name)
    mounted = False
    try:
        os.makedirs(mountpoint, exist_ok=True)
        _run("mount", "-t", fstype, node, mountpoint)
        mounted = True
        _run("fstrim", mountpoint)
        os.sync()
        with frozen(mountpoint):
            dm.message(name, 0, f"mark {mark}")
            if at_checkpoint is not None:
                at_checkpoint(mountpoint)
        workload(mountpoint)
        os.sync()
        _run("umount", mountpoint)
        mounted = False
    finally:
        if mounted:
            subprocess.run(["umount", mountpoint], capture_output=True)
        dm.remove(name)
    return CaptureResult(data_device, log_device, sectors, mark)
