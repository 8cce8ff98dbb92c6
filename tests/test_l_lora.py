"""L-LoRA task models: FusionBench's linearized adapters (``tests/data/l_lora``, made by
``scripts/fusionbench_l_lora.py`` with FusionBench's own linearization and loader), read as the
encoders FusionBench's linearized forward computes, and merged in adapter space."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from clipship.errors import ClipshipError
from clipship.merge.dataaware.common import load_vision
from clipship.pool import open_pool, read_pool_yaml

from .conftest import FIXTURE, load_weights, max_abs_diff, run_cli, write_model

DATA = Path(__file__).parent / "data" / "l_lora"
PRETRAINED = FIXTURE / "pretrained"
TASKS = ["task_a", "task_b", "task_c"]  # linearized around one point, as one fine-tuning run
REFERENCE = load_file(str(DATA / "reference.safetensors"))
PIXELS = REFERENCE["pixels"]
TOL = 1e-5  # float32 rounding: a folded weight against jvp's two products


def pooler(vision) -> torch.Tensor:
    with torch.no_grad():
        return vision(pixel_values=PIXELS).pooler_output


def members(tasks, folder=DATA):
    return open_pool(str(PRETRAINED), {t: str(folder / t) for t in tasks})


@pytest.mark.parametrize("task", [*TASKS, "task_x"])
def test_an_l_lora_member_is_fusionbenchs_linearized_model(task):
    """Equal to FusionBench's ``load_l_lora_vision_model_hf`` forward (committed reference);
    ``task_x`` is linearized where B₀ ≠ 0, so every first-order term counts."""
    pool = members([task])
    try:
        ours = pooler(load_vision(pool.models[0]))
    finally:
        pool.close()
    assert (ours - REFERENCE[task]).abs().max().item() <= TOL
    assert (ours - REFERENCE["task_a" if task != "task_a" else "task_b"]).abs().max() > 1e-3


class Linearized(torch.nn.Module):
    """A module evaluated as its first-order Taylor expansion around ``point`` (its parameters'
    values there): f(x; p₀) + J·(p − p₀) by ``torch.func.jvp`` — the linearized forward,
    written here independently of clipship's folded weights."""

    def __init__(self, module: torch.nn.Module, point: dict[str, torch.Tensor]):
        super().__init__()
        self.module, self.point = module, point

    def forward(self, x):
        from torch.func import functional_call, jvp

        names = list(self.point)
        current = dict(self.module.named_parameters())
        primals = tuple(self.point[n] for n in names)
        tangents = tuple(current[n].detach() - self.point[n] for n in names)

        def f(*params):
            return functional_call(self.module, dict(zip(names, params)), (x,))

        out, change = jvp(f, primals, tangents)
        return out + change


def jvp_pooler(adapter: Path) -> torch.Tensor:
    """An L-LoRA adapter folder evaluated with per-layer ``jvp`` on a ``peft`` model."""
    peft = pytest.importorskip("peft")
    from transformers import CLIPVisionModel

    config = peft.LoraConfig.from_pretrained(str(adapter))
    model = peft.get_peft_model(CLIPVisionModel.from_pretrained(PRETRAINED), config).eval()
    stored = load_file(str(adapter / "linearized_adapter_model.safetensors"))
    layers = {}
    for key in stored:
        module, sep, _ = key.partition(".model.lora_")
        if sep:
            layers[module] = model.get_submodule(module)
    for module_name, module in layers.items():
        names = [n for n, _ in module.named_parameters()]
        point = {}
        for i, name in enumerate(names):
            point[name] = stored.get(
                f"{module_name}.params0_values.{i}", module.get_parameter(name)
            )
            if f"{module_name}.model.{name}" in stored:
                module.get_parameter(name).data = stored[f"{module_name}.model.{name}"]
        parent, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent), child, Linearized(module, point))
    return pooler(model)


def test_the_folded_weights_are_the_jvp_forward():
    """Independent of FusionBench's files: the jvp forward of the same adapter."""
    pool = members(["task_x"])
    try:
        ours = pooler(load_vision(pool.models[0]))
    finally:
        pool.close()
    assert (ours - jvp_pooler(DATA / "task_x")).abs().max().item() <= TOL


def factors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "linearized_adapter_model.safetensors"))


