"""`fiesnap setup` and `fiesnap release`: put a device under fiesnap, and take it out.

dm-linear opens its device exclusively, so a mounted raw partition cannot get
a snapshot stacked on it later. `setup` puts the unmounted device behind
/dev/mapper/NAME (a linear pass-through) once, and the filesystem is mounted
from there from then on; `fiesnap start NAME` then works online.
"""

from __future__ import annotations

import os
import uuid

from fiesnap.commands.guards import Log, check_unused, require_root
from fiesnap.errors import CheckpointNameError, DeviceError, RefusedError
from fiesnap.kernel import blockdev, fsprobe
from fiesnap.model.record import CheckpointRecord, validate_name
from fiesnap.services.stack import StackNames, create_passthrough, refuse_in_use, remove_if_present
from fiesnap.services.statedir import StateStore


def _refuse_known(name: str, dev: blockdev.BlockDevice, device: str, state: StateStore) -> None:
    if state.exists(name):
        raise CheckpointNameError(f"the name {name!r} is taken: pick another --name")
    for other in state.load_all():
        if (other.device_major, other.device_minor) == (dev.major, dev.minor):
            raise DeviceError(f"{device} is already under fiesnap as {other.name!r}")


def setup(device: str, name: str, dm_factory, state: StateStore, log: Log) -> CheckpointRecord:
    """Put an unmounted ext4/XFS device behind /dev/mapper/NAME and record it."""
    require_root()
    validate_name(name)
    dev = blockdev.open_block_device(device)
    _refuse_known(name, dev, device, state)
    check_unused(dev, device, f"unmount it, run setup, then mount /dev/mapper/{name}")
    fs = fsprobe.probe_device(device)
    state.refuse_on(os.makedev(dev.major, dev.minor), device)
    with state.locked():
        _refuse_known(name, dev, device, state)
        dm = dm_factory()
        taken = [n for n in StackNames.for_name(name).all() if dm.info(n) is not None]
        if taken:
            raise CheckpointNameError(f"device-mapper device {taken[0]!r} exists already: pick another --name")
        record = CheckpointRecord(
            name=name, device=os.path.realpath(device), device_major=dev.major,
            device_minor=dev.minor, device_bytes=dev.size_bytes, fstype=fs.fstype,
            fs_uuid=fs.uuid, phase="passthrough", managed=True, setup_id=uuid.uuid4().hex,
        )
        create_passthrough(dm, record)
        try:
            state.save(record)
        except BaseException:
            remove_if_present(dm, name)
            raise
        log(f"{device} is now /dev/mapper/{name} ({fs.fstype} {fs.uuid}); mount that, "
            f"and use /dev/mapper/{name} in fstab, not UUID=")
        return record


def release(name: str, dm_factory, state: StateStore, log: Log) -> CheckpointRecord:
    """Undo `setup`: remove the pass-through and the record; the device is mounted directly again."""
    require_root()
    with state.locked():
        record = state.load(name)
        if not record.managed:
            raise RefusedError(
                f"{name!r} was not made by 'fiesnap setup': end it with 'fiesnap commit' or 'fiesnap merge'"
            )
        if record.phase != "passthrough":
            raise RefusedError(f"{name!r} has a checkpoint ({record.phase}): commit or merge it first")
        dm = dm_factory()
        info = dm.info(name)
        refuse_in_use(info, name)
        if info is not None:
            dm.remove(name)
        state.delete(name)
        log(f"released {record.device}: mount it directly again, and take /dev/mapper/{name} out of fstab")
        return record
