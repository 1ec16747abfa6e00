"""`fiesnap install-units`: the shipped systemd units, pointed at the fiesnap that is installed.

The units ship with `/usr/local/bin/fiesnap` in their commands, which is right for one way of
installing and wrong for the others (a pipx or virtualenv install, a distribution package).
The command that runs this process is the one to write: the `fiesnap` script beside the
interpreter when there is one, else the interpreter with `-m fiesnap`.

The units run that command as root at every boot, so everything it executes must be root's
alone: the script (as written and where its links lead), the interpreter its first line names,
every folder on the import path (a missing one by the parent it would be made in), and every
module file loaded once the commands the units run are imported; each path and all its
parents owned by root and not writable by group or others (a sticky parent like /tmp is fine:
others cannot replace root's entries in it). A fiesnap installed into a user's virtualenv or an
editable checkout a user can write is refused, with the path that fails. The folder the units
are written to is checked the same way.
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


def _untrusted_chain(path: str, seen: set[str]) -> str | None:
    p = path
    while True:
        if p in seen:
            return None
        try:
            st = os.stat(p)
        except FileNotFoundError:
            p = os.path.dirname(p)  # a missing path: whoever may create it there decides
            continue
        except OSError as e:
            return f"{p}: {os.strerror(e.errno or 0)}"
        if st.st_uid != 0:
            return f"{p} is owned by uid {st.st_uid}, not root"
        writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if writable and not (stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX and p != path):
            return f"{p} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
        if not writable:  # a sticky folder passed only as a parent; as code it would not
            seen.add(p)
        if p == "/":
            return None
        p = os.path.dirname(p)


def untrusted(path: str, seen: set[str] | None = None) -> str | None:
    """Why root should not run code from `path` (None: root's alone). Checks the path and every
    parent, both as written and after resolving symlinks (a root-owned link into a user's
    folder is no help, nor is a link in a folder a user can write)."""
    seen = set() if seen is None else seen
    return (_untrusted_chain(os.path.abspath(path), seen)
            or _untrusted_chain(os.path.realpath(path), seen))


def _interpreter(script: str) -> str | None:
    """The interpreter a script's first line names (#!/path/python)."""
    try:
        with open(script, "rb") as f:
            line = f.readline(4096)
    except OSError:
        return None
    if not line.startswith(b"#!"):
        return None
    words = line[2:].decode("utf-8", "replace").split()
    return words[0] if words else None


def _code_paths() -> list[str]:
    """What the units' commands load: the import path (less the working folder, which `-m`
    puts first and relative entries name: the units run in / with `-P`), and the file of
    every module loaded once the commands they run are imported."""
    import importlib

    import fiesnap

    for command in ("activate", "commit", "monitor"):  # what the units run, and all they import
        importlib.import_module(f"fiesnap.commands.{command}")

    cwd = os.getcwd()
    paths = [os.path.dirname(os.path.abspath(fiesnap.__file__)), sys.executable]
    paths += [p for p in sys.path if os.path.isabs(p) and p != cwd]  # relative: the working folder too
    paths += sorted({m.__file__ for m in list(sys.modules.values()) if isinstance(getattr(m, "__file__", None), str)})
    return paths


def installed_command() -> str:
    """The command line that runs this fiesnap, refused unless root alone can change its code."""
    script = os.path.join(os.path.dirname(sys.executable), "fiesnap")
    checked: list[str] = []
    if os.path.isfile(script) and os.access(script, os.X_OK):
        command = os.path.abspath(script)
        checked += [script] + [i for i in [_interpreter(script)] if i]
    else:  # -P: the working folder stays off the import path
        command = f"{shlex.quote(sys.executable)} -P -m fiesnap"
    seen: set[str] = set()
    for path in checked + _code_paths():
        why = untrusted(path, seen)
        if why is not None:
            raise RefusedError(
                f"the units would run {command} as root at every boot, but {why}: a user could change "
                "the code root runs; install fiesnap as root into root-owned folders (pipx or pip as root), "
                "then run install-units with that fiesnap")
    if any(c.isspace() for c in command) and not command.endswith(" -P -m fiesnap"):
        raise UsageError(f"{command} has white space in its path: systemd would split it; install fiesnap elsewhere")
    return command


def install_units(units: list[Unit], directory: str, *, force: bool = False) -> list[InstalledUnit]:
    """Write each unit into `directory` (0644, atomically). A file that exists with other
    content is refused before anything is written, unless `force`."""
    require_root()
    if not os.path.isdir(directory):
        raise UsageError(f"{directory} is not a directory: give the systemd unit folder with --dir")
    why = untrusted(directory)
    if why is not None:
        raise RefusedError(f"{why}: systemd would run as root what another user can put in "
                           f"{directory}; give a folder only root can write with --dir")
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
