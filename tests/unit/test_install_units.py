"""`fiesnap install-units`: the shipped units, running the fiesnap that is installed, written only
when root alone can change what they run.

The units run their command as root at every boot: a fiesnap whose code a user could change is
a way for that user to become root, so it is refused with the path that fails. The rendered
units are checked with systemd-analyze when it is installed.
"""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fiesnap.commands import units
from fiesnap.errors import RefusedError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (root-owned files, chown)")

REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534


def test_every_shipped_command_is_replaced() -> None:
    rendered = units.render_units("/opt/fiesnap/bin/fiesnap")
    assert [u.name for u in rendered] == list(units.UNIT_NAMES)
    for u in rendered:
        assert units.SHIPPED_COMMAND not in u.text
        assert "/opt/fiesnap/bin/fiesnap " in u.text
    activate = rendered[0].text
    assert "ExecStart=/opt/fiesnap/bin/fiesnap activate --all --wait 30" in activate
    assert "ExecStop=-/opt/fiesnap/bin/fiesnap deactivate --all" in activate


def test_this_fiesnap_runs_from_root_owned_folders() -> None:
    command = units.installed_command()
    exe = Path(sys.executable).parent / "fiesnap"
    assert command == (str(exe.absolute()) if exe.is_file() else f"{shlex.quote(sys.executable)} -m fiesnap")


def test_code_another_user_owns_or_can_write_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "bin").mkdir(parents=True)
    script = home / "bin" / "fiesnap"
    script.write_text("#!/bin/sh\n")
    assert units.untrusted(str(script)) is None
    os.chmod(script, 0o775)
    assert "writable by group or others" in units.untrusted(str(script))
    os.chmod(script, 0o755)
    os.chown(home, NOBODY, NOBODY)
    assert f"{home} is owned by uid {NOBODY}" in units.untrusted(str(script))
    os.chown(home, 0, 0)
    link = tmp_path / "link"
    link.symlink_to(home / "bin")
    os.chown(home / "bin", NOBODY, NOBODY)  # a root-owned link into a user's folder is no help
    assert "owned by uid" in units.untrusted(str(link / "fiesnap"))


def test_a_sticky_parent_is_fine_but_not_a_writable_code_folder(tmp_path: Path) -> None:
    sticky = tmp_path / "shared"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    code = sticky / "site"
    code.mkdir()
    os.chmod(code, 0o755)
    assert units.untrusted(str(code)) is None
    assert "writable by group or others" in units.untrusted(str(sticky))


def test_installed_command_refuses_an_untrusted_import_path(tmp_path: Path, monkeypatch) -> None:
    evil = tmp_path / "site"
    evil.mkdir()
    os.chown(evil, NOBODY, NOBODY)
    monkeypatch.setattr(sys, "path", [*sys.path, str(evil)])
    with pytest.raises(RefusedError, match=f"{evil} is owned by uid {NOBODY}") as e:
        units.installed_command()
    assert "install fiesnap as root" in str(e.value) and "\n" not in str(e.value)


def test_install_writes_0644_and_a_second_run_changes_nothing(tmp_path: Path) -> None:
    rendered = units.render_units("/usr/bin/fiesnap")
    first = units.install_units(rendered, str(tmp_path))
    assert [r.result for r in first] == ["written"] * 3
    for u in rendered:
        p = tmp_path / u.name
        assert p.read_text() == u.text and stat.S_IMODE(p.stat().st_mode) == 0o644
    assert [r.result for r in units.install_units(rendered, str(tmp_path))] == ["unchanged"] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(units.UNIT_NAMES)  # no temporaries left


def test_a_unit_the_admin_changed_is_kept_unless_forced(tmp_path: Path) -> None:
    rendered = units.render_units("/usr/bin/fiesnap")
    edited = tmp_path / "fiesnap-monitor.service"
    edited.write_text("# the admin's own\n")
    with pytest.raises(RefusedError, match="exists and differs.*--force"):
        units.install_units(rendered, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fiesnap-monitor.service"]  # nothing written
    assert edited.read_text() == "# the admin's own\n"
    results = units.install_units(rendered, str(tmp_path), force=True)
    assert [r.result for r in results] == ["written", "replaced", "written"]
    assert edited.read_text() == rendered[1].text


def test_cli_print_writes_nothing_and_install_uses_this_fiesnap(tmp_path: Path) -> None:
    run = [sys.executable, "-m", "fiesnap", "install-units"]
    p = subprocess.run([*run, "--print", "--dir", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert p.returncode == 0, p.stderr
    assert list(tmp_path.iterdir()) == [] and p.stdout.count("[Service]") == 3
    p = subprocess.run([*run, "--dir", str(tmp_path), "--json"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert p.returncode == 0, p.stderr
    written = (tmp_path / "fiesnap-activate.service").read_text()
    assert f"ExecStart={units.installed_command()} activate --all --wait 30" in written


def test_rendered_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    command = units.installed_command()
    units.install_units(units.render_units(command), str(tmp_path))
    for name in units.UNIT_NAMES:
        r = subprocess.run([analyze, "verify", str(tmp_path / name)], capture_output=True, text=True, timeout=120)
        # boot-complete.service names boot-complete.target, which a host without systemd-boot's
        # units may lack; everything else must verify cleanly.
        problems = [line for line in r.stderr.splitlines() if "boot-complete.target" not in line]
        assert problems == [], r.stderr


def test_a_symlinked_script_in_a_folder_others_can_write_is_refused(tmp_path: Path) -> None:
    """The unit runs the path as written: a root-owned target does not help when the link sits
    where another user can replace it."""
    real = tmp_path / "real"
    real.mkdir()
    (real / "fiesnap").write_text("#!/bin/sh\n")
    os.chmod(real / "fiesnap", 0o755)
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # not sticky
    (shared / "fiesnap").symlink_to(real / "fiesnap")
    assert "writable by group or others" in units.untrusted(str(shared / "fiesnap"))


def test_a_missing_import_folder_is_judged_by_where_it_would_be_made(tmp_path: Path) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    assert "writable by group or others" in units.untrusted(str(open_dir / "not-yet" / "site"))
    assert units.untrusted(str(tmp_path / "not-yet" / "site")) is None


def test_the_scripts_interpreter_is_checked(tmp_path: Path, monkeypatch) -> None:
    """A root-owned script whose first line names an interpreter another user owns is refused."""
    bindir = tmp_path / "venv" / "bin"
    bindir.mkdir(parents=True)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    (bindir / "fiesnap").write_text(f"#!{theirs}/python\n")
    os.chmod(bindir / "fiesnap", 0o755)
    monkeypatch.setattr(sys, "executable", str(bindir / "python"))
    with pytest.raises(RefusedError, match=f"{theirs} is owned by uid {NOBODY}"):
        units.installed_command()


def test_the_working_folder_of_python_m_is_not_code_the_units_run(tmp_path: Path, monkeypatch) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    monkeypatch.chdir(theirs)
    monkeypatch.setattr(sys, "path", [str(theirs), *sys.path])  # what `python -m` puts first
    assert units.installed_command()


def test_a_unit_folder_others_can_write_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "units"
    folder.mkdir()
    os.chmod(folder, 0o777)
    with pytest.raises(RefusedError, match="writable by group or others"):
        units.install_units(units.render_units("/usr/bin/fiesnap"), str(folder))
    assert list(folder.iterdir()) == []
