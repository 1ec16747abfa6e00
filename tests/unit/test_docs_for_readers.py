"""The project speaks to its readers: no issue numbers, internal nicknames, notes a reader
cannot see, or paths of one particular machine, in docs, code, tests or benchmarks."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FOLDERS = ("fiesnap", "bow_compat", "tests", "benchmarks", "docs")
TOP = ("README.md", "Makefile", "pyproject.toml")

# Spelled in pieces so that this file does not match itself.
FORBIDDEN = [
    re.compile(r"\b" + "iss" + r"ue\s*#?\s*\d+", re.I),           # an issue number
    re.compile(r"\b" + "tr" + r"ap\s*\d", re.I),                  # numbered nicknames
    re.compile("/" + "work/"), re.compile(r"\.\./" + "shared"),    # one machine's paths
    re.compile("(lab|dm|bow-format|free-aware)-" + "notes"),       # notes a reader cannot see
    re.compile("the " + r"notes (this work|say)", re.I),
]


def _files() -> list[Path]:
    out = [REPO / t for t in TOP]
    for folder in FOLDERS:
        out += [p for p in (REPO / folder).rglob("*") if p.is_file() and p.suffix in (".py", ".md", ".sh", ".service", ".conf")
                and "__pycache__" not in p.parts]
    return out


def test_no_issue_numbers_nicknames_or_machine_paths() -> None:
    found = []
    for path in _files():
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for pat in FORBIDDEN:
                if pat.search(line):
                    found.append(f"{path.relative_to(REPO)}:{n}: {line.strip()[:100]}")
    assert found == []
