"""The preallocated file whose blocks hold a checkpoint's COW store.

The store is written through a dm-linear device mapped onto the file's
physical extents, behind the filesystem's back. That is only safe while the
filesystem never moves, frees or shares those blocks, so the file is:
fully allocated (fallocate, not sparse), immutable (no truncate, unlink,
write or reflink), in a root-only directory, and its extents are read twice
around setting the immutable flag to prove they held still.

The first IDENTITY_BYTES of the file hold the store identity header
(identity.py), written through the filesystem before the file is made
immutable and rewritten (briefly mutable) when the store map changes. Such a
write turns an unwritten extent into a written one, which FIEMAP reports as
a split; the check after it is that no block moved (physical_layout).

One module because create, grow, rewrite-head and remove all keep that one
invariant through the same few steps (the root-only folder opened without
following links, the immutable flag lifted and restored around a change, the
extents re-read to prove no block moved); split up, each would have to
re-prove what the others assume.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass

from fiesnap.errors import FiesnapError, FilesystemError, RefusedError, UsageError
from fiesnap.model.extents import Extent, physical_layout
from fiesnap.model.units import format_bytes
from fiesnap.kernel.fiemap import file_extents
from fiesnap.kernel.fileflags import set_immutable
from fiesnap.model.identity import IDENTITY_BYTES, decode_identity
from fiesnap.kernel.fsprobe import check_statfs, is_realtime
from fiesnap.kernel.mounts import private_mount

STORE_DIR = ".fiesnap"
STORE_DIR_MODE = 0o700
STORE_FILE_MODE = 0o600

# Free space kept back when sizing a store: the filesystem needs room for the
# store's own extent-tree blocks, and a checkpointed filesystem that is
# completely full is a bad place to be. 1% of the filesystem, at least 16 MiB.
MIN_MARGIN_BYTES = 16 << 20
MARGIN_FRACTION = 100

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

#: Makes the header from the freshly allocated file's extents (e.g. to record where it lands).
HeadMaker = Callable[[tuple[Extent, ...]], bytes]


@dataclass(frozen=True)
class StoreFile:
    """A store file: `relpath` is relative to the filesystem root; extents in bytes."""

    relpath: str
    size: int
    extents: tuple[Extent, ...]


def space_margin(fs_bytes: int) -> int:
    """Bytes to leave free on a filesystem of `fs_bytes` bytes (see MIN_MARGIN_BYTES)."""
    return max(MIN_MARGIN_BYTES, fs_bytes // MARGIN_FRACTION)


def usable_space(where: int | str) -> int:
    """Free bytes a store may take on the filesystem of `where` (a path or an open fd):
    what unprivileged users could still allocate, minus fiesnap's margin."""
    sv = os.statvfs(where)
    return max(0, sv.f_bavail * sv.f_frsize - space_margin(sv.f_blocks * sv.f_frsize))


def _check_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise UsageError(f"bad store file name {name!r}: use a plain file name without '/'")


def _name_of(relpath: str) -> str:
    parts = relpath.split("/")
    if len(parts) != 2 or parts[0] != STORE_DIR:
        raise RefusedError(f"store path {relpath!r} is not inside {STORE_DIR}/: the recorded state is corrupt")
    _check_name(parts[1])
    return parts[1]


def _open_root(mountpoint: str) -> int:
    if not os.path.ismount(mountpoint):
        raise UsageError(f"{mountpoint} is not a mount point: give the root of the filesystem")
    try:
        return os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise FilesystemError(f"cannot open {mountpoint}: {os.strerror(e.errno or 0)}; check the path") from e


