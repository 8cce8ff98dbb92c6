"""Magnitude pruning of one fine-tuned model's task vector, as FusionBench 0.2.33's
``MagnitudeDiffPruningAlgorithm`` (pretrained + exactly one task model).

For each tensor selected (by default every ``nn.Linear`` weight: attention projections and MLP;
or the names matching one of ``extract_names``, Python regular expressions matched at the start):
δ = θ_ft − θ_pre; in each row, the int(n_cols · ``prune_ratio``) entries with the smallest |δ|
(``prune_type: minor``; the largest with ``major``) are zeroed, ties broken by column order;
θ = θ_pre + δ·s. Every other tensor keeps its pretrained value.

The scale s follows FusionBench's ``rescale`` exactly, defects included: null → 1; true (or any
value equal to it, such as 1.0) → 1/prune_ratio; any other number → that number; **false → 0**,
so the packaged default ``rescale: false`` returns the pretrained weights unchanged.
"""

from __future__ import annotations

import re

import torch

from clipship.errors import MethodError
from clipship.merge.methods.dare import is_linear_weight
from clipship.merge.registry import (
    Method,
    Param,
    TensorInputs,
    parse_names,
    parse_null_bool_or_number,
    unit_interval,
)


def selected(name: str, shape: tuple[int, ...], extract_names: list[str] | None) -> bool:
    if extract_names is None:
        return is_linear_weight(name, shape)
    return any(re.match(pattern, name) for pattern in extract_names)


def prune_rows(delta: torch.Tensor, prune_ratio: float, prune_type: str) -> torch.Tensor:
    """``delta`` with the int(n_cols·ratio) smallest-|δ| (or largest) entries of each row zeroed."""
    score = delta.abs() if prune_type == "minor" else -delta.abs()
    order = torch.sort(score, dim=-1, stable=True).indices
    mask = torch.zeros_like(score, dtype=torch.bool)
    mask.scatter_(1, order[:, : int(score.shape[1] * prune_ratio)], True)
    return delta.masked_fill_(mask, 0)


def scale(rescale: bool | float | None, prune_ratio: float) -> float | None:
    if rescale is None:
        return None
    return 1 / prune_ratio if rescale == True else float(rescale)  # noqa: E712 (1.0 == True too)


def magnitude_prune(
    inputs: TensorInputs,
    prune_ratio: float,
    prune_type: str,
    rescale: bool | float | None,
    extract_names: list[str] | None,
) -> torch.Tensor:
    if not selected(inputs.name, inputs.shape, extract_names):
        return inputs.pretrained
    if len(inputs.shape) != 2:
        raise MethodError(
            f"magnitude_prune: {inputs.name} is {len(inputs.shape)}-D; pruning is per row of a "
            "2-D weight (narrow extract_names)"
        )
    pretrained = inputs.pretrained.reshape(inputs.shape)
    delta = prune_rows(
        inputs.finetuned[0].reshape(inputs.shape) - pretrained, prune_ratio, prune_type
    )
    factor = scale(rescale, prune_ratio)
    if factor is not None:
        delta = delta * factor
    return (pretrained + delta).reshape(-1)


METHOD = Method(
    name="magnitude_prune",
    summary="Zero the smallest task-vector entries of each linear-weight row of one model.",
    paper="https://arxiv.org/abs/1506.02626",
    params=(
        Param("prune_ratio", float, 0.5, "share of each row's entries zeroed", check=unit_interval),
        Param(
            "prune_type",
            str,
            "minor",
            "prune the smallest |δ| (minor) or the largest (major)",
            choices=("minor", "major"),
        ),
        Param(
            "rescale",
            float,
            False,
            "null: keep δ; true: δ/prune_ratio; a number: δ·number; false: δ·0 (FusionBench's "
            "default and defect: the pretrained weights)",
            parse=parse_null_bool_or_number,
        ),
        Param(
            "extract_names",
            list,
            None,
            "regular expressions of the tensors pruned (default: every nn.Linear weight)",
            parse=parse_names,
        ),
    ),
    merge=magnitude_prune,
    exact_models=1,
    per_tensor=True,
)
