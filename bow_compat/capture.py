"""Record a workload's block trace with the kernel's dm-log-writes target.

The trace is what `bow-compat replay` and the benchmarks feed to the dm-bow model, so it is taken
the way Android takes a checkpoint: the filesystem is mounted on the logged device, `fstrim`
tells the device which blocks are free (dm-bow's TRIM state; here the discards land in the log),
then a mark named `checkpoint` starts backup-on-write, then the workload runs.

The mark is sent with the filesystem frozen, so the device image at the mark is a clean,
consistent filesystem (ext4's freeze clears its needs_recovery flag): the image a rollback must
give back. Needs root and dm-log-writes (no udev needed: fiesnap's libdevmapper layer makes the
node itself). Uses fiesnap's ctypes libdevmapper layer, never dmsetup.

Two users share these steps: `bow-compat record` (bow_compat.record: checks its input first) and
the lab tests and benchmarks (`capture`). Whatever fails, or on ^C, `logged_mount` unmounts and
removes the dm device again, and names what it could not undo.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

from fiesnap.kernel.dm import DeviceMapper
from fiesnap.kernel.freeze import frozen
from fiesnap.kernel.mounts import mount, umount
from fiesnap.model.dmtable import DmTarget

from bow_compat.errors import BowDeviceError, BowFilesystemError, BowKernelError

UMOUNT_TRIES = 20  # 0.25 s apart: a workload's last processes may still be leaving the mount
TEARDOWN_BLOCKED = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})


@dataclass(frozen=True)
class CaptureResult:
    """What a capture recorded: the logged device's size and the log device."""

    data_device: str
    log_device: str
    sectors: int
    mark: str


def devref(path: str) -> str:
    """ "major:minor" of a block device node, as a dm table names it."""
    st = os.stat(path)
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def _run(*argv: str) -> None:
    p = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise BowFilesystemError(f"{' '.join(argv)} failed (exit {p.returncode}): "
                                 f"{p.stderr.strip() or 'no message'}; check dmesg")


@contextmanager
def logged_mount(data_device: str, log_device: str, mountpoint: str, *, sectors: int,
                 fstype: str, name: str, dm: DeviceMapper) -> Iterator[str]:
    """Create the log-writes device `name` over the first `sectors` of `data_device`, logging
    to `log_device`, and mount it at `mountpoint` (an existing directory); yield its node.

    On the way out, whatever happened (an error, ^C): unmount, then remove `name`. What cannot
    be undone is added as notes to the error on its way out, or raised as BowKernelError, each
    naming what is left where and the command that removes it."""
    if dm.info(name) is not None:
        raise BowDeviceError(f"dm device {name} already exists (a record still running, or left "
                             f"behind?): remove it with 'dmsetup remove {name}' if it is unused")
    table = [DmTarget(0, sectors, "log-writes", f"{devref(data_device)} {devref(log_device)}")]
    dm.create(name, targets=table)
    node = dm.node_path(name)
    mounted = False
    failed = False
    try:
        mount(node, mountpoint, fstype)
        mounted = True
        yield node
    except BaseException:
        failed = True
        raise
    finally:
        left = _teardown(dm, name, node, mountpoint if mounted else None)
        if left and not failed:
            raise BowKernelError(f"{left[0]}" + "".join(f"; {x}" for x in left[1:]))
        if left:
            exc = sys.exc_info()[1]
            for note in left:
                exc.add_note(note)


def _teardown(dm: DeviceMapper, name: str, node: str, mountpoint: str | None) -> list[str]:
    """Unmount and remove the dm device, with ^C, SIGTERM and SIGHUP held back until done (a
    second ^C must not leave half of it); what is left, as sentences."""
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, TEARDOWN_BLOCKED)
    try:
        return _unmount_and_remove(dm, name, node, mountpoint)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _unmount_and_remove(dm: DeviceMapper, name: str, node: str, mountpoint: str | None) -> list[str]:
    """Unmount (retrying while busy), then remove the dm device."""
    if mountpoint is not None:
        for attempt in range(UMOUNT_TRIES):
            try:
                umount(mountpoint)
                break
            except Exception as e:  # EBUSY: a process of the workload still in there
                if attempt == UMOUNT_TRIES - 1:
                    return [f"{node} is still mounted at {mountpoint} ({e}); unmount it with "
                            f"'umount {mountpoint}', then remove the dm device with "
                            f"'dmsetup remove {name}'"]
                time.sleep(0.25)
    try:
        dm.remove(name)
    except Exception as e:
        return [f"dm device {name} is left ({e}); remove it with 'dmsetup remove {name}'"]
    return []


def start_checkpoint(dm: DeviceMapper, name: str, mountpoint: str, mark: str,
                     at_checkpoint: Callable[[str], None] | None = None) -> None:
    """fstrim (the free space goes into the log as discards), then the mark, sent with the
    filesystem frozen: the device at the mark is a clean filesystem. `at_checkpoint` runs
    while it is still frozen."""
    _run("fstrim", mountpoint)
    os.sync()
    with frozen(mountpoint):
        dm.message(name, 0, f"mark {mark}")
        if at_checkpoint is not None:
            at_checkpoint(mountpoint)


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
    os.makedirs(mountpoint, exist_ok=True)
    with logged_mount(data_device, log_device, mountpoint, sectors=sectors, fstype=fstype,
                      name=name, dm=dm):
        start_checkpoint(dm, name, mountpoint, mark, at_checkpoint)
        workload(mountpoint)
        os.sync()
    return CaptureResult(data_device, log_device, sectors, mark)
