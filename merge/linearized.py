"""An L-LoRA pool merged in its adapter parameters, where linearization makes the linear
methods exact (Tang et al., "Parameter Efficient Multi-task Model Fusion with Partial
Linearization", ICLR 2024).

Every task's adapter was linearized around the same point (A₀, B₀), so each layer of a task
model is W + s·(B₀A₀ + ΔB·A₀ + B₀·ΔA) with (ΔA, ΔB) its adapter's displacement from that point:
linear in the displacement. Simple and weighted averaging, task arithmetic and TIES therefore
run on the adapter parameters as on any weights, with (A₀, B₀) as the "pretrained" model, and
the merged adapter's model is the same combination of the task models' displacements.

The merged folder is the encoder that adapter makes (as every merge writes: evaluated,
exported and published like any other) and ``l_lora/``, the merged adapter itself in
FusionBench's format, which ``load_l_lora_vision_model_hf(pretrained, "<out>/l_lora")`` reads.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from clipship.errors import PoolMismatchError
from clipship.lora import ADAPTER_CONFIG, LINEARIZED_WEIGHTS, LoraCheckpoint, open_lora
from clipship.merge.registry import Method
from clipship.pool import Model, ModelPool, PickleCheckpoint, hf_id
from clipship.progress import Bars
from clipship.safetensors_io import WEIGHTS_NAME

LINEAR_METHODS = ("simple_average", "weighted_average", "task_arithmetic", "ties")
FOLDER = "l_lora"
SPACE = "l_lora adapter"  # the recipe's statistics say where the merge ran
SAME_CONFIG = ("r", "lora_alpha", "use_rslora", "target_modules", "bias", "fan_in_fan_out")


def in_adapter_space(pool: ModelPool, spec: Method) -> bool:
    """Merged as adapters: an all-L-LoRA pool with a linear method. Other methods (and pools
    mixing kinds) merge the encoders the adapters make, as for any task model."""
    return (
        spec.name in LINEAR_METHODS
        and spec.data is None
        and bool(pool.models)
        and all(getattr(m.checkpoint, "linear", False) for m in pool.models)
    )


def adapter_pool(pool: ModelPool) -> tuple[ModelPool, LoraCheckpoint]:
    """The pool's adapters as a pool of their factors (A, B per layer), with the shared
    linearization point (A₀, B₀) as its pretrained model; refused unless every adapter has the
    same layers, settings and linearization point."""
    first: LoraCheckpoint = pool.models[0].checkpoint
    names = sorted(n for pair in first.updates.values() for n in pair[:2])
    points = {n: first.adapter.read(n) for pair in first.updates.values() for n in pair[2:]}
    members = []
    for model in pool.models:
        ckpt: LoraCheckpoint = model.checkpoint
        where = f"{model.name} ({model.source})"
        if ckpt.updates != first.updates:
            raise PoolMismatchError(
                f"{where} adapts other layers (or stores them under other names) than "
                f"{pool.models[0].name}: L-LoRA adapters merge only layer for layer"
            )
        for key in SAME_CONFIG:
            if ckpt.config.get(key) != first.config.get(key):
                raise PoolMismatchError(
                    f"{where} has {key}={ckpt.config.get(key)!r}, {pool.models[0].name} has "
                    f"{first.config.get(key)!r}: L-LoRA adapters merge only with the same settings"
                )
        for name, value in points.items():
            if not torch.equal(ckpt.adapter.read(name), value):
                raise PoolMismatchError(
                    f"{where} was linearized around another point ({name} differs from "
                    f"{pool.models[0].name}'s): its adapter cannot be merged in adapter space"
                )
        state = {n: ckpt.adapter.read(n) for n in names}
        members.append(_as_model(model.name, model.source, model, state))
    start = {n: points[p] for pair in first.updates.values() for n, p in zip(pair[:2], pair[2:])}
    point = _as_model(pool.pretrained.name, "(A₀, B₀)", pool.models[0], start)
    return ModelPool(point, members), first


def _as_model(name: str, source: str, like: Model, state: dict[str, torch.Tensor]) -> Model:
    file = like.checkpoint.files[0]
    keys = {n: n for n in state}
    return Model(name, source, like.folder, None, None, PickleCheckpoint(file, state), {}, keys)


def merge_adapters(
    pool: ModelPool,
    spec: Method,
    values: dict[str, Any],
    seed: int,
    vision_only: bool,
    folder: Path,
    shard_bytes: int,
    bar: Bars,
    device: str,
) -> tuple[list[str], dict[str, Any]]:
    """Merge the adapters into ``folder / l_lora``, then write the encoder the merged adapter
    makes into ``folder``. Returns the files written and the method's statistics."""
    from clipship.merge.engine import _merge_weights

    adapters, first = adapter_pool(pool)
    out = folder / FOLDER
    out.mkdir()
    _, stats = _merge_weights(adapters, spec, values, seed, True, out, shard_bytes, bar, device)
    state = {}
    merged_factors = load_file(str(out / WEIGHTS_NAME))
    (out / WEIGHTS_NAME).unlink()
    for pair in first.updates.values():  # FusionBench's layout: the factors and their point
        for name, point in zip(pair[:2], pair[2:]):
            state[name] = merged_factors[name].contiguous()
            state[point] = first.adapter.read(point).contiguous()
    save_file(state, str(out / LINEARIZED_WEIGHTS), metadata={"format": "pt"})
    # peft's record of the base: a Hugging Face id; no local path (the folder may be published)
    config = dict(first.config, base_model_name_or_path=hf_id(pool.pretrained.repo_id))
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    # The encoder of the merged adapter: every tensor of the pretrained model, the adapted
    # weights as W + s·(B·A₀ + B₀·A − B₀·A₀), the linearized layer.
    checkpoint, keys = open_lora(str(out), out, pool.pretrained)
    try:
        config = pool.pretrained.config
        member = Model("merged", str(out), out, None, None, checkpoint, config, keys)
        copy = dataclasses.replace(
            spec, merge=lambda x, **_: x.finetuned[0], prepass=None, settle=None, per_tensor=False
        )
        files, _ = _merge_weights(
            ModelPool(pool.pretrained, [member]), copy, {}, seed, vision_only, folder,
            shard_bytes, bar, device,
        )  # fmt: skip
    finally:
        checkpoint.close()
    stats = {**stats, "space": SPACE}
    return [*files, f"{FOLDER}/{ADAPTER_CONFIG}", f"{FOLDER}/{LINEARIZED_WEIGHTS}"], stats
