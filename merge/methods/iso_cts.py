"""Iso-CTS, isotropic merging in common and task-specific subspaces (Marczak et al., 2025), as
FusionBench 0.2.33.

Per m×n matrix, r = min(m, n), N tasks:

1. Common space: the top c singular vectors of Σ_t τ_t, with c = r − round((r − int(r·f))/N)·N
   (f = ``common_space_fraction``), so the rest divides evenly among the tasks.
2. Task spaces: for each task, the top (r − c)/N singular vectors of τ_t with the common space
   projected out of its columns (τ_t − U_c U_cᵀ τ_t).
3. Task spaces first, then the common space, side by side; U and Vᵀ orthogonalised separately;
   every singular value replaced by their mean: Δ = U⊥ diag(mean σ) V⊥ᵀ.

Every other tensor gets the running mean. θ = θ_pre + scaling_factor·Δ.
"""

from __future__ import annotations

import torch

from clipship.errors import MethodError
from clipship.merge.matrices import (
    EXCLUDE_KEYS,
    is_matrix,
    polar,
    running_mean,
    sequential_sum,
    svd,
    task_matrices,
)
from clipship.merge.methods.iso_c import SCALING_FACTOR
from clipship.merge.registry import Method, Param, TensorInputs, scaled, unit_interval


def subspace_sizes(rank: int, n_tasks: int, fraction: float) -> tuple[int, int]:
    """(common dimensions, dimensions per task), FusionBench's rounding."""
    common = int(rank * fraction)
    common = rank - round((rank - common) / n_tasks) * n_tasks
    return common, int((rank - common) / n_tasks)


def iso_cts_matrix(task_vectors: list[torch.Tensor], fraction: float, name: str) -> torch.Tensor:
    n_tasks = len(task_vectors)
    rank = min(task_vectors[0].shape)
    common, per_task = subspace_sizes(rank, n_tasks, fraction)
    if common < 0:
        raise MethodError(
            f"iso_cts: common_space_fraction={fraction} leaves no common space for "
            f"{n_tasks} tasks in {name} (rank {rank}); raise it"
        )
    u, s, vh = svd(sequential_sum(task_vectors))
    common_u, common_s, common_vh = u[:, :common], s[:common], vh[:common, :]
    space_u = space_s = space_vh = None
    for i, tau in enumerate(task_vectors):
        # FusionBench writes (U_c U_cᵀ) τ; U_c (U_cᵀ τ) is the same projection without the
        # m×m product (36 MiB for a B/32 MLP weight), equal to it within float rounding.
        specific = tau - common_u @ (common_u.T @ tau)
        u_t, s_t, vh_t = svd(specific)
        if space_u is None:
            space_u, space_s = torch.zeros_like(u_t), torch.zeros_like(s_t)
            space_vh = torch.zeros_like(vh_t)
        cols = slice(i * per_task, (i + 1) * per_task)
        space_u[:, cols], space_s[cols], space_vh[cols, :] = (
            u_t[:, :per_task],
            s_t[:per_task],
            vh_t[:per_task, :],
        )
        del specific, u_t, s_t, vh_t  # before the next task's SVD allocates its own
    rest = slice(n_tasks * per_task, n_tasks * per_task + common)
    space_u[:, rest], space_s[rest], space_vh[rest, :] = common_u, common_s, common_vh
    flat = torch.ones_like(space_s) * space_s.mean()
    return torch.linalg.multi_dot((polar(space_u), torch.diag(flat), polar(space_vh)))


def iso_cts_direction(
    inputs: TensorInputs,
    common_space_fraction: float,
    exclude_keys: list[str] | None,
) -> torch.Tensor:
    taus = task_matrices(inputs)
    if is_matrix(inputs, exclude_keys):
        merged = iso_cts_matrix(taus, common_space_fraction, inputs.name)
    else:
        merged = running_mean(taus)
    return merged.reshape(-1).cpu()


METHOD = Method(
    name="iso_cts",
    summary="Iso-CTS: a common subspace plus one per task, with a flat spectrum.",
    paper="https://arxiv.org/abs/2502.04959",
    params=(
        SCALING_FACTOR,
        Param(
            "common_space_fraction",
            float,
            0.8,
            "share of each matrix's rank given to the common subspace",
            check=unit_interval,
        ),
        EXCLUDE_KEYS,
    ),
    merge=scaled(iso_cts_direction),
    per_tensor=True,
    scale="scaling_factor",
    direction=iso_cts_direction,
)
