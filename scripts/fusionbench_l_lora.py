"""Make the L-LoRA test data: adapters in FusionBench's format on the parity fixture, and what
FusionBench's own loader and linearized forward make of them.

    python scripts/fusionbench_l_lora.py --fusionbench SITE_PACKAGES_OR_SOURCE_DIR

FusionBench (0.2.33) is not imported as a package (its ``__init__`` pulls in Lightning and
Hydra): ``fusion_bench/models/linearized/{linearized_model_utils,vision_model}.py`` are executed
as a stand-in package; they need only torch, transformers, peft and huggingface_hub.

Writes ``tests/data/l_lora/``:

- ``task_a``, ``task_b``, ``task_c``: L-LoRA adapters (r=4, α=8 on q_proj, v_proj and fc1) made
  as FusionBench's ``clip_finetune`` starts one (``get_peft_model``, then
  ``linearize_lora_model_``), all from the same seed, so they share the linearization point
  (A₀ random, B₀ = 0, peft's initialisation), with trained factors replaced by seeded noise;
- ``task_x``: one whose linearization point has B₀ ≠ 0 (the general first-order term);
- ``reference.safetensors``: ``pooler_output`` of each adapter loaded with FusionBench's
  ``load_l_lora_vision_model_hf`` on seeded pixels (``pixels``), in eval mode.

Each adapter folder holds ``adapter_config.json`` and ``linearized_adapter_model.safetensors``
with the keys FusionBench's ``convert_l_lora_state_dict_to_hf`` writes (each wrapped layer's
trainable parameters and their ``params0_values``).
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "parity" / "fixture" / "pretrained"
OUT = ROOT / "tests" / "data" / "l_lora"
TARGETS = ["q_proj", "v_proj", "fc1"]


def fusionbench_linearized(root: Path) -> types.ModuleType:
    """FusionBench's ``fusion_bench.models.linearized`` modules, loaded from their files."""
    from transformers.models.clip import modeling_clip

    folder = root / "fusion_bench" / "models" / "linearized"
    # vision_model.py names CLIPVisionTransformer in annotations only; transformers 5 dropped it
    if not hasattr(modeling_clip, "CLIPVisionTransformer"):
        modeling_clip.CLIPVisionTransformer = torch.nn.Module
    package = types.ModuleType("fb_linearized")
    package.__path__ = [str(folder)]
    sys.modules["fb_linearized"] = package
    for name in ("linearized_model_utils", "vision_model"):
        path = folder / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"fb_linearized.{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        setattr(package, name, module)
    package.vision_model.CLIPVisionModel = VisionModel
    return package


class VisionModel:
    """transformers 5's ``CLIPVisionModel`` is the vision transformer itself (4.x, which
    FusionBench 0.2.33 was written for, wrapped it as ``.vision_model``): FusionBench's loader
    gets the loaded model as ``.vision_model``, so the keys it adapts (``encoder.…``) are the same
    as under 4.x."""

    @staticmethod
    def from_pretrained(name: str) -> types.SimpleNamespace:
        from transformers import CLIPVisionModel

        return types.SimpleNamespace(vision_model=CLIPVisionModel.from_pretrained(name))


def make(fb: types.ModuleType, folder: Path, init_seed: int, seed: int, nonzero_b0: bool) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import CLIPVisionModel

    wrapper = fb.linearized_model_utils.LinearizedModelWraper
    torch.manual_seed(init_seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.1)
    model = get_peft_model(CLIPVisionModel.from_pretrained(FIXTURE), config)
    if nonzero_b0:  # move the linearization point off peft's B = 0 before linearizing
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn_like(p) * 0.05)
    fb.vision_model.linearize_lora_model_(model)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, wrapper):
                continue
            pairs = zip(module.model.named_parameters(), module.params0_values.named_parameters())
            for (p_name, p), (p0_name, p0) in pairs:
                if p.requires_grad:  # the LoRA factors: "trained" to seeded noise
                    p.copy_(p0 + torch.randn(p.shape, generator=generator) * 0.05)
                    state[f"{name}.model.{p_name}"] = p.detach().clone().contiguous()
                    state[f"{name}.params0_values.{p0_name}"] = p0.detach().clone().contiguous()
    folder.mkdir(parents=True)
    model.peft_config["default"].base_model_name_or_path = None
    model.peft_config["default"].save_pretrained(folder)
    save_file(state, folder / "linearized_adapter_model.safetensors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fusionbench", type=Path, required=True)
    root = parser.parse_args().fusionbench
    fb = fusionbench_linearized(root)
    shutil.rmtree(OUT, ignore_errors=True)
    tasks = {"task_a": (1, False), "task_b": (2, False), "task_c": (3, False), "task_x": (4, True)}
    for task, (seed, nonzero) in tasks.items():
        make(fb, OUT / task, init_seed=0 if not nonzero else 5, seed=seed, nonzero_b0=nonzero)
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reference = {"pixels": pixels}
    with torch.no_grad():
        for task in tasks:
            model = fb.vision_model.load_l_lora_vision_model_hf(str(FIXTURE), str(OUT / task))
            model.eval()
            reference[task] = model(pixel_values=pixels).pooler_output.contiguous()
    save_file(reference, OUT / "reference.safetensors")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
