"""Devices under fiesnap from boot on: setup, online start, activate, deactivate.

dm-linear opens its device exclusively, so a mounted raw partition cannot get
a snapshot stacked on it. `setup` therefore puts the device behind
/dev/mapper/NAME (a pass-through) once, and the filesystem is mounted from
there. An online `start` then only reloads NAME's table, inside a window in
which the filesystem is frozen:

    store file (through the mount) -> NAME-cow -> zero header -> NAME-snap
    -> load snapshot-origin into NAME -> freeze -> free-space map ->
    suspend NAME (no second freeze) -> resume NAME -> thaw

While frozen, fiesnap writes nothing on that filesystem: every module is
already imported, messages wait until the thaw, the state folder must live
elsewhere, and stdin/stdout/stderr must not be files on it.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, replace
from typing import Callable

from fiesnap.kernel import blockdev
from fiesnap.kernel import fsprobe
from fiesnap.kernel import mounts
from fiesnap.services import storefile
from fiesnap.kernel.directio import AlignedBuffer, DirectDevice
from fiesnap.errors import (
    CheckpointNameError,
    DeviceError,
    DeviceMapperError,
    FiesnapError,
    RefusedError,
    StateError,
    UsageError,
)
from fiesnap.kernel.freeze import frozen
from fiesnap.kernel.fsmap import free_space
from fiesnap.model.identity import IDENTITY_BYTES, check_identity, decode_identity
from fiesnap.kernel.locate import Wanted, find_device
from fiesnap.commands.ops import (
    check_chunk_size,
    check_store_size,
    expected_identity,
    fill_checkpoint,
    identity_writer,
    require_root,
    snapshot_store_type,
)
from fiesnap.services.stack import (
    StackNames,
    build_stack,
    build_store_layers,
    create_passthrough,
    passthrough_targets,
    reload_as_passthrough,
    remove_if_present,
    switch_to_origin,
    unwind,
)
from fiesnap.services.statedir import CheckpointRecord, StateStore, validate_name
from fiesnap.model.units import format_bytes

Log = Callable[[str], None]


def _state_not_on(state: StateStore, devno: int, what: str) -> None:
    if state.device_id() == devno:
        raise StateError(
            f"the state folder {state.path} lives on {what}, the filesystem fiesnap would "
            "checkpoint: set FIESNAP_STATE_DIR to a folder on another filesystem"
        )


# --------------------------------------------------------------------- setup

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
    where = blockdev.mounts_of(dev.major, dev.minor)
    if where:
        raise DeviceError(
            f"{device} is mounted on {', '.join(where)}: unmount it, run setup, then mount /dev/mapper/{name}"
        )
    held = blockdev.holders(dev.major, dev.minor)
    if held:
        raise DeviceError(f"{device} is in use by {', '.join(held)}: take that device down first")
    fs = fsprobe.probe_device(device)
    _state_not_on(state, os.makedev(dev.major, dev.minor), device)
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
            "and use /dev/mapper/{name} in fstab, not UUID=".replace("{name}", name))
        return record


# --------------------------------------------------------------------- start

def resolve_target(target: str, state: StateStore) -> str | None:
    """The managed name `target` means (a name, /dev/mapper/NAME or a mount point), or None
    when it is a plain device for the offline start."""
    names = set(state.names())
    if "/" not in target:
        if target in names:
            return target
        if not os.path.exists(target):
            raise CheckpointNameError(
                f"no device under fiesnap named {target!r}: run 'fiesnap setup DEVICE --name {target}' first"
            )
        return None
    path = os.path.realpath(target)
    if os.path.isdir(path):
        src = _mount_source_devno(path)
        if src is None:
            raise UsageError(f"{target} is not a mount point: give NAME, a mount point or a device")
        name = _managed_name_of(src, state)
        if name is None:
            raise DeviceError(
                f"{target} is mounted straight from {os.major(src)}:{os.minor(src)}, not through fiesnap: "
                "unmount it, run 'fiesnap setup DEVICE --name NAME' and mount /dev/mapper/NAME"
            )
        return name
    try:
        st = os.stat(path)
    except OSError:
        return None  # the offline path gives the proper error
    return _managed_name_of(st.st_rdev, state)


def _mount_source_devno(path: str) -> int | None:
    """dev_t of the filesystem mounted exactly at `path`, if `path` is a mount point."""
    src = blockdev.mount_source(path)
    return None if src is None else os.makedev(*src)


def _managed_name_of(devno: int, state: StateStore) -> str | None:
    """The managed record whose /dev/mapper/NAME (or underlying device) is `devno`."""
    for r in state.load_all():
        if not r.managed:
            continue
        if (r.device_major, r.device_minor) == (os.major(devno), os.minor(devno)):
            return r.name
        try:
            st = os.stat(f"/dev/mapper/{r.name}")
        except OSError:
            continue
        if st.st_rdev == devno:
            return r.name
    return None


@dataclass(frozen=True)
class OnlineStart:
    name: str
    size: int
    chunk_bytes: int


def _check_std_streams(fs_dev: int, where: str) -> None:
    """A frozen filesystem blocks writers: fiesnap's own output must not go there."""
    for fd, label in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        if st.st_dev == fs_dev and not os.isatty(fd):
            raise UsageError(
                f"{label} is a file on {where}, the filesystem to be frozen: redirect it elsewhere"
            )


