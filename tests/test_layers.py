"""The one-way layering (pyproject's import-linter contract) holds, and a back-import breaks it."""

import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
CHECK = [sys.executable, str(ROOT / "scripts/check_layers.py")]


def check(*args):
    return subprocess.run([*CHECK, *args], capture_output=True, text=True)


def test_the_tree_keeps_the_layers():
    result = check()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_a_planted_back_import_breaks_the_contract():
    result = check("--plant", "clipship.merge.engine:clipship.exporter.onnx_export")
    assert result.returncode != 0
    assert "clipship.merge.engine -> clipship.exporter.onnx_export" in result.stdout


def test_every_core_module_is_in_a_layer():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    named = {
        name.strip()
        for layer in config["contracts"][0]["layers"]
        for name in layer.replace("|", ":").split(":")
    }
    modules = {f"clipship.{p.stem}" for p in (ROOT / "clipship").glob("*.py")}
    assert modules - {"clipship.__init__"} <= named
