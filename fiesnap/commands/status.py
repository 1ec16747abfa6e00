"""`fiesnap status`: what the records say, checked against what the kernel shows."""

from __future__ import annotations

from dataclasses import dataclass

from fiesnap.commands.guards import require_root
from fiesnap.kernel import blockdev, boot
from fiesnap.model.lifecycle import BootAttempts, attempts_of
from fiesnap.model.record import CheckpointRecord, validate_name
from fiesnap.model.snapstatus import SnapshotUsage
from fiesnap.services.kernelmerge import merge_usage, progress_of
from fiesnap.services.stack import StackNames, snapshot_usage, suspended_devices
from fiesnap.services.statedir import StateStore


@dataclass(frozen=True)
class CheckpointStatus:
    record: CheckpointRecord
    state: str
    usage: SnapshotUsage | None
    mounted_on: tuple[str, ...]
    #: devices of the stack left suspended (by a killed command): writes wait on them.
    suspended: tuple[str, ...] = ()
    #: an update checkpoint's boot attempts (None: it counts none).
    attempts: BootAttempts | None = None
    #: a kernel merge's progress (services/kernelmerge.py progress_of; None: none running).
    kernel_merge: dict | None = None

    def to_dict(self) -> dict:
        r = self.record
        u = self.usage
        cow = r.cow_table
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
            "store_bytes": r.store_bytes if cow is not None else None,
            "used_bytes": u.used_bytes if u else None,
            "metadata_bytes": u.metadata_bytes if u else None,
            "percent_used": u.percent_used if u else None,
            "chunk_bytes": r.chunk_bytes or None,
            "extents": len(r.store_extents) if r.store_extents else None,
            "segments": len(cow.segments) if cow is not None else None,
            "store_type": r.store_type or None,
            "free_aware": r.free_aware if r.checkpoint_id else None,
            "seeded_bytes": r.seeded_chunks * r.chunk_bytes if r.free_aware else None,
            "start_time": r.created or None,
            "mounted_on": list(self.mounted_on),
            "checkpoint_id": r.checkpoint_id or None,
            "bypass": r.bypass or None,
            "suspended": list(self.suspended),
            "boot_attempts": self.attempts.to_dict() if self.attempts else None,
            "auto_rollback": r.auto_rollback or None,
            "kernel_merge": self.kernel_merge,
        }


def status(dm_factory, state: StateStore, name: str | None) -> list[CheckpointStatus]:
    require_root()
    records = [state.load(validate_name(name))] if name is not None else state.load_all()
    if not records:
        return []
    dm = dm_factory()
    return [status_of(dm, r) for r in records]


def status_of(dm, r: CheckpointRecord) -> CheckpointStatus:
    names = StackNames.for_name(r.name)
    usage = None
    merge = None
    if r.phase == "passthrough":
        st = "passthrough" if dm.info(names.origin) is not None else "inactive"
    elif r.phase == "kernel-merging":
        st = "kernel-merging" if dm.info(names.origin) is not None else "inactive"
        merge = progress_of(merge_usage(dm, r), r)
    elif r.phase != "active":
        st = r.phase
    elif dm.info(names.snap) is None:
        st = "inactive"
    else:
        usage = snapshot_usage(dm, r)
        st = usage.state
    origin = dm.info(names.origin)
    mounted = tuple(blockdev.mounts_of(origin.major, origin.minor)) if origin else ()
    return CheckpointStatus(r, st, usage, mounted, tuple(suspended_devices(dm, r)),
                            attempts_of(r, boot.boot_id()), merge)
