"""The state folder: one checkpoint record per name, written atomically.

The record is what lets a merge or commit finish after an interruption, so a
record is never half-written: write a temporary file, fsync, rename, fsync the
folder. One lock file serialises fiesnap invocations that change anything.
Records are parsed and checked once here (`CheckpointRecord.from_dict`).

The folder is trusted only after it has been checked, the way sshd's StrictModes
and sudo check their files: a record names the store file whose blocks `merge`
(as root) copies over the device, so whoever can write a record can write the
device. Before every read or write, the path is opened one component at a time
from `/` with O_NOFOLLOW|O_DIRECTORY, each relative to the previous descriptor,
and every descriptor is checked with fstat:

- every ancestor is owned by root (or by the user fiesnap runs as, for tests)
  and is not writable by group or others, unless it is sticky (like /tmp:
  others cannot rename or replace a root-owned entry in it);
- the folder itself is owned by root with no group or other permission bits
  (it is created 0700);
- no component is a symlink.

All record I/O then goes through the folder's descriptor (openat, renameat), so
what was checked is what is used. Record and lock files are opened with
O_NOFOLLOW and must be regular files owned by root that only root can write.
A refusal is one line naming the path and what to do (StateError, exit 10) and
changes nothing.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager

from fiesnap.errors import CheckpointNameError, StateBusyError, StateError
from fiesnap.model.record import CheckpointRecord

DEFAULT_STATE_DIR = "/var/lib/fiesnap"

FOLDER_MODE = 0o700
RECORD_MODE = 0o600
PARENT_MODE = 0o755  # a missing parent we create (the folder itself is FOLDER_MODE)
LOCK_NAME = ".lock"
TMP_SUFFIX = ".tmp"
LOCK_TRIES = 5  # a lock file replaced under us this often: others are busy
MAX_RECORD_BYTES = 64 << 20  # far above any real record; a bigger file is not one

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_FILE = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # O_NONBLOCK: a FIFO must not hang us


def state_dir_from_env() -> str:
    return os.environ.get("FIESNAP_STATE_DIR", DEFAULT_STATE_DIR)


def _trusted_uids() -> frozenset[int]:
    """Root, and the user fiesnap runs as (the same when it runs as root, as it must)."""
    return frozenset({0, os.geteuid()})


def _mode(st: os.stat_result) -> str:
    return f"{stat.S_IMODE(st.st_mode):04o}"


def _check_ancestor(st: os.stat_result, where: str, folder: str) -> None:
    if st.st_uid not in _trusted_uids():
        raise StateError(
            f"{where} (a parent of the state folder {folder}) is owned by uid {st.st_uid}, not root: "
            "that user could replace the state folder; set FIESNAP_STATE_DIR to a folder whose parents are all owned by root"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        raise StateError(
            f"{where} (a parent of the state folder {folder}) has mode {_mode(st)}, writable by group or others "
            f"and not sticky: they could replace the state folder; run 'chmod go-w {where}' or set FIESNAP_STATE_DIR elsewhere"
        )


def _check_folder(st: os.stat_result, folder: str) -> None:
    if st.st_uid not in _trusted_uids():
        raise StateError(
            f"the state folder {folder} is owned by uid {st.st_uid}, not root: its records could be forged; "
            f"inspect it, then 'chown root: {folder}' or remove it"
        )
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise StateError(
            f"the state folder {folder} has mode {_mode(st)}: it must give group and others no access; "
            f"inspect it, then 'chmod 0700 {folder}'"
        )


def _check_file(st: os.stat_result, where: str, what: str) -> None:
    if not stat.S_ISREG(st.st_mode) or st.st_uid not in _trusted_uids() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StateError(
            f"{what} {where} is not a regular file owned by root and writable only by root "
            f"(uid {st.st_uid}, mode {_mode(st)}): it may be forged; inspect it, then remove it"
        )


class StateStore:
    """The state folder: one JSON record per checkpoint name."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path or state_dir_from_env()

    def _record_path(self, name: str) -> str:
        return os.path.join(self.path, f"{name}.json")

    @staticmethod
    def _entry(name: str) -> str | None:
        """The record's file name in the folder; None for a name that cannot be one
        (a path, a hidden file): such a record does not exist."""
        if not name or "/" in name or "\0" in name or name.startswith("."):
            return None
        return f"{name}.json"

    # ------------------------------------------------------------ the folder

    def _open_folder(self, *, create: bool, made: list[str] | None = None) -> int | None:
        """A descriptor of the checked state folder; None if it is missing and not `create`d.

        Walks the path from `/`: every component opened with O_NOFOLLOW relative to
        its parent's descriptor and checked by fstat before the next one is opened.
        The paths of the folders this call created are appended to `made`.
        """
        path = os.path.abspath(self.path)
        parts = [p for p in path.split("/") if p]
        fd = os.open("/", _O_DIR)
        where = "/"
        try:
            st = os.fstat(fd)
            if parts:
                _check_ancestor(st, where, path)
            else:
                _check_folder(st, path)
            for i, part in enumerate(parts):
                last = i == len(parts) - 1
                where = os.path.join(where, part)
                nfd, created = self._open_component(fd, part, where, path, create=create, last=last)
                if nfd is None:
                    return None
                os.close(fd)
                fd = nfd
                if created:  # mkdir's mode went through the umask; we own it, so set it exactly
                    os.fchmod(fd, FOLDER_MODE if last else PARENT_MODE)
                    if made is not None:
                        made.append(where)
                st = os.fstat(fd)
                if last:
                    _check_folder(st, path)
                else:
                    _check_ancestor(st, where, path)
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _open_component(self, parent: int, part: str, where: str, folder: str, *,
                        create: bool, last: bool) -> tuple[int | None, bool]:
        created = False
        while True:
            try:
                return os.open(part, _O_DIR, dir_fd=parent), created
            except FileNotFoundError:
                if not create:
                    return None, False
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise StateError(
                        f"{where} is a symlink or not a directory: the state folder's path must be real directories "
                        f"only; set FIESNAP_STATE_DIR to the real path of {folder}"
                    ) from None
                raise StateError(
                    f"cannot open {where} (state folder {folder}): {os.strerror(e.errno or 0)}; check the path"
                ) from None
            try:
                os.mkdir(part, FOLDER_MODE if last else PARENT_MODE, dir_fd=parent)
                os.fsync(parent)
                created = True
            except FileExistsError:
                pass  # someone else made it meanwhile: open and check it like any other
            except OSError as e:
                raise StateError(
                    f"cannot create {where} (state folder {folder}): {os.strerror(e.errno or 0)}; "
                    "create it as root with mode 0700 or set FIESNAP_STATE_DIR"
                ) from None

    @contextmanager
    def _folder(self, *, create: bool, made: list[str] | None = None) -> Iterator[int | None]:
        fd = self._open_folder(create=create, made=made)
        try:
            yield fd
        finally:
            if fd is not None:
                os.close(fd)

    def ensure(self) -> None:
        """Create the state folder (0700) if missing; refuse an unsafe one."""
        with self._folder(create=True):
            pass

    # ------------------------------------------------------------ the lock

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the state folder's lock: one changing fiesnap command at a time.

        A command that fails leaves no state folder of its own: when this call created the
        folder, the lock file in it and every folder it created on the way (each only if
        empty) are removed again, so a refusal on a fresh machine leaves nothing behind. A
        lock file in a folder that was there already stays: removing it could let a command
        that opened it a moment earlier lock a file no longer named .lock.
        """
        made: list[str] = []
        try:
            fd = self._take_lock(made)
            try:
                yield
            except BaseException:
                if made and made[-1] == os.path.abspath(self.path):
                    self._unlink_lock()
                raise
            finally:
                os.close(fd)
        except BaseException:
            for path in reversed(made):
                try:
                    # Made by this call under root-owned, checked parents: nobody else could
                    # have replaced it. Only an empty folder goes; a record or a lock stays.
                    os.rmdir(path)
                except OSError:
                    break
            raise

    def _take_lock(self, made: list[str]) -> int:
        """The flocked lock file's descriptor.

        Another command that fails removes the lock file and the folder it created: a lock is
        ours only if the name still refers to the file we locked, and a folder removed under
        us is made again; either way, try again.
        """
        where = os.path.join(self.path, LOCK_NAME)
        for _ in range(LOCK_TRIES):
            with self._folder(create=True, made=made) as dfd:
                try:
                    fd = self._open_lock(dfd, where)
                except FileNotFoundError:
                    continue  # the folder was removed after we opened it
                try:
                    _check_file(os.fstat(fd), where, "lock file")
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        raise StateBusyError(
                            f"another fiesnap command holds {where}: wait for it to finish"
                        ) from None
                    try:
                        named = os.stat(LOCK_NAME, dir_fd=dfd, follow_symlinks=False)
                    except FileNotFoundError:
                        named = None
                    held = os.fstat(fd)
                    if named is not None and (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino):
                        return fd
                except BaseException:
                    os.close(fd)
                    raise
                os.close(fd)
        raise StateBusyError(f"{where} keeps being replaced by other fiesnap commands: wait for them to finish")

    @classmethod
    def _open_lock(cls, dfd: int, where: str) -> int:
        """Open (creating) the lock file; FileNotFoundError when the folder itself is gone."""
        try:
            return os.open(LOCK_NAME, os.O_RDWR | os.O_CREAT | _O_FILE, RECORD_MODE, dir_fd=dfd)
        except FileNotFoundError:
            raise
        except OSError as e:
            raise cls._open_error(e, where, "lock file") from None

    def _unlink_lock(self) -> None:
        """Remove the lock file this command created (still holding it, so no one else does)."""
        try:
            with self._folder(create=False) as dfd:
                if dfd is not None:
                    os.unlink(LOCK_NAME, dir_fd=dfd)
        except (OSError, StateError):
            pass  # the command's own error is what the user needs to see

    @staticmethod
    def _open_error(e: OSError, where: str, what: str) -> StateError:
        if e.errno == errno.ELOOP:
            return StateError(f"{what} {where} is a symlink: it may be forged; inspect it, then remove it")
        return StateError(f"cannot open {what} {where}: {os.strerror(e.errno or 0)}; check it")

    # ------------------------------------------------------------ records

    def names(self) -> list[str]:
        with self._folder(create=False) as dfd:
            if dfd is None:
                return []
            try:
                entries = os.listdir(dfd)
            except OSError as e:
                raise StateError(f"cannot read the state folder {self.path}: {os.strerror(e.errno or 0)}") from None
        return sorted(e[:-5] for e in entries if e.endswith(".json") and not e.startswith("."))

    def exists(self, name: str) -> bool:
        entry = self._entry(name)
        with self._folder(create=False) as dfd:
            if dfd is None or entry is None:
                return False
            try:
                os.stat(entry, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                return False
            return True

    def load(self, name: str) -> CheckpointRecord:
        where = self._record_path(name)
        entry = self._entry(name)
        with self._folder(create=False) as dfd:
            if dfd is None or entry is None:
                raise self._unknown(name)
            try:
                fd = os.open(entry, os.O_RDONLY | _O_FILE, dir_fd=dfd)
            except FileNotFoundError:
                raise self._unknown(name) from None
            except OSError as e:
                raise self._open_error(e, where, "checkpoint record") from None
        try:
            st = os.fstat(fd)
            _check_file(st, where, "checkpoint record")
            if st.st_size > MAX_RECORD_BYTES:
                raise StateError(f"checkpoint record {where} is {st.st_size} bytes, not a record: inspect it")
            raw = _read_all(fd)
        except OSError as e:
            raise StateError(f"cannot read checkpoint record {where}: {os.strerror(e.errno or 0)}") from None
        finally:
            os.close(fd)
        try:
            data = json.loads(raw.decode("utf-8"))
        except ValueError as e:  # UnicodeDecodeError and JSONDecodeError both are
            raise StateError(f"cannot read checkpoint record {where}: {e}") from None
        return CheckpointRecord.from_dict(data, where=f"checkpoint record {where}")

    @staticmethod
    def _unknown(name: str) -> CheckpointNameError:
        return CheckpointNameError(f"no checkpoint named {name!r}: see 'fiesnap status' for the known ones")

    def load_all(self) -> list[CheckpointRecord]:
        return [self.load(n) for n in self.names()]

    def save(self, record: CheckpointRecord) -> None:
        """Atomic replace: the old or the new record survives a crash, never a mix."""
        final = self._entry(record.name)
        if final is None:  # CheckpointRecord validated the name; this is a programming error
            raise ValueError(f"bad record name {record.name!r}")
        tmp = final + TMP_SUFFIX
        where = self._record_path(record.name)
        data = record.to_json().encode()
        with self._folder(create=True) as dfd:
            _remove_stale(dfd, tmp, os.path.join(self.path, tmp))
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_FILE, RECORD_MODE, dir_fd=dfd)
            except OSError as e:
                raise StateError(f"cannot create {where}{TMP_SUFFIX}: {os.strerror(e.errno or 0)}; check the state folder") from None
            try:
                try:
                    os.fchmod(fd, RECORD_MODE)
                    _write_all(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.rename(tmp, final, src_dir_fd=dfd, dst_dir_fd=dfd)
            except OSError as e:
                _remove_stale(dfd, tmp, os.path.join(self.path, tmp), quiet=True)
                raise StateError(f"cannot write checkpoint record {where}: {os.strerror(e.errno or 0)}; "
                                 "check the state folder's filesystem") from None
            os.fsync(dfd)

    def delete(self, name: str) -> None:
        entry = self._entry(name)
        with self._folder(create=False) as dfd:
            if dfd is None or entry is None:
                return
            try:
                os.unlink(entry, dir_fd=dfd)
            except FileNotFoundError:
                return
            except OSError as e:
                raise StateError(f"cannot remove checkpoint record {self._record_path(name)}: "
                                 f"{os.strerror(e.errno or 0)}; inspect it") from None
            os.fsync(dfd)

    # ------------------------------------------------------------ where it lives

    def _missing_components(self) -> list[str]:
        """The state folder's path components that do not exist yet, outermost first."""
        missing: list[str] = []
        path = os.path.abspath(self.path)
        while path != "/" and not os.path.lexists(path):
            missing.insert(0, path)
            path = os.path.dirname(path)
        return missing

    def device_id(self) -> int:
        """st_dev of the filesystem holding the state folder (or that will hold it: a missing
        folder is not created just to ask, its nearest existing parent answers)."""
        with self._folder(create=False) as dfd:
            if dfd is not None:
                return os.fstat(dfd).st_dev
        missing = self._missing_components()
        return os.stat(os.path.dirname(missing[0]) if missing else "/").st_dev

    def refuse_on(self, devno: int, what: str) -> None:
        """Refuse when the state folder lives on the filesystem fiesnap is about to
        checkpoint, freeze or extend: its records would be frozen or rolled back with it."""
        if self.device_id() == devno:
            raise StateError(
                f"the state folder {self.path} lives on {what}, the filesystem fiesnap would "
                "checkpoint: set FIESNAP_STATE_DIR to a folder on another filesystem"
            )


def _read_all(fd: int) -> bytes:
    chunks = []
    total = 0
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > MAX_RECORD_BYTES:
            raise OSError(errno.EFBIG, "record too large")
        chunks.append(chunk)


def _write_all(fd: int, data: bytes) -> None:
    """os.write may write less than asked (a signal, a nearly full disk): loop until done."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        view = view[n:]


def _remove_stale(dfd: int, name: str, where: str, *, quiet: bool = False) -> None:
    """Remove a temporary record a crash left behind. unlinkat never follows a
    symlink, and the folder is root-only, so nothing outside it can be touched."""
    try:
        os.unlink(name, dir_fd=dfd)
    except FileNotFoundError:
        pass
    except OSError as e:
        if not quiet:
            raise StateError(f"cannot remove the stale temporary record {where}: "
                             f"{os.strerror(e.errno or 0)}; inspect and remove it by hand") from None