def ties_reference(taus: torch.Tensor, keep: float) -> torch.Tensor:
    """FusionBench's TIES on flat task vectors [T, d]: trim (top-k by |τ|, kthvalue), elect
    (sign of the sum, majority where 0), disjoint sum."""
    d = taus.shape[1]
    k = d - int(d * keep)
    kth = taus.abs().kthvalue(k, dim=1, keepdim=True).values
    trimmed = taus * (taus.abs() >= kth)
    signs = torch.sign(trimmed.sum(0))
    signs[signs == 0] = torch.sign(signs.sum())
    agree = torch.where(signs > 0, trimmed > 0, trimmed < 0)
    return (trimmed * agree).sum(0)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "simple_average"])
def test_an_l_lora_pool_merges_in_adapter_space(tmp_path, method):
    out = tmp_path / "merged"
    models = [a for t in TASKS for a in ("--model", f"{t}={DATA / t}")]
    result = run_cli(
        "merge", "--pretrained", PRETRAINED, *models, "--method", method, "--out", out,
        "--quiet", *(["--param", "threshold=20"] if method == "ties" else []),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    recipe = json.loads((out / "clipship_recipe.json").read_text())
    assert recipe["statistics"]["space"] == "l_lora adapter"

    # the adapter: the point plus the method's combination of the factors' displacements
    tasks = [factors(DATA / t) for t in TASKS]
    merged = factors(out / "l_lora")
    assert set(merged) == set(tasks[0])
    trained = sorted(k for k in merged if ".model.lora_" in k)
    points = {k: k2 for k, k2 in zip(trained, sorted(set(merged) - set(trained)))}
    point = torch.cat([tasks[0][points[k]].reshape(-1) for k in trained])
    flat = torch.stack([torch.cat([s[k].reshape(-1) for k in trained]) for s in tasks])
    if method == "task_arithmetic":
        expected = point + 0.3 * (flat - point).sum(0)
    elif method == "ties":
        expected = point + 0.3 * ties_reference(flat - point, 0.2)
    else:
        expected = flat.mean(0)
    ours = torch.cat([merged[k].reshape(-1) for k in trained])
    assert (ours - expected).abs().max().item() <= 1e-6
    for key in set(merged) - set(trained):
        assert torch.equal(merged[key], tasks[0][key])  # the linearization point, kept

    # the folder's encoder is that adapter's linearized model (FusionBench's loader reads it)
    from transformers import CLIPVisionModel

    encoder = CLIPVisionModel.from_pretrained(out).eval()
    config = json.loads((out / "l_lora" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] is None  # a local base is not named (published)
    assert (pooler(encoder) - jvp_pooler(out / "l_lora")).abs().max().item() <= TOL


def test_task_arithmetic_in_adapter_space_is_the_weight_space_merge(tmp_path):
    """Linearization makes it exact: merging the adapters equals merging the encoders they
    make (B₀ = 0, peft's initialisation)."""
    pool = members(TASKS)
    try:
        dense = {}
        for task, model in zip(TASKS, pool.models):
            tensors = {n: model.read(n) for n in pool.tensor_names}
            full = load_weights(PRETRAINED)
            full.update(tensors)
            dense[task] = write_model(tmp_path / task, full, PRETRAINED)
    finally:
        pool.close()
    outputs = {}
    for kind, sources in (("adapters", {t: DATA / t for t in TASKS}), ("encoders", dense)):
        outputs[kind] = tmp_path / f"out_{kind}"
        models = [a for t, s in sources.items() for a in ("--model", f"{t}={s}")]
        result = run_cli(
            "merge", "--pretrained", PRETRAINED, *models, "--method", "task_arithmetic",
            "--out", outputs[kind], "--quiet",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
    assert (
        max_abs_diff(load_weights(outputs["adapters"]), load_weights(outputs["encoders"])) <= 1e-6
    )


@pytest.mark.skipif(
    not os.environ.get("CLIPSHIP_FUSIONBENCH"),
    reason="CLIPSHIP_FUSIONBENCH names an installed fusion_bench's folder (for the live check)",
)
def test_fusionbenchs_loader_reads_the_merged_adapter(tmp_path):
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(
        "fb_l_lora", Path(__file__).parents[1] / "scripts" / "fusionbench_l_lora.py"
    )
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script
    spec.loader.exec_module(script)
    fb = script.fusionbench_linearized(Path(os.environ["CLIPSHIP_FUSIONBENCH"]))
    out = tmp_path / "merged"
    models = [a for t in TASKS for a in ("--model", f"{t}={DATA / t}")]
    result = run_cli(
        "merge", "--pretrained", PRETRAINED, *models, "--method", "ties", "--out", out, "--quiet"
    )
    assert result.returncode == 0, result.stderr
    model = fb.vision_model.load_l_lora_vision_model_hf(str(PRETRAINED), str(out / "l_lora"))
    from transformers import CLIPVisionModel

    ours = pooler(CLIPVisionModel.from_pretrained(out).eval())
    assert (ours - pooler(model.eval())).abs().max().item() <= TOL


def test_adapters_linearized_around_different_points_are_one_line(tmp_path):
    models = [a for t in [*TASKS[:2], "task_x"] for a in ("--model", f"{t}={DATA / t}")]
    result = run_cli(
        "merge", "--pretrained", PRETRAINED, *models, "--method", "task_arithmetic",
        "--out", tmp_path / "out",
    )  # fmt: skip
    assert result.returncode != 0 and result.stderr.startswith("error: ")
    assert "linearized around another point" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    # a method that is not linear merges the encoders the adapters make, like any task models
    result = run_cli(
        "merge", "--pretrained", PRETRAINED, *models, "--method", "magmax",
        "--out", tmp_path / "magmax", "--quiet",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "magmax" / "l_lora").exists()


def test_a_broken_l_lora_file_is_one_line(tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(DATA / "task_a", folder)
    stored = factors(folder)
    dropped = next(k for k in stored if ".params0_values." in k)
    save_file({k: v for k, v in stored.items() if k != dropped},
              str(folder / "linearized_adapter_model.safetensors"))  # fmt: skip
    with pytest.raises(ClipshipError, match="linearization points"):
        open_pool(str(PRETRAINED), {"task_a": str(folder)})


def test_fusionbenchs_l_lora_pool_entries_read_as_they_are(tmp_path):
    lines = ["models:", f"  _pretrained_: {PRETRAINED}"]
    for task in TASKS:
        lines += [
            f"  {task}:",
            "    _target_: fusion_bench.models.linearized.vision_model.load_l_lora_vision_model_hf",
            f"    base_model_name: {PRETRAINED}",
            f"    peft_name: {DATA / task}",
        ]
    path = tmp_path / "pool.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert read_pool_yaml(path) == (str(PRETRAINED), {t: str(DATA / t) for t in TASKS})


def test_an_l_lora_adapter_evaluates_and_exports_as_its_linearized_model(tmp_path):
    """``eval`` and ``export`` take an adapter folder (its base from ``--pretrained`` or its
    config): the folded model is the linearized forward, so the export validates like any."""
    from PIL import Image

    from clipship.runtime.model import load_zero_shot

    zero_shot, folder, _ = load_zero_shot(str(DATA / "task_x"), str(PRETRAINED), "cpu")
    assert folder == PRETRAINED.resolve() or folder == PRETRAINED
    assert (pooler(zero_shot.vision) - REFERENCE["task_x"]).abs().max().item() <= TOL

    shapes = tmp_path / "shapes"
    generator = torch.Generator().manual_seed(0)
    for name in ("o", "x"):  # the fixture's text tower takes 16 tokens
        (shapes / name).mkdir(parents=True)
        for i in range(4):
            pixels = torch.randint(0, 256, (32, 32, 3), generator=generator, dtype=torch.uint8)
            Image.fromarray(pixels.numpy()).save(shapes / name / f"{i}.png")
    (tmp_path / "templates.txt").write_text("{c}\n")
    task = ("--task", f"shapes={shapes}", "--templates", tmp_path / "templates.txt")
    result = run_cli("heads", PRETRAINED, "--tasks", "", *task, "--out", tmp_path / "heads")
    assert result.returncode == 0, result.stderr
    result = run_cli(
        "export", DATA / "task_x", "--pretrained", PRETRAINED, "--heads", tmp_path / "heads",
        "--out", tmp_path / "onnx", "--validation-data", shapes / "o",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "onnx" / "model.onnx").is_file()
    result = run_cli("eval", DATA / "task_x", "--pretrained", PRETRAINED, *task, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["shapes"]["samples"] == 8
    result = run_cli("eval", DATA / "task_x", *task)
    assert result.returncode != 0 and "names no base model: pass --pretrained" in result.stderr
