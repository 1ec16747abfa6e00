"""Shared plumbing for the benchmarks (they run INSIDE a lab guest, as root).

Not a test helper: nothing here asserts a speed. It runs fiesnap, reads snapshot usage
in-process, writes with O_DIRECT, and writes the result files
($FIESNAP_LAB_RESULTS/<bench>.json and <bench>.txt).
"""

from __future__ import annotations

import json
import mmap
import os
import platform
import shutil
import subprocess
import sys
import time

REPO = os.environ.get("FIESNAP_REPO") or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from fiesnap.kernel.dm import DeviceMapper  # noqa: E402
from fiesnap.kernel.directio import AlignedBuffer, DirectDevice  # noqa: E402
from fiesnap.model.record import CheckpointRecord  # noqa: E402
from fiesnap.model.snapstatus import parse_snapshot_status  # noqa: E402

MiB = 1 << 20
KiB = 1 << 10


def require_lab() -> tuple[str, str]:
    """(scratch disk, results folder). In the lab guest: its first scratch disk. Elsewhere
    (native hardware), only with FIESNAP_BENCH_DISK=/dev/XXX, a disk the benchmark may
    destroy (mkfs), as root; results go to FIESNAP_BENCH_RESULTS (default: the cwd)."""
    bench_disk = os.environ.get("FIESNAP_BENCH_DISK")
    if os.geteuid() != 0 or (os.environ.get("FIESNAP_LAB") != "1" and not bench_disk):
        sys.exit("run this in the VM lab: python -m tests.lab script benchmarks/<bench>.py "
                 "--disks 1 --disk-size 3G --timeout 1500 (see benchmarks/README.md), or as root "
                 "with FIESNAP_BENCH_DISK=/dev/XXX (a scratch disk it will overwrite)")
    if bench_disk:
        return bench_disk, os.environ.get("FIESNAP_BENCH_RESULTS", os.getcwd())
    disks = os.environ.get("FIESNAP_LAB_DISKS", "").split()
    if not disks:
        sys.exit("no scratch disk: give the lab --disks 1")
    return disks[0], os.environ.get("FIESNAP_LAB_RESULTS", "/tmp")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(*cmd: object, check: bool = True, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    argv = [str(c) for c in cmd]
    p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} -> exit {p.returncode}\n{p.stdout}{p.stderr}")
    return p


class Fiesnap:
    """Run `python -m fiesnap` with a private state folder; remembers every call's wall time."""

    def __init__(self, state_dir: str):
        self.state_dir = state_dir
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        os.chmod(state_dir, 0o700)  # fiesnap trusts a state folder only root can enter
        self.env = dict(os.environ, FIESNAP_STATE_DIR=state_dir)
        self.calls: list[tuple[str, float]] = []

    def __call__(self, *args: object, check: bool = True) -> subprocess.CompletedProcess:
        t0 = time.monotonic()
        p = sh(sys.executable, "-m", "fiesnap", *args, check=False, env=self.env)
        dt = time.monotonic() - t0
        self.calls.append((" ".join(str(a) for a in args), dt))
        if check and p.returncode != 0:
            raise RuntimeError(f"fiesnap {' '.join(map(str, args))} -> exit {p.returncode}\n{p.stdout}{p.stderr}")
        return p

    def status(self, name: str) -> dict:
        return json.loads(self("status", name, "--json").stdout)["checkpoints"][0]

    def record(self, name: str) -> dict:
        with open(os.path.join(self.state_dir, f"{name}.json")) as f:
            return json.load(f)


class Usage:
    """The kernel's snapshot status read in-process (one ioctl, no python start), in the
    store's backed bytes as `fiesnap status` reports them (a free-aware store's COW address
    space is mostly holes). `record` reads the checkpoint's record (its map can grow)."""

    def __init__(self, name: str, record=None):
        self.snap = f"{name}-snap"
        self.dm = DeviceMapper()
        self.record = record

    def __call__(self) -> tuple[str, int, int]:
        """(state, used bytes, store bytes); used/store are 0 when not active."""
        lines = self.dm.status(self.snap)
        u = parse_snapshot_status(lines[0].params if lines else "Invalid")
        if self.record is not None and u.total_bytes:
            u = u.backed(CheckpointRecord.from_dict(self.record()).store_bytes)
        return u.state, u.used_bytes or 0, u.total_bytes or 0


def aligned_buffer(nbytes: int, fill: bytes | None = None) -> mmap.mmap:
    """Page-aligned buffer for O_DIRECT (mmap memory is page aligned)."""
    buf = mmap.mmap(-1, nbytes)
    buf[:] = fill if fill is not None else os.urandom(nbytes)
    return buf


def machine() -> dict:
    """What the numbers were measured on (the lab guest: qemu TCG, no KVM)."""
    def first(path: str, key: str) -> str:
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith(key):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return ""

    targets = sh("dmsetup", "targets", check=False).stdout.split("\n")
    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu_model": first("/proc/cpuinfo", "model name"),
        "mem_total": first("/proc/meminfo", "MemTotal"),
        "emulation": ("qemu TCG (no KVM), lab guest" if os.environ.get("FIESNAP_LAB") == "1"
                      else f"not the lab (FIESNAP_BENCH_DISK={os.environ.get('FIESNAP_BENCH_DISK')})"),
        "dm_targets": {t.split()[0]: t.split()[1] for t in targets if t.strip()
                       and t.split()[0] in ("snapshot", "snapshot-origin", "linear")},
        "python": platform.python_version(),
    }


