"""clipship: merge, evaluate, export and ship CLIP vision encoders.

The stages are subpackages (``clipship.merge``, ``clipship.eval``, ``clipship.exporter``,
``clipship.cards``); this package holds the CLI and the shared core (model pool, safetensors
I/O, errors, recipe). Importing it is cheap: torch and transformers load only when used.
"""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"

# In a source checkout the stages sit beside this folder (merge/, eval/, ...), mapped into the
# package by pyproject.toml. Python started from the checkout root finds this folder first and
# would miss them, so point the package path at the root too; installed copies never need it.
_root = Path(__file__).resolve().parent.parent
if (_root / "merge" / "__init__.py").is_file() and (_root / "pyproject.toml").is_file():
    __path__.append(str(_root))  # noqa: F821  (module __path__)
