"""Assemble and take down the dm stack of one checkpoint, in the proven order.

    NAME       snapshot-origin DEVICE          the device users mount
    NAME-snap  snapshot DEVICE NAME-cow PO N   read-only checkpoint view
    NAME-cow   linear segments of DEVICE       the store file's whole chunks

Order matters, and each step guards against a measured trap:

1. map the store (`NAME-cow`) straight onto DEVICE, never through the origin,
   so store writes are not copied again;
2. zero the header chunk through `NAME-cow`: the store's blocks hold old data
   and a leftover valid header would make the kernel load stale exceptions
   (a free-aware store gets its whole seeded table written instead, header
   included: model/seeding.py);
3. load and resume the snapshot;
4. only then resume the origin: snapshot-origin computes the size at which it
   splits writes when it resumes, from the snapshots that exist then. Resumed
   earlier, a 1 MiB write would save only its first chunk.

Any failure removes every device this call created, newest first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, ContextManager

from fiesnap.errors import DeviceError, DeviceMapperError, FiesnapError, FilesystemError, RefusedError
from fiesnap.kernel import blockdev, freeze
from fiesnap.kernel.directio import AlignedBuffer, DirectDevice, write_chunks, zero_range
from fiesnap.kernel.libdm import UDEV_FLAGS_PRIVATE_LAYER, UDEV_LOW_PRIORITY
from fiesnap.model.dmtable import DmTarget, linear, snapshot, snapshot_origin
from fiesnap.model.record import CheckpointRecord
from fiesnap.model.seeding import SeedPlan, copy_runs, correct_seeding, plan_seeding
from fiesnap.model.snapstatus import SnapshotUsage, parse_snapshot_status
from fiesnap.model.units import SECTOR_BYTES
from fiesnap.services.cowio import check_seeded, read_frontier
from fiesnap.services.storeid import check_store_identity

#: Private layers: no probing, no /dev/disk links, no auto-mount (as lvm2 does for -cow).
HIDDEN = UDEV_FLAGS_PRIVATE_LAYER
#: The checkpoint view carries the same filesystem UUID as the origin: never let
#: udev link or mount it.
CHECKPOINT_VIEW = HIDDEN | UDEV_LOW_PRIORITY


@dataclass(frozen=True)
class StackNames:
    origin: str
    snap: str
    cow: str

    @classmethod
    def for_name(cls, name: str) -> "StackNames":
        return cls(origin=name, snap=f"{name}-snap", cow=f"{name}-cow")

    def all(self) -> tuple[str, str, str]:
        return (self.origin, self.snap, self.cow)


def dm_uuid(checkpoint_id: str, role: str) -> str:
    return f"FIESNAP-{checkpoint_id}-{role}"


def origin_uuid(record: CheckpointRecord) -> str:
    """NAME's dm UUID. A managed NAME outlives its checkpoints (its table is
    reloaded, its UUID cannot change), so it carries the setup's id."""
    if record.managed:
        return dm_uuid(record.setup_id, "dev")
    return dm_uuid(record.checkpoint_id, "origin")


def cow_targets(record: CheckpointRecord) -> list[DmTarget]:
    return record.cow.dm_targets(record.device_string)


def snapshot_targets(record: CheckpointRecord, cow_dev: str) -> list[DmTarget]:
    return [
        snapshot(
            record.device_bytes // SECTOR_BYTES,
            record.device_string,
            cow_dev,
            record.store_type,
            record.chunk_bytes // SECTOR_BYTES,
        )
    ]


