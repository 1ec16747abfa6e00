"""Seal the device when its stack goes down; find writes that bypassed the origin.

See model/seal.py for what a superblock can tell. `seal_device` runs when the
stack is taken down (deactivate, and at shutdown through the activation
unit); `find_bypass` when it is built again (activate) and before a merge.
Everything is read raw (O_DIRECT) from the device beneath the stack: the page
cache of the raw device can be stale.
"""

from __future__ import annotations

import time

from fiesnap.kernel import boot
from fiesnap.kernel.fsprobe import read_head
from fiesnap.model.record import CheckpointRecord
from fiesnap.model.seal import SuperblockStamp, explain_change, mounted_since, stamp_of


def current_stamp(record: CheckpointRecord) -> SuperblockStamp:
    return stamp_of(read_head(record.device), record.fstype)


def built_now(record: CheckpointRecord) -> CheckpointRecord:
    """`record` with the stack just built in this boot."""
    return record.built(boot.boot_id(), int(time.time()))


def find_bypass(record: CheckpointRecord) -> str:
    """Why the device seems written outside /dev/mapper/NAME since the stack was last up; "" if not seen.

    Call with the stack down. Against a seal: any change of the superblock.
    Without one (a reboot, no deactivate): an ext4 mounted read-write during
    this boot, before the stack was built in it -- judged only when the clock
    is not behind the last build (a machine without a real-time clock)."""
    if record.seal is not None:
        change = explain_change(record.seal, current_stamp(record))
        if change:
            return (f"{record.device} was written outside /dev/mapper/{record.name} after "
                    f"'fiesnap deactivate': {change}")
        return ""
    if not record.built_boot or record.built_boot == boot.boot_id():
        return ""
    if time.time() < record.built_at:
        return ""  # the clock is behind the last build: mount times prove nothing
    now = current_stamp(record)
    if mounted_since(now, boot.boot_time()):
        return (f"{record.device} was mounted read-write directly during this boot, before "
                f"/dev/mapper/{record.name} was activated (ext4 mount count {now.mount_count})")
    return ""
