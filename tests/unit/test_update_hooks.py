"""The update lifecycle's shipped files: fiesnap-boot-complete.service and the apt hook.

The unit commits once boot-complete.target is reached, never without fiesnap-activate; the
apt snippet parses as apt configuration and its command parses as a fiesnap command line.
When systemd-analyze and apt-config are installed they check the files; a real dpkg run
with the hook installed happens in the lab (tests/kernel/update_boots.py).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import typer

import fiesnap
from fiesnap.cli import app

PKG = Path(fiesnap.__file__).parent
UNIT = PKG / "systemd" / "fiesnap-boot-complete.service"
ACTIVATE = PKG / "systemd" / "fiesnap-activate.service"
APT = PKG / "hooks" / "80fiesnap-checkpoint.apt.conf"
REPO = Path(__file__).resolve().parents[2]

from test_systemd_unit import _all_values, _local_copy, _parse, _verify_tools  # noqa: E402


def _words(values: list[str]) -> list[str]:
    return " ".join(values).split()


def test_shipped_as_package_data():
    text = (REPO / "pyproject.toml").read_text()
    assert UNIT.is_file() and APT.is_file()
    assert '"systemd/*.service"' in text and '"hooks/*.conf"' in text


def test_unit_runs_after_a_good_boot_assessment_and_after_activate():
    text = UNIT.read_text()
    for key in ("Requires", "After"):
        assert {"boot-complete.target", "fiesnap-activate.service"} <= set(_words(_all_values(text, "Unit", key)))
    unit = _parse(text)
    assert "DefaultDependencies" not in unit["Unit"]  # stopped before shutdown like any service
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    s = unit["Service"]
    assert s["Type"] == "oneshot" and s["RemainAfterExit"] == "yes"
    (start,) = _all_values(text, "Service", "ExecStart")
    argv = shlex.split(start)
    assert argv[1:] == ["commit", "--boot-complete"]
    (activate_start,) = _all_values(ACTIVATE.read_text(), "Service", "ExecStart")
    assert shlex.split(activate_start)[0] == argv[0]


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze, exe = _verify_tools()
    for unit in (UNIT, ACTIVATE):  # verify resolves Requires= in the unit's own folder
        _local_copy(unit, exe, tmp_path)
    r = subprocess.run([analyze, "verify", str(tmp_path / UNIT.name)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "", r.stderr


def _hook_command() -> list[str]:
    (cmd,) = re.findall(r'DPkg::Pre-Invoke\s*\{\s*"([^"]+)";\s*\};', APT.read_text())
    return shlex.split(cmd)


def test_apt_hook_command_is_a_valid_idempotent_update_start():
    argv = _hook_command()
    (activate_start,) = _all_values(ACTIVATE.read_text(), "Service", "ExecStart")
    assert argv[0] == shlex.split(activate_start)[0]
    assert argv[1] == "start"
    params = typer.main.get_command(app).get_command(None, "start").make_context("start", argv[2:]).params
    assert params["target"] == "NAME" and params["unless_active"] is True
    assert params["boot_attempts"] >= 1 and params["size"]


def test_apt_config_parses_the_hook(tmp_path: Path):
    apt_config = shutil.which("apt-config")
    if apt_config is None:
        pytest.skip("apt-config not installed")
    r = subprocess.run([apt_config, "-c", str(APT), "dump", "DPkg::Pre-Invoke"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert shlex.join(_hook_command()) in r.stdout.replace('\\"', '"'), r.stdout