def start_online(req: OnlineStart, dm_factory, state: StateStore, log: Log) -> CheckpointRecord:
    """Checkpoint a managed device, mounted and busy or not."""
    require_root()
    check_chunk_size(req.chunk_bytes)
    with state.locked():
        record = state.load(req.name)
        name = record.name
        if not record.managed:
            raise RefusedError(f"{name!r} is a checkpoint of its own, not a device under fiesnap")
        if record.phase != "passthrough":
            raise RefusedError(
                f"{name!r} has a checkpoint already ({record.phase}): commit or merge it first"
            )
        dm = dm_factory()
        names = StackNames.for_name(name)
        info = dm.info(name)
        if info is None:
            raise RefusedError(f"/dev/mapper/{name} is not active: run 'fiesnap activate {name}' first")
        if dm.table(name) != passthrough_targets(record):
            raise RefusedError(
                f"/dev/mapper/{name} does not map {record.device} ({record.device_string}) as recorded: "
                f"run 'fiesnap deactivate {name}' and 'fiesnap activate {name}'"
            )
        taken = [n for n in (names.snap, names.cow) if dm.info(n) is not None]
        if taken:
            raise CheckpointNameError(f"device-mapper device {taken[0]!r} exists already: remove it first")
        check_store_size(req.size, req.chunk_bytes, record.device_bytes, record.device)
        nodev = os.makedev(info.major, info.minor)
        _state_not_on(state, nodev, f"/dev/mapper/{name}")
        # The filesystem may have been re-made since setup: the checkpoint (and its identity
        # block, and activate's search after a reboot) go by what is there now.
        fs = fsprobe.probe_device(f"/dev/mapper/{name}")
        record = replace(record, fs_uuid=fs.uuid, fstype=fs.fstype)
        store_type = snapshot_store_type(dm)
        checkpoint_id = uuid.uuid4().hex
        # A private mount of /dev/mapper/NAME: when NAME is mounted already it shares the
        # superblock, so the store lands at the filesystem root and freezing it freezes the
        # user's mount.
        with mounts.private_mount(f"/dev/mapper/{name}", record.fstype) as mnt:
            fs_dev = os.stat(mnt).st_dev
            _state_not_on(state, fs_dev, f"/dev/mapper/{name}")
            _check_std_streams(fs_dev, f"/dev/mapper/{name}")
            fsprobe.check_statfs(mnt)
            storefile.check_free_space(mnt, req.size, label=f"/dev/mapper/{name}")
            created = storefile.create_store_file(
                mnt, f"store-{name}-{checkpoint_id[:8]}", req.size,
                head=identity_writer(checkpoint_id, record.fs_uuid, record.device_bytes, req.chunk_bytes))
            log(f"created store file /{created.relpath} ({format_bytes(req.size)}, "
                f"{len(created.extents)} extents)")
            new = replace(record, notes=dict(record.notes), phase="starting", mode="online")
            try:
                fill_checkpoint(new, checkpoint_id, store_type, req.chunk_bytes, created)
                state.save(new)
                _attach(dm, new, mnt, state, log)
            except BaseException as e:
                try:
                    storefile.remove_store_file(mnt, created.relpath)
                    state.save(record)
                except BaseException as e2:
                    e.add_note(f"while undoing the start: {e2}")
                raise
        log(f"checkpoint {name!r} active; /dev/mapper/{name} stayed in use throughout")
        return new


