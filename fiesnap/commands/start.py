"""`fiesnap start`: take a checkpoint, of an unmounted device or online.

Offline (an unmounted DEVICE): the store file is created on a private mount,
the free-space map read, the mount dropped (which flushes everything: the
device content then is the checkpoint), and the whole stack built with
`NAME` resumed last (services/stack.py says why).

Online (a device under fiesnap, `NAME` or its mount point): dm-linear opens
its device exclusively, so a mounted raw partition cannot get a snapshot
stacked on it; `setup` put it behind /dev/mapper/NAME once, and an online
start only reloads NAME's table, inside a window in which the filesystem is
frozen:

    store file (through the mount) -> NAME-cow -> zero header -> NAME-snap
    -> load snapshot-origin into NAME -> freeze -> free-space map ->
    suspend NAME (no second freeze) -> resume NAME -> thaw

A free-aware store (model/seeding.py) seeds one exception per chunk free at
the checkpoint, so its table depends on the free-space map of the checkpoint
moment. Offline that is the map read before the unmount. Online, the table
is written before the freeze from a map read then, and corrected inside the
freeze for the map read there: a chunk allocated in between keeps its slot
as a real exception, with its checkpoint content copied into the store. So
the window holds no table write but those few, and NAME-snap (made without a
table beforehand) is loaded inside it, once the table is final:

    ... -> free-space map, seeded table written through NAME-cow -> freeze
    -> free-space map -> correct the table -> load + resume NAME-snap
    -> suspend NAME -> resume NAME -> thaw

The number of seeded areas (the store's layout, which its identity block
hashes) is fixed before the store file is made, from the free space then,
with one area to spare; free space beyond what the areas hold stays
unseeded, which is always safe (its first write is copied, as in a plain
store).

While frozen, fiesnap writes nothing on that filesystem: every module is
already imported, messages wait until the thaw, the state folder must live
elsewhere, and stdin/stdout/stderr must not be files on it.
"""

from __future__ import annotations

import os
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, replace

from fiesnap.commands.guards import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_FREE_AWARE,
    Log,
    check_chunk_size,
    check_store_size,
    check_unused,
    now,
    require_root,
)
from fiesnap.errors import CheckpointNameError, DeviceError, RefusedError, UsageError
from fiesnap.kernel import blockdev, fsprobe, mounts
from fiesnap.kernel.freeze import frozen
from fiesnap.kernel.fsmap import free_space
from fiesnap.model.identity import encode_identity, map_checksum, StoreIdentity
from fiesnap.model.extents import free_chunks
from fiesnap.model.record import CheckpointRecord, check_boot_attempts, store_map, validate_name
from fiesnap.model.seeding import areas_for
from fiesnap.model.units import format_bytes
from fiesnap.services import storefile
from fiesnap.services.deviceseal import built_now
from fiesnap.services.stack import (
    StackNames,
    build_stack,
    build_store_layers,
    correct_seeded_store,
    load_snapshot_frozen,
    origin_targets,
    seed_store,
    seeding_for,
    passthrough_targets,
    reload_as_passthrough,
    snapshot_store_type,
    snapshot_usage,
    switch_to_origin,
    unwind,
)
from fiesnap.services.statedir import StateStore


@dataclass(frozen=True)
class StartRequest:
    """What the user asked for: TARGET is a name, a mount point or a device."""

    target: str
    size: int
    name: str | None = None
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    #: seed the store with the checkpoint's free space (model/seeding.py); False: a plain store.
    free_aware: bool = DEFAULT_FREE_AWARE
    #: an update checkpoint allowing this many boots (model/lifecycle.py); None: not one.
    boot_attempts: int | None = None
    #: a name that holds a checkpoint already is left as it is (update hooks run many times).
    unless_active: bool = False


def check_request(req: StartRequest) -> None:
    """The checks of the arguments alone, before any device, record or dm call is looked at."""
    if req.name is not None:
        validate_name(req.name)
    check_chunk_size(req.chunk_bytes)
    if req.boot_attempts is not None:
        check_boot_attempts(req.boot_attempts)


