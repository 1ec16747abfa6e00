"""The shipped monitor unit, fiesnap/systemd/fiesnap-monitor.service.

A plain long-running service after (and requiring) fiesnap-activate.service,
restarted if it crashes, running `fiesnap monitor --all`. When systemd-analyze
is installed, the unit (with ExecStart pointing at this checkout's fiesnap,
next to the activate unit it requires) must verify cleanly.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

import fiesnap

SYSTEMD = Path(fiesnap.__file__).parent / "systemd"
UNIT = SYSTEMD / "fiesnap-monitor.service"
ACTIVATE = SYSTEMD / "fiesnap-activate.service"
REPO = Path(__file__).resolve().parents[2]

# One parser for both shipped units (pytest puts tests/unit on sys.path).
from test_systemd_unit import _all_values, _local_copy, _parse, _verify_tools  # noqa: E402


@pytest.fixture(scope="module")
def text() -> str:
    return UNIT.read_text()


def test_unit_is_shipped_as_package_data() -> None:
    assert UNIT.is_file()
    assert '"systemd/*.service"' in (REPO / "pyproject.toml").read_text()


def test_unit_follows_activate(text: str) -> None:
    for key in ("After", "Wants"):
        assert "fiesnap-activate.service" in " ".join(_all_values(text, "Unit", key)).split(), key
    # a normal service: default dependencies order it after local filesystems
    # and stop it before they are unmounted
    assert "DefaultDependencies" not in _parse(text)["Unit"]
    assert _parse(text)["Install"]["WantedBy"] == "multi-user.target"


def test_unit_service(text: str) -> None:
    s = _parse(text)["Service"]
    assert s["Type"] == "simple"
    assert s["Restart"] == "on-failure"
    assert "RemainAfterExit" not in s
    (start,) = _all_values(text, "Service", "ExecStart")
    argv = shlex.split(start)
    assert os.path.isabs(argv[0]) and os.path.basename(argv[0]) == "fiesnap"
    assert argv[1:] == ["monitor", "--all"]
    # same binary as the activate unit
    (activate_start,) = _all_values(ACTIVATE.read_text(), "Service", "ExecStart")
    assert shlex.split(activate_start)[0] == argv[0]


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze, exe = _verify_tools()
    # verify resolves Wants= in the unit's own folder: ship the pair together
    for unit in (UNIT, ACTIVATE):
        _local_copy(unit, exe, tmp_path)
    r = subprocess.run([analyze, "verify", str(tmp_path / UNIT.name)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "", r.stderr
