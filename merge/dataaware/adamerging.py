"""AdaMerging ("AdaMerging: Adaptive Model Merging for Multi-Task Learning", Yang et al., 2024),
task-wise and layer-wise, as FusionBench 0.2.33 runs it for CLIP.

θ(λ) = θ₀ + Σ_t λ_t ⊙ τ_t with τ_t = θ_t − θ₀, the terms added one task at a time in pool order.
Task-wise λ ∈ ℝᴺ (one scalar per task); layer-wise λ ∈ ℝ^{N×P}, one scalar per task and
parameter tensor, columns in ``named_parameters`` order (not per transformer block). λ starts
at ``init_values``; with ``clamp_weights`` the merge uses λ clamped to [0, 1] (λ itself is not).

Each step, for each task in pool order: the next batch of its endless shuffled loader, the
zero-shot logits of θ(λ) through ``torch.func.functional_call`` with that task's head, the
entropy loss −Σ p log(p + 1e-8) averaged over the batch, and a backward pass whose gradients
add up over the tasks; then one ``torch.optim.Adam`` step on λ (betas 0.9/0.999, eps 1e-8) and
θ(λ) is rebuilt. Resident: θ₀, the N task vectors (float32, on the compute device) and θ(λ)
with its graph.
"""

from __future__ import annotations

import torch

from clipship.errors import MethodError
from clipship.merge.dataaware.batches import TaskData, pixel_batches
from clipship.merge.dataaware.common import (
    DataAwareResult,
    canonical_params,
    check_data,
    check_heads,
    load_vision,
    rows_of,
    zero_shot,
)
from clipship.merge.matrices import canonical
from clipship.pool import ModelPool
from clipship.progress import Bars
from clipship.requests import Choice
from clipship.runtime.data import Preprocess
from clipship.runtime.state import borrows_process_state


class Granularity(Choice):
    """One merging weight per task model, or per task model and tensor."""

    TASK = "task"
    LAYER = "layer"


GRANULARITIES = tuple(Granularity)