def start(req: StartRequest, dm_factory, state: StateStore, log: Log) -> CheckpointRecord:
    """Online start of a device under fiesnap, or offline start of an unmounted device."""
    return start_unless_active(req, dm_factory, state, log)[0]


def start_unless_active(req: StartRequest, dm_factory, state: StateStore,
                        log: Log) -> tuple[CheckpointRecord, bool]:
    """As `start`; with `req.unless_active` a name that holds a checkpoint already is
    returned unchanged. Returns (record, whether this call started it)."""
    require_root()
    check_request(req)
    managed = resolve_target(req.target, state)
    if managed is None:
        if req.unless_active and state.exists(_offline_name(req)):
            return _already(state.load(_offline_name(req)), dm_factory(), log), False
        if req.boot_attempts:
            raise UsageError(
                f"--boot-attempts needs a device under fiesnap (the boot unit mounts /dev/mapper/NAME "
                f"whatever happens to the checkpoint): run 'fiesnap setup {req.target} --name NAME' once")
        return _start_offline(req, dm_factory, state, log), True
    if req.name is not None and req.name != managed:
        raise UsageError(f"--name {req.name} does not match {req.target}, which is {managed}: drop --name")
    return _start_online(managed, req, dm_factory, state, log)


def _offline_name(req: StartRequest) -> str:
    return validate_name(req.name or os.path.basename(os.path.realpath(req.target)))


def _already(record: CheckpointRecord, dm, log: Log) -> CheckpointRecord:
    """--unless-active: a checkpoint that can still roll back is the one to keep. Anything else
    (an interrupted start, commit or rollback; a store the kernel gave up) is no way back, and
    an update hook must stop on it, not go on unprotected."""
    name = record.name
    if record.phase != "active":
        raise RefusedError(
            f"{name!r} holds a checkpoint that is not active ({record.phase}): it cannot roll an "
            f"update back; finish it first ('fiesnap status {name}' says how), then run again")
    if dm.info(StackNames.for_name(name).snap) is not None:
        usage = snapshot_usage(dm, record)
        if usage.state != "active":
            raise RefusedError(
                f"{name!r} holds a checkpoint that is {usage.state}: it can no longer roll back; "
                f"'fiesnap commit {name}' ends it, then run again")
    log(f"{name!r} holds a checkpoint already (started {record.created}): none started")
    return record


# --------------------------------------------------------------------- target

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


# --------------------------------------------------------------------- the store file

def identity_writer(checkpoint_id: str, fs_uuid: str, device_bytes: int, chunk_bytes: int,
                    seeded_areas: int = 0):
    """The store file's identity block for its extents (storefile.create_store_file's `head`)."""
    def head(extents) -> bytes:
        cow = store_map(extents, chunk_bytes, seeded_areas)
        return encode_identity(StoreIdentity(
            checkpoint_id=checkpoint_id, fs_uuid=fs_uuid, device_bytes=device_bytes,
            chunk_bytes=chunk_bytes, map_sha256=map_checksum(cow.to_dict()), generation=1))
    return head


def _with_store(record: CheckpointRecord, created: storefile.StoreFile, *, checkpoint_id: str,
                store_type: str, chunk_bytes: int, mode: str, seeded_areas: int,
                free=()) -> CheckpointRecord:
    return record.with_checkpoint(
        checkpoint_id=checkpoint_id, store_type=store_type, chunk_bytes=chunk_bytes,
        store_relpath=created.relpath, store_file_bytes=created.size, extents=created.extents,
        created=now(), mode=mode, free_map=free, seeded_areas=seeded_areas)


