"""`bow-compat record`: record a dm-log-writes trace of a command's writes to your own device.

DEVICE (an unmounted block device with an ext4 or XFS filesystem) is first copied to BASE, a new
file: the device as logging began. Then the steps of bow_compat.capture: a log-writes device over
DEVICE logging to LOGDEV, mounted; fstrim; the mark, with the filesystem frozen; COMMAND, run in
the mount point; unmount; the dm device removed. `bow-compat replay LOGDEV --base BASE --out
OUT.img` then shows what dm-bow would have done.

Every check runs before the first change (the order: arguments, then root, then what only root
may open), so bad input changes nothing. Once something is built, any failure, ^C, SIGTERM or
SIGHUP tears it down again; the error says what is left where (BASE, the trace in LOGDEV, or a
mount or dm device that could not be removed, with the command that removes it).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import IO, Any

from fiesnap.errors import FiesnapError
from fiesnap.kernel import fsprobe
from fiesnap.kernel.blockdev import holders, mounts_anywhere, open_block_device
from fiesnap.kernel.dm import DeviceMapper

from bow_compat import errors as E
from bow_compat.capture import logged_mount, start_checkpoint
from bow_compat.image import kind_of
from bow_compat.logwrites import read_log

MOUNT_ENV = "BOW_COMPAT_MOUNT"  # COMMAND finds the mount point here too (it is also its cwd)
_COPY_CHUNK = 1 << 22
Progress = Callable[[int, int], None]  # (bytes copied, bytes to copy)


@dataclass
class RecordResult:
    """What a record did; to_dict() for --json."""

    device: str
    log_device: str
    base: str
    mark: str
    fstype: str
    block_size: int               # the filesystem's: replay's --block-size, as dm-bow's
    device_bytes: int
    command: list[str] = field(default_factory=list)
    command_exit: int | None = None
    trace_entries: int = 0        # entries in LOGDEV's dm-log-writes super block

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Checked:
    """The input once every check passed."""

    device: str
    log_device: str
    base: str
    command: list[str]
    mountpoint: str | None
    fstype: str
    block_size: int
    device_bytes: int
    dm_name: str


def record(device: str, log_device: str, base: str, command: list[str], *,
           mountpoint: str | None = None, mark: str = "checkpoint",
           command_stdout: IO[str] | None = None, progress: Progress | None = None,
           dm_factory: Callable[[], DeviceMapper] = DeviceMapper) -> RecordResult:
    """Copy DEVICE to BASE, then record COMMAND's writes to DEVICE into LOGDEV (module
    docstring). COMMAND's exit status is in the result, not raised: the trace is complete
    either way. fiesnap's errors come out as the bow_compat error with the same exit code."""
    try:
        c = _check(device, log_device, base, command, mountpoint)
        dm = dm_factory()
        _check_kernel(dm, c.dm_name)
        res = RecordResult(c.device, c.log_device, c.base, mark, c.fstype, c.block_size,
                           c.device_bytes, list(command))
        with _signals_interrupt():
            _record_steps(c, dm, mark, res, command_stdout, progress)
        return res
    except FiesnapError as e:
        raise _as_bow_error(e) from e


def _record_steps(c: _Checked, dm: DeviceMapper, mark: str, res: RecordResult,
                  command_stdout: IO[str] | None, progress: Progress | None) -> None:
    try:
        _copy_to_new_file(c.device, c.base, c.device_bytes, progress)
    except KeyboardInterrupt:
        raise E.BowInterrupted(f"interrupted while copying {c.device} to {c.base}: {c.base} is "
                               f"removed again, nothing else was changed") from None
    kept = f"{c.base} is kept ({c.device} as logging began)"
    stage = f"before the mark; {kept}, {c.log_device} holds a trace without the mark"
    try:
        with _mount_dir(c.mountpoint) as mnt, logged_mount(
                c.device, c.log_device, mnt, sectors=c.device_bytes // 512, fstype=c.fstype,
                name=c.dm_name, dm=dm):
            start_checkpoint(dm, c.dm_name, mnt, mark)
            stage = (f"while COMMAND ran; {kept}, {c.log_device} holds the trace up to the "
                     f"interrupt (replay can use it)")
            res.command_exit = _run_command(c.command, mnt, command_stdout)
            os.sync()
    except KeyboardInterrupt as e:
        err = E.BowInterrupted(f"interrupted {stage}")
        for note in getattr(e, "__notes__", ()):
            err.add_note(note)
        raise err from None
    except Exception as e:
        e.add_note(f"{kept}; remove it, or run record again once the cause is fixed")
        raise
    with read_log(c.log_device) as log:
        res.trace_entries = log.nr_entries


