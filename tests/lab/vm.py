"""Boot one lab guest with virtme-ng (qemu, TCG) and run a script in it.

Host side of the contract with ``guest-init.sh``:

* the results folder (``rwdir``) is shared read-write with the guest at the same path;
* the host writes ``job.env`` there (what to run, with which environment);
* the guest writes ``started`` when the wrapper begins, ``output.log`` (the script's
  stdout+stderr, live), ``dmesg.log``, ``guest-init.log`` and, last, ``status``
  (the script's exit status, written atomically; or ``poweroff`` when the script exited
  with ``LAB_POWEROFF`` and the wrapper cut the power: see below).

Power-off convention: a script that exits with status ``LAB_POWEROFF`` (99) asks for a
power cut. The wrapper saves dmesg (to the 9p results folder: no guest block device is
touched), writes ``poweroff`` to ``status`` and runs ``echo o > /proc/sysrq-trigger``
without any ``sync``: the guest's dirty page cache is lost, as on a real power loss. What the
guest had *submitted* to a scratch disk is in the image file: the lab attaches the images
with ``cache=unsafe``, so qemu writes each request to the image through the host page cache
as it completes it (only flushes are ignored) and drains in-flight requests when it exits;
the host page cache is shared by every process, so the next boot's qemu sees it all.

vng's own exit status is not used: without udevd in the guest, virtme-ng-init finds no
/dev/virtio-ports/* links, runs the script on the serial console instead and cannot
report its status, so vng always returns 255. The ``status`` file is the only truth.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence, TextIO

from . import LAB_DIR, REPO
from .kernel import KernelImage, ensure_kernel
from .udev import UdevTools

GUEST_INIT = Path(__file__).resolve().with_name("guest-init.sh")
DISK_SERIAL_PREFIX = "fiesnap-lab-"
# A script exiting with this status asks for a power cut (see the module docstring).
LAB_POWEROFF = 99
# Once the guest has written its status, qemu must be gone within this many seconds, or the
# host kills it and goes on (the status is already known).
EXIT_GRACE_S = 60
# Files the guest wrapper owns inside the results folder (cleared before each boot).
_OWN_FILES = ("status", "status.tmp", "started", "output.log", "dmesg.log", "guest-init.log", "job.env", "disks")
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9_./+@%-]+$")


class LabError(RuntimeError):
    """The lab could not boot a guest (setup problem, not a test failure)."""


@dataclass(frozen=True)
class DiskSpec:
    path: Path
    size_bytes: int


@dataclass
class GuestResult:
    exit_status: int | None  # the script's exit status; None if the guest never reported one
    log_text: str  # the script's stdout+stderr
    elapsed: float  # seconds, vng start to qemu exit
    boot_s: float | None = None  # seconds until the guest wrapper started
    timed_out: bool = False
    results_dir: Path = field(default_factory=Path)
    console_log: Path = field(default_factory=Path)
    disks: list[str] = field(default_factory=list)  # guest device names, in DiskSpec order
    powered_off: bool = False  # the script exited LAB_POWEROFF and the wrapper cut the power
    exit_after_status_s: float | None = None  # status file seen -> qemu gone (about: 0.25 s polls)
    killed_after_status: bool = False  # qemu outlived EXIT_GRACE_S after the status: killed

    @property
    def console_text(self) -> str:
        try:
            return self.console_log.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def ok(self) -> bool:
        """The script succeeded, or ended in a deliberate power-off."""
        return self.exit_status == 0 or self.powered_off

    @property
    def status_text(self) -> str:
        if self.exit_status is None:
            return "timeout" if self.timed_out else "no status"
        return "poweroff" if self.powered_off else str(self.exit_status)


def parse_size(text: str | int) -> int:
    """'512M' / '1G' / '4096' -> bytes (binary units)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B)?\s*", str(text), re.I)
    if not m:
        raise ValueError(f"bad size {text!r} (use e.g. 512M, 1G)")
    return int(m.group(1)) << (10 * " KMGT".index((m.group(2) or " ").upper()))


def default_venv() -> Path:
    """The venv whose python/vng the guest should use: the running one, else <repo>/.venv."""
    if sys.prefix != sys.base_prefix:
        return Path(sys.prefix)
    return REPO / ".venv"


def _check_path(p: Path, what: str) -> str:
    s = str(p)
    # vng builds a shell command line and qemu splits -drive options on commas.
    if not _SAFE_PATH.match(s):
        raise LabError(f"{what} path {s!r} must be absolute and use only [A-Za-z0-9_./+@%-]")
    return s


def _make_disk(d: DiskSpec) -> None:
    d.path.parent.mkdir(parents=True, exist_ok=True)
    if not d.path.exists():
        with open(d.path, "wb") as f:
            f.truncate(d.size_bytes)  # sparse


