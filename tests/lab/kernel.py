"""Fetch and unpack a stock Debian kernel (plus its modules) for the VM lab.

Nothing is installed on the host: the .deb is fetched with ``apt-get download``,
unpacked with ``dpkg -x`` into ``<cache>/root`` and indexed with ``depmod -b``.
Each kernel package asked for gets its own cache folder (``kernels/<package>``
under the lab folder), so runs on different kernels share nothing and can run
side by side. The result is cached; later calls only check that the files are
still there.

A package is named the way apt names it: a meta package that follows a series
(``linux-image-amd64`` = the distribution's kernel, ``linux-image-6.12-amd64``)
or a versioned image (``linux-image-6.12.117+deb12-amd64``).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

META_PACKAGE = "linux-image-amd64"
#: The second kernel series every landing is tested on (Debian 12's backported 6.12).
SECOND_PACKAGE = "linux-image-6.12-amd64"
STAMP = "kernel.json"
_PACKAGE_NAME = re.compile(r"linux-image-[a-z0-9][a-z0-9.+~-]*")


class KernelError(RuntimeError):
    """The lab kernel could not be prepared; the message says what to do."""


@dataclass(frozen=True)
class KernelImage:
    vmlinuz: Path  # <cache>/root/boot/vmlinuz-<version>
    modules_root: Path  # <cache>/root  (modules in <root>/lib/modules/<version>)
    version: str  # e.g. 6.1.0-56-amd64
    package: str = ""  # e.g. linux-image-6.1.0-56-amd64
    requested: str = META_PACKAGE  # what was asked for, e.g. linux-image-amd64

    @property
    def series(self) -> str:
        """Major.minor of the version ("6.12"), for run names and reports."""
        m = re.match(r"(\d+)\.(\d+)", self.version)
        return f"{m.group(1)}.{m.group(2)}" if m else self.version

    @property
    def modules_dir(self) -> Path:
        return self.modules_root / "lib" / "modules" / self.version


def _log(msg: str) -> None:
    print(f"lab: {msg}", file=sys.stderr, flush=True)


def _need_tools() -> None:
    missing = [t for t in ("apt-cache", "apt-get", "dpkg", "depmod") if shutil.which(t) is None]
    if missing:
        hint = (
            "the lab fetches a Debian kernel package with apt; this needs a Debian/Ubuntu host "
            "with apt and kmod (`apt-get install kmod`)"
        )
        raise KernelError(f"missing tools: {', '.join(missing)}; {hint}")


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL)


def _apt_update() -> None:
    if os.geteuid() != 0:
        raise KernelError("apt's package lists look stale or empty; run `sudo apt-get update` first")
    _log("apt-get update (package lists missing or stale)")
    p = _run(["apt-get", "update"])
    if p.returncode != 0:
        raise KernelError(f"apt-get update failed:\n{p.stdout}{p.stderr}")


def check_package_name(name: str) -> str:
    """A kernel image package name, or KernelError (it becomes a folder name and an apt argument)."""
    if not _PACKAGE_NAME.fullmatch(name) or ".." in name:
        raise KernelError(f"{name!r} is not a kernel image package name "
                          "(e.g. linux-image-amd64, linux-image-6.12-amd64, linux-image-6.1.0-57-amd64)")
    return name


def resolve_package(meta: str = META_PACKAGE, *, allow_update: bool = True) -> str:
    """The versioned kernel package behind ``meta``: what a meta package depends on, else itself.

    A meta package (``linux-image-amd64``, ``linux-image-6.12-amd64``) depends on one
    versioned ``linux-image-*`` package; a versioned image depends on none.
    """
    for attempt in (0, 1):
        p = _run(["apt-cache", "depends", meta])
        names = re.findall(r"^\s*Depends:\s*(linux-image-\S+)", p.stdout, re.M)
        names = [n for n in names if not n.startswith("<")]
        if p.returncode == 0 and names:
            return names[0]
        if p.returncode == 0 and p.stdout.strip().splitlines()[:1] == [meta]:
            return meta
        if attempt == 0 and allow_update:
            _apt_update()
            continue
        raise KernelError(
            f"apt knows no package {meta} "
            f"(`apt-cache depends` exit {p.returncode}: {p.stderr.strip() or p.stdout.strip()}); "
            "list the kernels it has with `apt-cache search --names-only '^linux-image-'`"
        )
    raise AssertionError("unreachable")


def _download(package: str, debs: Path, *, allow_update: bool = True) -> Path:
    debs.mkdir(parents=True, exist_ok=True)
    have = sorted(debs.glob(f"{package}_*.deb"))
    if have:
        return have[-1]
    for attempt in (0, 1):
        _log(f"apt-get download {package}")
        tmp = debs / "partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        p = _run(["apt-get", "download", "-o", "APT::Sandbox::User=root", package], cwd=tmp)
        got = sorted(tmp.glob(f"{package}_*.deb"))
        if p.returncode == 0 and got:
            dest = debs / got[-1].name
            os.replace(got[-1], dest)
            shutil.rmtree(tmp, ignore_errors=True)
            return dest
        if attempt == 0 and allow_update:
            _apt_update()  # a 404 after the archive moved on: refresh the lists once
            continue
        raise KernelError(f"apt-get download {package} failed (exit {p.returncode}):\n{p.stderr}")
    raise AssertionError("unreachable")


def _find_version(root: Path) -> str:
    boot = sorted((root / "boot").glob("vmlinuz-*"))
    if not boot:
        raise KernelError(f"no boot/vmlinuz-* in {root}")
    return boot[-1].name[len("vmlinuz-"):]


def _read_stamp(cache_dir: Path) -> KernelImage | None:
    try:
        meta = json.loads((cache_dir / STAMP).read_text())
    except (OSError, ValueError):
        return None
    root = cache_dir / "root"
    k = KernelImage(root / "boot" / f"vmlinuz-{meta['version']}", root, meta["version"],
                    meta.get("package", ""), meta.get("requested", META_PACKAGE))
    if k.vmlinuz.is_file() and (k.modules_dir / "modules.dep").is_file():
        return k
    return None


def requested_package(package: str | None = None) -> str:
    """The kernel package a lab run uses: ``package``, else $FIESNAP_LAB_KERNEL, else the default."""
    return check_package_name(package or os.environ.get("FIESNAP_LAB_KERNEL") or META_PACKAGE)


def ensure_kernel(lab_dir: str | os.PathLike, package: str | None = None, *, refresh: bool = False) -> KernelImage:
    """Return the cached lab kernel for ``package``, fetching and unpacking it first if needed.

    ``package`` (else $FIESNAP_LAB_KERNEL, else ``linux-image-amd64``) is a meta
    package, resolved once to the versioned package it depends on, or a versioned
    package. Its cache is ``<lab_dir>/kernels/<package>``. ``refresh`` re-resolves
    a meta package even when a kernel is cached (the archive moved on).
    Safe to call concurrently (a lock file serialises the work).
    """
    requested = requested_package(package)
    cache_dir = Path(lab_dir).resolve() / "kernels" / requested
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cached = _read_stamp(cache_dir)
        if cached and not refresh:
            return cached
        _need_tools()
        pkg = resolve_package(requested)
        if cached and cached.package == pkg:
            return cached
        deb = _download(pkg, cache_dir / "debs")
        root = cache_dir / "root"
        tmp = cache_dir / "root.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        _log(f"unpacking {deb.name}")
        p = _run(["dpkg", "-x", str(deb), str(tmp)])
        if p.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise KernelError(f"dpkg -x {deb} failed:\n{p.stderr}")
        # Merged-/usr packages ship /usr/lib/modules; depmod -b and virtme look in <root>/lib.
        if not (tmp / "lib" / "modules").exists() and (tmp / "usr" / "lib" / "modules").exists():
            (tmp / "lib").symlink_to("usr/lib")
        version = _find_version(tmp)
        if not (tmp / "lib" / "modules" / version).is_dir():
            raise KernelError(f"{deb.name} has no lib/modules/{version}")
        p = _run(["depmod", "-b", str(tmp), version])
        if p.returncode != 0:
            raise KernelError(f"depmod -b {tmp} {version} failed:\n{p.stderr}")
        shutil.rmtree(root, ignore_errors=True)
        os.replace(tmp, root)
        (cache_dir / STAMP).write_text(json.dumps({"requested": requested, "package": pkg, "version": version,
                                                   "deb": deb.name}) + "\n")
        # Keep only the deb in use.
        for old in (cache_dir / "debs").glob("*.deb"):
            if old != deb:
                old.unlink()
        k = _read_stamp(cache_dir)
        if k is None:
            raise KernelError(f"kernel unpacked into {root} but vmlinuz/modules.dep are missing")
        _log(f"kernel {k.version} ready in {root}")
        return k
