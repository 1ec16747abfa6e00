"""Checks every command makes before it touches a device (refuse early, change nothing)."""

from __future__ import annotations

import datetime as _dt
import os
from typing import Callable

from fiesnap.errors import DeviceError, FilesystemError, NotRootError, UsageError
from fiesnap.kernel import blockdev, fsprobe
from fiesnap.model.record import MIN_STORE_CHUNKS, ROLLBACK_PHASES, CheckpointRecord
from fiesnap.model.units import format_bytes

Log = Callable[[str], None]

DEFAULT_CHUNK_BYTES = 4096
#: `start` makes a free-aware store unless told --plain (model/seeding.py).
DEFAULT_FREE_AWARE = True
MIN_CHUNK_BYTES = 4096
MAX_CHUNK_BYTES = 512 * 1024


def require_root() -> None:
    if os.geteuid() != 0:
        raise NotRootError("fiesnap must run as root (device-mapper, mounts and block devices need it): use sudo")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def check_chunk_size(chunk_bytes: int) -> int:
    if chunk_bytes & (chunk_bytes - 1) or not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise UsageError(
            f"invalid chunk size {chunk_bytes} bytes: use a power of two from 4K to 512K (default 4K)"
        )
    return chunk_bytes


def check_store_size(size: int, chunk_bytes: int, device_bytes: int, device: str) -> None:
    if size < MIN_STORE_CHUNKS * chunk_bytes:
        raise UsageError(
            f"store size {format_bytes(size)} is too small: use at least "
            f"{format_bytes(MIN_STORE_CHUNKS * chunk_bytes)}"
        )
    if size >= device_bytes:
        raise UsageError(
            f"store size {format_bytes(size)} is not smaller than {device} "
            f"({format_bytes(device_bytes)}): choose a smaller --size"
        )


def check_unused(dev: blockdev.BlockDevice, device: str, unmount_hint: str) -> None:
    """Refuse a device that is mounted or held by another device (dm-linear opens it exclusively)."""
    where = blockdev.mounts_of(dev.major, dev.minor)
    if where:
        raise DeviceError(f"{device} is mounted on {', '.join(where)}: {unmount_hint}")
    held = blockdev.holders(dev.major, dev.minor)
    if held:
        raise DeviceError(f"{device} is in use by {', '.join(held)}: take that device down first")


def verify_device(record: CheckpointRecord) -> None:
    """Refuse to touch a device that is not the one the checkpoint was taken of.

    Device names move between boots; writing a merge onto the wrong disk would
    destroy it. major:minor, size and filesystem UUID must all match (the UUID
    is not checked once a merge has started writing: the superblock may then
    be half-way back to its checkpoint-time content).
    """
    try:
        dev = blockdev.open_block_device(record.device)
    except DeviceError as e:
        raise DeviceError(f"checkpoint {record.name!r}: {e}") from None
    if (dev.major, dev.minor, dev.size_bytes) != (record.device_major, record.device_minor,
                                                  record.device_bytes):
        raise DeviceError(
            f"{record.device} is now {dev.major}:{dev.minor} with {dev.size_bytes} bytes, but "
            f"checkpoint {record.name!r} was taken of {record.device_string} with "
            f"{record.device_bytes} bytes: refusing to touch it; reattach the original device"
        )
    if record.phase in ROLLBACK_PHASES:
        return
    try:
        uuid_now = fsprobe.probe_device(record.device).uuid
    except FilesystemError:
        uuid_now = None
    if uuid_now != record.fs_uuid:
        raise DeviceError(
            f"{record.device} holds filesystem {uuid_now or 'none'}, but checkpoint "
            f"{record.name!r} was taken of filesystem {record.fs_uuid}: refusing to touch it"
        )
