"""A known error is one line with its exit code; what undoing it ran into follows as notes."""

from __future__ import annotations

import sys

import pytest
import typer

from fiesnap.clirun import run_app
from fiesnap.errors import FiesnapError, RefusedError


def _run(monkeypatch, capsys, exc: Exception) -> tuple[int, list[str]]:
    app = typer.Typer()

    @app.command()
    def go() -> None:
        raise exc

    @app.command()
    def other() -> None:
        pass

    monkeypatch.setattr(sys, "argv", ["fiesnap", "go"])
    with pytest.raises(SystemExit) as ex:
        run_app(app, "fiesnap", known=(FiesnapError,), interrupted="run it again")
    return ex.value.code, capsys.readouterr().err.splitlines()


def test_a_known_error_is_one_line(monkeypatch, capsys):
    code, err = _run(monkeypatch, capsys, RefusedError("nothing to roll back"))
    assert (code, err) == (7, ["fiesnap: error: nothing to roll back"])


def test_what_undoing_ran_into_is_shown(monkeypatch, capsys):
    e = RefusedError("the switch failed")
    e.add_note("putting /dev/mapper/cp back failed too: EBUSY; run 'dmsetup resume cp'")
    code, err = _run(monkeypatch, capsys, e)
    assert code == 7
    assert err == ["fiesnap: error: the switch failed",
                   "fiesnap: note: putting /dev/mapper/cp back failed too: EBUSY; run 'dmsetup resume cp'"]
