"""TIES-merging with FusionBench's exact semantics (SPEC §2).

1. Trim each task vector globally: over all its tensors flattened together, keep the entries
   with |τ| ≥ the k-th smallest |τ|, k = d − int(d·threshold) (threshold in percent, values > 1
   divided by 100), so int(d·threshold)+1 entries and every tie at the boundary survive.
2. Elect a sign per entry: sign(Σ_t trimmed_t); where that sum is exactly 0, the majority sign
   (the sign of the sum of all elected signs over the whole vector).
3. Merge the entries that agree with the elected sign: ``sum`` (FusionBench's default), ``mean``
   over agreeing non-zero entries (the paper's), or ``max`` magnitude times the sign.
4. θ = θ_pre + λ·merged.

The thresholds come from two streaming pre-passes (``merge/kth.py``), so no task vector is ever
held whole. The majority sign is tallied during the merge pass itself with +1 assumed; the rare
pieces that had an exactly-zero sum are merged again if the tally says otherwise.
threshold=100 keeps everything (FusionBench crashes there).
"""

from __future__ import annotations

import torch

from clipship.merge.kth import kth_smallest_many
from clipship.merge.methods.task_arithmetic import SCALING_FACTOR
from clipship.merge.registry import Method, Param, Stream, TensorInputs, scaled
from clipship.requests import Choice


class MergeFunc(Choice):
    """How the entries that agree with the elected sign combine."""

    SUM = "sum"  # FusionBench's default
    MEAN = "mean"  # over the agreeing non-zero entries (the paper's)
    MAX = "max"  # the largest magnitude, with the elected sign


def keep_fraction(threshold: float) -> float:
    return threshold / 100 if threshold > 1 else threshold


def trim_rank(numel: int, threshold: float) -> int:
    """FusionBench's k: the rank (1-based) of the smallest |τ| that is kept; 0 keeps everything."""
    return numel - int(numel * keep_fraction(threshold))


def trim(task_vectors: torch.Tensor, thresholds: list[float]) -> torch.Tensor:
    """[N, n] task vectors with every |τ| below its task's threshold set to zero (in place)."""
    bounds = torch.tensor(thresholds, dtype=task_vectors.dtype).unsqueeze(1)
    return task_vectors.mul_(task_vectors.abs() >= bounds)


def elected_sign(trimmed: torch.Tensor) -> torch.Tensor:
    """sign(Σ_t trimmed_t): +1, −1, or 0 where the sum is exactly 0."""
    return torch.sign(trimmed.sum(dim=0))


def disjoint_merge(
    trimmed: torch.Tensor, sign: torch.Tensor, majority_sign: float, merge_func: MergeFunc | str
) -> torch.Tensor:
    """Combine the entries that agree with the elected sign (consumes ``trimmed`` and ``sign``).

    Zero signs become ``majority_sign`` first, as in FusionBench.
    """
    sign[sign == 0] = majority_sign
    if majority_sign == 0:  # zero signs remain: FusionBench's rule verbatim (keeps negatives)
        selected = trimmed * torch.where(sign > 0, trimmed > 0, trimmed < 0)
        if merge_func == MergeFunc.SUM:
            return selected.sum(dim=0)
        if merge_func == MergeFunc.MEAN:
            return selected.sum(dim=0) / torch.clamp((selected != 0).sum(dim=0).float(), min=1)
        return selected.abs().max(dim=0)[0] * sign
    # sign is ±1 everywhere: |agreeing entries| = max(τ·sign, 0); negation is exact, so summing
    # (or averaging, or maxing) magnitudes and applying the sign gives FusionBench's bits.
    magnitude = trimmed.mul_(sign).clamp_(min=0)
    if merge_func == MergeFunc.SUM:
        return magnitude.sum(dim=0).mul_(sign)
    if merge_func == MergeFunc.MEAN:
        counts = (magnitude > 0).sum(dim=0).float()
        return (magnitude.sum(dim=0) / torch.clamp(counts, min=1)).mul_(sign)
    return magnitude.max(dim=0)[0].mul_(sign)


def ties_prepass(
    stream: Stream, numel: int, tasks: list[str], threshold: float, **_: object
) -> dict:
    """Per-task trim thresholds: the exact k-th smallest |τ| over the whole task vector.

    The majority sign is provisional (+1) here and settled after the merge pass.
    """
    k = trim_rank(numel, threshold)
    thresholds = [0.0] * len(tasks)  # k == 0: keep everything
    if k > 0:
        labels = iter(("trim threshold (1/2)", "trim threshold (2/2)"))
        thresholds = kth_smallest_many(
            lambda: (x.task_vector_matrix().abs_() for x in stream(next(labels))),
            [k] * len(tasks),
            nonnegative=True,
        )
    return {"thresholds": thresholds, "majority_sign": 1.0}


def ties_direction(
    inputs: TensorInputs,
    merge_func: str,
    thresholds: list[float],
    majority_sign: float,
    **_: object,
) -> tuple[torch.Tensor, int, bool]:
    """One piece's merged task vector (before λ); also its elected-sign total and whether it
    used the majority sign."""
    trimmed = trim(inputs.task_vector_matrix(), thresholds)
    sign = elected_sign(trimmed)
    unsettled = sign == 0
    tally = int(sign.sum())
    if majority_sign == 0:
        depends = bool((unsettled & (trimmed != 0).any(dim=0)).any())
    merged = disjoint_merge(trimmed, sign, majority_sign, merge_func)
    if majority_sign != 0:
        # With a ±1 majority, an exactly-zero sum merges to non-zero only if it had entries
        # of both signs: exactly the entries whose value depends on the majority sign.
        depends = bool((unsettled & (merged != 0)).any())
    return merged, tally, depends


ties = scaled(ties_direction)


def settle_majority(tallies: list[int]) -> dict:
    """The majority sign: the sign of the sum of every entry's elected sign."""
    total = sum(tallies)
    return {"majority_sign": float((total > 0) - (total < 0))}


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
    Param("merge_func", str, "sum", "how agreeing entries combine", choices=tuple(MergeFunc)),
)

METHOD = Method(
    name="ties",
    summary="Trim, elect sign, disjoint merge (global trim, FusionBench's rules).",
    paper="https://arxiv.org/abs/2306.01708",
    params=TIES_PARAMS,
    merge=ties,
    prepass=ties_prepass,
    settle=settle_majority,
    scale="scaling_factor",
    direction=ties_direction,
)
