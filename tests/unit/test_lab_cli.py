"""The lab's command line: a script run's tag becomes part of a folder name, so only safe
characters pass, and a bad one stops the command before any guest or folder exists."""

from __future__ import annotations

import pytest

from tests.lab import __main__ as lab_cli


@pytest.mark.parametrize("tag", ["lane1", "lane-2", "a_b", "x" * 40])
def test_a_run_tag_of_letters_digits_dashes_and_underscores_is_kept(tag):
    assert lab_cli._run_tag(tag) == tag


@pytest.mark.parametrize("tag", ["../up", "a/b", "sp ace", "x" * 41, "dot.ted"])
def test_a_run_tag_that_could_leave_the_runs_folder_is_refused(tag, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(lab_cli, "cmd_script", lambda args: pytest.fail("the script ran"))
    with pytest.raises(SystemExit) as e:
        lab_cli.main(["script", "--tag", tag, str(tmp_path / "s.sh")])
    assert e.value.code == 2
    assert "run tag" in capsys.readouterr().err
