"""What a newcomer meets first: help with an example and the exit codes, `--version`, `-h`,
one-line usage errors that name the command's help, and a start that costs little.

These run the installed CLI as a user would (a subprocess), on this host, whose kernel may have
no device-mapper: nothing here gets that far, except where said.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main

import fiesnap
from fiesnap.cli import app
from fiesnap.commands.guards import DEFAULT_FREE_AWARE
from fiesnap.errors import EXIT_CODES

REPO = Path(__file__).resolve().parents[2]
COMMANDS = sorted(typer.main.get_command(app).commands)


def _fiesnap(*args: str, state: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if state is not None:
        env["FIESNAP_STATE_DIR"] = str(state)
    return subprocess.run([sys.executable, "-m", "fiesnap", *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env=env)


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_top_help_lists_commands_exit_codes_and_the_state_folder(flag: str) -> None:
    p = _fiesnap(flag)
    assert p.returncode == 0 and p.stderr == ""
    assert "Exit codes:" in p.stdout and "FIESNAP_STATE_DIR" in p.stdout
    for code, text in EXIT_CODES:
        assert f"{code:>3}  {text}" in p.stdout
    for name in COMMANDS:
        assert f"  {name} " in p.stdout


def test_no_arguments_shows_the_help_and_no_empty_error() -> None:
    p = _fiesnap()
    assert p.returncode == 2 and p.stdout.startswith("Usage: ") and "Exit codes:" in p.stdout
    assert p.stderr == ""


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_an_example_and_shows_its_arguments_help(command: str) -> None:
    p = _fiesnap(command, "-h")
    assert p.returncode == 0, p.stderr
    assert "Example:" in p.stdout or "Examples:" in p.stdout
    assert f"fiesnap {command}" in p.stdout.split("Example", 1)[1]
    click_cmd = typer.main.get_command(app).commands[command]
    for param in click_cmd.params:
        if param.param_type_name == "argument":
            assert param.help and " ".join(param.help.split()[:3]) in " ".join(p.stdout.split()), (command, param.name)


def test_version_both_ways() -> None:
    assert _fiesnap("--version").stdout == f"fiesnap {fiesnap.__version__}\n"
    assert _fiesnap("version").stdout == f"{fiesnap.__version__}\n"


@pytest.mark.parametrize("args,where", [
    (["start", "data"], "fiesnap start --help"),          # missing --size
    (["setup", "/dev/sdb1"], "fiesnap setup --help"),     # missing --name
    (["merge"], "fiesnap merge --help"),                  # missing NAME
    (["status", "--bogus"], "fiesnap status --help"),
    (["nosuch"], "fiesnap --help"),
    (["activate"], "fiesnap activate --help"),            # NAME or --all
    (["activate", "data", "--all"], "fiesnap activate --help"),
    (["deactivate"], "fiesnap deactivate --help"),
    (["monitor"], "fiesnap monitor --help"),
    (["commit"], "fiesnap commit --help"),                # NAME or --boot-complete
    (["extend", "data"], "fiesnap extend --help"),        # --by or --to
    (["extend", "data", "--by", "1G", "--to", "2G"], "fiesnap extend --help"),
])
def test_a_usage_error_is_one_line_naming_the_commands_help(tmp_path: Path, args, where) -> None:
    p = _fiesnap(*args, state=tmp_path / "state")
    lines = p.stderr.splitlines()
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and lines[0].startswith("fiesnap: error: ") and f"(see '{where}')" in lines[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [
    ["status", ""], ["merge", ""], ["merge", "../etc"], ["status", "a/b"], ["start", "/dev/null", "--size", "1G", "--name", ""],
    ["setup", "/dev/null", "--name", ""], ["start", "/dev/null", "--size", "1G", "--name", "x-snap"],
])
def test_a_bad_name_is_refused_before_anything_is_looked_at(tmp_path: Path, args) -> None:
    p = _fiesnap(*args, state=tmp_path / "state")
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and "invalid name" in p.stderr
    assert list(tmp_path.iterdir()) == []


def test_cli_default_store_is_the_commands_default() -> None:
    start = typer.main.get_command(app).commands["start"]
    (opt,) = [p for p in start.params if p.name == "free_aware"]
    assert opt.default is DEFAULT_FREE_AWARE


def test_start_imports_only_what_the_command_needs() -> None:
    """Every boot and every monitor poll starts the CLI: no command module, libdevmapper binding,
    rich table or progress bar, and no pydantic, before a command runs."""
    code = ("import sys, fiesnap.cli; heavy = ('fiesnap.commands.', 'fiesnap.kernel.libdm', 'rich.progress', "
            "'rich.table', 'rich.console', 'pydantic'); "
            "print([m for m in sys.modules if m.startswith(heavy)])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


def test_the_exit_code_table_in_the_docs_matches() -> None:
    design = (REPO / "docs" / "design.md").read_text()
    for code, text in EXIT_CODES:
        assert f"| {code} | {text} |" in design, code


def test_install_units_json_is_json_with_and_without_print(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    p = _fiesnap("install-units", "--print", "--json")
    assert p.returncode == 0, p.stderr
    assert [u["name"] for u in json.loads(p.stdout)["units"]] == [
        "fiesnap-activate.service", "fiesnap-monitor.service", "fiesnap-boot-complete.service"]
    p = _fiesnap("install-units", "--dir", str(tmp_path), "--json")
    assert p.returncode == 0, p.stderr
    assert {u["result"] for u in json.loads(p.stdout)["units"]} == {"written"}
