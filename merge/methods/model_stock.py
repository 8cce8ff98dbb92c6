"""Model Stock (Jang et al., 2024), as FusionBench 0.2.33: per tensor, interpolate between the
average of the fine-tuned models and the pretrained anchor by the angle between task vectors.

For each tensor: θ_avg = mean of the fine-tuned weights; φ = the mean over task pairs (i < j) of
the angle between τ_i and τ_j (cos = ⟨τ_i, τ_j⟩ / (√(‖τ_i‖²‖τ_j‖²) + 1e-8), in degrees, as
FusionBench rounds it); r = N cos φ / ((N − 1) cos φ + 1 + 1e-8);
θ = r·θ_avg + (1 − r)·θ_pre. Tensors named in ``ignore_keys`` get θ_avg.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from clipship.merge.matrices import named_in, task_matrices
from clipship.merge.methods.simple_average import simple_average
from clipship.merge.registry import Method, Param, TensorInputs, parse_names

EPS = 1e-8


def pair_angle(tau_1: torch.Tensor, tau_2: torch.Tensor) -> float:
    """The angle between two task vectors in degrees, FusionBench's float32 steps."""
    cos = torch.sum(tau_1 * tau_2) / (math.sqrt(torch.sum(tau_1**2) * torch.sum(tau_2**2)) + EPS)
    return float(np.rad2deg(torch.acos(torch.clamp(cos, min=-1.0, max=1.0)).item()))


def interpolation_ratio(angle: float, n_models: int) -> float:
    cos = np.cos(np.deg2rad(angle))
    return float(n_models * cos / ((n_models - 1) * cos + 1 + EPS))


def model_stock(inputs: TensorInputs, ignore_keys: list[str] | None) -> torch.Tensor:
    average = simple_average(inputs).reshape(inputs.shape)
    if named_in(inputs.name, ignore_keys):
        return average.reshape(-1)
    taus = task_matrices(inputs)  # in place of the fine-tuned values, read above
    total, count = 0.0, 0
    for i in range(len(taus)):
        for j in range(i + 1, len(taus)):
            total += pair_angle(taus[i], taus[j])
            count += 1
    ratio = interpolation_ratio(total / count, len(taus))
    pretrained = inputs.pretrained.reshape(inputs.shape)
    return (average * ratio + pretrained * (1.0 - ratio)).reshape(-1)


METHOD = Method(
    name="model_stock",
    summary="Model Stock: per tensor, the fine-tuned average pulled to the base by angle.",
    paper="https://arxiv.org/abs/2403.19522",
    params=(
        Param(
            "ignore_keys",
            list,
            None,
            "tensor names (vision_model.*) that get the plain fine-tuned average",
            parse=parse_names,
        ),
    ),
    merge=model_stock,
    min_models=2,
    per_tensor=True,
)
