"""WUDI merging, "Whoever Started the Interference Should End It" (Cheng et al., 2025), as
FusionBench 0.2.33.

Per matrix, from Δ₀ = Σ_t τ_t, Adam (lr 1e-5, no weight decay, ``iter_num`` steps) minimises

    L(Δ) = Σ_t ‖(Δ − τ_t) τ_tᵀ‖²_F / ‖τ_t‖²_F

Every other tensor gets the mean Σ_t τ_t / N. θ = θ_pre + Δ.

The loss is quadratic in Δ, so its gradient is linear: ∇L = 2(Δ·G − C) with
G = Σ_t τ_tᵀτ_t / ‖τ_t‖² (n×n) and C = Σ_t τ_t τ_tᵀ τ_t / ‖τ_t‖², both computed once. A step
then costs one m×n by n×n product instead of FusionBench's 3N products of m×n by n×m (forward and
backward through every task): 16× fewer operations on a ViT-B/32 layer with eight tasks. The
same Adam updates the same parameter, so the result equals FusionBench's within float rounding.
"""

from __future__ import annotations

import math

import torch

from clipship.merge.matrices import EXCLUDE_KEYS, is_matrix, task_matrices
from clipship.merge.registry import Method, Param, TensorInputs


def interference_terms(task_vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, C) of the quadratic loss: ∇L(Δ) = 2(Δ G − C), accumulated in place (the only
    temporary is min(m, n)² for C's inner product)."""
    _, m, n = task_vectors.shape
    gram = task_vectors.new_zeros(n, n)
    cross = task_vectors.new_zeros(m, n)
    for tau in task_vectors:
        weight = 1 / float(torch.square(torch.linalg.vector_norm(tau)))
        gram.addmm_(tau.T, tau, alpha=weight)
        if m <= n:  # τ τᵀ τ, cheaper and smaller as (τ τᵀ) τ when τ is wide
            cross.addmm_(tau @ tau.T, tau, alpha=weight)
        else:
            cross.addmm_(tau, tau.T @ tau, alpha=weight)
    return gram, cross


def adam_on_quadratic(
    start: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, iter_num: int, lr: float
) -> torch.Tensor:
    """FusionBench's optimiser, Adam (β = 0.9, 0.999, ε = 1e-8, no weight decay), on the loss
    whose gradient is 2(Δ G − C), from ``start``.

    The update is ``torch.optim.Adam``'s single-tensor step, operation for operation (the same
    bits on CPU; tests/test_subspace_methods.py checks), written out so that the gradient and
    the denominator live in reused buffers and ``torch.optim`` (whose import costs ~70 MB of
    resident memory) stays unloaded."""
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    delta = start
    grad, exp_avg, exp_avg_sq, denom = (torch.zeros_like(start) for _ in range(4))
    for step in range(1, iter_num + 1):
        torch.addmm(cross, delta, gram, beta=-2, alpha=2, out=grad)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = lr / (1 - beta1**step)
        torch.sqrt(exp_avg_sq, out=denom).div_(math.sqrt(1 - beta2**step)).add_(eps)
        delta.addcdiv_(exp_avg, denom, value=-step_size)
    return delta


def wudi(
    inputs: TensorInputs, iter_num: int, lr: float, exclude_keys: list[str] | None
) -> torch.Tensor:
    taus = task_matrices(inputs)
    if is_matrix(inputs, exclude_keys):
        gram, cross = interference_terms(taus)
        start = torch.sum(taus, dim=0)
        del taus
        inputs.release()  # the steps need only G, C and Δ: N task matrices fewer
        merged = adam_on_quadratic(start, gram, cross, iter_num, lr)
    else:
        merged = torch.sum(taus, dim=0) / len(taus)
    return inputs.pretrained + merged.reshape(-1).cpu()


def _check_steps(value: int) -> str | None:
    return None if value >= 0 else "must be ≥ 0"


def _check_lr(value: float) -> str | None:
    return None if value > 0 else "must be > 0"


METHOD = Method(
    name="wudi",
    summary="WUDI: per matrix, Adam minimises each task's interference with the merge.",
    paper="https://arxiv.org/abs/2503.08099",
    params=(
        Param("iter_num", int, 400, "Adam steps per matrix", check=_check_steps),
        EXCLUDE_KEYS,
        Param(
            "lr", float, 1e-5, "Adam learning rate (FusionBench fixes it at 1e-5)", check=_check_lr
        ),
    ),
    merge=wudi,
    per_tensor=True,
)