def origin_targets(record: CheckpointRecord) -> list[DmTarget]:
    return [snapshot_origin(record.device_bytes // SECTOR_BYTES, record.device_string)]


def passthrough_targets(record: CheckpointRecord) -> list[DmTarget]:
    return [linear(0, record.device_bytes // SECTOR_BYTES, record.device_string, 0)]


def build_store_layers(dm, record: CheckpointRecord, *, zero_header: bool,
                       log: Callable[[str], None] = lambda s: None,
                       snapshot_later: bool = False) -> list[str]:
    """Create cow -> (zero header) -> snapshot; unwind them on failure. Returns what was made.

    `zero_header` is True only when the checkpoint starts: rebuilding an existing
    checkpoint must never wipe its store. A free-aware store then gets its seeded
    table from the record's free map instead. With `snapshot_later`, NAME-snap is
    made without a table (an online free-aware start writes the table, corrects it
    inside the freeze and loads NAME-snap there: `correct_seeded_store`,
    `load_snapshot_frozen`).
    """
    names = StackNames.for_name(record.name)
    created: list[str] = []
    try:
        check_store_identity(record, record.device)
        cow = dm.create(names.cow, uuid=dm_uuid(record.checkpoint_id, "cow"),
                        targets=cow_targets(record), udev_flags=HIDDEN)
        created.append(names.cow)
        log(f"mapped store as {names.cow} ({cow.major}:{cow.minor})")
        if zero_header and record.free_aware and not snapshot_later:
            plan = seed_store(dm, record, record.free_map)
            if plan.count != record.seeded_chunks:
                raise FilesystemError(
                    f"internal check failed: the free map seeds {plan.count} chunks, "
                    f"the record says {record.seeded_chunks}")
            log(f"wrote {plan.count} seeded exceptions ({record.seeded_areas} metadata areas) "
                "through the COW device")
        elif zero_header:
            zero_range(dm.node_path(names.cow), 0, record.chunk_bytes,
                       expect_rdev=os.makedev(cow.major, cow.minor))
            log("zeroed the store header chunk through the COW device")
        elif record.free_aware:
            check_seeded(dm.node_path(names.cow), record)
        if snapshot_later:
            dm.create(names.snap, uuid=dm_uuid(record.checkpoint_id, "snap"))
            created.append(names.snap)
            return created
        snap = dm.create(names.snap, uuid=dm_uuid(record.checkpoint_id, "snap"),
                         targets=snapshot_targets(record, f"{cow.major}:{cow.minor}"),
                         read_only=True, udev_flags=CHECKPOINT_VIEW)
        created.append(names.snap)
        log(f"loaded snapshot {names.snap} ({snap.major}:{snap.minor})")
    except BaseException as e:
        unwind(dm, created)
        if isinstance(e, OSError):
            raise DeviceMapperError(f"building the checkpoint stack failed: {e}") from e
        raise
    return created


def seeding_for(record: CheckpointRecord, free_map) -> SeedPlan:
    """The seeded table of a free-aware record for `free_map`; FilesystemError (one line,
    nothing changed yet) when it has nothing to seed or calls a store chunk free."""
    layout = record.seed_layout
    if layout is None:
        raise ValueError("not a free-aware store")
    try:
        plan = plan_seeding(free_map, layout, store=record.cow.store_chunks())
    except ValueError as e:  # the map cannot be the checkpoint's: nothing may be seeded from it
        raise FilesystemError(f"internal check failed: {e}; nothing was changed, retry") from e
    if plan.count == 0:
        raise FilesystemError(
            f"{record.device} has no whole {record.chunk_bytes}-byte chunk of free space left to "
            "seed: free some space, or start with --plain")
    return plan


def seed_store(dm, record: CheckpointRecord, free_map) -> SeedPlan:
    """Write a free-aware store's header and seeded table for `free_map` through NAME-cow.

    Must run before NAME-snap's table is loaded: the kernel reads the table then.
    """
    names = StackNames.for_name(record.name)
    plan = seeding_for(record, free_map)
    info = dm.info(names.cow)
    write_chunks(dm.node_path(names.cow), plan.metadata(), record.chunk_bytes,
                 expect_rdev=os.makedev(info.major, info.minor))
    return plan


def correct_seeded_store(dm, record: CheckpointRecord, plan: SeedPlan, free_map) -> SeedPlan:
    """Inside an online start's freeze: `plan` (written before it) for the checkpoint-time
    `free_map`. A chunk allocated since the plan was made gets its content copied from
    NAME (its checkpoint content: the filesystem is frozen) into a data chunk, and the
    areas holding those entries are rewritten to point there (model/seeding.py)."""
    fixed = correct_seeding(plan, free_map)
    if not fixed.converted:
        return fixed
    cb = record.chunk_bytes
    last = fixed.converted[-1][1]
    if last + 1 >= record.cow.total_chunks:
        raise FilesystemError(
            f"{len(fixed.converted)} chunks were allocated while the start prepared its table, more "
            "than the store holds: retry, or start with a larger --size")
    names = StackNames.for_name(record.name)
    cow = dm.info(names.cow)
    cow_rdev = os.makedev(cow.major, cow.minor)
    runs = copy_runs(fixed.converted, max(1, (1 << 20) // cb))  # one I/O per run: the freeze waits
    with AlignedBuffer(max(n for _, _, n in runs) * cb) as buf, \
            DirectDevice.open(dm.node_path(record.name), write=False) as src, \
            DirectDevice.open(dm.node_path(names.cow), write=True, expect_rdev=cow_rdev) as dst:
        for chunk, data, n in runs:
            src.read_into(buf, chunk * cb, n * cb)
            dst.write_from(buf, data * cb, n * cb)
        dst.fsync()
    write_chunks(dm.node_path(names.cow), fixed.changed_areas(), cb, expect_rdev=cow_rdev)
    return fixed


def load_snapshot_frozen(dm, record: CheckpointRecord):
    """Load NAME-snap (made without a table by build_store_layers) while the filesystem may
    be frozen: the udev confirmation it returns is awaited after the thaw."""
    names = StackNames.for_name(record.name)
    cow = dm.info(names.cow)
    dm.load(names.snap, snapshot_targets(record, f"{cow.major}:{cow.minor}"), read_only=True)
    return dm.resume_frozen(names.snap, udev_flags=CHECKPOINT_VIEW)


def build_stack(dm, record: CheckpointRecord, *, zero_header: bool,
                log: Callable[[str], None] = lambda s: None) -> None:
    """Create cow -> (zero header) -> snapshot -> origin; unwind everything on failure."""
    names = StackNames.for_name(record.name)
    created = build_store_layers(dm, record, zero_header=zero_header, log=log)
    try:
        dm.create(names.origin, uuid=origin_uuid(record), targets=origin_targets(record))
        log(f"resumed origin {names.origin} after its snapshot exists")
    except BaseException as e:
        unwind(dm, created)
        if isinstance(e, OSError):
            raise DeviceMapperError(f"building the checkpoint stack failed: {e}") from e
        raise


def create_passthrough(dm, record: CheckpointRecord) -> None:
    """/dev/mapper/NAME as a plain linear map of the whole device (setup, activate)."""
    dm.create(record.name, uuid=origin_uuid(record), targets=passthrough_targets(record))


def switch_to_origin(dm, record: CheckpointRecord, window: Callable[[], ContextManager],
                     at_checkpoint: Callable[[], object] = lambda: None) -> object:
    """Turn the live pass-through NAME into snapshot-origin; the snapshot must exist.

    The new table is loaded first (its constructor opens the device, no I/O
    changes); then, inside `window` (the filesystem frozen), `at_checkpoint`
    runs (it reads the checkpoint-time free-space map), NAME is suspended
    without a second freeze and resumed with the new table. Resuming after the
    snapshot exists is what makes snapshot-origin split writes at chunk
    boundaries. Nothing inside the window waits for udev (a slow udevd would
    keep every writer frozen): the resume's udev confirmation is awaited,
    bounded, after the thaw. Returns what `at_checkpoint` returned.

    On any failure -- before, during or after the resume, the thaw included --
    NAME is left running its pass-through table (read back from the kernel,
    not assumed), so that the record, which still says pass-through, and the
    kernel agree; the caller then removes -snap and -cow.
    """
    name = record.name
    dm.load(name, origin_targets(record))
    owed: list = []  # udev confirmations, awaited only once the filesystem is thawed
    try:
        with window():
            result = at_checkpoint()
            dm.suspend(name, lockfs=False)
            try:
                owed.append(dm.resume_frozen(name))
            except BaseException as e:
                # Still frozen: the thaw writes the superblock and would wait forever
                # on a suspended NAME, so NAME must run again before it.
                _back_to_passthrough(dm, record, e, owed)
                raise
        _finish_udev(owed)
    except BaseException as e:
        _back_to_passthrough(dm, record, e, owed)
        _finish_udev(owed, failure=e)
        raise
    return result


def _finish_udev(owed: list, failure: BaseException | None = None) -> None:
    """Await (bounded) the udev confirmations of resumes done while frozen."""
    while owed:
        try:
            owed.pop(0).finish()
        except BaseException as e:
            if failure is None:
                raise
            failure.add_note(f"checking a device node after udev failed too: {e}")


def _back_to_passthrough(dm, record: CheckpointRecord, failure: BaseException, owed: list) -> None:
    """After a failed switch: NAME resumed on its pass-through table, whatever state it is in.

    Reads the kernel's view (inactive table, suspended, live table) instead
    of assuming how far the switch got, so it is safe to run twice. Never
    waits for udev (the filesystem may still be frozen): what is owed goes to
    `owed`. A step that fails is added to `failure` as a note with what to
    run by hand.
    """
    name = record.name
    try:
        info = dm.info(name)
        if info is None:
            return
        if info.inactive_table:
            dm.clear(name)
        if dm.table(name) == origin_targets(record):
            # The resume went through: the checkpoint is live. Put the pass-through
            # back (no lockfs: the filesystem may be frozen; every write lands on
            # the same device either way).
            dm.load(name, passthrough_targets(record))
            if not info.suspended:
                dm.suspend(name, lockfs=False)
            owed.append(dm.resume_frozen(name))
        elif info.suspended:
            owed.append(dm.resume_frozen(name))
    except BaseException as e2:
        failure.add_note(
            f"putting /dev/mapper/{name} back on its pass-through failed too: {e2}; check "
            f"'dmsetup table {name}' (it must be linear), 'dmsetup resume {name}', and "
            "'fsfreeze -u' on its mount point")


def unwind(dm, created: list[str]) -> list[str]:
    """Remove devices newest first; return the names that could not be removed."""
    left = []
    for name in reversed(created):
        try:
            dm.remove(name)
        except FiesnapError:
            left.append(name)
    return left


def remove_if_present(dm, name: str) -> None:
    if dm.info(name) is not None:
        dm.remove(name)


def ensure_cow(dm, record: CheckpointRecord) -> str:
    """The store device, recreated from the record if missing (never zeroed). Returns its node."""
    names = StackNames.for_name(record.name)
    info = dm.info(names.cow)
    if info is None:
        # Never map a store by major:minor alone: the disk under those numbers must
        # carry this checkpoint's identity block (any generation: a merge brings
        # the checkpoint-time block back).
        check_store_identity(record, record.device, any_generation=True)
        dm.create(names.cow, uuid=dm_uuid(record.checkpoint_id, "cow"),
                  targets=cow_targets(record), udev_flags=HIDDEN)
    else:
        live, recorded = dm.table(names.cow), cow_targets(record)
        if live != recorded and _grows_into(live, recorded):
            # An extend recorded its longer map but died before reloading: finish it.
            dm.load(names.cow, recorded)
            dm.suspend(names.cow, lockfs=False)
            dm.resume(names.cow)
        elif live != recorded:
            raise DeviceMapperError(
                f"{names.cow} exists but its table differs from the record: "
                "remove it or check that the right checkpoint record is in use"
            )
    return dm.node_path(names.cow)


def suspended_devices(dm, record: CheckpointRecord) -> list[str]:
    """NAME's devices that are suspended now (a write to them waits until a resume)."""
    names = StackNames.for_name(record.name)
    out = []
    for n in (names.cow, names.snap, names.origin):
        info = dm.info(n)
        if info is not None and info.suspended:
            out.append(n)
    return out


def resume_leftovers(dm, record: CheckpointRecord, log: Callable[[str], object]) -> list[str]:
    """Resume NAME's devices that a killed fiesnap command left suspended. Call under the lock.

    Every fiesnap table change runs under the state folder's lock and resumes
    before it returns, so a device found suspended by a command holding the
    lock was left so by one that died in between (SIGKILL in extend's reload
    of -cow, or in commit's switch to the pass-through). Left alone it holds
    every write to the filesystem, forever. Nothing unknown is swapped in: an
    inactive table is dropped; a -cow whose live table is shorter than the
    recorded map (the dead extend had recorded it) gets the recorded map, as
    `ensure_cow` would. Resuming also thaws a filesystem frozen by a lockfs
    suspend (the kernel releases its own freeze).
    """
    names = StackNames.for_name(record.name)
    resumed = []
    for n in suspended_devices(dm, record):  # the store first, then its users
        info = dm.info(n)
        if info is None:
            continue
        if info.inactive_table:
            dm.clear(n)
        if n == names.cow and record.has_checkpoint:
            live, recorded = dm.table(n), cow_targets(record)
            if live != recorded and _grows_into(live, recorded):
                dm.load(n, recorded)
        dm.resume(n)
        resumed.append(n)
        log(f"resumed /dev/mapper/{n}: an interrupted fiesnap command had left it suspended, "
            "holding every write")
    return resumed


def _grows_into(live: list[DmTarget], recorded: list[DmTarget]) -> bool:
    """True if `recorded` is `live` with chunks appended (the last live segment may have grown)."""
    if not live or len(live) > len(recorded) or live[:-1] != recorded[:len(live) - 1]:
        return False
    a, b = live[-1], recorded[len(live) - 1]
    return (a.start, a.target_type, a.params) == (b.start, b.target_type, b.params) and a.length <= b.length


def reload_as_passthrough(dm, record: CheckpointRecord, *, on_switch: Callable[[], object] = lambda: None,
                          refuse_frozen: Callable[[list[str], int], None] | None = None) -> None:
    """Turn a live origin into a plain linear device without unmounting: load, suspend, resume.

    The lockfs suspend freezes a mounted filesystem, so no write is in flight as the
    origin stops saving overwrites, and a resume, anyone's, thaws it. On a filesystem
    another tool froze it fails with EBUSY before Linux 6.8 and nests from 6.8 on (then
    deleting the store file waited forever), so `refuse_frozen` (freeze.refuse_frozen)
    checks a filesystem mounted here first, before `on_switch` and any change. A failed suspend
    or resume leaves NAME on its old table (an inactive one would go live at the next resume).
    """
    name, info = record.name, dm.info(record.name)
    if info is not None:
        (refuse_frozen or freeze.refuse_frozen)(blockdev.mounts_of(info.major, info.minor),
                                                os.makedev(info.major, info.minor))
    on_switch()
    with freeze.signals_held():
        dm.load(name, passthrough_targets(record))
        try:
            dm.suspend(name, lockfs=True)
            dm.resume(name)
        except BaseException as e:
            _undo_reload(dm, name, e)
            raise


def _undo_reload(dm, name: str, failure: BaseException) -> None:
    """After a failed reload: the loaded table dropped, NAME resumed on its live one."""
    try:
        info = dm.info(name)
        if info is not None and info.inactive_table:
            dm.clear(name)
        if info is not None and info.suspended:
            dm.resume(name)  # also thaws what the lockfs suspend froze
    except BaseException as e2:
        failure.add_note(f"resuming /dev/mapper/{name} on its table failed too: {e2}; check "
                         f"'dmsetup info {name}' (no inactive table), 'dmsetup resume {name}'")


def snapshot_store_type(dm) -> str:
    """PO (overflow reported as Overflow, not Invalid) needs snapshot target >= 1.15."""
    version = dm.target_versions().get("snapshot")
    return "PO" if version is not None and tuple(version) >= (1, 15, 0) else "P"


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
    usage = parse_snapshot_status(lines[0][3] if lines else "Invalid").backed(record.store_bytes)
    if usage.state != "invalid":
        return usage
    total = record.cow.total_chunks
    try:
        frontier = read_frontier(dm.node_path(names.cow), record)
    except OSError:
        return usage
    if frontier is not None and frontier >= total - min(OVERFLOW_SLACK_CHUNKS, total // 4):
        return SnapshotUsage("overflowed")
    return usage


def refuse_in_use(info, name: str) -> None:
    """/dev/mapper/NAME may only go away when nothing has it mounted or open."""
    if info is None:
        return
    where = blockdev.mounts_of(info.major, info.minor)
    if where:
        raise RefusedError(f"/dev/mapper/{name} is mounted on {', '.join(where)}: unmount it first")
    if info.open_count:
        raise DeviceError(f"/dev/mapper/{name} is open by another program: close it first")


def mount_source(record: CheckpointRecord) -> str:
    """What to mount to reach the filesystem: /dev/mapper/NAME once NAME holds the device."""
    return f"/dev/mapper/{record.name}" if record.managed else record.device
