"""The `clipship` command line: the merge contract, outputs that load, and one-line errors."""

import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from clipship.cli import app

from .conftest import FIXTURE, TASKS, load_weights, write_model

runner = CliRunner()
PRE = str(FIXTURE / "pretrained")
POOL = [arg for t in TASKS for arg in ("--model", f"{t}={FIXTURE / t}")]


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """Model folders that are each wrong in one way."""
    root = tmp_path_factory.mktemp("broken")
    a = load_weights(FIXTURE / "task_a")
    out = {}
    nan = dict(a)
    nan["vision_model.post_layernorm.weight"] = nan["vision_model.post_layernorm.weight"].clone()
    nan["vision_model.post_layernorm.weight"][3] = float("nan")
    out["nan"] = write_model(root / "nan", nan, FIXTURE / "task_a")
    inf = dict(a)
    inf["vision_model.pre_layrnorm.bias"] = torch.full_like(
        a["vision_model.pre_layrnorm.bias"], float("inf")
    )
    out["inf"] = write_model(root / "inf", inf, FIXTURE / "task_a")
    missing = {k: v for k, v in a.items() if "layers.3.mlp.fc2.bias" not in k}
    out["missing"] = write_model(root / "missing", missing, FIXTURE / "task_a")
    out["fp16"] = write_model(
        root / "fp16", {k: v.half() for k, v in a.items()}, FIXTURE / "task_a"
    )
    patch16 = dict(a)
    patch16["vision_model.embeddings.patch_embedding.weight"] = torch.zeros(64, 3, 16, 16)
    folder = write_model(root / "patch16", patch16, FIXTURE / "task_a")
    config = json.loads((folder / "config.json").read_text())
    config["patch_size"] = 16
    config["image_size"] = 64  # the same 4×4 patch grid: a consistent model of another shape
    (folder / "config.json").write_text(json.dumps(config))
    out["patch16"] = folder
    truncated = write_model(root / "truncated", a, FIXTURE / "task_a")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    out["truncated"] = truncated
    garbage = write_model(root / "garbage", a, FIXTURE / "task_a")
    (garbage / "model.safetensors").write_bytes(
        b"\x10\x00\x00\x00\x00\x00\x00\x00{{{{ not json }}}}"
    )
    out["garbage"] = garbage
    pickled = root / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((FIXTURE / "task_a/config.json").read_text())
    torch.save(a, pickled / "pytorch_model.bin")
    out["pickled"] = pickled
    return out


