"""Seeded synthetic CLIP pools of real model shapes, for the benchmarks (``from synthetic import
build_pool`` in a script run from benchmarks/).

``write_model`` writes a CLIPModel or CLIPVisionModel folder of any size tensor by tensor (shapes
come from a meta-device instance, values from a seeded generator), so even a ViT-L/14 pool is
built without holding a model in memory. Task encoders are the pretrained vision tower plus
seeded noise. The tokenizer is a byte-level CLIP BPE vocabulary with no merges (514 ids), so the
pretrained folder loads with ``CLIPModel``, ``CLIPProcessor`` and the zero-shot pipeline.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch

from clipship.minibench.build import bytes_to_unicode
from clipship.safetensors_io import DTYPE_NAMES, Checkpoint, ShardedWriter

# A tiny CLIP: the parity fixture's shape (vision: image 32, patch 8, hidden 64, 4 layers).
TINY = {
    "projection_dim": 32,
    "vision_config": {
        "image_size": 32,
        "patch_size": 8,
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "projection_dim": 32,
        "hidden_act": "quick_gelu",
    },
    "text_config": {
        "vocab_size": 514,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "max_position_embeddings": 16,
        "bos_token_id": 512,
        "eos_token_id": 513,
        "pad_token_id": 513,
        "projection_dim": 32,
        "hidden_act": "quick_gelu",
    },
}
# openai/clip-vit-base-patch32 and openai/clip-vit-large-patch14.
B32 = {
    "projection_dim": 512,
    "vision_config": {
        "image_size": 224,
        "patch_size": 32,
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "projection_dim": 512,
        "hidden_act": "quick_gelu",
    },
    "text_config": {
        "hidden_size": 512,
        "num_hidden_layers": 12,
        "num_attention_heads": 8,
        "intermediate_size": 2048,
        "projection_dim": 512,
        "hidden_act": "quick_gelu",
    },
}
L14 = {
    "projection_dim": 768,
    "vision_config": {
        "image_size": 224,
        "patch_size": 14,
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
        "projection_dim": 768,
        "hidden_act": "quick_gelu",
    },
    "text_config": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "projection_dim": 768,
        "hidden_act": "quick_gelu",
    },
}
SIZES = {"tiny": TINY, "b32": B32, "l14": L14}
# Task models are named after FusionBench tasks, so its data-aware merges find class names and
# templates for them; these eight have prompts that fit the synthetic byte-level tokenizer's 77
# positions (EuroSAT's and GTSRB's do not). The images are random either way.
TASKS = ["sun397", "resisc45", "dtd", "svhn", "mnist", "cifar10", "fashion_mnist", "stl10"]


def _generator(seed: int, *labels: str) -> torch.Generator:
    digest = hashlib.sha256("\0".join([str(seed), *labels]).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _initial_value(
    name: str, shape: tuple[int, ...], gen: torch.Generator, logit_scale: float
) -> torch.Tensor:
    if name.endswith("logit_scale"):
        return torch.tensor(logit_scale)
    if "norm" in name.split(".")[-2] or "layrnorm" in name:
        return torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
    return torch.randn(shape, generator=gen) * 0.02


def write_model(
    folder: Path,
    config: Any,
    seed: int,
    base: Path | None = None,
    noise: float = 0.02,
    label: str = "",
) -> Path:
    """Write a seeded ``CLIPModel`` (CLIPConfig) or ``CLIPVisionModel`` (CLIPVisionConfig) folder.

    With ``base``, each tensor is the base model's value plus ``noise``·N(0, 1).
    """
    from transformers import CLIPModel, CLIPVisionConfig, CLIPVisionModel

    vision = isinstance(config, CLIPVisionConfig)
    with torch.device("meta"):
        meta = (CLIPVisionModel if vision else CLIPModel)(config)
    shapes = {n: tuple(t.shape) for n, t in meta.state_dict().items()}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    source = Checkpoint.open(base) if base else None
    writer = ShardedWriter(folder, {n: (DTYPE_NAMES[torch.float32], s) for n, s in shapes.items()})
    try:
        for name, shape in shapes.items():
            gen = _generator(seed, label, name)
            if source is not None:
                stored = name if name in source.tensors else f"vision_model.{name}"
                value = source.read(stored) + torch.randn(shape, generator=gen) * noise
            else:
                value = _initial_value(name, shape, gen, math.log(100.0))
            writer.write(name, value.to(torch.float32).contiguous())
        writer.close()
    finally:
        writer.abort()
        if source:
            source.close()
    config.architectures = ["CLIPVisionModel" if vision else "CLIPModel"]
    config.save_pretrained(folder)
    return folder


def write_processor(folder: Path, image_size: int) -> None:
    """A byte-level CLIP tokenizer (no merges) and a CLIPImageProcessor for ``image_size``."""
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    byte_chars = bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(byte_chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(byte_chars)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    folder = Path(folder)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)


def build_pool(
    folder: Path,
    size: str = "tiny",
    tasks: int | list[str] = 4,
    seed: int = 0,
    noise: float = 0.02,
) -> tuple[Path, dict[str, Path]]:
    """A seeded pool in ``folder``: ``pretrained/`` (CLIPModel) and one CLIPVisionModel per task.

    >>> pretrained, tasks = build_pool(Path("pool"), "tiny", 4)   # doctest: +SKIP
    """
    from transformers import CLIPConfig

    shape = SIZES[size]
    config = CLIPConfig(
        text_config=shape["text_config"],
        vision_config=shape["vision_config"],
        projection_dim=shape["projection_dim"],
    )
    names = [f"task_{chr(97 + i)}" for i in range(tasks)] if isinstance(tasks, int) else list(tasks)
    folder = Path(folder)
    pretrained = write_model(folder / "pretrained", config, seed, label="pretrained")
    write_processor(pretrained, shape["vision_config"]["image_size"])
    models = {
        name: write_model(
            folder / name, config.vision_config, seed, base=pretrained, noise=noise, label=name
        )
        for name in names
    }
    return pretrained, models


def write_pool_yaml(path: Path, pretrained: Path, models: dict[str, Path]) -> Path:
    """A FusionBench-shaped modelpool YAML (``CLIPVisionModelPool``) for a local pool."""
    lines = [
        "_target_: fusion_bench.modelpool.CLIPVisionModelPool",
        "_recursive_: false",
        "models:",
        f"  _pretrained_: {Path(pretrained).resolve()}",
        *(f"  {name}: {Path(p).resolve()}" for name, p in models.items()),
    ]
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


def write_task_data(
    folder: Path, names: list[str], images: int, image_size: int, seed: int = 0
) -> Path:
    """Seeded random images (10 classes, ``images`` per split) for each task, as parquet train
    and test splits, and a ``tasks.json`` naming them: data for the data-aware merges."""
    import numpy as np

    from clipship.minibench.build import write_parquet

    classnames = [f"class {i}" for i in range(10)]
    spec = {}
    for name in names:
        rng = np.random.default_rng([seed, *name.encode()])
        for split in ("train", "test"):
            pixels = rng.integers(0, 256, (images, image_size, image_size, 3), dtype=np.uint8)
            labels = rng.integers(0, 10, images)
            path = Path(folder) / "data" / name / f"{split}-00000-of-00001.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_parquet(path, pixels, labels, classnames)
        spec[name] = {
            "classnames": classnames,
            "templates": ["a photo of a {c}."],
            "data": f"data/{name}",
        }
    path = Path(folder) / "tasks.json"
    path.write_text(json.dumps({"tasks": spec}, indent=1) + "\n")
    return path


def write_lora_pool(work: Path, rank: int, seed: int = 0) -> Path:
    """``pool_lora.yaml``: every task model of ``work/pool.yaml`` replaced by a seeded random
    LoRA adapter of rank ``rank`` (PEFT's files: ``adapter_config.json``,
    ``adapter_model.safetensors`` with FusionBench's key layout, ``base_model.model.encoder.…``)
    on every attention projection and both MLP layers of the pretrained vision tower."""
    import json

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    text = (work / "pool.yaml").read_text()
    lines = text.split("models:", 1)[1].splitlines()
    entries = [line.strip().split(": ", 1) for line in lines if line.strip()]
    sources = dict(entries)
    pretrained = Path(sources.pop("_pretrained_"))
    with safe_open(str(pretrained / "model.safetensors"), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    modules = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    targets = sorted(
        k.removeprefix("vision_model.").removesuffix(".weight")
        for k in shapes
        if k.startswith("vision_model.encoder.")
        and k.endswith(tuple(f"{m}.weight" for m in modules))
    )
    generator = torch.Generator().manual_seed(seed)
    adapters = {}
    for name in sources:
        folder = work / f"{name}_lora"
        folder.mkdir(exist_ok=True)
        tensors = {}
        for target in targets:
            out_dim, in_dim = shapes[f"vision_model.{target}.weight"]
            key = f"base_model.model.{target}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_dim, generator=generator) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_dim, rank, generator=generator) * 0.01
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        config = {
            "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(modules),
            "base_model_name_or_path": str(pretrained.resolve()), "fan_in_fan_out": False,
            "use_dora": False, "use_rslora": False, "bias": "none",
        }  # fmt: skip
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=1))
        adapters[name] = folder
    return write_pool_yaml(work / "pool_lora.yaml", pretrained, adapters)
