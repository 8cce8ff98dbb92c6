"""Writing a mixture of experts (WEMoE, E-WEMoE) as a folder any Hub user can load:

    AutoModel.from_pretrained(folder, trust_remote_code=True)

The folder is a full CLIP model: the pretrained text tower, projections and logit scale; the
vision tower's task-arithmetic tensors; per layer the MLP experts under FusionBench's module names
(``...mlp.base_model.*``, ``...mlp.task_vectors.{t}.*``, ``...mlp.gate.*``; a shared router is
written under every layer's key, with the same values); ``config.json`` with a ``wemoe`` section
and an ``auto_map`` to ``modeling_clipship_wemoe.py`` (``clipship.runtime``'s file, copied), and
the pretrained tokenizer and processor files.

E-WEMoE's pruned task vectors are stored as a bit mask of the kept entries (one bit each, packed
into bytes) plus the kept values in row-major order: at 90 % pruning that is 1/32 + 1/10 of the
dense size (13 %), against 2 × 1/10 (20 %) for int32 indices with values, and it unpacks with two
vector operations.
"""

from __future__ import annotations

import json
import math
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from clipship.merge.dataaware.wemoe import MixtureResult, Pruned, router_keys
from clipship.pool import PROCESSOR_FILES, TOKENIZER_FILES, ModelPool
from clipship.runtime.modeling_clipship_wemoe import FORMAT, MLP_PARAMS, pack_mask
from clipship.safetensors_io import DTYPE_NAMES, ShardedWriter

MODELING_FILE = "modeling_clipship_wemoe.py"


def mixture_tensors(result: MixtureResult, dtype: torch.dtype):
    """Every vision tensor of the folder as (name, dtype, shape, make): float tensors in
    ``dtype``, routers in float32, sparse masks uint8; ``make()`` gives the tensor, so the
    writer holds one converted tensor at a time, not a second copy of the mixture."""
    from clipship.merge.matrices import canonical

    mixture = result.mixture

    def converted(value: torch.Tensor, to: torch.dtype = dtype):
        return to, tuple(value.shape), lambda: value.detach().to("cpu", to)

    for name, param in mixture.vision.named_parameters():
        key = canonical(name)
        if ".mlp." not in key:
            yield (key, *converted(param))
    for layer, mlp in enumerate(mixture.mlps):
        prefix = f"vision_model.encoder.layers.{layer}.mlp."
        for name, param in mlp.base.named_parameters():
            yield (f"{prefix}base_model.{name}", *converted(param))
        for t, vector in enumerate(mlp.task_vectors):
            for name in MLP_PARAMS:
                value = vector[name]
                key = f"{prefix}task_vectors.{t}.{name}"
                if not isinstance(value, Pruned):
                    yield (key, *converted(value))
                    continue
                numel = math.prod(value.shape)
                yield (f"{key}_mask", torch.uint8, ((numel + 7) // 8,), lambda v=value: mask_of(v))
                yield (f"{key}_values", *converted(value.values))
        params = dict(mlp.router.named_parameters())
        for key, name in router_keys(mlp.router, layer).items():
            yield (key, *converted(params[name], torch.float32))


def mask_of(value: Pruned) -> torch.Tensor:
    """The folder's packed bit mask of a pruned tensor's kept entries."""
    mask = torch.zeros(math.prod(value.shape), dtype=torch.bool, device=value.indices.device)
    mask[value.indices.long()] = True
    return pack_mask(mask.cpu())


def mixture_config(result: MixtureResult, pool: ModelPool, kept: dict[str, int] | None) -> dict:
    """The pretrained ``config.json`` as the mixture's: its class, the remote-code map, and the
    ``wemoe`` section ``modeling_clipship_wemoe.py`` builds the model from."""
    settings = result.mixture.settings
    config = json.loads((pool.pretrained.folder / "config.json").read_text())
    module = MODELING_FILE.removesuffix(".py")
    config.update(
        architectures=["CLIPWEMoEModel"],
        model_type="clipship_wemoe",
        auto_map={
            "AutoConfig": f"{module}.CLIPWEMoEConfig",
            "AutoModel": f"{module}.CLIPWEMoEModel",
            "AutoModelForZeroShotImageClassification": f"{module}.CLIPWEMoEModel",
        },
        wemoe={
            "format": FORMAT,
            "experts": pool.names,
            "router_hidden_layers": settings.router_hidden_layers,
            "shared_gate": settings.shared_gate,
            "position_encoding": settings.position_encoding,
            "position_encoding_dim": settings.position_encoding_dim,
            "tv_prune_ratio": settings.tv_prune_ratio,
            "routing": "per_sample",
            "storage": "bitmask" if kept is not None else "dense",
            **({"kept": kept} if kept is not None else {}),
        },
    )
    return config


def write_mixture(
    result: MixtureResult, pool: ModelPool, folder: Path, max_shard_bytes: int
) -> list[str]:
    """The mixture folder's files into ``folder`` (weights streamed to their offsets, the
    pretrained tensors outside the vision tower copied file to file); returns their names."""
    from clipship.merge.engine import check_finite, copy_extra

    pretrained = pool.pretrained
    dtype = pretrained.info(pool.tensor_names[0]).dtype_torch
    vision = list(mixture_tensors(result, dtype))
    stored_vision = set(pretrained.vision_keys.values())
    extra = sorted(n for n in pretrained.checkpoint.tensors if n not in stored_vision)
    layout = {n: (DTYPE_NAMES[d], shape) for n, d, shape, _ in vision}
    for name in extra:
        info = pretrained.checkpoint.tensors[name]
        layout[name] = (info.dtype, info.shape)
    writer = ShardedWriter(folder, layout, max_shard_bytes)
    try:
        for name, _, _, make in vision:
            tensor = make()
            check_finite(tensor, f"mixture tensor {name}", None)
            writer.write(name, tensor)
        copy_extra(writer, pretrained, extra)
        files = writer.close()
    finally:
        writer.abort()
    kept = None
    if result.mixture.settings.tv_prune_ratio is not None:
        kept = {
            f"{layer}.{t}.{name}": vector[name].values.numel()
            for layer, mlp in enumerate(result.mixture.mlps)
            for t, vector in enumerate(mlp.task_vectors)
            for name in MLP_PARAMS
        }
    config = mixture_config(result, pool, kept)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    source = resources.files("clipship.runtime").joinpath(MODELING_FILE).read_text("utf-8")
    (folder / MODELING_FILE).write_text(source)
    for name in PROCESSOR_FILES + TOKENIZER_FILES:
        if (pretrained.folder / name).is_file():
            shutil.copyfile(pretrained.folder / name, folder / name)
    return [*files, "config.json", MODELING_FILE]


def is_mixture(config: dict[str, Any]) -> bool:
    return config.get("model_type") == "clipship_wemoe"