# ---------------------------------------------------------------- checks (no change made)

def _check(device: str, log_device: str, base: str, command: list[str],
           mountpoint: str | None) -> _Checked:
    if not command:
        raise E.BowUsageError("no COMMAND given: put the workload after '--', e.g. -- sh -c 'cp -a /src .'")
    if shutil.which(command[0]) is None:
        raise E.BowUsageError(f"{command[0]}: command not found or not executable: give COMMAND "
                              f"after '--' as you would run it")
    _check_new_file(base)
    if mountpoint is not None:
        _check_mountpoint(mountpoint)
    _check_node(device, "DEVICE")
    _check_node(log_device, "LOGDEV (--log)")
    if os.stat(device).st_rdev == os.stat(log_device).st_rdev:
        raise E.BowUsageError(f"{device} and {log_device} are the same device: the log needs a "
                              f"device of its own")
    if os.geteuid() != 0:
        raise E.BowNotRootError("record needs root: it creates a device-mapper device and mounts "
                                "it; run it with sudo")
    dev = open_block_device(device)
    logdev = open_block_device(log_device)
    _check_unused(device, dev.major, dev.minor, "DEVICE: record mounts it itself")
    _check_unused(log_device, logdev.major, logdev.minor, "LOGDEV: record overwrites it")
    try:
        fs = fsprobe.probe_device(device)
    except FiesnapError as e:
        raise E.BowFilesystemError(f"{device}: {e}") from None
    _check_no_filesystem(log_device)
    mountpoint = None if mountpoint is None else os.path.abspath(mountpoint)  # COMMAND's cwd
    return _Checked(device, log_device, base, list(command), mountpoint, fs.fstype,
                    fs.block_size, dev.size_bytes,
                    "bow-record-" + os.path.basename(os.path.realpath(device)))


def _check_new_file(base: str) -> None:
    if os.path.lexists(base):
        what = "is a directory" if os.path.isdir(base) else "exists"
        raise E.BowUsageError(f"{base} {what}: --base names a new file for the device image; "
                              f"remove it or name another")
    folder = os.path.dirname(os.path.abspath(base))
    if not os.path.isdir(folder):
        raise E.BowUsageError(f"{base}: folder {folder} does not exist: create it or name another --base")


def _check_mountpoint(mountpoint: str) -> None:
    if not os.path.isdir(mountpoint):
        raise E.BowUsageError(f"{mountpoint} is not a directory: --mount needs an existing "
                              f"directory (or leave it out: record makes one)")
    if os.path.ismount(mountpoint):
        raise E.BowUsageError(f"{mountpoint} is a mount point already: give an unused directory")