def seeded_areas_for(mnt: str, req: StartRequest) -> int:
    """Seeded areas to reserve (0 for a plain store): for the free space now, less the
    store file about to be made."""
    if not req.free_aware:
        return 0
    free = len(free_chunks(free_space(mnt), req.chunk_bytes))
    return max(1, areas_for(free - req.size // req.chunk_bytes, req.chunk_bytes))


def _seeded_count(record: CheckpointRecord, free) -> int:
    """Chunks the checkpoint-time map `free` seeds (0 for a plain store)."""
    return seeding_for(record, free).count if record.free_aware else 0


# --------------------------------------------------------------------- offline

def _remove_leftovers(mnt: str, name: str, fs_uuid: str, log: Log) -> None:
    """Store files an interrupted start of `name` left behind (it holds no checkpoint now)."""
    for relpath in storefile.leftover_stores(mnt, name, fs_uuid):
        storefile.remove_store_file(mnt, relpath)
        log(f"removed /{relpath}, a store file left by an interrupted start")


def _start_offline(req: StartRequest, dm_factory, state: StateStore, log: Log) -> CheckpointRecord:
    dev = blockdev.open_block_device(req.target)
    name = _offline_name(req)
    check_unused(dev, req.target, "unmount it first")
    check_store_size(req.size, req.chunk_bytes, dev.size_bytes, req.target)
    fs = fsprobe.probe_device(req.target)
    state.refuse_on(os.makedev(dev.major, dev.minor), req.target)

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

        # Checks first, on a read-only mount: a clean filesystem gets no write
        # from it, so a refusal here leaves the device exactly as it was.
        with mounts.private_mount(req.target, fs.fstype, readonly=True) as mnt:
            fsprobe.check_statfs(mnt)
            storefile.check_free_space(mnt, req.size, label=req.target)
        # Create the store file and read the checkpoint-time free-space map on a
        # private mount; unmounting flushes everything, so the device content at
        # this point is the checkpoint.
        with mounts.private_mount(req.target, fs.fstype) as mnt:
            _remove_leftovers(mnt, name, fs.uuid, log)
            areas = seeded_areas_for(mnt, req)
            created = storefile.create_store_file(
                mnt, f"store-{name}-{checkpoint_id[:8]}", req.size,
                head=identity_writer(checkpoint_id, fs.uuid, dev.size_bytes, req.chunk_bytes, areas))
            try:
                free = free_space(mnt)
            except BaseException:
                storefile.remove_store_file(mnt, created.relpath)
                raise
        log(f"created store file /{created.relpath} ({format_bytes(req.size)}, "
            f"{len(created.extents)} extents)")

        record: CheckpointRecord | None = None
        try:
            device = CheckpointRecord(
                name=name, device=os.path.realpath(req.target), device_major=dev.major,
                device_minor=dev.minor, device_bytes=dev.size_bytes, fstype=fs.fstype,
                fs_uuid=fs.uuid, phase="starting")
            record = _with_store(device, created, checkpoint_id=checkpoint_id, store_type=store_type,
                                 chunk_bytes=req.chunk_bytes, mode="offline", seeded_areas=areas, free=free)
            record = record.with_free_map(free, seeded_chunks=_seeded_count(record, free))
            state.save(record)
            build_stack(dm, record, zero_header=True, log=log)
            record = built_now(record.with_phase("active"))
            state.save(record)
        except BaseException:
            storefile.discard_store(req.target, fs.fstype, created.relpath)
            log(f"removed store file /{created.relpath}")
            if record is not None:
                state.delete(name)
            raise
        log(f"checkpoint {name!r} active: mount /dev/mapper/{name}")
        return record


# --------------------------------------------------------------------- online

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


def _start_online(name: str, req: StartRequest, dm_factory, state: StateStore,
                  log: Log) -> tuple[CheckpointRecord, bool]:
    """Checkpoint a managed device, mounted and busy or not."""
    with state.locked():
        record = state.load(name)
        if req.unless_active and record.has_checkpoint:
            return _already(record, dm_factory(), log), False
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
        state.refuse_on(os.makedev(info.major, info.minor), f"/dev/mapper/{name}")
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
            state.refuse_on(fs_dev, f"/dev/mapper/{name}")
            _check_std_streams(fs_dev, f"/dev/mapper/{name}")
            fsprobe.check_statfs(mnt)
            storefile.check_free_space(mnt, req.size, label=f"/dev/mapper/{name}")
            _remove_leftovers(mnt, name, record.fs_uuid, log)
            areas = seeded_areas_for(mnt, req)
            created = storefile.create_store_file(
                mnt, f"store-{name}-{checkpoint_id[:8]}", req.size,
                head=identity_writer(checkpoint_id, record.fs_uuid, record.device_bytes, req.chunk_bytes,
                                     areas))
            log(f"created store file /{created.relpath} ({format_bytes(req.size)}, "
                f"{len(created.extents)} extents)")
            try:
                new = _with_store(record, created, checkpoint_id=checkpoint_id, store_type=store_type,
                                  chunk_bytes=req.chunk_bytes, mode="online", seeded_areas=areas)
                if req.boot_attempts:
                    new = new.with_boot_attempts(req.boot_attempts)
                state.save(new)
                new = _attach(dm, new, mnt, state, log)
            except BaseException as e:
                try:
                    if dm.table(name) == origin_targets(new):  # the switch back failed too
                        e.add_note(f"/dev/mapper/{name} still saves overwrites into /{created.relpath}: "
                                   f"both are kept; 'fiesnap commit {name}' ends the checkpoint")
                    else:
                        storefile.remove_store_file(mnt, created.relpath)
                        state.save(record)
                except BaseException as e2:
                    e.add_note(f"while undoing the start: {e2}")
                raise
        log(f"checkpoint {name!r} active; /dev/mapper/{name} stayed in use throughout")
        if new.boot_attempts:
            log(f"update checkpoint: the next {new.boot_attempts} boot(s) may try the update; "
                f"'fiesnap commit {name}' (or fiesnap-boot-complete.service) keeps it, and an "
                "activate that finds them all used rolls it back")
        return new, True


def _attach(dm, record: CheckpointRecord, mnt: str, state: StateStore, log: Log) -> CheckpointRecord:
    """Build cow + snapshot, switch NAME to snapshot-origin while frozen, record the free map.

    A free-aware store's table is written first, from the free map then; inside the
    freeze it is corrected for the checkpoint-time map and NAME-snap loaded."""
    seeded = record.free_aware
    made = build_store_layers(dm, record, zero_header=True, log=log, snapshot_later=seeded)
    spans: list[float] = []
    owed: list = []  # NAME-snap's udev confirmation, awaited after the thaw
    try:
        prepared_map = free_space(mnt) if seeded else []
        prepared = seed_store(dm, record, prepared_map) if seeded else None
    except BaseException:
        unwind(dm, made)
        raise
    if prepared is not None:
        log(f"wrote {prepared.count} seeded exceptions ({record.seeded_areas} metadata areas); "
            "the freeze corrects them for what is allocated by then")

    @contextmanager
    def window():
        """The freeze, timed from before FIFREEZE to after FITHAW."""
        t0 = time.monotonic()
        try:
            with frozen(mnt):
                yield
        finally:
            spans.append(time.monotonic() - t0)

    def at_checkpoint():
        free = free_space(mnt)
        if prepared is None:
            return free, None
        plan = correct_seeded_store(dm, record, prepared, free)
        owed.append(load_snapshot_frozen(dm, record))
        return free, plan

    try:
        try:
            free, plan = switch_to_origin(dm, record, window, at_checkpoint)
        finally:
            for pending in owed:
                pending.finish()
        frozen_s = spans[0]
    except BaseException:
        unwind(dm, made)
        raise
    try:
        active = built_now(record.with_free_map(
            free, frozen_seconds=round(frozen_s, 3), seeded_chunks=plan.count if plan else 0,
            seed_map=prepared_map if plan else ()).with_phase("active"))
        state.save(active)
    except BaseException as e:
        # Back to the pass-through even on a filesystem another tool froze meanwhile: the
        # checkpoint is being dropped, and a frozen filesystem has no write in flight. What
        # failed first stays the error; a failed switch back is told as a note.
        try:
            reload_as_passthrough(dm, record, refuse_frozen=lambda *_: None)
        except BaseException as e2:
            e.add_note(f"putting /dev/mapper/{record.name} back on its pass-through failed too: {e2}")
        else:
            unwind(dm, made)
        raise
    if plan is not None:
        log(f"{plan.count} free chunks seeded; {len(plan.converted)} allocated before the freeze "
            "were saved instead")
    log(f"switched /dev/mapper/{record.name} to snapshot-origin; filesystem frozen {frozen_s:.2f}s")
    return active
