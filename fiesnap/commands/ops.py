"""The checkpoint operations: start, status, commit, merge.

Each operation checks everything it can before it changes anything, records
its phase before each irreversible step, and can be re-run after an
interruption to finish the job.
"""

from __future__ import annotations

import datetime as _dt
import os
import uuid
from dataclasses import dataclass
from typing import Callable

from fiesnap.kernel import blockdev
from fiesnap.kernel import fsprobe
from fiesnap.kernel import mounts
from fiesnap.services import storefile
from fiesnap.model.cowtable import CowTable
from fiesnap.errors import (
    CheckpointNameError,
    DeviceError,
    FilesystemError,
    NotRootError,
    RefusedError,
    StateError,
    UsageError,
)
from fiesnap.model.extents import head_location, whole_chunks, without_head
from fiesnap.model.identity import IDENTITY_BYTES, StoreIdentity, encode_identity, map_checksum
from fiesnap.kernel.fsmap import free_space
from fiesnap.services.cowio import MergeResult, copy_back, make_plan, read_frontier, read_table
from fiesnap.model.snapstatus import SnapshotUsage, parse_snapshot_status
from fiesnap.services.stack import (
    StackNames,
    build_stack,
    create_passthrough,
    ensure_cow,
    passthrough_targets,
    reload_as_passthrough,
    remove_if_present,
)
from fiesnap.services.statedir import CheckpointRecord, StateStore, validate_name
from fiesnap.model.units import format_bytes

Log = Callable[[str], None]

DEFAULT_CHUNK_BYTES = 4096
MIN_CHUNK_BYTES = 4096
MAX_CHUNK_BYTES = 512 * 1024
#: header + first metadata area + at least one data chunk, with room to spare.
MIN_STORE_CHUNKS = 8


def require_root() -> None:
    if os.geteuid() != 0:
        raise NotRootError("fiesnap must run as root (device-mapper, mounts and block devices need it): use sudo")


def _now() -> str:
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


def snapshot_store_type(dm) -> str:
    """PO (overflow reported as Overflow, not Invalid) needs snapshot target >= 1.15."""
    version = dm.target_versions().get("snapshot")
    return "PO" if version is not None and tuple(version) >= (1, 15, 0) else "P"


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
    if record.phase in ("merging", "copied"):
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


# --------------------------------------------------------------------- start

@dataclass(frozen=True)
class StartRequest:
    device: str
    size: int
    name: str | None = None
    chunk_bytes: int = DEFAULT_CHUNK_BYTES


def start(req: StartRequest, dm_factory, state: StateStore, log: Log) -> CheckpointRecord:
    require_root()
    check_chunk_size(req.chunk_bytes)
    dev = blockdev.open_block_device(req.device)
    name = validate_name(req.name or os.path.basename(os.path.realpath(req.device)))
    where = blockdev.mounts_of(dev.major, dev.minor)
    if where:
        raise DeviceError(f"{req.device} is mounted on {', '.join(where)}: unmount it first")
    held = blockdev.holders(dev.major, dev.minor)
    if held:
        raise DeviceError(
            f"{req.device} is in use by {', '.join(held)}: take that device down first"
        )
    check_store_size(req.size, req.chunk_bytes, dev.size_bytes, req.device)
    fs = fsprobe.probe_device(req.device)
    if state.device_id() == os.makedev(dev.major, dev.minor):
        raise StateError(
            f"the state folder {state.path} lives on {req.device}: set FIESNAP_STATE_DIR to a "
            "folder on another filesystem"
        )

    with state.locked():
        dm = dm_factory()
        names = StackNames.for_name(name)
        if state.exists(name):
            raise CheckpointNameError(
                f"a checkpoint named {name!r} exists already: pick another --name or end it first"
            )
        taken = [n for n in names.all() if dm.info(n) is not None]
        if taken:
            raise CheckpointNameError(
                f"device-mapper device {taken[0]!r} exists already: pick another --name"
            )
        store_type = snapshot_store_type(dm)
        checkpoint_id = uuid.uuid4().hex
        store_name = f"store-{name}-{checkpoint_id[:8]}"

        # Create the store file and read the checkpoint-time free-space map on a
        # private mount; unmounting flushes everything, so the device content at
        # this point is the checkpoint.
        # Checks first, on a read-only mount: a clean filesystem gets no write
        # from it, so a refusal here leaves the device exactly as it was.
        with mounts.private_mount(req.device, fs.fstype, readonly=True) as mnt:
            fsprobe.check_statfs(mnt)
            storefile.check_free_space(mnt, req.size, label=req.device)
        with mounts.private_mount(req.device, fs.fstype) as mnt:
            created = storefile.create_store_file(
                mnt, store_name, req.size,
                head=identity_writer(checkpoint_id, fs.uuid, dev.size_bytes, req.chunk_bytes))
            try:
                free = free_space(mnt)
            except BaseException:
                storefile.remove_store_file(mnt, created.relpath)
                raise
        log(f"created store file /{created.relpath} ({format_bytes(req.size)}, "
            f"{len(created.extents)} extents)")

        record: CheckpointRecord | None = None
        try:
            record = CheckpointRecord(
                name=name,
                device=os.path.realpath(req.device),
                device_major=dev.major,
                device_minor=dev.minor,
                device_bytes=dev.size_bytes,
                fstype=fs.fstype,
                fs_uuid=fs.uuid,
                free_map=[[s, n] for s, n in free],
                phase="starting",
            )
            fill_checkpoint(record, checkpoint_id, store_type, req.chunk_bytes, created)
            state.save(record)
            build_stack(dm, record, zero_header=True, log=log)
            record.phase = "active"
            state.save(record)
        except BaseException:
            _discard_store(req.device, fs.fstype, created.relpath, log)
            if record is not None:
                state.delete(name)
            raise
        log(f"checkpoint {name!r} active: mount /dev/mapper/{name}")
        return record


