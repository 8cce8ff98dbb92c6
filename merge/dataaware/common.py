"""What the data-aware methods share: the pool's vision towers as modules, loaded one at a time;
the pretrained projection and logit scale for zero-shot logits; tensor names; the result.

Modules are ``CLIPVisionModel.from_pretrained`` of each pool folder (what FusionBench's pool
loads), in float32, copied out of the files' mappings (``clipship.memory``). transformers 5
flattens ``CLIPVisionModel`` (no ``.vision_model``, bare parameter names); transformers 4 nests
it. ``tower`` and ``canonical`` hide the difference: results always use the files'
``vision_model.*`` names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from clipship.errors import HeadsMismatchError, PoolMismatchError
from clipship.memory import owned
from clipship.merge.dataaware.batches import TaskData
from clipship.merge.matrices import canonical
from clipship.pool import Model, ModelPool
from clipship.runtime.model import ZeroShotModel, load_vision  # noqa: F401 (re-exported)


@dataclass
class DataAwareResult:
    """A data-aware merge: the merged vision tower and what is needed to replay it.

    ``state_dict`` has every vision tensor by its ``vision_model.*`` name (float32, CPU);
    ``rows`` the rows each task's data used, in fetch order. AdaMerging adds the learned
    ``merging_weights`` ([N] task-wise, [N, P] layer-wise, columns named by ``weight_names``).
    """

    state_dict: dict[str, torch.Tensor]
    rows: dict[str, list[int]]
    merging_weights: torch.Tensor | None = None
    weight_names: list[str] | None = None
    statistics: dict[str, Any] = field(default_factory=dict)
    # Concrete: the mask logits and the final mask (``mask_logits/<name>``, ``final_mask/<name>``)
    # saved beside the merging weights; AdaMerging's λ at every merge, in call order.
    saved: dict[str, torch.Tensor] = field(default_factory=dict)
    trace: torch.Tensor | None = None


@torch.no_grad()
def tower(vision: Any) -> Any:
    """The module holding ``embeddings``, ``pre_layrnorm``, ``encoder``, ``post_layernorm``."""
    return getattr(vision, "vision_model", vision)


def layers(vision: Any) -> torch.nn.ModuleList:
    return tower(vision).encoder.layers


def run_layer(layer: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """One encoder layer on ``hidden`` without a mask (transformers 4 returns a tuple)."""
    out = layer(hidden, attention_mask=None)
    return out[0] if isinstance(out, tuple) else out


def canonical_params(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """``module``'s parameters by their ``vision_model.*`` names, in ``named_parameters`` order
    (the order of layer-wise AdaMerging's columns)."""
    return {canonical(name): p for name, p in module.named_parameters()}


def linear_modules(module: torch.nn.Module, prefix: str = "") -> dict[str, torch.nn.Linear]:
    """Every ``nn.Linear`` in ``module`` by its name (``prefix`` + the name in ``module``)."""
    return {
        prefix + name: m for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)
    }


def excluded(patterns: Iterable[str], *names: str) -> bool:
    """Whether any of ``names`` matches a pattern with ``re.match`` (FusionBench's
    ``exclude_param_names_regex``)."""
    return any(re.match(p, name) for p in patterns for name in names)


def mergeable(params: dict[str, Any], patterns: list[str]) -> dict[str, Any]:
    """``params`` without the ones ``patterns`` exclude (by ``vision_model.*`` or bare name)."""
    bare = canonical("")
    return {
        name: p
        for name, p in params.items()
        if not excluded(patterns, name, name.removeprefix(bare))
    }


def accumulate(sums: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    """``sums[name] += value``, starting from a copy of the first value."""
    if name in sums:
        sums[name] += value
    else:
        sums[name] = value.clone()


def zero_shot(pretrained: Model, vision: Any, device: str = "cpu") -> ZeroShotModel:
    """``vision`` with the pretrained ``visual_projection`` and ``logit_scale``, read from the
    pretrained CLIPModel's checkpoint, frozen: ``logits`` in FusionBench's operation order."""
    tensors = pretrained.checkpoint.tensors
    absent = [n for n in ("visual_projection.weight", "logit_scale") if n not in tensors]
    if absent:
        raise PoolMismatchError(
            f"{pretrained.source}: no {absent[0]} (data-aware merging needs the pretrained "
            "CLIPModel, not a vision tower)"
        )
    weight = owned(pretrained.checkpoint.read("visual_projection.weight").float())
    projection = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    projection.weight = torch.nn.Parameter(weight, requires_grad=False)
    scale = pretrained.checkpoint.read("logit_scale").float()
    return ZeroShotModel(vision, projection, scale).to(device)


def check_data(pool: ModelPool, data: list[TaskData]) -> None:
    """One ``TaskData`` per task model, in pool order (the task of a model is its name)."""
    names = [d.task.name for d in data]
    if names != pool.names:
        raise PoolMismatchError(
            f"the data's tasks ({', '.join(names)}) differ from the task models "
            f"({', '.join(pool.names)}); give one task per model, in pool order"
        )


def check_heads(data: list[TaskData], heads: dict[str, torch.Tensor]) -> None:
    absent = [d.task.name for d in data if d.task.name not in heads]
    if absent:
        raise HeadsMismatchError(f"no zero-shot head for task {absent[0]!r}")


def rows_of(data: list[TaskData]) -> dict[str, list[int]]:
    return {d.task.name: list(d.rows) for d in data}
