"""Fisher merging ("Merging Models with Fisher-Weighted Averaging", Matena & Raffel, 2022), as
FusionBench 0.2.33 estimates and applies it for CLIP.

The estimator, per task model on its own task's data (one pass, no shuffle in FusionBench):
z = zero-shot logits, p = softmax(z) detached, L = Σ_batch Σ_classes √p · log_softmax(z), and
F_batch = (∂L/∂θ)², the square of the gradient of the batch sum (so the batch size matters).
F_t = Σ_batches F_batch / examples seen. With ``normalize_fisher_weight``, each task is weighted
by c_t ∝ 1 / (‖F_t‖ + ε), ‖·‖ the global L2 norm of all of F_t. Every tensor is then
θ = Σ_t c_t (F_t + ε) θ_t / Σ_t c_t (F_t + ε), with ε = ``minimal_fisher_weight``.

Streaming: FusionBench's c_t = (1/N) · w_t / Σ_s w_s with w_t = 1 / (‖F_t‖ + ε), and the factor
(1/N) / Σ_s w_s is common to numerator and denominator, so each task adds w_t (F_t + ε) θ_t and
w_t (F_t + ε) as soon as its F_t is known, and only one task model, its F_t and the two sums are
resident. The result differs from FusionBench's only by float rounding (~1e-7 relative).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from clipship.merge.dataaware.batches import TaskData, pixel_batches
from clipship.merge.dataaware.common import (
    DataAwareResult,
    accumulate,
    canonical_params,
    check_data,
    check_heads,
    load_vision,
    mergeable,
    rows_of,
    zero_shot,
)
from clipship.pool import ModelPool
from clipship.progress import Bars
from clipship.runtime.data import Preprocess
from clipship.runtime.model import ZeroShotModel
from clipship.runtime.state import borrows_process_state


def expected_log_likelihood(logits: torch.Tensor) -> torch.Tensor:
    """Σ_batch Σ_classes √p · log_softmax(z), p detached: the objective whose squared gradient
    is FusionBench's Fisher estimate for a batch (the model's own predictive distribution, no
    labels, no sampling)."""
    probabilities = torch.softmax(logits, dim=-1).detach()
    return (torch.sqrt(probabilities) * torch.log_softmax(logits, dim=-1)).sum(dim=-1).sum(dim=0)


def fisher_information(
    model: ZeroShotModel,
    head: torch.Tensor,
    batches: Iterable[torch.Tensor],
    params: dict[str, torch.nn.Parameter],
    on_batch: Callable[[], None] | None = None,
) -> dict[str, torch.Tensor]:
    """F = Σ_batches (∂L/∂θ)² / examples for ``params`` of ``model.vision``."""
    fisher: dict[str, torch.Tensor] = {}
    examples = 0
    for pixels in batches:
        logits = model.logits(model.embed(pixels), head)
        model.vision.zero_grad()
        expected_log_likelihood(logits).backward()
        for name, param in params.items():
            square = param.grad.detach() ** 2
            if name in fisher:
                fisher[name] += square
            else:
                fisher[name] = square
        examples += pixels.shape[0]
        if on_batch is not None:
            on_batch()
    model.vision.zero_grad()
    return {name: value / examples for name, value in fisher.items()}


def global_norm(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The L2 norm over every entry: the norm of the per-tensor L2 norms."""
    return torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(t) for t in tensors.values()])
    )


@borrows_process_state
def fisher_merging(
    pool: ModelPool,
    data: list[TaskData],
    preprocess: Preprocess,
    heads: dict[str, torch.Tensor],
    *,
    normalize_fisher_weight: bool = True,
    minimal_fisher_weight: float = 1e-6,
    exclude_param_names_regex: Iterable[str] = (),
    device: str = "cpu",
    workers: int = 0,
    quiet: bool = True,
) -> DataAwareResult:
    """Fisher merging of ``pool``'s task models, each on its own task's ``data`` (FusionBench:
    ``one_pass_data(..., shuffle=False)``) with its zero-shot ``heads[task]``.

    Tensors matching ``exclude_param_names_regex`` (``re.match`` on the ``vision_model.*`` or
    the bare name) keep the pretrained values and do not count in the Fisher norms.

    >>> heads, _ = build_heads(folder, tasks)                            # doctest: +SKIP
    >>> data = [one_pass_data(t, "train", 256, 32, shuffle=False) for t in tasks]
    >>> fisher_merging(pool, data, preprocess, heads).state_dict
    """
    check_data(pool, data)
    check_heads(data, heads)
    patterns = list(exclude_param_names_regex)
    numerator: dict[str, torch.Tensor] = {}
    denominator: dict[str, torch.Tensor] = {}
    norms = []
    with Bars(quiet, "elapsed") as bars, torch.enable_grad():
        bar = bars.add("Fisher", sum(len(d.batches()) for d in data))
        for model, task_data in zip(pool.models, data):
            vision = load_vision(model, device).requires_grad_(True)
            scorer = zero_shot(pool.pretrained, vision, device)
            params = mergeable(canonical_params(vision), patterns)
            head = heads[task_data.task.name].to(device)
            batches = pixel_batches(task_data, preprocess, device, workers)
            fisher = fisher_information(scorer, head, batches, params, lambda: bars.advance(bar))
            norm = global_norm(fisher)
            norms.append(float(norm))
            weight = 1.0 / (norm + minimal_fisher_weight) if normalize_fisher_weight else None
            with torch.no_grad():
                for name, param in params.items():
                    scaled = fisher[name] + minimal_fisher_weight
                    if weight is not None:
                        scaled = weight * scaled
                    accumulate(numerator, name, scaled * param)
                    accumulate(denominator, name, scaled)
            del vision, scorer, params, fisher
    merged = {name: (numerator[name] / denominator[name]).cpu() for name in numerator}
    for name in pool.tensor_names:
        if name not in merged:
            merged[name] = pool.pretrained.read(name).float()
    state = {name: merged[name].contiguous() for name in pool.tensor_names}
    return DataAwareResult(state, rows_of(data), statistics={"fisher_norms": norms})