def store_map(extents, chunk_bytes: int) -> CowTable:
    """The store's chunks: whole chunks of the file, never the identity block."""
    cow = CowTable.from_runs(whole_chunks(without_head(extents, IDENTITY_BYTES), chunk_bytes), chunk_bytes)
    if cow.total_chunks < MIN_STORE_CHUNKS:
        raise FilesystemError(
            f"the store file has only {cow.total_chunks} whole {chunk_bytes}-byte "
            "chunks: the filesystem is too fragmented; choose a larger --size or a "
            "smaller --chunk-size"
        )
    return cow


def identity_writer(checkpoint_id: str, fs_uuid: str, device_bytes: int, chunk_bytes: int):
    """The store file's identity block for its extents (storefile.create_store_file's `head`)."""
    def head(extents) -> bytes:
        cow = store_map(extents, chunk_bytes)
        return encode_identity(StoreIdentity(
            checkpoint_id=checkpoint_id, fs_uuid=fs_uuid, device_bytes=device_bytes,
            chunk_bytes=chunk_bytes, map_sha256=map_checksum(cow.to_dict()), generation=1))
    return head


def expected_identity(record: CheckpointRecord) -> StoreIdentity:
    return StoreIdentity(
        checkpoint_id=record.checkpoint_id, fs_uuid=record.fs_uuid,
        device_bytes=record.device_bytes, chunk_bytes=record.chunk_bytes,
        map_sha256=map_checksum(record.cow_table), generation=record.generation)


def fill_checkpoint(record: CheckpointRecord, checkpoint_id: str, store_type: str,
                    chunk_bytes: int, created: storefile.StoreFile) -> None:
    """Put a new checkpoint's store into `record` (its map is what the identity block hashes)."""
    cow = store_map(created.extents, chunk_bytes)
    record.checkpoint_id = checkpoint_id
    record.chunk_bytes = chunk_bytes
    record.store_type = store_type
    record.store_relpath = created.relpath
    record.store_file_bytes = created.size
    record.store_extents = [[e.logical, e.physical, e.length, e.flags] for e in created.extents]
    record.cow_table = cow.to_dict()
    record.identity_offset = head_location(created.extents, IDENTITY_BYTES)
    record.generation = 1
    record.created = _now()
    first = record.identity_offset // chunk_bytes
    last = (record.identity_offset + IDENTITY_BYTES - 1) // chunk_bytes
    if cow.store_chunks().overlaps(first, last - first + 1):
        raise FilesystemError("internal check failed: the identity block lies inside the mapped store; retry")


def mount_source(record: CheckpointRecord) -> str:
    """What to mount to reach the filesystem: /dev/mapper/NAME once NAME holds the device."""
    return f"/dev/mapper/{record.name}" if record.managed else record.device


def _discard_store(device: str, fstype: str, relpath: str, log: Log) -> None:
    with mounts.private_mount(device, fstype) as mnt:
        storefile.remove_store_file(mnt, relpath)
    log(f"removed store file /{relpath}")


# --------------------------------------------------------------------- status

#: Exceptions that may have been in flight when the store filled: an invalid
#: snapshot whose committed frontier is this close to the end overflowed.
OVERFLOW_SLACK_CHUNKS = 64