def _attach(dm, record: CheckpointRecord, mnt: str, state: StateStore, log: Log) -> None:
    """Build cow + snapshot, switch NAME to snapshot-origin while frozen, record the free map."""
    made = build_store_layers(dm, record, zero_header=True, log=log)
    try:
        t0 = time.monotonic()
        free = switch_to_origin(dm, record, lambda: frozen(mnt), lambda: free_space(mnt))
        frozen_s = time.monotonic() - t0
    except BaseException:
        unwind(dm, made)
        raise
    try:
        record.free_map = [[s, n] for s, n in free]
        record.phase = "active"
        record.notes = {**record.notes, "frozen_seconds": round(frozen_s, 3)}
        state.save(record)
    except BaseException:
        reload_as_passthrough(dm, record)
        unwind(dm, made)
        raise
    log(f"switched /dev/mapper/{record.name} to snapshot-origin; filesystem frozen {frozen_s:.2f}s")


# --------------------------------------------------------------------- activate

@dataclass(frozen=True)
class ActivateResult:
    name: str
    result: str  # "activated", "already active", "skipped"
    detail: str = ""

    def to_dict(self) -> dict:
        return {"name": self.name, "result": self.result, "detail": self.detail}


def read_identity_block(device: str, offset: int) -> bytes:
    with AlignedBuffer(IDENTITY_BYTES) as buf, DirectDevice.open(device, write=False) as dev:
        return bytes(dev.read_into(buf, offset, IDENTITY_BYTES))


def check_store_identity(record: CheckpointRecord, device: str) -> None:
    """Refuse unless the identity block at the recorded place matches the record."""
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
    expected = expected_identity(record)
    previous = record.notes.get("previous_identity")
    if previous and (found.generation, found.map_sha256) == (previous["generation"], previous["map_sha256"]):
        # `extend` recorded a longer map and died before rewriting the block: the
        # recorded map only appends safe chunks to the one the block names.
        expected = replace(expected, generation=previous["generation"], map_sha256=previous["map_sha256"])
    check_identity(found, expected, where)


def _locate(record: CheckpointRecord, state: StateStore) -> None:
    """Find the device again (names move between boots) and update the record's numbers."""
    dev = find_device(Wanted(record.name, record.device, record.fs_uuid, record.device_bytes))
    if (dev.path, dev.major, dev.minor) != (record.device, record.device_major, record.device_minor):
        record.device = os.path.realpath(dev.path)
        record.device_major, record.device_minor = dev.major, dev.minor
        state.save(record)


