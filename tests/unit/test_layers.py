"""The layers are in the folders, and imports only go down.

    cli / clirun                 the command line
    commands/                    one module per command
    services/                    the store file, the dm stack, the state folder
    kernel/                      thin adapters: libdevmapper, ioctls, mounts, O_DIRECT
    model/                       pure: formats, tables, plans; no I/O, no root

Read from the source (imports, as the AST has them), so a new import that
climbs a layer, or a model module that starts doing I/O, fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "fiesnap"
LAYERS = ("model", "kernel", "services", "commands")
#: what each layer may import from fiesnap (besides itself and fiesnap.errors)
ALLOWED = {
    "model": set(),
    "kernel": {"model"},
    "services": {"model", "kernel"},
    "commands": {"model", "kernel", "services"},
}
#: the standard library's doors to the machine: a pure model opens none of them
IO_MODULES = {"os", "fcntl", "ctypes", "mmap", "subprocess", "socket", "signal", "threading",
              "time", "shutil", "tempfile", "io", "pathlib", "pyudev", "psutil", "select"}
MAX_LINES = 500


def _modules(layer: str) -> list[Path]:
    return sorted((PKG / layer).glob("*.py"))


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"{path}: relative import; fiesnap uses absolute imports")
            out += [node.module] if node.module != "fiesnap" else [f"fiesnap.{a.name}" for a in node.names]
    return out


def test_every_module_is_in_a_layer():
    top = {p.name for p in PKG.glob("*.py")}
    assert top == {"__init__.py", "__main__.py", "cli.py", "clirun.py", "errors.py"}
    # besides the layers, folders of files installed as they are (unit files, an apt hook)
    data = {"systemd", "hooks"}
    assert {p.name for p in PKG.iterdir() if p.is_dir() and p.name != "__pycache__"} == {*LAYERS, *data}
    assert not [p for d in data for p in (PKG / d).rglob("*.py")]
    for layer in LAYERS:
        assert len(_modules(layer)) > 1


@pytest.mark.parametrize("layer", LAYERS)
def test_imports_only_go_down(layer):
    for path in _modules(layer):
        for mod in _imports(path):
            parts = mod.split(".")
            if parts[0] != "fiesnap" or mod == "fiesnap.errors" or len(parts) < 2:
                continue
            target = parts[1]
            assert target == layer or target in ALLOWED[layer], (
                f"{path.relative_to(PKG.parent)} imports {mod}: {layer} may import only "
                f"{sorted(ALLOWED[layer] | {layer})} and fiesnap.errors")


def test_the_model_does_no_io():
    for path in _modules("model"):
        for mod in _imports(path):
            assert mod.split(".")[0] not in IO_MODULES, f"{path.name} imports {mod}: the model is pure"


def test_no_module_is_long_without_a_reason():
    """A module above the limit says at its top why it is one module."""
    for path in sorted(PKG.rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > MAX_LINES:
            head = ast.get_docstring(ast.parse(text)) or ""
            assert "One module because" in head, (
                f"{path.relative_to(PKG.parent)} has {text.count(chr(10))} lines and no reason at its top")


def test_the_rules_catch_a_climbing_import(tmp_path, monkeypatch):
    """The check itself: a model module importing a kernel adapter is reported."""
    bad = tmp_path / "fiesnap" / "model"
    bad.mkdir(parents=True)
    (bad / "a.py").write_text("from fiesnap.kernel.dm import DeviceMapper\nimport os\n")
    (bad / "b.py").write_text("x = 1\n")
    monkeypatch.setattr(__import__(__name__), "PKG", tmp_path / "fiesnap")
    with pytest.raises(AssertionError, match="model may import only"):
        test_imports_only_go_down("model")
    with pytest.raises(AssertionError, match="the model is pure"):
        test_the_model_does_no_io()
