"""Fixtures for the real-kernel tests. They run INSIDE the VM lab guest, as root:

    python -m tests.lab kernel-tests [pytest args...]      (or: make test)

Outside the lab (no $FIESNAP_LAB) every test here is skipped with a pointer to that command.

Fixtures:
  scratch_disk      a /dev/vdX no other test is using, first and last MiB zeroed (rest discarded)
  scratch_disks     factory: scratch_disks(n) -> n such disks
  dm_prefix         a per-test prefix for dm device names ("lt007-")
  lab_results       the host-shared results folder (Path) for artifacts worth keeping
After every test (autouse): anything left suspended/frozen is resumed/thawed, mounts made
during the test are unmounted, dm devices made during the test (or named with the prefix,
or stacked on the test's disks) are removed with --force, new loop devices are detached.
A disk that cannot be cleaned is taken out of the pool and the test errors in teardown.
A test still running after HANG_REPORT_SECONDS gets a report on the guest console (blocked
tasks via sysrq-w, the dm devices, their tables and status, the processes): a hang in the
kernel leaves evidence before the lab's timeout kills the guest.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import platform
import sys
import threading
from pathlib import Path

import pytest

from . import helpers as h

HERE = Path(__file__).resolve().parent
NOT_IN_LAB = ("real-kernel test: runs only inside the VM lab guest "
              "(`python -m tests.lab kernel-tests`, or `make test`)")


#: a test running longer than this is reported as possibly hung (it goes on running).
HANG_REPORT_SECONDS = 900


def _hang_report(nodeid: str) -> None:
    out = [f"\n=== {nodeid} still running after {HANG_REPORT_SECONDS} s: a hang report ==="]
    for cmd in (["dmsetup", "info", "-c"], ["dmsetup", "table"], ["dmsetup", "status"],
                ["ps", "axo", "stat,pid,wchan:32,args"], ["cat", "/proc/mounts"]):
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            out.append(f"$ {' '.join(cmd)}\n{p.stdout}{p.stderr}")
        except (OSError, subprocess.SubprocessError) as e:
            out.append(f"$ {' '.join(cmd)}: {e}")
    text = "\n".join(out)
    sys.__stderr__.write(text + "\n")
    sys.__stderr__.flush()
    for line in text.splitlines():  # and onto the console, next to the kernel's own report
        h.kmsg(line[:900])
    try:  # blocked (D state) tasks with their kernel stacks, into dmesg and the console
        with open("/proc/sys/kernel/sysrq", "w") as f:
            f.write("1")
        with open("/proc/sysrq-trigger", "w") as f:
            f.write("w")
    except OSError:
        pass


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    if not (h.in_lab() and _ours(item)):
        yield
        return
    watch = threading.Timer(HANG_REPORT_SECONDS, _hang_report, args=(item.nodeid,))
    watch.daemon = True
    watch.start()
    try:
        yield
    finally:
        watch.cancel()


def _ours(item: pytest.Item) -> bool:
    return HERE in Path(str(item.path)).resolve().parents


def pytest_report_header(config):
    if not h.in_lab():
        return "fiesnap lab: not in the lab guest, real-kernel tests will be skipped"
    shard = os.environ.get("FIESNAP_LAB_SHARD", "1/1")
    return (f"fiesnap lab: kernel {platform.release()}, scratch disks {' '.join(h.lab_disks()) or 'none'}, "
            f"shard {shard}")


def pytest_addoption(parser):
    parser.addoption("--store", choices=("default", "plain", "free-aware"), default="default",
                     help="the store `fiesnap start` makes when a test does not ask for one")


def pytest_configure(config):
    mode = config.getoption("--store")
    if mode != "default":
        os.environ[h.STORE_ENV] = mode


def pytest_collection_modifyitems(config, items):
    ours = [i for i in items if _ours(i)]
    if not h.in_lab():
        for item in ours:
            item.add_marker(pytest.mark.skip(reason=NOT_IN_LAB))
        return
    shard = os.environ.get("FIESNAP_LAB_SHARD")  # "i/n", 1-based, set by the lab runner
    if shard:
        i, n = (int(x) for x in shard.split("/"))
        drop = {id(item) for k, item in enumerate(ours) if k % n != i - 1}
        if drop:
            config.hook.pytest_deselected(items=[x for x in items if id(x) in drop])
            items[:] = [x for x in items if id(x) not in drop]


class DiskPool:
    """The lab's scratch disks; each test gets disks nobody else holds."""

    def __init__(self, disks: list[str]):
        self.all = list(disks)
        self.free = list(disks)
        self.poisoned: dict[str, str] = {}

    def acquire(self) -> str:
        if not self.free:
            pytest.fail(
                f"no free scratch disk: {len(self.all)} attached, "
                f"{len(self.poisoned)} unusable after failed cleanups {self.poisoned or ''}; "
                "boot the lab with more (`--disks N`) or ask for fewer per test")
        dev = self.free.pop(0)
        h.wipe_disk(dev)
        return dev

    def release(self, dev: str, problem: str | None = None) -> None:
        if problem:
            self.poisoned[dev] = problem
        elif dev not in self.free:
            self.free.append(dev)


