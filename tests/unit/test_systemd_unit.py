"""The shipped boot unit, fiesnap/systemd/fiesnap-activate.service.

It must run early (before local-fs-pre.target, without default dependencies,
as lvm2's units do) so that fstab can mount /dev/mapper/NAME, and run
`fiesnap activate --all` once. When systemd-analyze is installed, the unit
(with ExecStart pointing at this checkout's fiesnap) must verify cleanly.
"""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fiesnap

UNIT = Path(fiesnap.__file__).parent / "systemd" / "fiesnap-activate.service"
REPO = Path(__file__).resolve().parents[2]


def _parse(text: str) -> configparser.ConfigParser:
    # systemd allows repeated keys (they accumulate); keep case, no % interpolation.
    cp = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#", ";"),
                                   empty_lines_in_values=False)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(text)
    return cp


def _all_values(text: str, section: str, key: str) -> list[str]:
    """Every value of a (possibly repeated) key: configparser keeps only the last one."""
    out, current = [], None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
        elif current == section and "=" in line and not line.startswith(("#", ";")):
            k, v = line.split("=", 1)
            if k.strip() == key:
                out.append(v.strip())
    return out


@pytest.fixture(scope="module")
def text() -> str:
    return UNIT.read_text()


@pytest.fixture(scope="module")
def unit(text: str) -> configparser.ConfigParser:
    return _parse(text)


def test_unit_is_shipped_as_package_data() -> None:
    assert UNIT.is_file()
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"systemd/*.service"' in pyproject


def test_unit_ordering(unit: configparser.ConfigParser, text: str) -> None:
    u = unit["Unit"]
    assert u["DefaultDependencies"] == "no"
    before = " ".join(_all_values(text, "Unit", "Before")).split()
    assert "local-fs-pre.target" in before
    assert "local-fs-pre.target" in " ".join(_all_values(text, "Unit", "Wants")).split()
    # runs after udev has been asked to announce the disks
    assert "systemd-udev-trigger.service" in " ".join(_all_values(text, "Unit", "After")).split()
    assert "shutdown.target" in u["Conflicts"].split()
    assert unit["Install"]["WantedBy"] == "sysinit.target"


def test_unit_service(unit: configparser.ConfigParser, text: str) -> None:
    s = unit["Service"]
    assert s["Type"] == "oneshot"
    assert s["RemainAfterExit"] == "yes"
    (start,) = _all_values(text, "Service", "ExecStart")
    argv = shlex.split(start)
    assert os.path.isabs(argv[0]) and os.path.basename(argv[0]) == "fiesnap"
    assert argv[1:3] == ["activate", "--all"]
    # --wait takes a number of seconds
    if "--wait" in argv:
        float(argv[argv.index("--wait") + 1])
    # At shutdown every stack goes down and is sealed; a failure there never blocks shutdown.
    (stop,) = _all_values(text, "Service", "ExecStop")
    assert stop.startswith("-/")
    stop_argv = shlex.split(stop[1:])
    assert stop_argv[0] == argv[0] and stop_argv[1:] == ["deactivate", "--all"]


def test_unit_comment_references_exist(text: str) -> None:
    docs = [w.rstrip(".,;:)") for w in text.split() if w.startswith("docs/")]
    assert docs  # it points at its documentation
    for doc in docs:
        assert (REPO / doc).is_file(), doc


def _verify_tools() -> tuple[str, Path]:
    """(systemd-analyze, the venv's fiesnap entry point), or skip the test."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    exe = Path(sys.prefix) / "bin" / "fiesnap"
    if not os.access(exe, os.X_OK):
        exe = REPO / ".venv" / "bin" / "fiesnap"
    if not os.access(exe, os.X_OK):
        pytest.skip("no fiesnap entry point in the venv (pip install -e .)")
    return analyze, exe


def _local_copy(unit: Path, exe: Path, dest: Path) -> None:
    """`unit` copied into `dest` with ExecStart pointing at `exe` (verify needs it to exist)."""
    text = unit.read_text()
    (start,) = _all_values(text, "Service", "ExecStart")
    argv = shlex.split(start)
    local = text.replace(f"ExecStart={start}", f"ExecStart={shlex.join([str(exe.absolute()), *argv[1:]])}")
    for stop in _all_values(text, "Service", "ExecStop"):
        prefix, stop_argv = stop[:1] if stop.startswith("-") else "", shlex.split(stop.lstrip("-"))
        local = local.replace(f"ExecStop={stop}",
                              f"ExecStop={prefix}{shlex.join([str(exe.absolute()), *stop_argv[1:]])}")
    assert local != text
    (dest / unit.name).write_text(local)


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze, exe = _verify_tools()
    _local_copy(UNIT, exe, tmp_path)
    r = subprocess.run([analyze, "verify", str(tmp_path / UNIT.name)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "", r.stderr
