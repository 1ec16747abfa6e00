"""Checkpoint records in the state folder, written atomically.

The record is what lets a merge or commit finish after an interruption, so a
record is never half-written: write a temporary file, fsync, rename, fsync the
folder. One lock file serialises fiesnap invocations that change anything.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Iterator

from fiesnap.errors import CheckpointNameError, StateError, UsageError

DEFAULT_STATE_DIR = "/var/lib/fiesnap"
RECORD_VERSION = 1

# dm names allow more, but these keep /dev/mapper paths and file names boring.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
_RESERVED_SUFFIXES = ("-snap", "-cow", "-real")

#: Phases of a checkpoint's life, in order. A merge or commit that is
#: interrupted leaves its phase behind so a re-run knows where to resume.
PHASES = ("starting", "active", "merging", "copied", "committing", "passthrough")


def state_dir_from_env() -> str:
    return os.environ.get("FIESNAP_STATE_DIR", DEFAULT_STATE_DIR)


def validate_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise UsageError(
            f"invalid name {name!r}: use 1-64 letters, digits, '_', '.', '+' or '-', "
            "starting with a letter or digit"
        )
    if name.endswith(_RESERVED_SUFFIXES):
        raise UsageError(
            f"invalid name {name!r}: names ending in -snap, -cow or -real are used for "
            "fiesnap's own devices; choose another name"
        )
    return name


@dataclass
class CheckpointRecord:
    """Everything needed to rebuild, inspect, commit or merge a checkpoint.

    A name put under fiesnap with `setup` (`managed`) keeps its record between
    checkpoints in phase "passthrough"; the checkpoint fields are then empty.
    """

    name: str
    device: str
    device_major: int
    device_minor: int
    device_bytes: int
    fstype: str
    fs_uuid: str
    checkpoint_id: str = ""
    chunk_bytes: int = 0
    store_type: str = ""
    store_relpath: str = ""
    store_file_bytes: int = 0
    store_extents: list[list[int]] = field(default_factory=list)  # [logical, physical, length, flags]
    cow_table: dict = field(default_factory=dict)
    free_map: list[list[int]] = field(default_factory=list)  # checkpoint-time free space, [start, length] bytes
    created: str = ""
    phase: str = "starting"
    version: int = RECORD_VERSION
    notes: dict = field(default_factory=dict)
    #: set up with `fiesnap setup`: /dev/mapper/NAME outlives each checkpoint.
    managed: bool = False
    #: id of the `setup` that made /dev/mapper/NAME (its dm UUID); "" if not managed.
    setup_id: str = ""
    #: device byte offset of the store file's identity block (-1: none written).
    identity_offset: int = -1
    #: bumped whenever the store map changes; also in the identity block.
    generation: int = 1
    #: how the checkpoint was taken: "offline" (device unmounted) or "online" (frozen).
    mode: str = "offline"

    def as_passthrough(self) -> "CheckpointRecord":
        """The same device under fiesnap with no checkpoint (after commit or merge)."""
        return CheckpointRecord(
            name=self.name, device=self.device, device_major=self.device_major,
            device_minor=self.device_minor, device_bytes=self.device_bytes,
            fstype=self.fstype, fs_uuid=self.fs_uuid, phase="passthrough",
            managed=self.managed, setup_id=self.setup_id, notes=dict(self.notes),
        )

    @property
    def has_checkpoint(self) -> bool:
        return self.phase not in ("passthrough",) and bool(self.checkpoint_id)

    @property
    def device_string(self) -> str:
        return f"{self.device_major}:{self.device_minor}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "CheckpointRecord":
        if data.get("version") != RECORD_VERSION:
            raise StateError(
                f"checkpoint record {data.get('name')!r} has version {data.get('version')}, "
                f"this fiesnap reads version {RECORD_VERSION}: use the fiesnap that wrote it"
            )
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


class StateStore:
    """The state folder: one JSON record per checkpoint name."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path or state_dir_from_env()

    def _record_path(self, name: str) -> str:
        return os.path.join(self.path, f"{name}.json")

    def ensure(self) -> None:
        os.makedirs(self.path, mode=0o700, exist_ok=True)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the state folder's lock: one changing fiesnap command at a time."""
        self.ensure()
        fd = os.open(os.path.join(self.path, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StateError(
                    f"another fiesnap command holds {self.path}/.lock: wait for it to finish"
                ) from None
            yield
        finally:
            os.close(fd)

    def names(self) -> list[str]:
        try:
            entries = os.listdir(self.path)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise StateError(f"cannot read the state folder {self.path}: {os.strerror(e.errno or 0)}") from None
        return sorted(e[:-5] for e in entries if e.endswith(".json") and not e.startswith("."))

    def exists(self, name: str) -> bool:
        return os.path.exists(self._record_path(name))

    def load(self, name: str) -> CheckpointRecord:
        try:
            with open(self._record_path(name), encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise CheckpointNameError(
                f"no checkpoint named {name!r}: see 'fiesnap status' for the known ones"
            ) from None
        except (OSError, ValueError) as e:
            raise StateError(f"cannot read checkpoint record {self._record_path(name)}: {e}") from None
        return CheckpointRecord.from_dict(data)

    def load_all(self) -> list[CheckpointRecord]:
        return [self.load(n) for n in self.names()]

    def save(self, record: CheckpointRecord) -> None:
        """Atomic replace: the old or the new record survives a crash, never a mix."""
        self.ensure()
        final = self._record_path(record.name)
        tmp = final + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, record.to_json().encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        self._fsync_dir()

    def delete(self, name: str) -> None:
        try:
            os.unlink(self._record_path(name))
        except FileNotFoundError:
            return
        self._fsync_dir()

    def _fsync_dir(self) -> None:
        dfd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def device_id(self) -> int:
        """st_dev of the filesystem holding the state folder."""
        self.ensure()
        return os.stat(self.path).st_dev