def _write_job_env(rw: Path, values: Mapping[str, str], args: Sequence[str]) -> None:
    lines = ["# written by tests/lab/vm.py; sourced by guest-init.sh"]
    for k, v in values.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
            raise LabError(f"bad environment variable name {k!r}")
        lines.append(f"export {k}={shlex.quote(str(v))}")
    lines.append("FIESNAP_LAB_ARGS=(" + " ".join(shlex.quote(a) for a in args) + ")")
    (rw / "job.env").write_text("\n".join(lines) + "\n")


class _Tail:
    """Copy new bytes of a growing file to a stream."""

    def __init__(self, path: Path, out: TextIO | None):
        self.path, self.out, self.pos = path, out, 0

    def poll(self) -> None:
        if self.out is None:
            return
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except FileNotFoundError:
            return
        if data:
            self.pos += len(data)
            self.out.write(data.decode(errors="replace"))
            self.out.flush()


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_guest(
    script_path: str | os.PathLike,
    *,
    disks: Sequence[DiskSpec] = (),
    rwdir: str | os.PathLike,
    memory: str = "1G",
    cpus: int = 1,
    timeout_s: float = 1800,
    env: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    kernel: KernelImage | None = None,
    venv: str | os.PathLike | None = None,
    console_log: str | os.PathLike | None = None,
    stream: TextIO | None = None,
    modules: Sequence[str] = (),
    on_start: Callable[[float], None] | None = None,
    qemu_opts: Sequence[str] = (),
    rwdirs: Sequence[str | os.PathLike] = (),
    udev: UdevTools | None = None,
) -> GuestResult:
    """Boot a guest, run ``script_path`` (as root, cwd = repo) and collect the result.

    disks: raw sparse images (created if missing), attached as virtio-blk in order;
        the guest exports them as $FIESNAP_LAB_DISKS (``/dev/vda /dev/vdb ...``).
    rwdir: host folder shared read-write at the same path; results land there.
    cpus: keep 1: a 2-vCPU TCG guest ran our workloads ~2x slower (tests/lab/README.md).
    timeout_s: the host kills qemu after this; the guest stops the script a bit earlier
        (exit status 124) so that its output and dmesg still get saved.
    env: extra environment for the script. args: arguments for the script.
    stream: if given, the script's output is copied there live.
    modules: extra kernel modules to load before the script (virtio_blk, dm-mod and
        dm-snapshot always are).
    qemu_opts: extra qemu arguments (tokens), appended after the lab's own.
    rwdirs: more host folders shared read-write at the same path (e.g. the ``boots``
        command's carry folder); they must exist.
    udev: start systemd-udevd from these unpacked udev package files in the guest
        (the script sees FIESNAP_LAB_UDEV=1).
    A script exiting LAB_POWEROFF gets a power cut: exit_status LAB_POWEROFF, powered_off.
    """
    t0 = time.monotonic()
    script = Path(script_path).resolve()
    if not script.is_file():
        raise LabError(f"no such script: {script}")
    rw = Path(rwdir).resolve()
    rw.mkdir(parents=True, exist_ok=True)
    for name in _OWN_FILES:
        (rw / name).unlink(missing_ok=True)
    console = Path(console_log) if console_log else rw.parent / f"{rw.name}.console.log"
    console = console.resolve()
    venv_dir = Path(venv).resolve() if venv else default_venv()
    vng = shutil.which("vng", path=f"{venv_dir / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    if vng is None:
        raise LabError(f"vng not found in {venv_dir}/bin or PATH: run `make lab` (pip install -e '.[test]')")
    if shutil.which("qemu-system-x86_64") is None:
        raise LabError("qemu-system-x86_64 not found: run `make lab` (apt-get install qemu-system-x86)")
    kernel = kernel or ensure_kernel(LAB_DIR)

    _check_path(rw, "results folder")
    _check_path(REPO, "repository")
    shared = [Path(d).resolve() for d in rwdirs]
    for d in shared:
        if not d.is_dir():
            raise LabError(f"shared folder {d} does not exist")
        _check_path(d, "shared folder")
    drive_opts: list[str] = [
        # The host root again, as 9p tag "fiesnaproot": guest-init.sh mounts it with
        # cache=loose over the Python install and the venv (vng's own root mount is uncached).
        "-fsdev", "local,id=fiesnaproot,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=fiesnaproot,mount_tag=fiesnaproot",
        *qemu_opts,
    ]
    for i, d in enumerate(disks):
        d = DiskSpec(Path(d.path).resolve(), d.size_bytes)
        _make_disk(d)
        p = _check_path(d.path, "disk image")
        drive_opts += [
            "-drive", f"file={p},format=raw,if=none,id=labdisk{i},cache=unsafe,discard=unmap",
            "-device", f"virtio-blk-pci,drive=labdisk{i},serial={DISK_SERIAL_PREFIX}{i}",
        ]

    guest_timeout = int(max(timeout_s - 45, timeout_s * 0.75))
    job = {
        "FIESNAP_REPO": str(REPO),
        "FIESNAP_LAB_VENV": str(venv_dir),
        "FIESNAP_LAB_SCRIPT": str(script),
        "FIESNAP_LAB_RESULTS": str(rw),
        "FIESNAP_LAB_NDISKS": str(len(disks)),
        "FIESNAP_LAB_TIMEOUT": str(guest_timeout),
        "FIESNAP_LAB_MODULES": " ".join(["virtio_blk", "dm_mod", "dm_snapshot", *modules]),
        "FIESNAP_LAB_POWEROFF": str(LAB_POWEROFF),
        **(env or {}),
    }
    if udev is not None:
        job.update({
            "FIESNAP_LAB_UDEV": "1",
            "FIESNAP_LAB_UDEVADM": str(udev.udevadm),
            "FIESNAP_LAB_UDEV_LIBEXEC": str(udev.libexec),
            # block (default): coldplug only block devices; all: every device (~5 s more)
            "FIESNAP_LAB_UDEV_COLDPLUG": os.environ.get("FIESNAP_LAB_UDEV_COLDPLUG", "block"),
        })
    _write_job_env(rw, job, [str(a) for a in args])

    cmd = [
        vng, "--run", str(kernel.vmlinuz),
        "--disable-kvm",  # KVM guests hang on this host kind; TCG always
        "--force-9p",  # no usable virtiofsd: skip vng's ~6 s of retries
        "--verbose",  # kernel console + wrapper messages -> console log
        "--cpus", str(cpus), "--memory", memory,
        f"--rwdir={rw}",
        *(f"--rwdir={d}" for d in shared),
        "--exec", f"bash {GUEST_INIT} {rw}",
    ]
    if drive_opts:
        # vng pastes --qemu-opts into a shell command line: quote each token.
        cmd.append("--qemu-opts=" + " ".join(shlex.quote(o) for o in drive_opts))
    penv = dict(os.environ)
    penv["PATH"] = f"{venv_dir / 'bin'}{os.pathsep}{penv.get('PATH', '')}"

    console.parent.mkdir(parents=True, exist_ok=True)
    tail = _Tail(rw / "output.log", stream)
    boot_s = None
    timed_out = False
    status_seen: float | None = None
    killed_after_status = False
    with open(console, "wb") as con:
        con.write(("# " + shlex.join(cmd) + "\n").encode())
        con.flush()
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=penv, stdin=subprocess.DEVNULL, stdout=con, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            while proc.poll() is None:
                if boot_s is None and (rw / "started").exists():
                    boot_s = time.monotonic() - t0
                    if on_start:
                        on_start(boot_s)
                tail.poll()
                now = time.monotonic()
                if status_seen is None and (rw / "status").exists():
                    status_seen = now
                if status_seen is not None and now - status_seen > EXIT_GRACE_S:
                    # The guest is done but did not power off: the status is what counts.
                    killed_after_status = True
                    _kill_group(proc)
                    break
                if now - t0 > timeout_s:
                    timed_out = True
                    _kill_group(proc)
                    break
                time.sleep(0.25)
        except BaseException:
            _kill_group(proc)
            raise
        finally:
            if proc.poll() is None:
                _kill_group(proc)
    tail.poll()
    t_end = time.monotonic()
    elapsed = t_end - t0
    if killed_after_status:
        with open(console, "ab") as con:
            con.write(f"\n# lab: qemu still running {EXIT_GRACE_S}s after the guest's status: killed\n".encode())

    status: int | None = None
    powered_off = False
    try:
        text = (rw / "status").read_text().strip()
        if text == "poweroff":
            status, powered_off = LAB_POWEROFF, True
        else:
            status = int(text)
    except (OSError, ValueError):
        status = None
    if status is not None and status_seen is None:
        status_seen = t_end  # written in the last poll interval
    try:
        log_text = (rw / "output.log").read_text(errors="replace")
    except OSError:
        log_text = ""
    try:
        guest_disks = (rw / "disks").read_text().split()
    except OSError:
        guest_disks = []
    return GuestResult(status, log_text, elapsed, boot_s, timed_out, rw, console, guest_disks,
                       powered_off=powered_off,
                       exit_after_status_s=None if status_seen is None else t_end - status_seen,
                       killed_after_status=killed_after_status)