BAD = {
    "missing path": (
        ["--pretrained", PRE, "--model", "a=/nonexistent/model", "--method", "ties"],
        "/nonexistent/model",
    ),
    "unknown method": (
        ["--pretrained", PRE, *POOL, "--method", "soup"],
        "unknown merge method 'soup'",
    ),
    "unknown parameter": (
        ["--pretrained", PRE, *POOL, "--method", "ties", "--param", "k=3"],
        "no parameter 'k'",
    ),
    "lambda nan": (
        ["--pretrained", PRE, *POOL, "--method", "ties", "--lambda", "nan"],
        "not a finite number",
    ),
    "lambda inf": (
        ["--pretrained", PRE, *POOL, "--method", "task_arithmetic", "--lambda", "inf"],
        "not a finite number",
    ),
    "lambda text": (
        ["--pretrained", PRE, *POOL, "--method", "task_arithmetic", "--lambda", "big"],
        "scaling_factor='big'",
    ),
    "lambda on average": (
        ["--pretrained", PRE, *POOL, "--method", "simple_average", "--lambda", "1"],
        "no parameter 'scaling_factor'",
    ),
    "threshold 0": (
        ["--pretrained", PRE, *POOL, "--method", "ties", "--threshold", "0"],
        "must be in (0, 100]",
    ),
    "threshold 150": (
        ["--pretrained", PRE, *POOL, "--method", "ties", "--threshold", "150"],
        "must be in (0, 100]",
    ),
    "bad merge_func": (
        ["--pretrained", PRE, *POOL, "--method", "ties", "--param", "merge_func=avg"],
        "choose one of sum, mean, max",
    ),
    "no models": (["--pretrained", PRE, "--method", "task_arithmetic"], "needs at least 1"),
    "weights count": (
        ["--pretrained", PRE, *POOL, "--method", "weighted_average", "--param", "weights=1,2"],
        "2 weights given for 4 models",
    ),
    "no pool": (["--method", "ties"], "no pool"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_and_leaves_nothing(case, tmp_path):
    args, message = BAD[case]
    result = cli("merge", *args, "--out", tmp_path / "out", "--quiet")
    assert result.exit_code != 0
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert message in result.stderr
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "kind, message",
    [
        ("nan", "has NaN or Inf values"),
        ("inf", "has NaN or Inf values"),
        ("missing", "lacks vision_model.encoder.layers.3.mlp.fc2.bias"),
        ("fp16", "is F16 in task_x, F32 in _pretrained_"),
        ("patch16", "pool mixes architectures: task_x has patch_size=16"),
        ("truncated", "truncated"),
        ("garbage", "corrupt"),
        ("pickled", "--allow-pickle"),
    ],
)
def test_bad_models_are_refused(kind, message, broken, tmp_path):
    result = cli(
        "merge",
        "--pretrained",
        PRE,
        *POOL,
        "--model",
        f"task_x={broken[kind]}",
        "--method",
        "ties",
        "--out",
        tmp_path / "out",
    )
    assert result.exit_code == 1, result.output
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_pickles_load_only_with_the_flag(broken, tmp_path):
    base = ["merge", "--pretrained", PRE, "--method", "task_arithmetic", "--vision-only", "--quiet"]
    assert (
        cli(
            *base, "--model", f"a={broken['pickled']}", "--out", tmp_path / "p", "--allow-pickle"
        ).exit_code
        == 0
    )
    assert cli(*base, "--model", f"a={FIXTURE / 'task_a'}", "--out", tmp_path / "s").exit_code == 0
    assert (tmp_path / "p/model.safetensors").read_bytes() == (
        tmp_path / "s/model.safetensors"
    ).read_bytes()


def test_existing_output_needs_force_which_replaces_it(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    args = ["merge", "--pretrained", PRE, *POOL, "--method", "ties", "--out", out, "--quiet"]
    result = cli(*args)
    assert result.exit_code == 1 and "already exists (pass --force" in result.stderr
    assert (out / "old.txt").exists()
    assert cli(*args, "--force").exit_code == 0
    assert not (out / "old.txt").exists() and (out / "model.safetensors").exists()
    assert leftovers(tmp_path) == []


def test_merge_writes_a_full_clip_model_that_transformers_loads(tmp_path):
    from transformers import CLIPModel, CLIPVisionModel, pipeline

    out = tmp_path / "merged"
    result = cli(
        "merge",
        "--pretrained",
        PRE,
        *POOL,
        "--method",
        "ties",
        "--lambda",
        "0.3",
        "--threshold",
        "20",
        "--out",
        out,
        "--json",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["method"] == "ties" and summary["parameters"]["threshold"] == 20.0
    assert set(summary["files"]) == {"model.safetensors", "clipship_recipe.json"}
    clip = CLIPModel.from_pretrained(out)
    pretrained = CLIPModel.from_pretrained(PRE)
    assert torch.equal(
        clip.text_model.embeddings.token_embedding.weight,
        pretrained.text_model.embeddings.token_embedding.weight,
    )
    assert torch.equal(clip.visual_projection.weight, pretrained.visual_projection.weight)
    merged_vision = load_weights(out)["vision_model.post_layernorm.weight"]
    assert torch.equal(clip.vision_model.post_layernorm.weight.detach(), merged_vision)
    vision = CLIPVisionModel.from_pretrained(out)
    assert torch.equal(state(vision)["post_layernorm.weight"], merged_vision)
    from PIL import Image

    classify = pipeline("zero-shot-image-classification", model=str(out))
    # The fixture's byte-level tokenizer has 16 positions: keep prompts short.
    image = Image.new("RGB", (40, 40), "red")
    scores = classify(image, candidate_labels=["cat", "dog"], hypothesis_template="{}")
    assert {s["label"] for s in scores} == {"cat", "dog"}


def test_vision_only_output_loads_as_clip_vision_model(tmp_path):
    from transformers import CLIPVisionModel

    out = tmp_path / "vision"
    assert (
        cli(
            "merge",
            "--pretrained",
            PRE,
            *POOL,
            "--method",
            "task_arithmetic",
            "--vision-only",
            "--out",
            out,
            "--quiet",
        ).exit_code
        == 0
    )
    model = CLIPVisionModel.from_pretrained(out)
    weights = load_weights(out)
    assert all(k.startswith("vision_model.") for k in weights)
    assert torch.equal(
        state(model)["post_layernorm.bias"], weights["vision_model.post_layernorm.bias"]
    )


def state(model):
    """A CLIPVisionModel's tensors without the prefix (transformers 5.23 has none, 5.17 has one)."""
    return {k.removeprefix("vision_model."): v for k, v in model.state_dict().items()}


def test_recipe_rerun_is_byte_identical(tmp_path):
    first = tmp_path / "first"
    assert (
        cli(
            "merge",
            "--pretrained",
            PRE,
            *POOL,
            "--method",
            "dare",
            "--param",
            "base=ties",
            "--seed",
            "5",
            "--out",
            first,
            "--quiet",
        ).exit_code
        == 0
    )
    recipe = json.loads((first / "clipship_recipe.json").read_text())
    assert (
        recipe["method"] == "dare"
        and recipe["seed"] == 5
        and recipe["parameters"]["base"] == "ties"
    )
    assert [m["name"] for m in recipe["models"]] == TASKS
    assert all(len(h) == 64 for m in recipe["models"] for h in m["files"].values())
    assert {"torch", "transformers", "safetensors", "clipship"} <= set(recipe["versions"])
    # Local folders are named, never located, by a (publishable) recipe.
    text = (first / "clipship_recipe.json").read_text()
    assert str(FIXTURE) not in text and str(tmp_path) not in text
    assert recipe["pretrained"]["source"] == "pretrained" and "path" not in recipe["pretrained"]
    again = tmp_path / "again"

    def replay(*sources):
        return cli(
            "merge", "--recipe", first / "clipship_recipe.json", *sources, "--out", again, "--quiet"
        )

    result = replay()
    assert result.exit_code == 1 and result.stderr == (
        "error: the pretrained model was merged from a local folder (pretrained), which a recipe does not "
        "locate: give it with --pretrained PATH (or --pool); its files are checked against the "
        "recipe's sha256\n"
    )
    result = replay("--pretrained", PRE)
    assert result.exit_code == 1 and "task_a was merged from a local folder" in result.stderr
    result = replay("--pretrained", PRE, *POOL)
    assert result.exit_code == 0, result.stderr
    assert (again / "model.safetensors").read_bytes() == (first / "model.safetensors").read_bytes()
    assert (again / "clipship_recipe.json").read_bytes() == (
        first / "clipship_recipe.json"
    ).read_bytes()


def test_recipe_refuses_changed_sources(tmp_path):
    models = {
        t: write_model(tmp_path / t, load_weights(FIXTURE / t), FIXTURE / t) for t in TASKS[:2]
    }
    args = [a for t, p in models.items() for a in ("--model", f"{t}={p}")]
    assert (
        cli(
            "merge",
            "--pretrained",
            PRE,
            *args,
            "--method",
            "ties",
            "--out",
            tmp_path / "m",
            "--quiet",
        ).exit_code
        == 0
    )
    write_model(
        tmp_path / "task_b",
        {k: v + 1e-3 for k, v in load_weights(FIXTURE / "task_b").items()},
        FIXTURE / "task_b",
    )
    result = cli(
        "merge",
        "--recipe",
        tmp_path / "m/clipship_recipe.json",
        "--pretrained",
        PRE,
        *args,
        "--out",
        tmp_path / "again",
        "--quiet",
    )
    assert (
        result.exit_code == 1
        and "task_b" in result.stderr
        and "changed since the recipe" in result.stderr
    )
    wrong = cli(
        "merge",
        "--recipe",
        tmp_path / "m/clipship_recipe.json",
        "--model",
        f"task_z={PRE}",
        "--out",
        tmp_path / "z",
    )
    assert wrong.exit_code == 1 and "--model task_z: not in the recipe" in wrong.stderr
    assert not (tmp_path / "again").exists()


def test_pool_yaml_as_fusionbench_writes_it(tmp_path):
    pool = tmp_path / "clip-vit-tiny_TA4.yaml"
    pool.write_text(
        "defaults:\n  - CLIPVisionModelPool@: _template\n"
        "_target_: fusion_bench.modelpool.CLIPVisionModelPool\n_recursive_: false\n"
        f"processor: {PRE}\n"
        "models:\n"
        f"  _pretrained_:\n    _target_: transformers.CLIPModel.from_pretrained\n"
        f"    pretrained_model_name_or_path: {PRE}\n"
        + "".join(f"  {t}: {FIXTURE / t}\n" for t in TASKS)
    )
    assert (
        cli(
            "merge",
            "--pool",
            pool,
            "--method",
            "task_arithmetic",
            "--out",
            tmp_path / "a",
            "--quiet",
        ).exit_code
        == 0
    )
    assert (
        cli(
            "merge",
            "--pretrained",
            PRE,
            *POOL,
            "--method",
            "task_arithmetic",
            "--out",
            tmp_path / "b",
            "--quiet",
        ).exit_code
        == 0
    )
    assert (tmp_path / "a/model.safetensors").read_bytes() == (
        tmp_path / "b/model.safetensors"
    ).read_bytes()


def test_sharded_output_loads(tmp_path):
    from transformers import CLIPModel

    out = tmp_path / "sharded"
    assert (
        cli(
            "merge",
            "--pretrained",
            PRE,
            *POOL,
            "--method",
            "ties",
            "--max-shard-size",
            "200KB",
            "--out",
            out,
            "--quiet",
        ).exit_code
        == 0
    )
    assert (out / "model.safetensors.index.json").exists() and not (
        out / "model.safetensors"
    ).exists()
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 2
    CLIPModel.from_pretrained(out)


def test_info_and_methods_and_similarity(tmp_path):
    result = cli("info", FIXTURE / "task_a", PRE, "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert rows[0]["model_info"] == {
        "trainable_params": 147584,
        "all_params": 147584,
        "trainable_percentage": 1.0,
    }
    assert rows[1]["architecture"] == "CLIPModel" and rows[1]["vision_params"] == 147584
    assert rows[1]["vision"]["patch_size"] == 8 and rows[1]["text"]["vocab_size"] == 514
    result = cli("methods", "--json")
    assert result.exit_code == 0, (result.output, result.exception)
    table = json.loads(result.stdout)
    assert {m["name"] for m in table} == {
        "simple_average",
        "weighted_average",
        "task_arithmetic",
        "ties",
        "dare",
        "magmax",
        "task_singular_vector",
        "iso_c",
        "iso_cts",
        "wudi",
        "model_stock",
        "slerp",
        "magnitude_prune",
        "regmean",
        "regmean_plusplus",
        "fisher_merging",
        "adamerging",
        "concrete_task_arithmetic",
        "concrete_adamerging",
        "weight_ensembling_moe",
        "sparse_weight_ensembling_moe",
    }
    assert all(m["paper"].startswith("https://") for m in table)
    reads = {m["name"]: m["reads"] for m in table if m["reads"]}
    assert reads == {
        "regmean": "train",
        "regmean_plusplus": "train",
        "fisher_merging": "train",
        "adamerging": "test",
        "concrete_task_arithmetic": "test",
        "concrete_adamerging": "test",
        "weight_ensembling_moe": "test",
        "sparse_weight_ensembling_moe": "test",
    }
    wudi = next(m for m in table if m["name"] == "wudi")["params"]
    assert wudi["iter_num"]["default"] == 400 and wudi["exclude_keys"]["default"] is None
    result = cli("analyze", "similarity", "--pretrained", PRE, *POOL, "--out", tmp_path, "--json")
    assert result.exit_code == 0 and len(json.loads(result.stdout)["matrix"]) == 4
    assert (
        cli(
            "analyze", "similarity", "--pretrained", PRE, *POOL[:2], "--out", tmp_path / "x"
        ).exit_code
        == 1
    )


def test_help_is_fast_because_it_imports_no_heavy_library():
    code = "import sys; from clipship.cli import app; print(sorted(m for m in ('torch', 'transformers', 'huggingface_hub') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    result = subprocess.run(
        [sys.executable, "-m", "clipship.cli", "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "100"},
    )
    assert result.returncode == 0 and "merge" in result.stdout