def snapshot_usage(dm, record: CheckpointRecord) -> SnapshotUsage:
    """The kernel's view of the snapshot, with `invalid` split into overflowed or not.

    An origin write that finds the store full invalidates the snapshot and the
    kernel says only `Invalid` (store type PO changes writes to the snapshot
    device only). The committed allocation frontier on disk tells an overflow
    from an I/O error.
    """
    names = StackNames.for_name(record.name)
    lines = dm.status(names.snap)
    usage = parse_snapshot_status(lines[0][3] if lines else "Invalid")
    if usage.state != "invalid":
        return usage
    cow = CowTable.from_dict(record.cow_table)
    try:
        frontier = read_frontier(dm.node_path(names.cow), record)
    except OSError:
        return usage
    if frontier is not None and frontier >= cow.total_chunks - min(OVERFLOW_SLACK_CHUNKS, cow.total_chunks // 4):
        return SnapshotUsage("overflowed")
    return usage

@dataclass(frozen=True)
class CheckpointStatus:
    record: CheckpointRecord
    state: str
    usage: SnapshotUsage | None
    mounted_on: tuple[str, ...]

    def to_dict(self) -> dict:
        r = self.record
        u = self.usage
        store_bytes = None
        segments = None
        if r.cow_table:
            cow = CowTable.from_dict(r.cow_table)
            store_bytes = cow.total_chunks * r.chunk_bytes
            segments = len(cow.segments)
        return {
            "name": r.name,
            "state": self.state,
            "phase": r.phase,
            "managed": r.managed,
            "mode": r.mode if r.checkpoint_id else None,
            "device": r.device,
            "fstype": r.fstype,
            "fs_uuid": r.fs_uuid,
            "store_file": "/" + r.store_relpath if r.store_relpath else None,
            "store_bytes": store_bytes,
            "used_bytes": u.used_bytes if u else None,
            "metadata_bytes": u.metadata_bytes if u else None,
            "percent_used": u.percent_used if u else None,
            "chunk_bytes": r.chunk_bytes or None,
            "extents": len(r.store_extents) if r.store_extents else None,
            "segments": segments,
            "store_type": r.store_type or None,
            "start_time": r.created or None,
            "mounted_on": list(self.mounted_on),
            "checkpoint_id": r.checkpoint_id or None,
        }


def status(dm_factory, state: StateStore, name: str | None) -> list[CheckpointStatus]:
    require_root()
    records = [state.load(name)] if name else state.load_all()
    if not records:
        return []
    dm = dm_factory()
    out = []
    for r in records:
        names = StackNames.for_name(r.name)
        usage = None
        if r.phase == "passthrough":
            st = "passthrough" if dm.info(names.origin) is not None else "inactive"
        elif r.phase != "active":
            st = r.phase
        elif dm.info(names.snap) is None:
            st = "inactive"
        else:
            usage = snapshot_usage(dm, r)
            st = usage.state
        origin = dm.info(names.origin)
        mounted = tuple(blockdev.mounts_of(origin.major, origin.minor)) if origin else ()
        out.append(CheckpointStatus(r, st, usage, mounted))
    return out


# --------------------------------------------------------------------- commit

def commit(name: str, dm_factory, state: StateStore, log: Log) -> str:
    """End the checkpoint keeping every change. Returns "passthrough" or "removed"."""
    require_root()
    with state.locked():
        record = state.load(name)
        dm = dm_factory()
        names = StackNames.for_name(name)
        if record.phase in ("merging", "copied"):
            raise RefusedError(
                f"a rollback of {name!r} is under way: run 'fiesnap merge {name}' to finish it"
            )
        origin = dm.info(names.origin)
        mounted = blockdev.mounts_of(origin.major, origin.minor) if origin else []
        if record.phase == "passthrough" and record.managed:
            raise RefusedError(
                f"{name!r} has no checkpoint: nothing to commit; 'fiesnap start {name} --size SIZE' takes one"
            )
        if record.phase == "passthrough":
            if mounted:
                raise RefusedError(
                    f"{name!r} is a plain pass-through mounted on {mounted[0]}: nothing to commit; "
                    "unmount it and run commit again to remove the device"
                )
            remove_if_present(dm, names.origin)
            state.delete(name)
            log(f"removed pass-through /dev/mapper/{name}")
            return "removed"

        verify_device(record)
        if record.phase != "committing":
            record.phase = "committing"
            state.save(record)
        if record.managed:
            return _commit_managed(dm, record, state, log)
        if mounted:
            reload_as_passthrough(dm, record)
            log(f"/dev/mapper/{name} is now a plain pass-through; still mounted on {mounted[0]}")
            remove_if_present(dm, names.snap)
            remove_if_present(dm, names.cow)
            _discard_store(f"/dev/mapper/{name}", record.fstype, record.store_relpath, log)
            record.phase = "passthrough"
            state.save(record)
            return "passthrough"
        if origin is not None and origin.open_count:
            raise DeviceError(
                f"/dev/mapper/{name} is open by another program: close it and run commit again"
            )
        remove_if_present(dm, names.origin)
        remove_if_present(dm, names.snap)
        remove_if_present(dm, names.cow)
        _discard_store(record.device, record.fstype, record.store_relpath, log)
        state.delete(name)
        log(f"checkpoint {name!r} committed; {record.device} holds the current data")
        return "removed"


def _commit_managed(dm, record: CheckpointRecord, state: StateStore, log: Log) -> str:
    """Back to the pass-through, mounted or not; the record stays for the next checkpoint."""
    names = StackNames.for_name(record.name)
    if dm.info(names.origin) is None:
        remove_if_present(dm, names.snap)
        remove_if_present(dm, names.cow)
        create_passthrough(dm, record)
    elif dm.table(names.origin) != passthrough_targets(record):
        reload_as_passthrough(dm, record)
    log(f"/dev/mapper/{record.name} is a plain pass-through again")
    remove_if_present(dm, names.snap)
    remove_if_present(dm, names.cow)
    if record.store_relpath:
        _discard_store(mount_source(record), record.fstype, record.store_relpath, log)
    state.save(record.as_passthrough())
    log(f"checkpoint {record.name!r} committed; the device holds the current data")
    return "passthrough"


# --------------------------------------------------------------------- merge

def merge(name: str, dm_factory, state: StateStore, log: Log, *, keep_store: bool = False,
          progress_factory=None) -> MergeResult | None:
    """Roll back to the checkpoint. Safe to re-run after an interruption."""
    require_root()
    with state.locked():
        record = state.load(name)
        dm = dm_factory()
        names = StackNames.for_name(name)
        if record.phase == "starting":
            raise RefusedError(
                f"checkpoint {name!r} never finished starting: nothing to roll back; "
                f"run 'fiesnap commit {name}' to clean up"
            )
        if record.phase in ("committing", "passthrough"):
            raise RefusedError(
                f"checkpoint {name!r} was committed: there is nothing to roll back"
            )
        verify_device(record)
        where = blockdev.mounts_of(record.device_major, record.device_minor)
        for n in names.all():
            info = dm.info(n)
            if info is not None:
                where += blockdev.mounts_of(info.major, info.minor)
        if where:
            raise RefusedError(
                f"the filesystem is mounted on {', '.join(where)}: unmount it, then run merge again"
            )
        result = None
        if record.phase == "active":
            _precheck_merge(dm, record, names)
            origin = dm.info(names.origin)
            if origin is not None and origin.open_count:
                raise DeviceError(
                    f"/dev/mapper/{name} is open by another program: close it and run merge again"
                )
            record.phase = "merging"
            state.save(record)
        if record.phase == "merging":
            # Origin first: once it is gone nothing can write to the device, and
            # removing the snapshot afterwards cannot let an unsaved write through.
            remove_if_present(dm, names.origin)
            remove_if_present(dm, names.snap)
            cow_node = ensure_cow(dm, record)
            table = read_table(cow_node, record)
            plan = make_plan(table, record)
            log(f"merging {len(table.entries)} chunks in {len(plan.runs)} runs "
                f"({plan.total_bytes} bytes) onto {record.device}")
            progress = progress_factory(plan.total_bytes) if progress_factory else None
            try:
                result = copy_back(plan, record, cow_node, record.device,
                                   progress=progress.advance if progress else (lambda n: None))
            finally:
                if progress:
                    progress.close()
            record.phase = "copied"
            state.save(record)
        if record.phase == "copied":
            remove_if_present(dm, names.cow)
            if record.managed and dm.info(names.origin) is None:
                create_passthrough(dm, record)
            if keep_store:
                log(f"kept the store file /{record.store_relpath} (immutable; "
                    "chattr -i it before deleting)")
            else:
                _discard_store(mount_source(record), record.fstype, record.store_relpath, log)
            if record.managed:
                state.save(record.as_passthrough())
                log(f"/dev/mapper/{name} is a plain pass-through again: mount it")
            else:
                state.delete(name)
            log(f"rolled {record.device} back to checkpoint {name!r} of {record.created}")
        return result


def _precheck_merge(dm, record: CheckpointRecord, names: StackNames) -> None:
    """Refuse before changing anything: invalid/overflowed snapshot, unreadable store."""
    snap = dm.info(names.snap)
    if snap is not None:
        usage = snapshot_usage(dm, record)
        if usage.state != "active":
            raise RefusedError(
                f"checkpoint {record.name!r} is {usage.state}: the store did not keep every "
                f"change, so a rollback is impossible; 'fiesnap commit {record.name}' keeps "
                "the current data"
            )
    created_cow = dm.info(names.cow) is None
    cow_node = ensure_cow(dm, record)
    try:
        table = read_table(cow_node, record)
        make_plan(table, record)
    finally:
        if created_cow:
            remove_if_present(dm, names.cow)
