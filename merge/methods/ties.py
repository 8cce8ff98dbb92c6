"""TIES-merging with FusionBench's exact semantics (SPEC §2).

1. Trim each task vector globally: over all its tensors flattened together, keep the entries
   with |τ| ≥ the k-th smallest |τ|, k = d − int(d·threshold) (threshold in percent, values > 1
   divided by 100), so int(d·threshold)+1 entries and every tie at the boundary survive.
2. Elect a sign per entry: sign(Σ_t trimmed_t); where that sum is exactly 0, the majority sign
   (the sign of the sum of all elected signs over the whole vector).
3. Merge the entries that agree with the elected sign: ``sum`` (FusionBench's default), ``mean``
   over agreeing non-zero entries (the paper's), or ``max`` magnitude times the sign.
4. θ = θ_pre + λ·merged.

The two global statistics come from streaming pre-passes (``merge/kth.py`` for the thresholds),
so no task vector is ever held whole. threshold=100 keeps everything (FusionBench crashes there).
"""

from __future__ import annotations

import torch

from clipship.merge.kth import kth_smallest_many
from clipship.merge.methods.task_arithmetic import SCALING_FACTOR
from clipship.merge.registry import Method, Param, Stream, TensorInputs


def keep_fraction(threshold: float) -> float:
    return threshold / 100 if threshold > 1 else threshold


def trim_rank(numel: int, threshold: float) -> int:
    """FusionBench's k: the rank (1-based) of the smallest |τ| that is kept; 0 keeps everything."""
    return numel - int(numel * keep_fraction(threshold))


def trim(task_vectors: list[torch.Tensor], thresholds: list[float]) -> torch.Tensor:
    """[N, n] task vectors with every |τ| below its task's threshold set to zero."""
    stacked = torch.stack([tau.reshape(-1) for tau in task_vectors])
    bounds = torch.tensor(thresholds, dtype=stacked.dtype).unsqueeze(1)
    return stacked * (stacked.abs() >= bounds)


def elected_sign(trimmed: torch.Tensor, majority_sign: float) -> torch.Tensor:
    sign = torch.sign(trimmed.sum(dim=0))
    sign[sign == 0] = majority_sign
    return sign


def disjoint_merge(trimmed: torch.Tensor, sign: torch.Tensor, merge_func: str) -> torch.Tensor:
    agree = torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * agree
    if merge_func == "sum":
        return selected.sum(dim=0)
    if merge_func == "mean":
        counts = (selected != 0).sum(dim=0).float()
        return selected.sum(dim=0) / torch.clamp(counts, min=1)
    return selected.abs().max(dim=0)[0] * sign


def ties_prepass(
    stream: Stream, numel: int, tasks: list[str], threshold: float, **_: object
) -> dict:
    """Per-task trim thresholds (exact k-th smallest |τ|), then the majority sign."""
    k = trim_rank(numel, threshold)
    thresholds = [0.0] * len(tasks)  # k == 0: keep everything
    if k > 0:
        labels = iter(("trim threshold (1/2)", "trim threshold (2/2)"))
        thresholds = kth_smallest_many(
            lambda: ([tau.abs() for tau in x.task_vectors] for x in stream(next(labels))),
            [k] * len(tasks),
        )
    signs = 0
    for x in stream("majority sign"):
        signs += int(torch.sign(trim(x.task_vectors, thresholds).sum(dim=0)).sum())
    return {"thresholds": thresholds, "majority_sign": float((signs > 0) - (signs < 0))}


def ties(
    inputs: TensorInputs,
    scaling_factor: float,
    merge_func: str,
    thresholds: list[float],
    majority_sign: float,
    **_: object,
) -> torch.Tensor:
    trimmed = trim(inputs.task_vectors, thresholds)
    merged = disjoint_merge(trimmed, elected_sign(trimmed, majority_sign), merge_func)
    return inputs.pretrained + (scaling_factor * merged).reshape(inputs.pretrained.shape)


def _check_threshold(value: float) -> str | None:
    return None if 0 < value <= 100 else "must be in (0, 100] (percent of entries kept)"


TIES_PARAMS = (
    SCALING_FACTOR,
    Param(
        "threshold",
        float,
        20.0,
        "percent of each task vector kept (values ≤ 1 are fractions)",
        check=_check_threshold,
    ),
    Param("merge_func", str, "sum", "how agreeing entries combine", choices=("sum", "mean", "max")),
)

METHOD = Method(
    name="ties",
    summary="Trim, elect sign, disjoint merge (global trim, FusionBench's rules).",
    paper="https://arxiv.org/abs/2306.01708",
    params=TIES_PARAMS,
    merge=ties,
    prepass=ties_prepass,
)
