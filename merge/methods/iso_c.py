"""Iso-C, isotropic merging in the common subspace (Marczak et al., 2025), as FusionBench 0.2.33.

Per matrix: Δ = Σ_t τ_t (computed as (Σ/N)·N, FusionBench's order), then its spectrum is made
flat: U diag(mean(σ)) Vᵀ from Δ's thin SVD. Every other tensor gets the mean Σ/N.
θ = θ_pre + scaling_factor·Δ.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from clipship.merge.matrices import EXCLUDE_KEYS, is_matrix, sequential_sum, svd, task_matrices
from clipship.merge.methods import task_arithmetic
from clipship.merge.registry import Method, TensorInputs, scaled


def iso_c_matrix(total: torch.Tensor) -> torch.Tensor:
    """The sum of the task matrices with every singular value replaced by their mean."""
    u, s, vh = svd(total)
    flat = torch.ones_like(s) * s.mean()
    return torch.linalg.multi_dot((u, torch.diag(flat), vh))


def iso_c_direction(inputs: TensorInputs, exclude_keys: list[str] | None) -> torch.Tensor:
    taus = task_matrices(inputs)
    merged = sequential_sum(taus) / len(taus)
    if is_matrix(inputs, exclude_keys):
        merged *= len(taus)
        merged = iso_c_matrix(merged)
    return merged.reshape(-1).cpu()


SCALING_FACTOR = replace(task_arithmetic.SCALING_FACTOR, default=1.0)

METHOD = Method(
    name="iso_c",
    summary="Iso-C: the summed task matrices with a flat (isotropic) spectrum.",
    paper="https://arxiv.org/abs/2502.04959",
    params=(SCALING_FACTOR, EXCLUDE_KEYS),
    merge=scaled(iso_c_direction),
    per_tensor=True,
    scale="scaling_factor",
    direction=iso_c_direction,
)
