"""TSV-M, Task Singular Vector Merging (Gargiulo et al., 2025), with FusionBench 0.2.33's rules.

Per matrix (2-D tensor not in ``exclude_keys``), for N tasks:

1. Thin SVD of each task's τ; keep its first k = int(r · (1/N)) singular triplets (r = min(m, n)).
2. Place task t's triplets in columns t·k … (t+1)·k of U, Σ, Vᵀ of full size r (the rest stay 0).
3. Orthogonalise U and Vᵀ separately (U_u V_uᵀ of each one's SVD): Δ = U⊥ diag(Σ) V⊥ᵀ.

Every other tensor gets the running mean of its task vectors. ``alpha`` scales the result; a
list of per-task alphas scales each task vector before its SVD instead. θ = Δ·alpha + θ_pre.
"""

from __future__ import annotations

import torch

from clipship.merge.matrices import EXCLUDE_KEYS, is_matrix, running_mean, svd, task_matrices
from clipship.merge.registry import (
    Method,
    Param,
    TensorInputs,
    combine,
    parse_number_or_list,
)


def tsv_matrix(task_vectors: list[torch.Tensor]) -> torch.Tensor:
    """The TSV-M merge of N same-shape task matrices."""
    n_tasks = len(task_vectors)
    sum_u = sum_s = sum_vh = None
    for i, tau in enumerate(task_vectors):
        u, s, vh = svd(tau)
        if sum_u is None:
            sum_u, sum_s, sum_vh = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(vh)
        k = int(s.shape[0] * (1 / n_tasks))
        sum_u[:, i * k : (i + 1) * k] = u[:, :k]
        sum_s[i * k : (i + 1) * k] = s[:k]
        sum_vh[i * k : (i + 1) * k, :] = vh[:k, :]
    # polar(sum_u) @ diag(sum_s) @ polar(sum_vh), in FusionBench's one multi_dot
    u_u, _, vh_u = svd(sum_u)
    u_vh, _, vh_vh = svd(sum_vh)
    return torch.linalg.multi_dot((u_u, vh_u, torch.diag(sum_s), u_vh, vh_vh))


def tsv_direction(
    inputs: TensorInputs, exclude_keys: list[str] | None, alphas: list[float] | None = None
) -> torch.Tensor:
    """Δ before one scalar ``alpha`` (``alphas``, one per task, scale each τ before the SVD)."""
    taus = task_matrices(inputs)
    if alphas is not None:
        taus = [a * tau for a, tau in zip(alphas, taus)]
    merged = tsv_matrix(taus) if is_matrix(inputs, exclude_keys) else running_mean(taus)
    return merged.reshape(-1).cpu()


def task_singular_vector(
    inputs: TensorInputs, alpha: float | list[float], exclude_keys: list[str] | None
) -> torch.Tensor:
    if isinstance(alpha, list):
        return tsv_direction(inputs, exclude_keys, alpha) + inputs.pretrained
    return combine(inputs.pretrained, tsv_direction(inputs, exclude_keys), alpha)


def _check_pool(values: dict, n_models: int) -> str | None:
    alpha = values["alpha"]
    if isinstance(alpha, list) and len(alpha) != n_models:
        return f"{len(alpha)} alphas given for {n_models} models (one per model, or one number)"
    return None


METHOD = Method(
    name="task_singular_vector",
    summary="TSV-M: each task's top singular vectors, orthogonalised together, per matrix.",
    paper="https://arxiv.org/abs/2412.00081",
    params=(
        Param(
            "alpha",
            float,
            1.0,
            "scale of the merged task vector; a list (one per model) scales each task first",
            parse=parse_number_or_list,
        ),
        EXCLUDE_KEYS,
    ),
    merge=task_singular_vector,
    check_pool=_check_pool,
    per_tensor=True,
    scale="alpha",
    direction=tsv_direction,
    scalable=lambda values: not isinstance(values["alpha"], list),
)
