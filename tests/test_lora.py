"""LoRA task models: PEFT adapters made here with ``peft`` on the parity fixture's vision tower,
merged by clipship as the encoders ``merge_and_unload`` gives, tensor by tensor."""

import json

import pytest
import torch

from clipship.errors import ClipshipError
from clipship.merge.dataaware.common import load_vision
from clipship.merge.matrices import canonical
from clipship.pool import open_pool, read_pool_yaml

from .conftest import FIXTURE, load_weights, max_abs_diff, run_cli, write_model

peft = pytest.importorskip("peft")  # a dev dependency (pyproject); clipship reads adapters itself

PRETRAINED = FIXTURE / "pretrained"
TASKS = ["task_a", "task_b", "task_c"]


def make_adapter(folder, seed: int, on_vision_model: bool, **config):
    """A LoRA adapter with random A and B (peft starts B at zero: no change) on q/v/fc1, saved
    with ``save_pretrained``; and the vision tensors ``merge_and_unload`` makes of it. On the
    vision model the keys are ``encoder.…`` (FusionBench's layout: it adapts the vision
    transformer); on a whole ``CLIPModel`` they are ``vision_model.encoder.…``."""
    from peft import LoraConfig, get_peft_model
    from transformers import CLIPModel, CLIPVisionModel

    torch.manual_seed(seed)
    if on_vision_model:
        model, targets = CLIPVisionModel.from_pretrained(PRETRAINED), ["q_proj", "v_proj", "fc1"]
    else:
        model = CLIPModel.from_pretrained(PRETRAINED)
        targets = r".*vision_model.*\.(q_proj|v_proj|fc1)"
    settings = {"r": 4, "lora_alpha": 8, "target_modules": targets, **config}
    adapted = get_peft_model(model, LoraConfig(**settings))
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.05)
    adapted.save_pretrained(folder)
    state = adapted.merge_and_unload().state_dict()
    keep = (lambda k: True) if on_vision_model else (lambda k: k.startswith("vision_model."))
    return folder, {k: v for k, v in state.items() if keep(k) and "position_ids" not in k}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    out = {}
    for i, task in enumerate(TASKS):
        folder, merged = make_adapter(root / task, i, on_vision_model=i != 1, use_rslora=i == 2)
        dense = write_model(root / f"{task}_merged", merged, FIXTURE / "task_a")
        out[task] = (folder, dense)
    return out


def test_a_lora_member_reads_as_peft_merge_and_unload(adapters):
    pool = open_pool(str(PRETRAINED), {t: str(a) for t, (a, _) in adapters.items()})
    try:
        for task, model in zip(TASKS, pool.models):
            reference = load_weights(adapters[task][1])
            ours = {name: model.read(name) for name in pool.tensor_names}
            assert max_abs_diff(ours, reference) <= 1e-6, task
            vision = load_vision(model)  # data-aware methods load task models whole
            loaded = {canonical(n): t.detach() for n, t in vision.named_parameters()}
            assert max_abs_diff(loaded, reference) <= 1e-6, task
            changed = [n for n in ours if not torch.equal(ours[n], pool.pretrained.read(n))]
            assert changed and all(n.endswith(("q_proj.weight", "v_proj.weight", "fc1.weight"))
                                   for n in changed)  # fmt: skip
    finally:
        pool.close()


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_a_lora_pool_merges_like_the_merged_encoders(adapters, tmp_path, method):
    outputs = {}
    for kind, index in (("lora", 0), ("dense", 1)):
        models = [a for t in TASKS for a in ("--model", f"{t}={adapters[t][index]}")]
        outputs[kind] = tmp_path / kind
        result = run_cli(
            "merge", "--pretrained", PRETRAINED, *models, "--method", method,
            "--out", outputs[kind], "--quiet",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
    lora, dense = load_weights(outputs["lora"]), load_weights(outputs["dense"])
    assert max_abs_diff(lora, dense) <= 1e-6
    recipe = json.loads((outputs["lora"] / "clipship_recipe.json").read_text())
    assert set(recipe["models"][0]["files"]) == {"adapter_model.safetensors"}


def edited(adapters, tmp_path, change):
    import shutil

    folder = tmp_path / "edited"
    shutil.copytree(adapters["task_a"][0], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    change(config)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.update(base_model_name_or_path="someone/other-clip"), "made on someone"),
        (lambda c: c.update(r=8), "do not have the rank r=8"),
        (lambda c: c.update(use_dora=True), "DoRA"),
        (lambda c: c.update(rank_pattern={"fc1": 2}), "rank_pattern"),
        (lambda c: c.update(modules_to_save=["post_layernorm"]), "modules_to_save"),
        (lambda c: c.update(peft_type="IA3"), "IA3 adapter"),
    ],
)
def test_an_adapter_clipship_cannot_reproduce_is_one_line(adapters, tmp_path, change, message):
    folder = edited(adapters, tmp_path, change)
    with pytest.raises(ClipshipError, match=message):
        open_pool(str(PRETRAINED), {"task_a": str(folder)})
    result = run_cli(
        "merge", "--pretrained", PRETRAINED, "--model", f"task_a={folder}",
        "--model", f"task_b={adapters['task_b'][0]}", "--method", "task_arithmetic",
        "--out", tmp_path / "out",
    )  # fmt: skip
    assert result.returncode != 0 and result.stderr.startswith("error: ")
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_fusionbenchs_lora_pool_entries_read_as_they_are(adapters, tmp_path):
    lines = [
        "_target_: fusion_bench.modelpool.CLIPVisionModelPool",
        "models:",
        "  _pretrained_:",
        "    _target_: fusion_bench.models.linearized.vision_model.load_fft_vision_model_hf",
        f"    model_name: {PRETRAINED}",
    ]
    for task in TASKS[:2]:
        lines += [
            f"  {task}:",
            "    _target_: fusion_bench.models.linearized.vision_model.load_lora_vision_model_hf",
            f"    base_model_name: {PRETRAINED}",
            f"    peft_name: {adapters[task][0]}",
            "    merge_and_unload: true",
        ]
    path = tmp_path / "pool.yaml"
    path.write_text("\n".join(lines) + "\n")
    pretrained, models = read_pool_yaml(path)
    assert pretrained == str(PRETRAINED)
    assert models == {t: str(adapters[t][0]) for t in TASKS[:2]}
    path.write_text(
        path.read_text().replace(f"base_model_name: {PRETRAINED}", "base_model_name: x/y", 1)
    )
    with pytest.raises(ClipshipError, match="base_model_name x/y"):
        read_pool_yaml(path)
