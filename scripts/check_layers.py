"""Check the one-way layering of clipship with import-linter (the contract is in pyproject.toml).

The stages live at the repository root and are mapped into the ``clipship`` package by
pyproject's ``package-dir``; import-linter reads a package from its folder, so this lays the
package out as installed (links to the sources, in a temporary folder) and runs ``lint-imports``
there. ``--plant MODULE:IMPORTED`` adds ``import IMPORTED`` to MODULE first (the test suite uses
it to show that a back-import breaks the contract).

    python scripts/check_layers.py [--plant clipship.merge.engine:clipship.release]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def lay_out(target: Path) -> None:
    """The installed shape of the ``clipship`` package, under ``target``."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = config["package-dir"]
    for package in config["packages"]:
        parent, _, leaf = package.rpartition(".")
        source = ROOT / mapped[package] if package in mapped else ROOT / mapped[parent] / leaf
        folder = target.joinpath(*package.split("."))
        folder.mkdir(parents=True, exist_ok=True)
        for module in source.glob("*.py"):
            (folder / module.name).symlink_to(module)


def plant(target: Path, module: str, imported: str) -> None:
    path = target.joinpath(*module.split(".")).with_suffix(".py")
    text = path.read_text()
    path.unlink()  # a link to the source: write a copy instead
    path.write_text(f"import {imported}  # planted\n{text}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plant", help="MODULE:IMPORTED, a back-import to add first")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="clipship-layers-") as tmp:
        target = Path(tmp)
        lay_out(target)
        if args.plant:
            plant(target, *args.plant.split(":"))
        shutil.copy(ROOT / "pyproject.toml", target / "pyproject.toml")
        linter = Path(sys.executable).with_name("lint-imports")
        env = {**os.environ, "PYTHONPATH": str(target)}
        # from the temporary folder, so Python finds this layout before the installed package
        return subprocess.run([str(linter), "--no-cache"], cwd=target, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