def write_results(results_dir: str, bench: str, data: dict, summary: list[str]) -> None:
    os.makedirs(results_dir, exist_ok=True)
    with open(os.path.join(results_dir, f"{bench}.json"), "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    text = "\n".join(summary) + "\n"
    with open(os.path.join(results_dir, f"{bench}.txt"), "w") as f:
        f.write(text)
    print("\n" + text, flush=True)


def median(xs: list[float]) -> float | None:
    s = sorted(xs)
    if not s:
        return None
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def populate_ext4(dev: str, mnt: str, files: int, file_mib: int) -> None:
    """A new ext4 on `dev` (its inode tables and journal written now, not lazily during the
    measurement) holding `files` files f0.bin ... of `file_mib` MiB of random data."""
    sh("wipefs", "-aq", dev)
    sh("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev)
    os.makedirs(mnt, exist_ok=True)
    sh("mount", dev, mnt)
    for i in range(files):
        sh("dd", "if=/dev/urandom", f"of={mnt}/f{i}.bin", "bs=1M", f"count={file_mib}", "status=none")
    sh("umount", mnt)



def quiet(_msg: str) -> None:
    """A progress sink for in-process fiesnap calls: the benchmarks log their own lines."""


def timed(fn) -> float:
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


def trace_chunks(log_path: str, mark: str, chunk: int) -> set[int]:
    """Chunks a dm-log-writes trace wrote or discarded after its mark."""
    from bow_compat.logwrites import read_log

    chunks: set[int] = set()
    after = False
    with read_log(log_path) as trace:
        for e in trace.entries(with_data=False):
            if e.is_mark and e.mark == mark:
                after = True
            elif after and (e.is_write or e.is_discard) and e.length:
                chunks.update(range(e.offset // chunk, -(-(e.offset + e.length) // chunk)))
    return chunks


def drop_caches() -> None:
    """Write back and drop the page cache, so every measured run starts equally cold."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


# --------------------------------------------------------------------- LVM, the peer

# lvm2 in a guest without udev, without lvm's own daemons, with no backups to write.
LVM_CONFIG = ("activation { udev_sync = 0 udev_rules = 0 monitoring = 0 } "
              "backup { backup = 0 archive = 0 } global { use_lvmpolld = 0 } devices { obtain_device_list_from_udev = 0 }")


def have_lvm() -> bool:
    return shutil.which("lvm") is not None


def lvm(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    return sh("lvm", *args, "--config", LVM_CONFIG, check=check, timeout=timeout,
              env=dict(os.environ, DM_DISABLE_UDEV="1"))


# --------------------------------------------------------------------- copies

def store_device(dm: DeviceMapper, record: CheckpointRecord, name: str) -> str:
    """A read-only linear device NAME over a kept store file's extents: the store as NAME-cow
    showed it, for a raw copy of the same runs a merge copied."""
    dev = f"{record.device_major}:{record.device_minor}"
    dm.create(name, targets=record.cow.dm_targets(dev), read_only=True)
    return dm.node_path(name)


def raw_same_runs(src: str, dst: str, ranges: list) -> float:
    """Copy (dest, src_offset, length) runs one at a time with O_DIRECT, one I/O in flight,
    then fsync: the plain copy loop a merge is measured against."""
    largest = max(n for _, _, n in ranges)
    with AlignedBuffer(largest + (-largest % 4096)) as buf, DirectDevice.open(src, write=False) as s, \
            DirectDevice.open(dst, write=True) as d:
        t0 = time.monotonic()
        for dest, off, n in ranges:
            s.read_into(buf, off, n)
            d.write_from(buf, dest, n)
        d.fsync()
        return time.monotonic() - t0


# --------------------------------------------------------------------- kernel memory

SLAB = "/sys/kernel/slab/dm_exception"
SETTLE_S = 0.3  # before each slab read: RCU-freed objects of the last command go away


def slab_objects() -> int:
    """Objects in use in the (shared) cache. `shrink` first: it flushes the per-CPU slabs, whose
    free objects `objects` would otherwise count as in use (128 a slab: the noise of a delta)."""
    time.sleep(SETTLE_S)
    try:
        with open(f"{SLAB}/shrink", "w") as f:
            f.write("1")
    except OSError:
        pass
    with open(f"{SLAB}/objects") as f:
        return int(f.read().split()[0])


def slab_info() -> dict:
    info = {"path": SLAB, "merged_into": os.path.basename(os.path.realpath(SLAB))}
    for key in ("object_size", "slab_size", "objs_per_slab", "aliases"):
        try:
            with open(f"{SLAB}/{key}") as f:
                info[key] = f.read().split()[0]
        except OSError:
            pass
    return info
