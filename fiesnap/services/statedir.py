"""The state folder: one checkpoint record per name, written atomically.

The record is what lets a merge or commit finish after an interruption, so a
record is never half-written: write a temporary file, fsync, rename, fsync the
folder. One lock file serialises fiesnap invocations that change anything.
Records are parsed and checked once here (`CheckpointRecord.from_dict`).
"""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from typing import Iterator

from fiesnap.errors import CheckpointNameError, StateError
from fiesnap.model.record import CheckpointRecord

DEFAULT_STATE_DIR = "/var/lib/fiesnap"


def state_dir_from_env() -> str:
    return os.environ.get("FIESNAP_STATE_DIR", DEFAULT_STATE_DIR)


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
        return CheckpointRecord.from_dict(data, where=f"checkpoint record {self._record_path(name)}")

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

    def refuse_on(self, devno: int, what: str) -> None:
        """Refuse when the state folder lives on the filesystem fiesnap is about to
        checkpoint, freeze or extend: its records would be frozen or rolled back with it."""
        if self.device_id() == devno:
            raise StateError(
                f"the state folder {self.path} lives on {what}, the filesystem fiesnap would "
                "checkpoint: set FIESNAP_STATE_DIR to a folder on another filesystem"
            )
