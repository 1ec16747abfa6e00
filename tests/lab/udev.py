"""Fetch and unpack Debian's ``udev`` package (systemd-udevd, udevadm, rules) for lab guests.

The host runs no udevd and must not get the ``udev`` package installed; guests started
with ``--udev`` need it. Like the kernel (kernel.py), the .deb is fetched with
``apt-get download`` and unpacked with ``dpkg -x`` into ``<cache>/root`` (default
``.lab/udev``); nothing is installed. The result is cached; later calls only check that
the files are still there. ``udevadm`` is one binary (``systemd-udevd`` is a link to it,
chosen by the name it is started under) with no private systemd library, so it runs on the
host's libraries: it is tried once here (``udevadm --version``) to catch a missing one.

In the guest (tests/lab/guest-init.sh, FIESNAP_LAB_UDEV=1) the rules and helpers are copied
into /usr/lib/udev (a RAM overlay there, next to dmsetup's rules from the host), udevadm to
/usr/bin and /usr/lib/systemd/systemd-udevd, then udevd is started and the coldplug run.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .kernel import KernelError, _download, _log, _run

PACKAGE = "udev"
STAMP = "udev.json"


class UdevError(KernelError):
    """udev for the guests could not be prepared; the message says what to do."""


@dataclass(frozen=True)
class UdevTools:
    root: Path  # <cache>/root: the unpacked package
    udevadm: Path  # <root>/bin/udevadm (or usr/bin): also systemd-udevd, by argv[0]
    libexec: Path  # <root>/lib/udev (or usr/lib/udev): rules.d/ and helpers (ata_id, ...)
    version: str  # e.g. 252.39-1~deb12u2


def _locate(root: Path) -> tuple[Path, Path]:
    udevadm = next((p for p in (root / "bin" / "udevadm", root / "usr" / "bin" / "udevadm") if p.is_file()), None)
    libexec = next((p for p in (root / "lib" / "udev", root / "usr" / "lib" / "udev") if (p / "rules.d").is_dir()),
                   None)
    if udevadm is None or libexec is None:
        raise UdevError(f"the {PACKAGE} package unpacked into {root} has no bin/udevadm or lib/udev/rules.d")
    return udevadm, libexec


def _read_stamp(cache_dir: Path) -> UdevTools | None:
    try:
        meta = json.loads((cache_dir / STAMP).read_text())
        root = cache_dir / "root"
        t = UdevTools(root, root / meta["udevadm"], root / meta["libexec"], meta["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if t.udevadm.is_file() and os.access(t.udevadm, os.X_OK) and (t.libexec / "rules.d").is_dir():
        return t
    return None


def _check_runs(udevadm: Path) -> None:
    """The guest uses the host's libraries: make sure the binary links here."""
    try:
        p = subprocess.run([str(udevadm), "--version"], capture_output=True, text=True, timeout=30,
                           stdin=subprocess.DEVNULL)
    except OSError as e:
        raise UdevError(f"cannot run {udevadm}: {e}") from e
    if p.returncode != 0:
        ldd = _run(["ldd", str(udevadm)]).stdout if shutil.which("ldd") else ""
        missing = [ln.split()[0] for ln in ldd.splitlines() if "not found" in ln]
        hint = (f"missing libraries: {' '.join(missing)} (install the Debian packages that ship them, "
                "e.g. libkmod2 libcap2 libacl1 libblkid1 libselinux1)") if missing else p.stderr.strip()
        raise UdevError(f"{udevadm} --version failed (exit {p.returncode}): {hint}")


def ensure_udev(cache_dir: str | os.PathLike, *, refresh: bool = False) -> UdevTools:
    """Return the cached udev files, fetching and unpacking the package first if needed.

    ``refresh`` fetches the package again (the current candidate version).
    Safe to call concurrently (a lock file serialises the work).
    """
    cache_dir = Path(cache_dir).resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cached = _read_stamp(cache_dir)
        if cached and not refresh:
            return cached
        missing = [t for t in ("apt-get", "dpkg", "dpkg-deb") if shutil.which(t) is None]
        if missing:
            raise UdevError(f"missing tools: {', '.join(missing)}; the lab fetches the {PACKAGE} package "
                            "with apt: this needs a Debian/Ubuntu host")
        debs = cache_dir / "debs"
        if refresh:
            shutil.rmtree(debs, ignore_errors=True)
        try:
            deb = _download(PACKAGE, debs)
        except UdevError:
            raise
        except KernelError as e:
            raise UdevError(str(e)) from e
        p = _run(["dpkg-deb", "-f", str(deb), "Version"])
        version = p.stdout.strip() if p.returncode == 0 else deb.name.split("_")[1]
        root = cache_dir / "root"
        tmp = cache_dir / "root.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        _log(f"unpacking {deb.name}")
        p = _run(["dpkg", "-x", str(deb), str(tmp)])
        if p.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UdevError(f"dpkg -x {deb} failed:\n{p.stderr}")
        udevadm, libexec = _locate(tmp)
        _check_runs(udevadm)
        shutil.rmtree(root, ignore_errors=True)
        os.replace(tmp, root)
        (cache_dir / STAMP).write_text(json.dumps({
            "package": PACKAGE, "version": version, "deb": deb.name,
            "udevadm": str(udevadm.relative_to(tmp)), "libexec": str(libexec.relative_to(tmp)),
        }) + "\n")
        for old in debs.glob("*.deb"):
            if old != deb:
                old.unlink()
        t = _read_stamp(cache_dir)
        if t is None:
            raise UdevError(f"{PACKAGE} unpacked into {root} but udevadm/rules.d are missing")
        _log(f"udev {t.version} ready in {root}")
        return t
