"""An installed fiesnap holds every module: setuptools' own build of the tree (what a
pip or distribution install copies) contains each layer and command, and the CLI
imports from it. An editable install, as the tests use, would hide a package list that
misses a folder."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

BUILD = """
import sys
from setuptools.dist import Distribution
dist = Distribution({"script_name": "setup.py"})
dist.parse_config_files()
cmd = dist.get_command_obj("build_py")
cmd.build_lib = sys.argv[1]
dist.run_command("build_py")
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("build")
    # a clean copy: no egg-info from the editable install, whose file list would fill gaps
    src = tmp_path_factory.mktemp("src")
    shutil.copy(REPO / "pyproject.toml", src)
    shutil.copy(REPO / "README.md", src)
    for pkg in ("fiesnap", "bow_compat"):
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    p = subprocess.run([sys.executable, "-c", BUILD, str(out)], cwd=src, capture_output=True, text=True)
    if p.returncode != 0:
        pytest.fail(f"setuptools build_py failed: {p.stderr[-2000:]}")
    return out


def test_the_build_holds_every_module_of_the_tree(built):
    for pkg in ("fiesnap", "bow_compat"):
        for src in (REPO / pkg).rglob("*.py"):
            rel = src.relative_to(REPO)
            assert (built / rel).is_file(), f"{rel} would not be installed"
    for data in ("systemd/fiesnap-activate.service", "systemd/fiesnap-monitor.service",
                 "systemd/fiesnap-boot-complete.service", "hooks/80fiesnap-checkpoint.apt.conf"):
        assert (built / "fiesnap" / data).is_file(), f"{data} would not be installed"


def test_the_installed_commands_import(built, tmp_path):
    # -S: no site-packages, so the editable install of this tree cannot stand in
    p = subprocess.run([sys.executable, "-S", "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                        "import fiesnap.commands.start, fiesnap.commands.monitor, fiesnap.commands.merge; "
                        "assert fiesnap.commands.start.__file__.startswith(sys.argv[1])",
                        str(built)], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