def _open_store_dir(root_fd: int, mountpoint: str, *, fix_mode: bool = False) -> int:
    """Open STORE_DIR under `root_fd` and check nobody but root could have touched it.

    `fix_mode` is for a directory we just created: mkdir's mode went through the umask.
    """
    where = os.path.join(mountpoint, STORE_DIR)
    try:
        fd = os.open(STORE_DIR, _O_DIR, dir_fd=root_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise RefusedError(f"{where} is not a real directory: move it away and retry") from e
        if isinstance(e, FileNotFoundError):
            raise
        raise FilesystemError(f"cannot open {where}: {os.strerror(e.errno or 0)}; check dmesg") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISDIR(st.st_mode) or st.st_dev != os.fstat(root_fd).st_dev:
            raise RefusedError(f"{where} is not a directory of this filesystem: unmount or move it and retry")
        if fix_mode and st.st_uid == 0:
            os.fchmod(fd, STORE_DIR_MODE)
            st = os.fstat(fd)
        if st.st_uid != 0 or stat.S_IMODE(st.st_mode) != STORE_DIR_MODE:
            raise RefusedError(
                f"{where} is not owned by root with mode 0700: someone else may have touched it; "
                "inspect it, then fix with chown root: and chmod 0700"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_space(root_fd: int, mountpoint: str, size: int) -> int:
    """Refuse a store that would eat into the margin; return the usable bytes."""
    usable = usable_space(root_fd)
    if size > usable:
        raise FilesystemError(_no_space_message(mountpoint, size, usable))
    return usable


def check_free_space(mountpoint: str, size: int, *, label: str | None = None,
                     hint: str = "choose a smaller --size") -> int:
    """Refuse a store larger than the free space minus the margin; return the usable bytes.

    `label` names the filesystem in the message (a device path reads better
    than a private mount point).
    """
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        usable = usable_space(fd)
    finally:
        os.close(fd)
    if size > usable:
        raise FilesystemError(_no_space_message(label or mountpoint, size, usable, hint))
    return usable


def _no_space_message(mountpoint: str, size: int, usable: int,
                      hint: str = "choose a smaller --size") -> str:
    return f"not enough free space on {mountpoint}: need {format_bytes(size)}, have {format_bytes(usable)}; {hint}"


def _discard(fd: int, dir_fd: int, name: str) -> list[str]:
    """Remove a half-made store file we created; return what went wrong, if anything."""
    problems = []
    try:
        set_immutable(fd, False)
    except Exception as e:
        problems.append(str(e))
    try:
        if os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
            os.unlink(name, dir_fd=dir_fd)
            os.fsync(dir_fd)
        else:
            problems.append(f"the partial store file {name} was replaced by another file: left it alone")
    except OSError as e:
        problems.append(f"cannot remove the partial store file {name}: {os.strerror(e.errno or 0)}")
    return problems


def _check_head(data: object) -> bytes:
    if not isinstance(data, (bytes, bytearray)) or len(data) != IDENTITY_BYTES:
        size = len(data) if isinstance(data, (bytes, bytearray)) else type(data).__name__
        raise ValueError(f"store header must be {IDENTITY_BYTES} bytes, got {size}")
    return bytes(data)


def _write_head(fd: int, data: bytes, where: str) -> None:
    """pwrite all of `data` at offset 0 and fsync."""
    try:
        done = 0
        while done < len(data):
            n = os.pwrite(fd, data[done:], done)
            if n <= 0:
                raise OSError(errno.EIO, "short write")
            done += n
        os.fsync(fd)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise FilesystemError(
                f"cannot write the header of {where}: the filesystem is full; free some space and retry"
            ) from e
        raise FilesystemError(f"cannot write the header of {where}: {os.strerror(e.errno or 0)}; check dmesg") from e


def _moved_error(where: str, when: str) -> FilesystemError:
    return FilesystemError(f"the blocks of {where} moved {when}: the filesystem relocated them; retry")


def _create_in(
    dir_fd: int, mountpoint: str, name: str, size: int, usable: int, head: HeadMaker | None
) -> StoreFile:
    where = os.path.join(mountpoint, STORE_DIR, name)
    flags = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_WRONLY | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, STORE_FILE_MODE, dir_fd=dir_fd)
    except FileExistsError:
        raise RefusedError(f"{where} already exists: choose another name or remove the stale store first") from None
    try:
        os.fchmod(fd, STORE_FILE_MODE)
        if is_realtime(fd):  # inherited from the folder (rtinherit): its blocks would be on the rt device
            raise FilesystemError(
                f"{where} is a realtime file of XFS: FIEMAP addresses would be on the realtime device, "
                "not this one; fiesnap supports XFS without a realtime section only"
            )
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise FilesystemError(_no_space_message(mountpoint, size, usable)) from e
            if e.errno == errno.EFBIG:
                raise FilesystemError(
                    f"{format_bytes(size)} is too large for one file on {mountpoint}: choose a smaller --size"
                ) from e
            raise FilesystemError(f"cannot allocate {where}: {os.strerror(e.errno or 0)}; check dmesg") from e
        os.fsync(fd)
        before = file_extents(fd)
        if head is not None:
            _write_head(fd, _check_head(head(tuple(before))), where)
            written = file_extents(fd)
            if physical_layout(written) != physical_layout(before):
                raise _moved_error(where, "when its header was written")
            before = written
        set_immutable(fd, True)
        os.fsync(fd)
        after = file_extents(fd)
        if (physical_layout(before) != physical_layout(after)) if head is not None else (before != after):
            raise FilesystemError(f"the extents of {where} changed while it was being created: retry")
        if os.fstat(fd).st_size != size:
            raise FilesystemError(f"{where} has the wrong size after fallocate: check dmesg")
        os.fsync(dir_fd)
        return StoreFile(f"{STORE_DIR}/{name}", size, tuple(after))
    except BaseException as e:
        for problem in _discard(fd, dir_fd, name):
            e.add_note(problem)
        raise
    finally:
        os.close(fd)


def create_store_file(mountpoint: str, file_name: str, size: int, head: HeadMaker | None = None) -> StoreFile:
    """Create, fully allocate and freeze `.fiesnap/<file_name>` of `size` bytes on the mounted fs.

    With `head`, it is called with the allocated file's extents and must
    return the IDENTITY_BYTES-byte header (ValueError otherwise), which is
    written at offset 0 before the file is made immutable. The returned
    extents are FIEMAP's after that write.

    Nothing is left behind on failure: the half-made file (and a
    `.fiesnap` directory created for it) are removed before re-raising.
    """
    _check_name(file_name)
    if size <= 0 or size % 512:
        raise UsageError(f"store size {size} is not a positive multiple of 512 bytes: choose another --size")
    if head is not None and size <= IDENTITY_BYTES:
        raise UsageError(f"store size {size} leaves no room after the {IDENTITY_BYTES}-byte header: choose a larger --size")
    check_statfs(mountpoint)
    root_fd = _open_root(mountpoint)
    try:
        usable = _check_space(root_fd, mountpoint, size)
        created_dir = False
        try:
            os.mkdir(STORE_DIR, STORE_DIR_MODE, dir_fd=root_fd)
            created_dir = True
        except FileExistsError:
            pass
        dir_fd = -1
        try:
            dir_fd = _open_store_dir(root_fd, mountpoint, fix_mode=created_dir)
            if created_dir:
                os.fsync(root_fd)
            return _create_in(dir_fd, mountpoint, file_name, size, usable, head)
        except BaseException:
            if created_dir:
                _remove_dir_if_empty(root_fd)
            raise
        finally:
            if dir_fd >= 0:
                os.close(dir_fd)
    finally:
        os.close(root_fd)


def _remove_dir_if_empty(root_fd: int) -> None:
    try:
        os.rmdir(STORE_DIR, dir_fd=root_fd)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
            return
        raise
    os.fsync(root_fd)


def _open_store(mountpoint: str, relpath: str) -> tuple[int, int]:
    """Open an existing store file read-only after the same checks as creation.

    Returns (dir_fd, fd); the caller closes both. No symlinks, a regular
    file, inside a root-owned 0700 `.fiesnap` of this filesystem.
    """
    name = _name_of(relpath)
    where = os.path.join(mountpoint, relpath)
    root_fd = _open_root(mountpoint)
    try:
        dir_fd = _open_store_dir(root_fd, mountpoint)
    except FileNotFoundError:
        raise RefusedError(f"store file {where} is missing: the checkpoint is lost") from None
    finally:
        os.close(root_fd)
    try:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        except FileNotFoundError:
            raise RefusedError(f"store file {where} is missing: the checkpoint is lost") from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise RefusedError(f"{where} is a symlink, not a store file: refusing to use it") from e
            raise FilesystemError(f"cannot open {where}: {os.strerror(e.errno or 0)}; check dmesg") from e
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise RefusedError(f"{where} is not a regular file: refusing to use it")
        except BaseException:
            os.close(fd)
            raise
    except BaseException:
        os.close(dir_fd)
        raise
    return dir_fd, fd


def store_extents(mountpoint: str, relpath: str) -> tuple[Extent, ...]:
    """Re-read the store file's validated extents, e.g. to check they still match the recorded ones."""
    dir_fd, fd = _open_store(mountpoint, relpath)
    try:
        return tuple(file_extents(fd))
    finally:
        os.close(fd)
        os.close(dir_fd)


def read_head(mountpoint: str, relpath: str) -> bytes:
    """The store file's first IDENTITY_BYTES bytes, read through the filesystem (tests, diagnostics)."""
    dir_fd, fd = _open_store(mountpoint, relpath)
    try:
        data = os.pread(fd, IDENTITY_BYTES, 0)
        while len(data) < IDENTITY_BYTES:
            more = os.pread(fd, IDENTITY_BYTES - len(data), len(data))
            if not more:
                raise RefusedError(
                    f"{os.path.join(mountpoint, relpath)} is shorter than its {IDENTITY_BYTES}-byte header: "
                    "it is not a fiesnap store"
                )
            data += more
        return data
    finally:
        os.close(fd)
        os.close(dir_fd)


def rewrite_head(mountpoint: str, relpath: str, data: bytes) -> None:
    """Replace the store file's header (e.g. after the store map grew).

    The immutable flag is lifted only for the write and set again whatever
    happens; the file's block layout must be the same afterwards.
    """
    data = _check_head(data)
    where = os.path.join(mountpoint, relpath)
    dir_fd, fd = _open_store(mountpoint, relpath)
    try:
        before = file_extents(fd)
        set_immutable(fd, False)
        try:
            _write_through(dir_fd, fd, _name_of(relpath), data, where)
        except BaseException as e:
            try:
                set_immutable(fd, True)
            except FiesnapError as again:
                e.add_note(f"{where} is left mutable ({again}): run 'chattr +i {where}' now")
            raise
        try:
            set_immutable(fd, True)
        except FiesnapError as e:
            raise FilesystemError(f"cannot make {where} immutable again ({e}): run 'chattr +i {where}' now") from e
        if physical_layout(file_extents(fd)) != physical_layout(before):
            raise FilesystemError(
                f"the blocks of {where} moved when its header was rewritten: "
                "the recorded store map is wrong now; do not activate this checkpoint"
            )
    finally:
        os.close(fd)
        os.close(dir_fd)


def _write_through(dir_fd: int, ro_fd: int, name: str, data: bytes, where: str) -> None:
    """Open `name` for writing, check it is still the inode `ro_fd` has open, write the header."""
    try:
        wfd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as e:
        raise FilesystemError(f"cannot open {where} for writing: {os.strerror(e.errno or 0)}; check dmesg") from e
    try:
        a, b = os.fstat(wfd), os.fstat(ro_fd)
        if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
            raise RefusedError(f"{where} was replaced while its header was being rewritten: inspect it by hand")
        _write_head(wfd, data, where)
    finally:
        os.close(wfd)


def leftover_stores(mountpoint: str, name: str, fs_uuid: str) -> list[str]:
    """Store files of checkpoint `name` that no record names (relpaths, sorted).

    A start killed between creating its store file and recording it leaves an
    immutable file no command would remove. Call under the state lock, with
    `name` holding no checkpoint: then every `store-NAME-<8 hex>` in STORE_DIR
    whose identity block names this filesystem is such a leftover. Anything
    else -- another name, another pattern, a file without a fiesnap identity --
    is not touched.
    """
    wanted = re.compile(rf"^store-{re.escape(name)}-[0-9a-f]{{8}}$")
    root_fd = _open_root(mountpoint)
    try:
        try:
            dir_fd = _open_store_dir(root_fd, mountpoint)
        except FileNotFoundError:
            return []
        try:
            candidates = sorted(n for n in os.listdir(dir_fd) if wanted.match(n))
        finally:
            os.close(dir_fd)
    finally:
        os.close(root_fd)
    found = []
    for file_name in candidates:
        relpath = f"{STORE_DIR}/{file_name}"
        try:
            ident = decode_identity(read_head(mountpoint, relpath), os.path.join(mountpoint, relpath))
        except (FiesnapError, OSError):
            continue
        if ident.fs_uuid == fs_uuid:
            found.append(relpath)
    return found


def remove_store_file(mountpoint: str, relpath: str) -> None:
    """Delete the store file and, if then empty, `.fiesnap`. Already gone is fine (idempotent)."""
    name = _name_of(relpath)
    where = os.path.join(mountpoint, relpath)
    root_fd = _open_root(mountpoint)
    try:
        try:
            dir_fd = _open_store_dir(root_fd, mountpoint)
        except FileNotFoundError:
            return
        try:
            _unlink_store(dir_fd, name, where)
        finally:
            os.close(dir_fd)
        _remove_dir_if_empty(root_fd)
    finally:
        os.close(root_fd)


def _unlink_store(dir_fd: int, name: str, where: str) -> None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise RefusedError(f"{where} is a symlink, not a store file: inspect and remove it by hand") from e
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RefusedError(f"{where} is not a regular file: inspect and remove it by hand")
        set_immutable(fd, False)
        if os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_ino != st.st_ino:
            raise RefusedError(f"{where} was replaced while being removed: inspect it by hand")
        os.unlink(name, dir_fd=dir_fd)
        os.fsync(dir_fd)
    finally:
        os.close(fd)


def grow_store_file(mountpoint: str, relpath: str, new_size: int) -> tuple[Extent, ...]:
    """Allocate the store file up to `new_size` bytes; return all its extents afterwards.

    The blocks already in the file must not move (they hold a live store):
    the layout of the old part is compared before and after. The immutable
    flag is lifted only for the fallocate and set again whatever happens.
    """
    where = os.path.join(mountpoint, relpath)
    dir_fd, fd = _open_store(mountpoint, relpath)
    try:
        old_size = os.fstat(fd).st_size
        if new_size <= old_size or new_size % 512:
            raise UsageError(f"new store file size {new_size} must exceed {old_size} and be a multiple of 512")
        before = file_extents(fd)
        set_immutable(fd, False)
        try:
            wfd = os.open(_name_of(relpath), os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            try:
                a, b = os.fstat(wfd), os.fstat(fd)
                if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
                    raise RefusedError(f"{where} was replaced while being grown: inspect it by hand")
                try:
                    os.posix_fallocate(wfd, old_size, new_size - old_size)
                except OSError as e:
                    if e.errno in (errno.ENOSPC, errno.EDQUOT):
                        raise FilesystemError(
                            f"not enough free space on {mountpoint} to grow the store by "
                            f"{format_bytes(new_size - old_size)}: free space or commit") from e
                    raise FilesystemError(f"cannot grow {where}: {os.strerror(e.errno or 0)}; check dmesg") from e
                os.fsync(wfd)
            finally:
                os.close(wfd)
        finally:
            set_immutable(fd, True)
        after = file_extents(fd)
        old_part = [e for e in after if e.logical < old_size]
        if physical_layout(_clip(old_part, old_size)) != physical_layout(_clip(before, old_size)):
            raise FilesystemError(f"the existing blocks of {where} moved while it grew: do not use this store")
        if os.fstat(fd).st_size != new_size:
            raise FilesystemError(f"{where} has the wrong size after fallocate: check dmesg")
        return tuple(after)
    finally:
        os.close(fd)
        os.close(dir_fd)


def _clip(extents, size: int) -> list[Extent]:
    """The extents cut at logical byte `size`."""
    out = []
    for e in extents:
        if e.logical >= size:
            continue
        out.append(Extent(e.logical, e.physical, min(e.length, size - e.logical), e.flags))
    return out


def discard_store(device: str, fstype: str, relpath: str) -> None:
    """Remove a checkpoint's store file through a private mount of `device`."""
    with private_mount(device, fstype) as mnt:
        remove_store_file(mnt, relpath)
