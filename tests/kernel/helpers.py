"""Guest-side helpers for the real-kernel tests (they run INSIDE the lab guest, as root).

The lab wrapper (tests/lab/guest-init.sh) sets:
  FIESNAP_LAB=1                 we are in the lab guest
  FIESNAP_LAB_DISKS             "/dev/vda /dev/vdb ..." scratch disks (virtio-blk, raw)
  FIESNAP_LAB_RESULTS           host-shared results folder (read-write)
  FIESNAP_REPO                  the repository (read-only in the guest)

No udevd runs in the guest: ``dmsetup create`` makes no /dev/mapper node; use
``dm_create`` (create + mknodes) or call ``dmsetup mknodes`` yourself.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import re
import stat
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

MiB = 1 << 20
FS_KINDS = ("ext4-4k", "ext4-1k", "xfs")

_ZERO_MIB = bytes(MiB)
_ZERO_MIB_SHA = hashlib.sha256(_ZERO_MIB).hexdigest()

BLKFLSBUF = 0x1261
BLKDISCARD = 0x1277


# --------------------------------------------------------------------------- basics


def in_lab() -> bool:
    return os.environ.get("FIESNAP_LAB") == "1"


def lab_disks() -> list[str]:
    return os.environ.get("FIESNAP_LAB_DISKS", "").split()


def sh(*cmd: object, check: bool = True, timeout: float | None = 300, input: str | None = None,
       env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a command, capture text output; on failure raise AssertionError with the output."""
    argv = [str(c) for c in cmd]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input,
                       env=None if env is None else dict(env),
                       stdin=None if input is not None else subprocess.DEVNULL)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} -> exit {p.returncode}\n{p.stdout}{p.stderr}")
    return p


def kmsg(text: str) -> None:
    """Write a marker line into the kernel log (ends up in dmesg.log next to dm/fs messages)."""
    try:
        with open("/dev/kmsg", "w") as f:
            f.write(f"fiesnap-lab: {text}\n")
    except OSError:
        pass


