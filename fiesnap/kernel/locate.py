"""Find a recorded device again after a reboot, by what it holds, never by a guess.

Device names and numbers move between boots (/dev/vdb can become /dev/vdc).
A device is the recorded one only if it holds the recorded filesystem UUID and
has the recorded size. The recorded path is tried first; otherwise every
non-device-mapper block device of the right size is probed. Exactly one match
is accepted; none or several is a refusal.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from fiesnap.kernel.blockdev import BlockDevice, open_block_device
from fiesnap.errors import DeviceError, FiesnapError
from fiesnap.kernel.fsprobe import probe_device

SYS_CLASS_BLOCK = "/sys/class/block"


@dataclass(frozen=True)
class Wanted:
    """What the device must be: its filesystem UUID and size, and where it last was."""

    label: str  # the checkpoint name, for messages
    path: str
    fs_uuid: str
    size_bytes: int


def _uuid_of(path: str) -> str | None:
    try:
        return probe_device(path).uuid
    except (FiesnapError, OSError):
        return None


def _candidates(sys_block: str) -> list[str]:
    try:
        names = sorted(os.listdir(sys_block))
    except OSError:
        return []
    out = []
    for n in names:
        if n.startswith(("dm-", "ram", "zram", "sr", "fd")):
            continue  # fiesnap's own layers (same UUID as the device), and no-disk devices
        path = os.path.join("/dev", n)
        if os.path.exists(path):
            out.append(path)
    return out


def _size_of(sys_block: str, name: str) -> int | None:
    try:
        with open(os.path.join(sys_block, name, "size")) as f:
            return int(f.read()) * 512
    except (OSError, ValueError):
        return None


def find_device(want: Wanted, *, sys_block: str = SYS_CLASS_BLOCK) -> BlockDevice:
    """The block device holding `want`, or a DeviceError that says what was found instead."""
    recorded: BlockDevice | None = None
    try:
        recorded = open_block_device(want.path)
    except DeviceError:
        recorded = None
    if recorded is not None and _uuid_of(want.path) == want.fs_uuid:
        if recorded.size_bytes != want.size_bytes:
            raise DeviceError(
                f"{want.path} holds the filesystem of {want.label!r} but is now {recorded.size_bytes} bytes, "
                f"not the recorded {want.size_bytes}: refusing; give the device back its size"
            )
        return recorded
    matches = []
    for path in _candidates(sys_block):
        name = os.path.basename(path)
        if _size_of(sys_block, name) != want.size_bytes:
            continue
        if os.path.realpath(path) == os.path.realpath(want.path):
            continue
        if _uuid_of(path) == want.fs_uuid:
            matches.append(path)
    if len(matches) == 1:
        return open_block_device(matches[0])
    if matches:
        raise DeviceError(
            f"{len(matches)} devices hold filesystem {want.fs_uuid} with {want.size_bytes} bytes "
            f"({', '.join(matches)}): refusing to guess which is {want.label!r}; detach the copies"
        )
    raise DeviceError(
        f"cannot find the device of {want.label!r} (filesystem {want.fs_uuid}, {want.size_bytes} bytes, "
        f"last seen as {want.path}): attach it and retry"
    )
