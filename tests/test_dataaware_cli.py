"""Data-aware merges through `clipship merge`: the images come from the tasks' data (here
--data-dir), FusionBench's recorded order through --data-order, and the recipe replays them."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from clipship.cli import app

from .conftest import DATA, max_abs_diff

HERE = DATA / "dataaware"
FIXTURE, REFERENCE = HERE / "fixture", HERE / "reference"
PRETRAINED = DATA / "evalref" / "fixture" / "pretrained"
NAMES = ["mnist", "svhn", "eurosat"]
POOL = ["--pretrained", str(PRETRAINED)]
for _name in NAMES:
    POOL += ["--model", f"{_name}={FIXTURE / _name}"]


def cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result


def order_file(tmp_path, algo: str) -> str:
    """FusionBench's recorded order as {task: rows}."""
    recorded = json.loads((REFERENCE / algo / "info.json").read_text())["data_order"]
    order = {key.split("/")[1]: rows for key, rows in recorded.items()}
    path = tmp_path / f"{algo}-order.json"
    path.write_text(json.dumps(order))
    return str(path)


def vision(folder) -> dict:
    return {k: v for k, v in load_file(str(folder / "model.safetensors")).items()
            if k.startswith("vision_model.")}  # fmt: skip


@pytest.mark.numerics
@pytest.mark.parametrize(
    "method, algo, extra, tolerance",
    [
        ("regmean", "regmean", ["--data-examples", 64, "--batch-size", 16], 1e-3),
        ("fisher_merging", "fisher", ["--data-examples", 64, "--batch-size", 16], 1e-5),
        ("adamerging", "taskwise_adamerging", ["--param", "granularity=task",
                                               "--param", "max_steps=40"], 1e-5),
    ],
)  # fmt: skip
def test_cli_merge_matches_fusionbench_and_the_recipe_replays(
    tmp_path, method, algo, extra, tolerance
):
    data = ["--data-dir", FIXTURE / "data"]
    order = [] if method == "fisher_merging" else ["--data-order", order_file(tmp_path, algo)]
    out = tmp_path / "merged"
    result = cli("merge", *POOL, "--method", method, *extra, *data, *order, "--out", out, "-q")
    assert result.exit_code == 0, result.output
    reference = load_file(str(REFERENCE / algo / "merged.safetensors"))
    assert max_abs_diff(vision(out), reference) <= tolerance
    recipe = json.loads((out / "clipship_recipe.json").read_text())
    assert set(recipe["data"]["tasks"]) == set(NAMES)
    assert all(len(entry["sha256"]) == 64 for entry in recipe["data"]["tasks"].values())

    again = tmp_path / "again"
    result = cli("merge", "--recipe", out / "clipship_recipe.json", *POOL, *data, "--out", again)
    assert result.exit_code == 0, result.output
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_adamerging_weights_learned_once_then_reused_without_data(tmp_path):
    steps = ["--param", "max_steps=3", "--param", "granularity=layer", "--data-examples", 20]
    learned = tmp_path / "weights.safetensors"
    first = tmp_path / "first"
    result = cli("merge", *POOL, "--method", "adamerging", *steps, "--data-dir",
                 FIXTURE / "data", "--save-merging-weights", learned, "--out", first, "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    weights = load_file(str(learned))["merging_weights"]
    assert weights.shape == (3, 71)
    recipe = json.loads((first / "clipship_recipe.json").read_text())
    for entry in recipe["data"]["tasks"].values():
        # 3 steps from the first 20 test images: an epoch of 16 + 4 (short), then 16
        assert entry["split"] == "test" and len(entry["rows"]) == 36
        assert max(entry["rows"]) < 20 and entry["epoch_size"] == 20
    second = tmp_path / "second"
    result = cli("merge", *POOL, "--method", "adamerging", "--merging-weights", learned,
                 "--out", second, "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert max_abs_diff(vision(second), vision(first)) <= 1e-6


def test_data_aware_requests_are_checked_first(tmp_path):
    out = tmp_path / "out"
    result = cli("merge", *POOL, "--method", "ties", "--data-dir", FIXTURE / "data", "--out", out)
    assert (
        result.exit_code == 1 and result.stderr == "error: ties reads no images: drop --data-dir\n"
    )
    odd = ["--pretrained", PRETRAINED, "--model", f"digits={FIXTURE / 'mnist'}"]
    result = cli("merge", *odd, "--method", "regmean", "--data-dir", FIXTURE / "data", "--out", out)
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert "unknown task 'digits'" in result.stderr
    result = cli("merge", *POOL, "--method", "ties", "--data-examples", 5, "--out", out)
    assert result.stderr == "error: ties reads no images: drop --data-examples\n"
    assert not out.exists()