def dev_majmin(dev: str) -> str:
    """'254:16' for a block device path (what dm tables accept)."""
    st = os.stat(dev)
    if not stat.S_ISBLK(st.st_mode):
        raise ValueError(f"{dev} is not a block device")
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def dev_size(dev: str) -> int:
    fd = os.open(dev, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def dev_sectors(dev: str) -> int:
    return dev_size(dev) // 512


def _kname(dev: str) -> str:
    """Kernel name (vda, dm-3) of a block device path."""
    st = os.stat(dev)
    link = os.readlink(f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
    return os.path.basename(link)


def flush_buffers(dev: str) -> None:
    """Drop the block device's page cache (BLKFLSBUF) so buffered readers see the disk."""
    fd = os.open(dev, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, BLKFLSBUF, 0)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- raw I/O


def read_direct(dev: str, offset: int, length: int) -> bytes:
    """Read with O_DIRECT (no page cache). offset must be 512-aligned."""
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    try:
        span = -(-length // 4096) * 4096 or 4096
        buf = mmap.mmap(-1, span)
        try:
            n = os.preadv(fd, [buf], offset)
            return bytes(buf[: min(n, length)])
        finally:
            buf.close()
    finally:
        os.close(fd)


def write_direct(dev: str, offset: int, data: bytes) -> None:
    """Write with O_DIRECT and fsync. offset and len(data) must be 512-aligned."""
    if offset % 512 or len(data) % 512:
        raise ValueError("O_DIRECT writes need 512-byte alignment")
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, max(4096, len(data)))
        try:
            buf[: len(data)] = data
            view = memoryview(buf)[: len(data)]
            done = 0
            while done < len(data):
                done += os.pwritev(fd, [view[done:]], offset + done)
            view.release()
        finally:
            buf.close()
        os.fsync(fd)
    finally:
        os.close(fd)


def wipe_disk(dev: str) -> None:
    """Discard the whole device (best effort), then zero its first and last MiB."""
    size = dev_size(dev)
    fd = os.open(dev, os.O_WRONLY)
    try:
        try:
            fcntl.ioctl(fd, BLKDISCARD, struct.pack("QQ", 0, size))
        except OSError:
            pass
    finally:
        os.close(fd)
    zero = bytes(MiB)
    write_direct(dev, 0, zero[: min(MiB, size)])
    tail = max(0, size - MiB) // 512 * 512
    write_direct(dev, tail, zero[: size - tail])
    flush_buffers(dev)


def device_digest(dev: str, exclude: Iterable[tuple[int, int]] = ()) -> list[str]:
    """sha256 of each MiB of the device (read with O_DIRECT); excluded byte ranges
    ``(start, length)`` are zeroed before hashing, so chunk indexes stay aligned."""
    exclude = [(s, n) for s, n in exclude if n > 0]
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, MiB)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        out = []
        for off in range(0, size, MiB):
            n = os.preadv(fd, [buf], off)
            data = bytearray(buf[:n]) if exclude else buf[:n]
            for start, length in exclude:
                lo, hi = max(start, off), min(start + length, off + n)
                if lo < hi:
                    data[lo - off: hi - off] = bytes(hi - lo)
            # sha256 runs at ~50 MB/s under TCG, a compare at ~800 MB/s: most of a
            # scratch disk is zeros, so look those digests up instead.
            out.append(_ZERO_MIB_SHA if n == MiB and data == _ZERO_MIB else hashlib.sha256(data).hexdigest())
        return out
    finally:
        buf.close()
        os.close(fd)


def differing_mib(a: Sequence[str], b: Sequence[str]) -> list[int]:
    """Indexes of MiBs that differ between two device_digest results (-1: lengths differ)."""
    diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    return diff + ([-1] if len(a) != len(b) else [])


# --------------------------------------------------------------------------- filesystems


def kernel_series() -> tuple[int, int]:
    """(major, minor) of the running kernel, for tests that pin what a kernel series does."""
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    if not m:
        raise AssertionError(f"cannot read the kernel version from {os.uname().release!r}")
    return int(m.group(1)), int(m.group(2))


def make_fs(dev: str, kind: str, *, label: str | None = None, extra: Sequence[str] = ()) -> None:
    """mkfs for kind in ext4-4k, ext4-1k, xfs. Deterministic: no lazy init, no discard."""
    lbl = ["-L", label] if label else []
    if kind in ("ext4-4k", "ext4-1k"):
        bs = "4096" if kind == "ext4-4k" else "1024"
        sh("mkfs.ext4", "-F", "-q", "-b", bs, "-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard",
           *lbl, *extra, dev)
    elif kind == "xfs":
        sh("mkfs.xfs", "-f", "-q", "-K", *lbl, *extra, dev)
    else:
        raise ValueError(f"unknown filesystem kind {kind!r}; use one of {FS_KINDS}")


def fsck_clean(dev: str, kind: str) -> tuple[bool, str]:
    """Read-only check of an unmounted filesystem: (clean, output)."""
    if kind.startswith("ext4"):
        p = sh("e2fsck", "-f", "-n", dev, check=False)
    elif kind == "xfs":
        p = sh("xfs_repair", "-n", dev, check=False)
    else:
        raise ValueError(f"unknown filesystem kind {kind!r}; use one of {FS_KINDS}")
    return p.returncode == 0, f"exit {p.returncode}\n{p.stdout}{p.stderr}"


def mount_at(dev: str, path: str | os.PathLike, *, options: str | None = None,
             fstype: str | None = None) -> str:
    """Mount dev at path (created if needed). Leftovers are unmounted after each test."""
    path = str(path)
    os.makedirs(path, exist_ok=True)
    cmd = ["mount"]
    if fstype:
        cmd += ["-t", fstype]
    if options:
        cmd += ["-o", options]
    sh(*cmd, dev, path)
    return path


def umount(path: str | os.PathLike, *, lazy: bool = False) -> None:
    sh("umount", *(["-l"] if lazy else []), str(path))


def tree_digest(root: str | os.PathLike) -> dict[str, tuple[int, str | None]]:
    """{relpath: (st_mode, sha256 | symlink target | None)} for everything under root,
    root itself as '.', skipping the top-level .fiesnap/ folder. Directories and
    other non-regular files hash to None (devices to 'dev:MAJ:MIN')."""
    root = str(root)
    out: dict[str, tuple[int, str | None]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir == ".":
            if ".fiesnap" in dirnames:
                dirnames.remove(".fiesnap")
            if ".fiesnap" in filenames:
                filenames.remove(".fiesnap")
            out["."] = (os.lstat(dirpath).st_mode, None)
        dirnames.sort()
        for name in dirnames + sorted(filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = (st.st_mode, os.readlink(path))
            elif stat.S_ISREG(st.st_mode):
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(MiB), b""):
                        h.update(block)
                out[rel] = (st.st_mode, h.hexdigest())
            elif stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode):
                out[rel] = (st.st_mode, f"dev:{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
            else:
                out[rel] = (st.st_mode, None)
    return out


# --------------------------------------------------------------------------- fiesnap


#: Runs fiesnap's CLI with one method counted: the process SIGKILLs itself right after call
#: number N returns, like a kill -9 at that point. argv: MODULE CLASS|"" FUNCTION N fiesnap-args...
KILL_AFTER_CALL = r"""
import importlib, os, signal, sys
module, cls, method, left = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
owner = importlib.import_module(module)
owner = getattr(owner, cls) if cls else owner  # a class's method, or a module's function
real = getattr(owner, method)
def call_then_die(*a, **kw):
    global left
    out = real(*a, **kw)
    left -= 1
    if left <= 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return out
setattr(owner, method, call_then_die)
from fiesnap.cli import main
sys.argv = ["fiesnap", *sys.argv[5:]]
main()
"""

#: kill_after targets: every O_DIRECT write (a merge writes one copy run per call); every
#: device-mapper suspend (the window before the matching resume).
AFTER_WRITES = ("fiesnap.kernel.directio", "DirectDevice", "write_from")
AFTER_SUSPENDS = ("fiesnap.kernel.dm", "DeviceMapper", "suspend")


#: The store `fiesnap start` makes when a test does not ask for one: unset (fiesnap's default),
#: "plain" or "free-aware". Set by the suite's `--store` option (tests/kernel/conftest.py), so
#: that the whole suite can run against either store.
STORE_ENV = "FIESNAP_TEST_STORE"


def with_store_mode(args: Sequence[object]) -> list[str]:
    """`args` with --plain/--free-aware added to a `start` that names neither."""
    out = [str(a) for a in args]
    mode = os.environ.get(STORE_ENV, "")
    if mode and out and out[0] == "start" and not {"--plain", "--free-aware"} & set(out):
        out.append(f"--{mode}")
    return out


def run_fiesnap(*args: object, state_dir: str | os.PathLike, check: bool = False,
                env: Mapping[str, str] | None = None, timeout: float | None = 600,
                input: str | None = None, kill_after_writes: int | None = None,
                kill_after: tuple[tuple[str, str, str], int] | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m fiesnap ARGS`` with FIESNAP_STATE_DIR=state_dir (text output captured).

    env: the whole environment to use (default: os.environ); FIESNAP_STATE_DIR is added.
    check: raise AssertionError (with stdout/stderr) on a non-zero exit.
    kill_after_writes: SIGKILL the command right after its N-th O_DIRECT write.
    kill_after: ((module, class, method), N): SIGKILL it right after the N-th call of that method
    (class "": a function of the module).
    """
    args = tuple(with_store_mode(args))
    argv = [sys.executable, "-m", "fiesnap", *args]
    if kill_after_writes is not None:
        kill_after = (AFTER_WRITES, kill_after_writes)
    if kill_after is not None:
        (module, cls, method), n = kill_after
        argv = [sys.executable, "-c", KILL_AFTER_CALL, module, cls, method, str(n), *[str(a) for a in args]]
    e = dict(os.environ if env is None else env)
    e["FIESNAP_STATE_DIR"] = str(state_dir)
    t0 = time.monotonic()
    p = subprocess.run(argv, capture_output=True, text=True, env=e, timeout=timeout, input=input,
                       stdin=None if input is not None else subprocess.DEVNULL)
    took = time.monotonic() - t0
    # Shown by pytest for failing tests ("Captured stdout call").
    print(f"$ fiesnap {' '.join(str(a) for a in args)}  -> {p.returncode} ({took:.1f}s)")
    if p.stdout:
        print("  stdout: " + p.stdout.rstrip().replace("\n", "\n          "))
    if p.stderr:
        print("  stderr: " + p.stderr.rstrip().replace("\n", "\n          "))
    if check and p.returncode != 0:
        raise AssertionError(f"fiesnap {' '.join(str(a) for a in args)} -> exit {p.returncode}\n{p.stdout}{p.stderr}")
    return p


# --------------------------------------------------------------------------- device-mapper


def dm_names() -> list[str]:
    """Names of all dm devices (``dmsetup ls``)."""
    p = sh("dmsetup", "ls", check=False)
    if p.returncode != 0 or p.stdout.strip() == "No devices found":
        return []
    return sorted(line.split()[0] for line in p.stdout.splitlines() if line.strip())


def dm_create(name: str, table: str, *, readonly: bool = False) -> str:
    """dmsetup create + mknodes (no udev here); returns /dev/mapper/<name>."""
    sh("dmsetup", "create", name, *(["--readonly"] if readonly else []), "--table", table)
    sh("dmsetup", "mknodes", name)
    path = f"/dev/mapper/{name}"
    if not stat.S_ISBLK(os.stat(path).st_mode):
        raise AssertionError(f"{path} is not a block device after mknodes")
    return path


def dm_remove(name: str, *, force: bool = False) -> None:
    sh("dmsetup", "remove", *(["--force"] if force else []), "--retry", name)
    sh("dmsetup", "mknodes", check=False)


def dm_status(name: str) -> str:
    return sh("dmsetup", "status", name).stdout.strip()


def dm_table(name: str) -> str:
    return sh("dmsetup", "table", name).stdout.strip()


def _dm_sysfs() -> dict[str, str]:
    """{dm name: kernel name (dm-N)} from sysfs (no dmsetup call)."""
    out = {}
    for d in Path("/sys/block").glob("dm-*"):
        try:
            out[(d / "dm" / "name").read_text().strip()] = d.name
        except OSError:
            pass
    return out


def _holders(kname: str) -> list[str]:
    """Kernel names of everything stacked on kname (transitively, topmost first)."""
    seen: list[str] = []

    def walk(k: str) -> None:
        try:
            hs = os.listdir(f"/sys/block/{k}/holders")
        except OSError:
            hs = []
        for h in hs:
            walk(h)
            if h not in seen:
                seen.append(h)

    walk(kname)
    return seen


# --------------------------------------------------------------------------- leftovers


@dataclass
class Mount:
    mount_id: int
    majmin: str
    mountpoint: str
    source: str


def mounts() -> list[Mount]:
    def unescape(s: str) -> str:  # mountinfo escapes space, tab, newline, backslash as \ooo
        return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)

    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            a, b = left.split(), right.split()
            out.append(Mount(int(a[0]), a[2], unescape(a[4]), unescape(b[1]) if len(b) > 1 else ""))
    return out


def loop_devices() -> set[str]:
    return {p.parent.parent.name for p in Path("/sys/block").glob("loop*/loop/backing_file")}


@dataclass
class SystemState:
    dm: set[str] = field(default_factory=set)
    mount_ids: set[int] = field(default_factory=set)
    loops: set[str] = field(default_factory=set)


def system_state() -> SystemState:
    return SystemState(set(_dm_sysfs()), {m.mount_id for m in mounts()}, loop_devices())


def _bounded(*cmd: str, timeout: float = 30) -> tuple[int | None, str]:
    """Run a cleanup command that might hang on a wedged device; never wait forever."""
    try:
        p = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, text=True)
    except OSError as e:
        return None, str(e)
    try:
        out, _ = p.communicate(timeout=timeout)
        return p.returncode, out
    except subprocess.TimeoutExpired:
        p.kill()
        try:
            out, _ = p.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            out = "(process stuck in the kernel)"
        return None, f"timed out after {timeout}s: {out}"


def cleanup_leftovers(before: SystemState, *, prefix: str = "", disks: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """Undo what a test left behind: dm devices created since ``before`` (or named with
    ``prefix``, or stacked on ``disks``), mounts made since ``before`` or of those
    devices, new loop devices. Returns (what was cleaned, what could not be)."""
    cleaned: list[str] = []
    problems: list[str] = []
    by_name = _dm_sysfs()
    knames = {k: n for n, k in by_name.items()}
    stale = {n for n in by_name if n not in before.dm or (prefix and n.startswith(prefix))}
    for d in disks:
        try:
            stale |= {knames[h] for h in _holders(_kname(d)) if h in knames}
        except OSError:
            pass
    # Kernel names of everything we are about to tear down, plus the disks (for mounts).
    doomed = {by_name[n] for n in stale}
    for d in disks:
        try:
            doomed.add(_kname(d))
        except OSError:
            pass
    doomed_majmin = set()
    for k in doomed:
        try:
            doomed_majmin.add(Path(f"/sys/block/{k}/dev").read_text().strip())
        except OSError:
            pass

    # 1. Nothing may stay suspended or frozen, or umount/remove would hang.
    for n in sorted(stale):
        _bounded("dmsetup", "resume", n, timeout=20)
    ms = [m for m in mounts() if m.mount_id not in before.mount_ids or m.majmin in doomed_majmin]
    for m in ms:
        _bounded("fsfreeze", "--unfreeze", m.mountpoint, timeout=20)
    # 2. Unmount, newest first.
    for m in sorted(ms, key=lambda m: m.mount_id, reverse=True):
        rc, out = _bounded("umount", m.mountpoint, timeout=60)
        if rc != 0:
            rc2, out2 = _bounded("umount", "-l", m.mountpoint, timeout=30)
            if rc2 != 0:
                problems.append(f"umount {m.mountpoint}: {out.strip()} / {out2.strip()}")
                continue
        cleaned.append(f"mount {m.source} on {m.mountpoint}")
    # 3. Remove dm devices, topmost first (retry rounds for stacks sysfs didn't order).
    left = set(stale)
    for _ in range(4):
        if not left:
            break
        # Fewest (transitive) holders first: the top of each stack goes before its base.
        for n in sorted(left, key=lambda n: len(_holders(by_name[n])) if n in by_name else 0):
            rc, out = _bounded("dmsetup", "remove", "--force", "--retry", n, timeout=60)
            if rc == 0 or n not in _dm_sysfs():
                left.discard(n)
                cleaned.append(f"dm device {n}")
    problems += [f"dm device {n} could not be removed" for n in sorted(left)]
    # 4. Loop devices made during the test.
    for lo in sorted(loop_devices() - before.loops):
        rc, out = _bounded("losetup", "-d", f"/dev/{lo}", timeout=30)
        (cleaned if rc == 0 else problems).append(f"loop device {lo}" + ("" if rc == 0 else f": {out.strip()}"))
    # 5. Stale /dev/mapper nodes (no udev here).
    _bounded("dmsetup", "mknodes", timeout=30)
    for d in disks:
        try:
            hs = _holders(_kname(d))
        except OSError:
            continue
        if hs:
            problems.append(f"{d} is still held by {', '.join(hs)}")
        if any(m.majmin == dev_majmin(d) for m in mounts()):
            problems.append(f"{d} is still mounted")
    return cleaned, problems
