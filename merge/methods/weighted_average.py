"""Weighted average: Σ w_t θ_t with the weights normalised to sum to 1."""

from __future__ import annotations

import torch

from clipship.merge.registry import Method, Param, TensorInputs


def weighted_average(inputs: TensorInputs, weights: list[float]) -> torch.Tensor:
    total_weight = sum(weights)
    total = None
    for theta, w in zip(inputs.finetuned, weights):
        term = theta * (w / total_weight)
        total = term if total is None else total + term
    return total


def _check_weights(weights: list[float]) -> str | None:
    if sum(weights) == 0:
        return "must not sum to 0"
    return None


def _check_pool(values: dict, n_models: int) -> str | None:
    n = len(values["weights"] or [])
    return None if n == n_models else f"{n} weights given for {n_models} models (one per model)"


METHOD = Method(
    name="weighted_average",
    summary="Weighted mean of the fine-tuned models, weights normalised to sum to 1.",
    paper="https://arxiv.org/abs/2203.05482",
    params=(
        Param(
            "weights",
            list,
            None,
            "one weight per model, comma-separated, in pool order",
            check=_check_weights,
            required=True,
        ),
    ),
    merge=weighted_average,
    check_pool=_check_pool,
)