def entropy_loss(logits: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The batch mean of −Σ_c p_c log(p_c + eps), p = softmax(logits)."""
    probabilities = torch.softmax(logits, dim=-1)
    return -torch.sum(probabilities * torch.log(probabilities + eps), dim=-1).mean()


def merged_parameters(
    pretrained: dict[str, torch.Tensor],
    task_vectors: list[dict[str, torch.Tensor]],
    merging_weights: torch.Tensor,
    clamp_weights: bool = False,
) -> dict[str, torch.Tensor]:
    """θ₀ + Σ_t λ_t τ_t, one task at a time: λ is [N] (task-wise) or [N, P] (layer-wise, the
    P columns in ``pretrained``'s order). Differentiable in λ."""
    weights = merging_weights.clamp(0, 1) if clamp_weights else merging_weights
    merged = dict(pretrained)
    for row, vectors in zip(weights, task_vectors):
        columns = row if row.dim() == 1 else [row] * len(vectors)
        for weight, (name, vector) in zip(columns, vectors.items()):
            merged[name] = merged[name] + vector * weight
    return merged


class MergedVision(torch.nn.Module):
    """θ₀'s vision tower run with other parameters (``params``, by its own names)."""

    def __init__(self, base: torch.nn.Module):
        super().__init__()
        self.base = base
        self.params: dict[str, torch.Tensor] = {}

    def forward(self, pixel_values: torch.Tensor):
        from torch.func import functional_call

        return functional_call(
            self.base, self.params, (pixel_values,), tie_weights=True, strict=False
        )


def initial_weights(tasks: int, params: int, granularity: str, init_values: float) -> torch.Tensor:
    """λ filled with ``init_values``: [tasks] task-wise, [tasks, params] layer-wise."""
    shape = (tasks,) if granularity == Granularity.TASK else (tasks, params)
    return torch.full(shape, init_values, dtype=torch.float32)


def load_task_vectors(
    pool: ModelPool, base: torch.nn.Module, device: str
) -> list[dict[str, torch.Tensor]]:
    """τ_t = θ_t − θ₀ for every parameter of ``base`` (by its own names), one model at a time."""
    own_name = {full: own for own, full in _own_names(base).items()}
    base_params = dict(base.named_parameters())
    vectors = []
    for model in pool.models:
        vision = load_vision(model, device)
        vector = {}
        for full, param in canonical_params(vision).items():
            own = own_name[full]
            vector[own] = param.detach() - base_params[own].detach()
        vectors.append(vector)
        del vision
    return vectors


@borrows_process_state
def adamerging(
    pool: ModelPool,
    data: list[TaskData],
    preprocess: Preprocess,
    heads: dict[str, torch.Tensor],
    *,
    granularity: str = "task",
    max_steps: int = 1000,
    lr: float = 1e-3,
    init_values: float = 0.3,
    clamp_weights: bool = False,
    device: str = "cpu",
    workers: int = 0,
    quiet: bool = True,
) -> DataAwareResult:
    """Task-wise (``granularity="task"``) or layer-wise (``"layer"``) AdaMerging of ``pool``'s
    task models, learning λ for ``max_steps`` steps on each task's ``data`` (FusionBench:
    ``endless_data(task, "test", max_steps, 16)``) with its zero-shot ``heads[task]``.

    >>> data = [endless_data(t, "test", 1000, 16) for t in tasks]        # doctest: +SKIP
    >>> result = adamerging(pool, data, preprocess, heads, granularity="layer")
    >>> result.merging_weights.shape, result.weight_names[:2]
    """
    check_data(pool, data)
    check_heads(data, heads)
    if granularity not in GRANULARITIES:
        raise MethodError(f"granularity {granularity!r}: choose task or layer")
    if max_steps < 0:
        raise MethodError(f"max_steps {max_steps}: must be 0 or more")
    short = [d.task.name for d in data if len(d.batches()) < max_steps]
    if short:
        raise MethodError(f"task {short[0]}: its data has fewer batches than {max_steps} steps")
    base = load_vision(pool.pretrained, device).requires_grad_(False)
    pretrained = {name: p.detach() for name, p in base.named_parameters()}
    task_vectors = load_task_vectors(pool, base, device)
    weights = initial_weights(len(pool.models), len(pretrained), granularity, init_values)
    weights = torch.nn.Parameter(weights.to(device))
    merged_vision = MergedVision(base)
    scorer = zero_shot(pool.pretrained, merged_vision, device)
    task_heads = {d.task.name: heads[d.task.name].to(device) for d in data}
    loaders = {d.task.name: pixel_batches(d, preprocess, device, workers) for d in data}
    optimizer = torch.optim.Adam([weights], lr=lr)
    losses = []
    with Bars(quiet, "elapsed") as bars, torch.enable_grad():
        bar = bars.add(f"AdaMerging ({granularity}-wise)", max_steps)
        merged_vision.params = merged_parameters(pretrained, task_vectors, weights, clamp_weights)
        for _ in range(max_steps):
            step_loss = 0.0
            for task_data in data:
                name = task_data.task.name
                pixels = next(loaders[name])
                loss = entropy_loss(scorer.logits(scorer.embed(pixels), task_heads[name]))
                loss.backward(retain_graph=True)
                step_loss += float(loss.detach())
            optimizer.step()
            optimizer.zero_grad()
            merged_vision.params = merged_parameters(
                pretrained, task_vectors, weights, clamp_weights
            )
            losses.append(step_loss)
            bars.advance(bar)
    merged_vision.params = {}  # the last graph
    learned = weights.detach().cpu().clone()
    with torch.no_grad():
        merged = merged_parameters(pretrained, task_vectors, weights.detach(), clamp_weights)
    names = _own_names(base)
    state = {names[own]: t.detach().cpu().contiguous() for own, t in merged.items()}
    return DataAwareResult(
        {name: state[name] for name in pool.tensor_names},
        rows_of(data),
        merging_weights=learned,
        weight_names=list(names.values()),
        statistics={"entropy": losses, "granularity": granularity},
    )


@borrows_process_state
@torch.no_grad()
def merge_with_weights(
    pool: ModelPool,
    merging_weights: torch.Tensor,
    weight_names: list[str] | None = None,
    *,
    clamp_weights: bool = False,
) -> dict[str, torch.Tensor]:
    """θ₀ + Σ_t λ_t τ_t from given merging weights, without data (FusionBench's ``weights``):
    [N] task-wise, or [N, P] layer-wise with columns named by ``weight_names`` (default: the
    ``named_parameters`` order of the pretrained vision tower). Read one tensor at a time.

    >>> merge_with_weights(pool, torch.tensor([0.33, 0.28, 0.33]))    # doctest: +SKIP
    """
    from transformers import CLIPVisionConfig, CLIPVisionModel

    weights = merging_weights.detach().float().cpu()
    if weights.dim() not in (1, 2) or weights.shape[0] != len(pool.models):
        raise MethodError(
            f"merging weights of shape {list(weights.shape)}: expected [{len(pool.models)}] "
            f"or [{len(pool.models)}, tensors]"
        )
    if weights.dim() == 2 and weight_names is None:
        with torch.device("meta"):
            config = CLIPVisionConfig.from_dict(pool.pretrained.vision_config)
            weight_names = list(canonical_params(CLIPVisionModel(config)))
    if weights.dim() == 2 and (
        weights.shape[1] != len(weight_names) or set(weight_names) != set(pool.tensor_names)
    ):
        raise MethodError(
            f"layer-wise merging weights have {weights.shape[1]} columns for "
            f"{len(weight_names or [])} names; the pool has {len(pool.tensor_names)} tensors"
        )
    if clamp_weights:
        weights = weights.clamp(0, 1)
    column = {name: i for i, name in enumerate(weight_names or [])}
    state = {}
    for name in pool.tensor_names:
        pretrained = pool.pretrained.read(name).float()
        merged = pretrained
        for t, model in enumerate(pool.models):
            weight = weights[t] if weights.dim() == 1 else weights[t, column[name]]
            merged = merged + (model.read(name).float() - pretrained) * weight
        state[name] = merged
    return state


def _own_names(module: torch.nn.Module) -> dict[str, str]:
    """``module``'s own parameter names → their ``vision_model.*`` names, in order."""
    return {name: canonical(name) for name, _ in module.named_parameters()}