def _check_node(path: str, what: str) -> None:
    """A block device node; a file gets the losetup hint (dm-log-writes takes block devices)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise E.BowDeviceError(f"{path} does not exist: give {what} as a block device, "
                               f"e.g. /dev/sdb") from None
    if stat.S_ISBLK(mode):
        return
    if stat.S_ISREG(mode):
        raise E.BowDeviceError(f"{path} is a regular file: {what} must be a block device; attach "
                               f"the file with 'losetup -f --show {path}' and give the /dev/loopN "
                               f"it prints")
    if stat.S_ISDIR(mode):
        raise E.BowUsageError(f"{path} is a directory: give {what} as a block device")
    raise E.BowDeviceError(f"{path} is {kind_of(mode)}: give {what} as a block device")


def _check_unused(path: str, major: int, minor: int, why: str) -> None:
    """Not mounted (in any namespace), nothing stacked on it, no exclusive opener."""
    where = mounts_anywhere(major, minor)
    if where:
        raise E.BowDeviceError(f"{path} is mounted at {', '.join(where)}: unmount it first ({why})")
    stacked = holders(major, minor)
    if stacked:
        raise E.BowDeviceError(f"{path} is in use by {', '.join(stacked)} (stacked on it): "
                               f"remove that first ({why})")
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC))
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise E.BowDeviceError(f"{path} is in use (opened exclusively by another program, "
                                   f"or a partition of it is mounted): free it first ({why})") from None
        raise E.BowDeviceError(f"cannot open {path}: {e.strerror}; check the device") from None


def _check_no_filesystem(log_device: str) -> None:
    """LOGDEV is overwritten: refuse one that holds a filesystem (a wrong device name?)."""
    try:
        fs = fsprobe.probe_device(log_device)
    except FiesnapError:
        return  # no ext4 or XFS: a fresh device, or an earlier trace
    raise E.BowDeviceError(f"{log_device} holds an {fs.fstype} filesystem and record would "
                           f"overwrite it with the trace: check the device name, or wipe it first "
                           f"with 'wipefs -a {log_device}'")


def _check_kernel(dm: DeviceMapper, name: str) -> None:
    """The log-writes target (loading dm-log-writes if need be) and a free dm name."""
    if "log-writes" not in dm.target_versions():
        p = subprocess.run(["modprobe", "dm-log-writes"], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL)
        if "log-writes" not in dm.target_versions():
            raise E.BowKernelError(f"the kernel has no dm-log-writes target (modprobe dm-log-writes: "
                                   f"{p.stderr.strip() or f'exit {p.returncode}'}); record needs a "
                                   f"kernel built with CONFIG_DM_LOG_WRITES")
    if dm.info(name) is not None:
        raise E.BowDeviceError(f"dm device {name} already exists (a record still running, or "
                               f"left behind?): remove it with 'dmsetup remove {name}' if unused")


# ---------------------------------------------------------------- the steps that change things

def _copy_to_new_file(src: str, dst: str, size: int, progress: Progress | None) -> None:
    """Copy `size` bytes of `src` to the new file `dst` (sparse: zero chunks are holes), fsync;
    on any failure or ^C the partial file is removed."""
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        with open(src, "rb", buffering=0) as fi:
            done = 0
            while done < size:
                buf = fi.read(min(_COPY_CHUNK, size - done))
                if not buf:
                    raise OSError(errno.EIO, f"{src} ended at byte {done} of {size}", src)
                if buf.count(0) != len(buf):
                    os.pwrite(fd, buf, done)
                done += len(buf)
                if progress is not None:
                    progress(done, size)
        os.ftruncate(fd, size)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(dst)
        raise
    os.close(fd)


@contextmanager
def _mount_dir(given: str | None) -> Iterator[str]:
    """The mount point: the one given, or a new private directory removed afterwards."""
    if given is not None:
        yield given
        return
    made = tempfile.mkdtemp(prefix="bow-compat-record.")
    try:
        yield made
    finally:
        try:
            os.rmdir(made)
        except OSError:
            pass  # still a mount point: the teardown's error names it


def _run_command(command: list[str], mnt: str, stdout: IO[str] | None) -> int:
    """COMMAND with the mount point as cwd and in $BOW_COMPAT_MOUNT; its exit status (128+N
    for signal N, as a shell says it). On ^C it is terminated, then killed, before the
    teardown."""
    proc = subprocess.Popen(command, cwd=mnt, env={**os.environ, MOUNT_ENV: mnt}, stdout=stdout)
    try:
        rc = proc.wait()
    except BaseException:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        raise
    return 128 - rc if rc < 0 else rc


@contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP end a record like ^C: torn down, not killed with things left built."""
    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    old = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


_BY_EXIT_CODE = {c.exit_code: c for c in (E.BowUsageError, E.BowNotRootError, E.BowDeviceError,
                                          E.BowFilesystemError, E.BowStateError, E.BowKernelError)}


def _as_bow_error(e: FiesnapError) -> E.BowError:
    """fiesnap's error (from its kernel adapters) as bow_compat's class with the same exit code."""
    err = _BY_EXIT_CODE.get(e.exit_code, E.BowKernelError)(str(e))
    for note in getattr(e, "__notes__", ()):
        err.add_note(note)
    return err
