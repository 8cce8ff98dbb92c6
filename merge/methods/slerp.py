"""SLERP between two fine-tuned models, per tensor, as FusionBench 0.2.33.

For each tensor, with v₀, v₁ the two models' weights (not task vectors) and û = u/‖u‖ (left as
is when ‖u‖ ≤ ``epsilon``): d = ⟨v̂₀, v̂₁⟩. If |d| > ``DOT_THRESHOLD`` the two are nearly
collinear and θ = (1 − t)·v₀ + t·v₁; otherwise, with Ω = arccos d,
θ = sin((1 − t)Ω)/sin Ω · v₀ + sin(tΩ)/sin Ω · v₁. t = 0 gives the first model, t = 1 the
second. The pool is exactly two task models; the pretrained model only supplies the text tower
and the configuration.
"""

from __future__ import annotations

import torch

from clipship.merge.registry import Method, Param, TensorInputs, finite


def _normalized(v: torch.Tensor, epsilon: float) -> torch.Tensor:
    norm = torch.linalg.norm(v)
    return v / norm if norm > epsilon else v


def slerp_tensor(
    t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float, epsilon: float
) -> torch.Tensor:
    dot = torch.sum(_normalized(v0, epsilon) * _normalized(v1, epsilon))
    if torch.abs(dot) > dot_threshold:
        return (1 - t) * v0 + t * v1
    theta_0 = torch.arccos(dot)
    sin_theta_0 = torch.sin(theta_0)
    theta_t = theta_0 * t
    s0 = torch.sin(theta_0 - theta_t) / sin_theta_0
    s1 = torch.sin(theta_t) / sin_theta_0
    return s0 * v0 + s1 * v1


def slerp(
    inputs: TensorInputs,
    t: float,
    DOT_THRESHOLD: float,
    epsilon: float,  # noqa: N803
) -> torch.Tensor:
    v0, v1 = (theta.reshape(inputs.shape) for theta in inputs.finetuned)
    return slerp_tensor(t, v0, v1, DOT_THRESHOLD, epsilon).reshape(-1)


METHOD = Method(
    name="slerp",
    summary="Spherical interpolation between two fine-tuned models, per tensor.",
    paper="https://dl.acm.org/doi/10.1145/325165.325242",
    params=(
        Param(
            "t",
            float,
            0.5,
            "interpolation factor: 0 gives the first model, 1 the second",
            check=finite,
        ),
        Param(
            "DOT_THRESHOLD", float, 0.9995, "above this |cos|, interpolate linearly", check=finite
        ),
        Param("epsilon", float, 1e-8, "norms at or below this are not normalised", check=finite),
    ),
    merge=slerp,
    exact_models=2,
    per_tensor=True,
)
