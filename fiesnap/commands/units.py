"""`fiesnap install-units`: the shipped systemd units, pointed at the fiesnap that is installed.

The units ship with `/usr/local/bin/fiesnap` in their commands, which is right for one way of
installing and wrong for the others (a pipx or virtualenv install, a distribution package).
The command that runs this process is the one to write: the `fiesnap` script beside the
interpreter when there is one, else the interpreter with `-m fiesnap`.

The units run that command as root at every boot, so everything it executes must be root's
alone: the script, the interpreter and every folder on its import path, each path and all its
parents owned by root and not writable by group or others (a sticky parent like /tmp is fine:
others cannot replace root's entries in it). A fiesnap installed into a user's virtualenv or an
editable checkout a user can write is refused, with the path that fails.
"""

from __future__ import annotations

import os
import shlex
import stat
import sys
from dataclasses import dataclass
from importlib import resources

from fiesnap.commands.guards import require_root
from fiesnap.errors import RefusedError, StateError, UsageError

UNIT_NAMES = ("fiesnap-activate.service", "fiesnap-monitor.service", "fiesnap-boot-complete.service")
SHIPPED_COMMAND = "/usr/local/bin/fiesnap"
UNIT_MODE = 0o644


@dataclass(frozen=True)
class Unit:
    name: str
    text: str


@dataclass(frozen=True)
class InstalledUnit:
    path: str
    result: str  # written, unchanged, replaced

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "result": self.result}


def shipped_unit(name: str) -> str:
    return resources.files("fiesnap").joinpath("systemd", name).read_text(encoding="utf-8")


def render_units(command: str) -> list[Unit]:
    """The shipped units with every use of the shipped path replaced by `command`."""
    units = []
    for name in UNIT_NAMES:
        text = shipped_unit(name)
        if SHIPPED_COMMAND not in text:
            raise RuntimeError(f"{name} has no {SHIPPED_COMMAND} to replace")
        units.append(Unit(name, text.replace(SHIPPED_COMMAND, command)))
    return units


def untrusted(path: str) -> str | None:
    """Why root should not run code from `path` (None: root's alone). Checks the path itself and
    every parent, after resolving symlinks (a root-owned link into a user's folder is no help)."""
    real = os.path.realpath(path)
    p = real
    while True:
        try:
            st = os.stat(p)
        except OSError as e:
            return f"{p}: {os.strerror(e.errno or 0)}"
        if st.st_uid != 0:
            return f"{p} is owned by uid {st.st_uid}, not root"
        writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if writable and not (stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX and p != real):
            return f"{p} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
        if p == "/":
            return None
        p = os.path.dirname(p)


def installed_command() -> str:
    """The command line that runs this fiesnap, refused unless root alone can change its code."""
    script = os.path.join(os.path.dirname(sys.executable), "fiesnap")
    if os.path.isfile(script) and os.access(script, os.X_OK):
        command, checked = os.path.abspath(script), [script]
    else:
        command, checked = f"{shlex.quote(sys.executable)} -m fiesnap", []
    import fiesnap

    package = os.path.dirname(os.path.abspath(fiesnap.__file__))  # an editable install is not on sys.path
    checked += [sys.executable, package] + [p for p in sys.path if p and os.path.exists(p)]
    for path in checked:
        why = untrusted(path)
        if why is not None:
            raise RefusedError(
                f"the units would run {command} as root at every boot, but {why}: a user could change "
                "the code root runs; install fiesnap as root into root-owned folders (pipx or pip as root), "
                "then run install-units with that fiesnap")
    if any(c.isspace() for c in command) and not command.endswith(" -m fiesnap"):
        raise UsageError(f"{command} has white space in its path: systemd would split it; install fiesnap elsewhere")
    return command


def install_units(units: list[Unit], directory: str, *, force: bool = False) -> list[InstalledUnit]:
    """Write each unit into `directory` (0644, atomically). A file that exists with other
    content is refused before anything is written, unless `force`."""
    require_root()
    if not os.path.isdir(directory):
        raise UsageError(f"{directory} is not a directory: give the systemd unit folder with --dir")
    plan = []
    for u in units:
        path = os.path.join(directory, u.name)
        old = _read(path)
        if old == u.text:
            plan.append((u, path, "unchanged"))
        elif old is None:
            plan.append((u, path, "written"))
        elif force:
            plan.append((u, path, "replaced"))
        else:
            raise RefusedError(f"{path} exists and differs from the unit fiesnap would write: compare them "
                               "('fiesnap install-units --print'), then run again with --force to replace it")
    for u, path, result in plan:
        if result != "unchanged":
            _write(path, u.text)
    return [InstalledUnit(path, result) for _, path, result in plan]


def _read(path: str) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StateError(f"cannot read {path}: {os.strerror(e.errno or 0)}; inspect it (a symlink is refused)") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise StateError(f"{path} is not a regular file: inspect it")
        return f.read().decode("utf-8", errors="replace")


def _write(path: str, text: str) -> None:
    tmp = f"{path}.fiesnap-tmp"
    try:
        try:
            os.unlink(tmp)  # left by an interrupted run: in root's unit folder, nobody else's
        except FileNotFoundError:
            pass
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, UNIT_MODE)
        try:
            os.fchmod(fd, UNIT_MODE)
            data = text.encode()
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise StateError(f"cannot write {path}: {os.strerror(e.errno or 0)}; check the folder") from None
