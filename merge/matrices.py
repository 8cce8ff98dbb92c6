"""Shared pieces of the per-tensor methods (TSV-M, Iso-C, Iso-CTS, WUDI): which tensors count as
matrices, the task vectors as matrices on the compute device, and FusionBench's two means.

FusionBench treats a tensor as a matrix when it is 2-D and its name is not in ``exclude_keys``:
every ``nn.Linear`` weight and the position embedding. Everything else (biases, LayerNorms, the
class embedding, the 4-D patch convolution) is averaged, with the exact accumulation each
FusionBench method uses, so the averaged tensors match bit for bit.
"""

from __future__ import annotations

import torch

from clipship.merge.registry import Param, TensorInputs, parse_names

EXCLUDE_KEYS = Param(
    "exclude_keys",
    list,
    None,
    "tensor names (vision_model.*) averaged instead of merged as matrices",
    parse=parse_names,
)


def canonical(name: str) -> str:
    return name if name.startswith("vision_model.") else f"vision_model.{name}"


def named_in(name: str, keys: list[str] | None) -> bool:
    """Whether ``keys`` names the tensor, with or without the leading ``vision_model.``."""
    return canonical(name) in {canonical(k) for k in keys or ()}


def is_matrix(inputs: TensorInputs, exclude_keys: list[str] | None) -> bool:
    """2-D and not in ``exclude_keys``."""
    return len(inputs.shape) == 2 and not named_in(inputs.name, exclude_keys)


def task_matrices(inputs: TensorInputs) -> torch.Tensor:
    """τ_t = θ_t − θ_pre for each task as one [N, *shape] tensor on the compute device.

    Computed in place of ``inputs.finetuned`` (same bits as ``θ_t − θ_pre``), which these
    methods never read again: one [N, n] block less at the peak."""
    if inputs.vectors is None:
        block = inputs.finetuned.sub_(inputs.pretrained)
        inputs.vectors = list(block)
    else:
        block = torch.stack(inputs.vectors)
    return block.reshape(len(inputs.vectors), *inputs.shape).to(inputs.device)


def running_mean(values: list[torch.Tensor]) -> torch.Tensor:
    """m_1 = x_1, m_i = m_{i−1} + (x_i − m_{i−1}) / i (TSV-M's and Iso-CTS's accumulation)."""
    mean = values[0].clone()
    for i, value in enumerate(values[1:], start=2):
        mean += (value - mean) / i
    return mean


def sequential_sum(values: list[torch.Tensor]) -> torch.Tensor:
    """x_1 + x_2 + … left to right (Python's ``sum``, as Iso-C accumulates)."""
    total = values[0].clone()
    for value in values[1:]:
        total += value
    return total


def svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD, as FusionBench computes it (``torch.linalg.svd`` in the tensor's dtype).

    LAPACK's float32 divide-and-conquer SVD can fail to converge on matrices with many equal
    (near-zero) singular values, such as a task matrix with Iso-CTS's common space projected
    out; FusionBench then stops with ``LinAlgError``. Here that one SVD is computed from the
    transpose (Aᵀ = V Σ Uᵀ, which LAPACK takes another path through), or failing that in
    float64, so a merge never stops on it and every other SVD keeps FusionBench's bits. The
    methods use singular vectors in sign-invariant ways, so either gives the same merge.
    """
    try:
        return torch.linalg.svd(matrix, full_matrices=False)
    except torch.linalg.LinAlgError:
        pass
    try:
        u, s, vh = torch.linalg.svd(matrix.T, full_matrices=False)
        return vh.T, s, u.T
    except torch.linalg.LinAlgError:
        u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
        return u.to(matrix.dtype), s.to(matrix.dtype), vh.to(matrix.dtype)


def polar(matrix: torch.Tensor) -> torch.Tensor:
    """The nearest matrix with orthonormal columns (U Vᵀ of the thin SVD), as FusionBench
    orthogonalises the concatenated singular vectors."""
    u, _, vh = svd(matrix)
    return u @ vh
