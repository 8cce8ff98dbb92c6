"""MagMax: per entry, the task-vector value of largest magnitude; θ = θ_pre + λ·τ_max.

On equal magnitudes the later task in pool order wins (FusionBench's rule).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from clipship.merge.methods.task_arithmetic import SCALING_FACTOR
from clipship.merge.registry import Method, TensorInputs, scaled


def max_magnitude(task_vectors: list[torch.Tensor]) -> torch.Tensor:
    best = task_vectors[0].clone()
    for tau in task_vectors[1:]:
        best = torch.where(tau.abs() >= best.abs(), tau, best)
    return best


def largest(inputs: TensorInputs) -> torch.Tensor:
    return max_magnitude(inputs.task_vectors)


METHOD = Method(
    name="magmax",
    summary="Keep, per entry, the task-vector value of largest magnitude.",
    paper="https://arxiv.org/abs/2407.06322",
    params=(replace(SCALING_FACTOR, default=1.0),),
    merge=scaled(largest),
    scale="scaling_factor",
    direction=largest,
)
