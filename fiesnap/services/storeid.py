"""The store identity block, read raw from the device beneath everything.

A store is only ever mapped (NAME-cow) after the block at the recorded place
says it belongs to this checkpoint: after a reboot that renumbered disks, the
record's major:minor may name another disk, and mapping "the store" there
would hand dm-snapshot -- or a merge -- someone else's blocks.
"""

from __future__ import annotations

import os
from dataclasses import replace

from fiesnap.errors import DeviceError, RefusedError
from fiesnap.kernel.directio import AlignedBuffer, DirectDevice
from fiesnap.model.identity import IDENTITY_BYTES, check_identity, decode_identity
from fiesnap.model.record import CheckpointRecord


def read_identity_block(device: str, offset: int) -> bytes:
    with AlignedBuffer(IDENTITY_BYTES) as buf, DirectDevice.open(device, write=False) as dev:
        return bytes(dev.read_into(buf, offset, IDENTITY_BYTES))


def check_store_identity(record: CheckpointRecord, device: str, *, any_generation: bool = False) -> None:
    """Refuse unless the identity block at the recorded place matches the record.

    `any_generation`: accept a block of this checkpoint from an earlier store
    map (generation 1..now). A merge needs that: `extend` rewrites the block
    through the filesystem, so the checkpoint-time block is saved in the store
    and comes back on the device as the merge copies. The checkpoint id, the
    filesystem UUID, the device size and the chunk size must still match.
    """
    if record.identity_offset < 0:
        raise RefusedError(
            f"checkpoint {record.name!r} has no store identity recorded (made by an older fiesnap): "
            "refusing to map its store blindly"
        )
    where = f"{device} byte {record.identity_offset}"
    try:
        raw = read_identity_block(device, record.identity_offset)
    except OSError as e:
        raise DeviceError(f"cannot read the store identity at {where}: {os.strerror(e.errno or 0)}") from e
    found = decode_identity(raw, where)
    expected = record.expected_identity()
    previous = record.previous_identity
    if previous is not None and (found.generation, found.map_sha256) == (previous.generation, previous.map_sha256):
        # `extend` recorded a longer map and died before rewriting the block: the
        # recorded map only appends safe chunks to the one the block names.
        expected = replace(expected, generation=previous.generation, map_sha256=previous.map_sha256)
    elif any_generation and 1 <= found.generation < expected.generation:
        expected = replace(expected, generation=found.generation, map_sha256=found.map_sha256)
    check_identity(found, expected, where)
