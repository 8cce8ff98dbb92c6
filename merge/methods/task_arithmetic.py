"""Task arithmetic: θ_pre + λ·Σ_t τ_t, with τ_t = θ_t − θ_pre."""

from __future__ import annotations

import torch

from clipship.merge.registry import Method, Param, TensorInputs, finite, scaled


def sum_task_vectors(task_vectors: list[torch.Tensor]) -> torch.Tensor:
    """τ_1 + τ_2 + … in pool order (FusionBench's accumulation order)."""
    total = task_vectors[0].clone()
    for tau in task_vectors[1:]:
        total += tau
    return total


def summed(inputs: TensorInputs) -> torch.Tensor:
    """M = Σ_t τ_t: θ = θ_pre + M·λ."""
    return sum_task_vectors(inputs.task_vectors)


task_arithmetic = scaled(summed)


SCALING_FACTOR = Param("scaling_factor", float, 0.3, "λ, the task-vector scale", check=finite)

METHOD = Method(
    name="task_arithmetic",
    summary="Pretrained weights plus λ times the sum of the task vectors.",
    paper="https://arxiv.org/abs/2212.04089",
    params=(SCALING_FACTOR,),
    merge=task_arithmetic,
    scale="scaling_factor",
    direction=summed,
)