def _activate_one(dm, record: CheckpointRecord, state: StateStore, log: Log) -> ActivateResult:
    name = record.name
    names = StackNames.for_name(name)
    if record.phase in ("merging", "copied"):
        raise RefusedError(f"a rollback of {name!r} is under way: run 'fiesnap merge {name}' to finish it")
    if record.phase in ("starting", "committing"):
        raise RefusedError(
            f"checkpoint {name!r} was interrupted while {record.phase}: run 'fiesnap commit {name}' to finish"
        )
    present = [n for n in names.all() if dm.info(n) is not None]
    if record.phase == "passthrough":
        if names.origin in present:
            return ActivateResult(name, "already active")
        _locate(record, state)
        create_passthrough(dm, record)
        log(f"activated /dev/mapper/{name} (pass-through of {record.device})")
        return ActivateResult(name, "activated", "passthrough")
    if set(present) == set(names.all()):
        return ActivateResult(name, "already active")
    if present:
        raise RefusedError(
            f"{name!r} is half active ({', '.join(present)} present): run 'fiesnap deactivate {name}' first"
        )
    _locate(record, state)
    check_store_identity(record, record.device)
    build_stack(dm, record, zero_header=False, log=log)
    log(f"activated checkpoint {name!r} over its existing store")
    return ActivateResult(name, "activated", "checkpoint")


def activate(name: str | None, dm_factory, state: StateStore, log: Log, *,
             wait_seconds: float = 0.0) -> list[ActivateResult]:
    """Rebuild recorded devices after boot. With --all, one failure does not stop the others."""
    require_root()
    with state.locked():
        records = [state.load(name)] if name else state.load_all()
        dm = dm_factory()
        results = []
        errors: list[FiesnapError] = []
        deadline = time.monotonic() + wait_seconds  # one budget for all: boot waits at most this
        for r in records:
            while True:
                try:
                    results.append(_activate_one(dm, r, state, log))
                    break
                except FiesnapError as e:
                    if isinstance(e, DeviceError) and time.monotonic() < deadline:
                        time.sleep(0.5)  # devices still appearing during boot
                        continue
                    if name:
                        raise
                    errors.append(e)
                    results.append(ActivateResult(r.name, "failed", str(e)))
                    break
        if errors:
            for e in errors:
                log(f"error: {e}")
            first = errors[0]
            raise type(first)(
                f"{len(errors)} of {len(records)} could not be activated; first: {first}"
            )
        return results


# --------------------------------------------------------------------- deactivate

def _refuse_in_use(info, name: str) -> None:
    """/dev/mapper/NAME may only go away when nothing has it mounted or open."""
    if info is None:
        return
    where = blockdev.mounts_of(info.major, info.minor)
    if where:
        raise RefusedError(f"/dev/mapper/{name} is mounted on {', '.join(where)}: unmount it first")
    if info.open_count:
        raise DeviceError(f"/dev/mapper/{name} is open by another program: close it first")


def deactivate(name: str, dm_factory, state: StateStore, log: Log) -> list[str]:
    """Take NAME's devices down, ending nothing: activate brings them back."""
    require_root()
    with state.locked():
        record = state.load(name)
        dm = dm_factory()
        names = StackNames.for_name(name)
        _refuse_in_use(dm.info(names.origin), name)
        snap = dm.info(names.snap)
        if snap is not None and snap.open_count:
            raise DeviceError(f"{names.snap} is open by another program: close it first")
        removed = []
        for n in names.all():  # origin first: once it is gone nothing writes the device
            if dm.info(n) is not None:
                try:
                    dm.remove(n)
                except DeviceMapperError as e:
                    raise DeviceMapperError(
                        f"{e}; removed so far: {', '.join(removed) or 'nothing'}; "
                        f"'fiesnap activate {name}' rebuilds them"
                    ) from e
                removed.append(n)
        log(f"deactivated {name!r} ({record.phase}); 'fiesnap activate {name}' brings it back")
        return removed



# --------------------------------------------------------------------- release

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
        _refuse_in_use(info, name)
        if info is not None:
            dm.remove(name)
        state.delete(name)
        log(f"released {record.device}: mount it directly again, and take /dev/mapper/{name} out of fstab")
        return record