@pytest.fixture(scope="session")
def disk_pool() -> DiskPool:
    if not h.in_lab():
        pytest.skip(NOT_IN_LAB)
    if os.geteuid() != 0:
        pytest.fail("the lab guest runs tests as root; FIESNAP_LAB is set but we are not root")
    disks = h.lab_disks()
    for d in disks:
        if not os.path.exists(d):
            pytest.fail(f"scratch disk {d} (from FIESNAP_LAB_DISKS) does not exist")
    return DiskPool(disks)


class _TestGuard:
    def __init__(self, prefix: str):
        self.prefix = prefix
        self.disks: list[str] = []
        self.pool: DiskPool | None = None
        self.before = h.system_state()


_counter = itertools.count(1)


@pytest.fixture(autouse=True)
def _lab_guard(request):
    """Per-test bookkeeping + cleanup of leftovers (see the module docstring)."""
    if not h.in_lab():
        yield None
        return
    guard = _TestGuard(f"lt{next(_counter):03d}-")
    h.kmsg(f"START {request.node.nodeid}")
    yield guard
    h.kmsg(f"END {request.node.nodeid}")
    cleaned, problems = h.cleanup_leftovers(guard.before, prefix=guard.prefix, disks=guard.disks)
    if cleaned:
        print(f"lab cleanup after {request.node.nodeid}: removed {'; '.join(cleaned)}")
    for d in guard.disks:
        guard.pool.release(d, "; ".join(problems) if problems else None)
    if problems:
        pytest.fail("lab cleanup failed (disk taken out of the pool): " + "; ".join(problems))


@pytest.fixture
def scratch_disk(disk_pool: DiskPool, _lab_guard: _TestGuard) -> str:
    """A whole scratch disk (/dev/vdX) for this test alone."""
    dev = disk_pool.acquire()
    _lab_guard.pool = disk_pool
    _lab_guard.disks.append(dev)
    return dev


@pytest.fixture
def scratch_disks(disk_pool: DiskPool, _lab_guard: _TestGuard):
    """Factory: ``scratch_disks(n)`` -> list of n more scratch disks for this test."""

    def take(n: int = 1) -> list[str]:
        out = []
        for _ in range(n):
            dev = disk_pool.acquire()
            _lab_guard.pool = disk_pool
            _lab_guard.disks.append(dev)
            out.append(dev)
        return out

    return take


@pytest.fixture
def dm_prefix(_lab_guard: _TestGuard) -> str:
    """Prefix for this test's dm device names; leftovers with it are removed after the test."""
    if _lab_guard is None:
        pytest.skip(NOT_IN_LAB)
    return _lab_guard.prefix


@pytest.fixture(scope="session")
def lab_results() -> Path:
    if not h.in_lab():
        pytest.skip(NOT_IN_LAB)
    return Path(os.environ["FIESNAP_LAB_RESULTS"])


@pytest.fixture
def lab(scratch_disk, tmp_path):
    """A scratch disk, a private state folder and mount point, and a fiesnap runner."""

    class Lab:
        disk = scratch_disk
        state = str(tmp_path / "state")
        mnt = str(tmp_path / "mnt")

        def fiesnap(self, *args, check=True, env=None, kill_after_writes=None, kill_after=None):
            p = h.run_fiesnap(*args, state_dir=self.state, env=env, kill_after_writes=kill_after_writes,
                              kill_after=kill_after)
            if check and p.returncode != 0:
                raise AssertionError(f"fiesnap {' '.join(args)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
            return p

        def mount(self, dev, ro=False):
            """ro: True for "-o ro", or the mount options to use (say "ro,noload")."""
            os.makedirs(self.mnt, exist_ok=True)
            opts = ro if isinstance(ro, str) else "ro" if ro else ""
            h.sh("mount", *(["-o", opts] if opts else []), dev, self.mnt)

        def umount(self):
            h.sh("umount", self.mnt)

        def status(self, name):
            return json.loads(self.fiesnap("status", name, "--json").stdout)["checkpoints"][0]

    os.makedirs(Lab.mnt, exist_ok=True)
    yield Lab()
    subprocess.run(["umount", Lab.mnt], capture_output=True)
