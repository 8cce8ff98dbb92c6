"""Concrete Task Arithmetic and Concrete AdaMerging ("Concrete Subspace Learning based
Interference Elimination for Multi-task Model Fusion", Tang et al., 2023), as FusionBench 0.2.33
runs them for CLIP (``shared/mixing/README.md`` describes what is matched).

One mask m over every parameter of the vision tower, shared by all tasks, is learned by
minimising the entropy of the merged model's zero-shot predictions on each task's test images.
Its logits start at ``initial_logits``; each step draws m from the Concrete (relaxed Bernoulli)
distribution at ``temperature`` (m = σ((log u − log(1−u) + log p − log(1−p)) / T), p = σ(logit),
u uniform), rescales each tensor to m̂ = m / mean(m), and merges
θ = θ₀ + Σ_t τ_t · (λ_t · m̂), the tasks in pool order (layer-wise: λ_{t,j} per tensor j).

- **Task arithmetic**: λ_t = ``scaling_factor``, fixed. Each step, the summed entropy of one batch
  per task, backpropagated to the logits, one Adam step on them.
- **AdaMerging**: each step first adapts λ on the detached mask (the *inner* step: merge, loss
  on one batch per task, one step of Adam(λ, ``base_lr``)), then steps the mask on the next batch
  per task through the merge with the adapted λ (the *outer* step); λ is reset to its start every
  step, the inner optimizer's state is kept. After ``max_steps``, λ is learned afresh with the
  final mask for ``max_adamerging_steps`` (Adam, ``adamerging_lr``), as AdaMerging does.

The final mask is one more draw from the trained logits (``eval_mask_type`` continuous, or a
discrete Bernoulli draw), rescaled. FusionBench's defects are followed by default for parity and
each has a switch that fixes it: D5, every batch is one image (``use_batch_size`` reads
``batch_size`` images); D6, the inner merge uses the previous step's λ before the reset
(``reset_before_merge``); D7, the final mask is random (``final_mask: expected`` uses the mask's
expectation, E[m] for a Bernoulli draw being σ(logit): deterministic, and the mask whose
discrete draws the training made likely).

Randomness: the uniforms behind every draw come from a generator seeded by the merge's seed, or
from a noise file (FusionBench's recorded ``mask_uniforms.safetensors``: ``step<k>/<param>`` and
``final/<param>``, the 0/1 sample itself for a discrete final mask).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from clipship.errors import DataError, MethodError
from clipship.merge.dataaware.adamerging import (
    GRANULARITIES,
    Granularity,
    MergedVision,
    _own_names,
    entropy_loss,
    initial_weights,
    load_task_vectors,
)
from clipship.merge.dataaware.batches import TaskData, pixel_batches
from clipship.merge.dataaware.common import (
    DataAwareResult,
    check_data,
    check_heads,
    load_vision,
    rows_of,
    zero_shot,
)
from clipship.pool import ModelPool
from clipship.progress import Bars
from clipship.requests import Choice
from clipship.runtime.data import Preprocess
from clipship.runtime.state import borrows_process_state

EPS = torch.finfo(torch.float32).eps  # 2⁻²³: torch's clamp of probabilities
TINY = torch.finfo(torch.float32).tiny  # 2⁻¹²⁶


class MaskType(Choice):
    """The final mask: a relaxed (continuous) draw, or a 0/1 Bernoulli draw."""

    CONTINUOUS = "continuous"
    DISCRETE = "discrete"


class FinalMask(Choice):
    """How the final mask is made: one more random draw (FusionBench), or its expectation."""

    SAMPLE = "sample"
    EXPECTED = "expected"


def relaxed_mask(logits: torch.Tensor, uniform: torch.Tensor, temperature: float) -> torch.Tensor:
    """A relaxed Bernoulli draw from ``uniform`` (``RelaxedBernoulli(logits, T).rsample()``'s
    arithmetic), differentiable in ``logits``."""
    p = torch.sigmoid(logits).clamp(EPS, 1 - EPS)
    u = uniform.clamp(EPS, 1 - EPS)
    x = (u.log() - (-u).log1p() + p.log() - (-p).log1p()) / temperature
    return torch.sigmoid(x).clamp(TINY, 1 - EPS)


class Noise:
    """The uniforms behind each mask draw: from ``file`` (a recorded run), else from a generator
    seeded by (seed, "concrete"), drawn per tensor in parameter order, one draw after another."""

    def __init__(self, names: dict[str, str], shapes: dict[str, torch.Size], seed: int, file=None):
        self.names, self.shapes = names, shapes  # own name → vision_model.* name, → shape
        self.file = read_noise(Path(file), names, shapes) if file else None
        digest = hashlib.sha256(f"clipship-concrete\0{seed}".encode()).digest()
        self.generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)

    def draw(self, tag: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """One draw's uniforms, made on the CPU (the same values on every device)."""
        if self.file is not None:
            drawn = {own: self.file[f"{tag}/{full}"] for own, full in self.names.items()}
        else:
            drawn = {o: torch.rand(self.shapes[o], generator=self.generator) for o in self.names}
        return {own: u.to(device) for own, u in drawn.items()}


def read_noise(
    path: Path, names: dict[str, str], shapes: dict[str, torch.Size]
) -> dict[str, torch.Tensor]:
    """A noise file, checked: every ``<tag>/<param>`` of the vision tower's parameters, with
    their shapes; each tag holds every parameter; the values finite."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise DataError(f"mask_noise {path}: no such file")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise DataError(f"mask_noise {path}: not a safetensors file ({e})") from None
    full_shapes = {names[own]: shape for own, shape in shapes.items()}
    tags: dict[str, set[str]] = {}
    for key, tensor in tensors.items():
        tag, _, param = key.partition("/")
        if param not in full_shapes:
            raise DataError(f"mask_noise {path}: {key} is not a parameter of the vision tower")
        if tuple(tensor.shape) != tuple(full_shapes[param]):
            raise DataError(
                f"mask_noise {path}: {key} is {list(tensor.shape)}, the parameter is "
                f"{list(full_shapes[param])}"
            )
        if not bool(torch.isfinite(tensor).all()):
            raise DataError(f"mask_noise {path}: {key} has NaN or Inf values")
        tags.setdefault(tag, set()).add(param)
    for tag, params in tags.items():
        missing = sorted(set(full_shapes) - params)
        if missing:
            raise DataError(f"mask_noise {path}: {tag}/{missing[0]} is missing")
    return {k: v.float() for k, v in tensors.items()}


def check_noise_tags(noise: Noise, tags: list[str]) -> None:
    if noise.file is None:
        return
    present = {key.partition("/")[0] for key in noise.file}
    for tag in tags:
        if tag not in present:
            raise DataError(f"mask_noise: no {tag}/ tensors (the run draws {len(tags)} masks)")
    extra = sorted(present - set(tags) - {"final"})  # a recorded final draw may go unused
    if extra:
        raise DataError(f"mask_noise: {extra[0]}/ is not a draw of this run")


def rescaled(mask: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor of the mask divided by its mean."""
    return {name: m / torch.mean(m) for name, m in mask.items()}


def masked_merge(
    pretrained: dict[str, torch.Tensor],
    task_vectors: list[dict[str, torch.Tensor]],
    weights: torch.Tensor,
    mask: dict[str, torch.Tensor],
    clamp_weights: bool = False,
) -> dict[str, torch.Tensor]:
    """θ₀ + Σ_t τ_t · (λ_t · m̂), one task at a time in pool order; λ [N] or [N, P]."""
    weights = weights.clamp(0, 1) if clamp_weights else weights
    merged = dict(pretrained)
    for row, vectors in zip(weights, task_vectors):
        columns = row if row.dim() == 1 else [row] * len(vectors)
        for weight, (name, vector) in zip(columns, vectors.items()):
            merged[name] = merged[name] + vector * (weight * mask[name])
    return merged


def draw_final(
    logits: dict[str, torch.Tensor],
    noise: Noise,
    mask_type: str,
    how: str,
    temperature: float,
) -> dict[str, torch.Tensor]:
    """The mask the returned model is merged with, before rescaling."""
    with torch.no_grad():
        if how == FinalMask.EXPECTED:  # E[m] of a Bernoulli draw: σ(logit)
            return {n: torch.sigmoid(x) for n, x in logits.items()}
        uniforms = noise.draw("final", next(iter(logits.values())).device)
        if mask_type == MaskType.CONTINUOUS:
            return {n: relaxed_mask(x, uniforms[n], temperature) for n, x in logits.items()}
        if noise.file is not None:  # a recorded discrete draw is the 0/1 sample itself
            return {n: uniforms[n].clone() for n in logits}
        return {n: (uniforms[n] < torch.sigmoid(x)).float() for n, x in logits.items()}


@borrows_process_state
def concrete(
    pool: ModelPool,
    data: list[TaskData],
    preprocess: Preprocess,
    heads: dict[str, torch.Tensor],
    *,
    adamerging: bool,
    granularity: str = "task",
    scaling_factor: float = 0.3,
    max_steps: int = 2000,
    lr: float = 1e-3,
    initial_logits: float = 0.0,
    temperature: float = 0.5,
    eval_mask_type: str = "continuous",
    base_lr: float = 1.0,
    adamerging_lr: float = 1e-3,
    max_adamerging_steps: int = 1000,
    clamp_weights: bool = False,
    reset_before_merge: bool = False,
    skip_training: bool = False,
    final_mask: str = "sample",
    mask_noise: str | None = None,
    seed: int = 0,
    device: str = "cpu",
    workers: int = 0,
    quiet: bool = True,
) -> DataAwareResult:
    """Concrete Task Arithmetic (``adamerging=False``) or Concrete AdaMerging (task- or
    layer-wise) of ``pool``'s task models, on each task's ``data`` (FusionBench: one image per
    batch, ``max_steps`` batches, or ``2·max_steps + max_adamerging_steps`` for AdaMerging)."""
    check_data(pool, data)
    check_heads(data, heads)
    if granularity not in GRANULARITIES:
        raise MethodError(f"granularity {granularity!r}: choose task or layer")
    if not temperature > 0:
        raise MethodError(f"temperature {temperature}: must be positive")
    if eval_mask_type not in tuple(MaskType):
        raise MethodError(f"eval_mask_type {eval_mask_type!r}: choose continuous or discrete")
    if final_mask not in tuple(FinalMask):
        raise MethodError(f"final_mask {final_mask!r}: choose sample or expected")
    if skip_training:  # Concrete TA's: the final mask from the initial logits, no data read
        max_steps = 0
    needed = 2 * max_steps + max_adamerging_steps if adamerging else max_steps
    short = [d.task.name for d in data if len(d.batches()) < needed]
    if short:
        raise MethodError(f"task {short[0]}: its data has fewer batches than {needed} steps")
    base = load_vision(pool.pretrained, device).requires_grad_(False)
    pretrained = {name: p.detach() for name, p in base.named_parameters()}
    names = _own_names(base)
    shapes = {name: p.shape for name, p in pretrained.items()}
    noise = Noise(names, shapes, seed, mask_noise)
    tags = [f"step{s:03d}" for s in range(max_steps)]
    check_noise_tags(noise, [*tags, *(["final"] if final_mask == FinalMask.SAMPLE else [])])
    task_vectors = load_task_vectors(pool, base, device)
    logits = {
        name: torch.nn.Parameter(torch.full(shape, float(initial_logits), device=device))
        for name, shape in shapes.items()
    }
    shape = granularity if adamerging else Granularity.TASK  # TA: one fixed λ per task
    start = initial_weights(len(pool.models), len(pretrained), shape, scaling_factor).to(device)
    weights = torch.nn.Parameter(start.clone(), requires_grad=adamerging)
    merged_vision = MergedVision(base)
    scorer = zero_shot(pool.pretrained, merged_vision, device)
    task_heads = {d.task.name: heads[d.task.name].to(device) for d in data}
    loaders = {d.task.name: pixel_batches(d, preprocess, device, workers) for d in data}

    def total_entropy() -> torch.Tensor:
        total = None
        for task_data in data:
            name = task_data.task.name
            pixels = next(loaders[name])
            loss = entropy_loss(scorer.logits(scorer.embed(pixels), task_heads[name]))
            total = loss if total is None else total + loss
        return total

    losses: list[float] = []
    trace: list[torch.Tensor] = []  # AdaMerging: λ at every merge

    def step(mask: dict, optimizer: torch.optim.Optimizer, after_merge=None) -> None:
        """Merge with ``mask`` and the current λ, then one step of ``optimizer`` on the summed
        entropy of one batch per task (``after_merge`` runs between the two: D6's reset)."""
        if adamerging:
            trace.append(weights.detach().cpu().clone())
        merged_vision.params = masked_merge(pretrained, task_vectors, weights, mask, clamp_weights)
        if after_merge is not None:
            after_merge()
        loss = total_entropy()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        merged_vision.params = {}  # the graph

    def reset() -> None:
        weights.data.copy_(start)

    mask_optimizer = torch.optim.Adam(list(logits.values()), lr=lr)
    base_optimizer = torch.optim.Adam([weights], lr=base_lr)  # AdaMerging's inner steps
    label = f"Concrete {'AdaMerging (' + granularity + '-wise)' if adamerging else 'TA'}"
    with Bars(quiet, "elapsed") as bars, torch.enable_grad():
        bar = bars.add(label, max_steps + (max_adamerging_steps if adamerging else 0))
        for tag in tags:
            uniforms = noise.draw(tag, device)
            mask = rescaled(
                {n: relaxed_mask(x, uniforms[n], temperature) for n, x in logits.items()}
            )
            if adamerging:  # the inner step: λ adapted on the detached mask
                detached = {n: m.detach() for n, m in mask.items()}
                if reset_before_merge:
                    reset()
                # FusionBench (D6): the merge uses the previous step's λ, reset after it
                step(detached, base_optimizer, None if reset_before_merge else reset)
            step(mask, mask_optimizer)
            bars.advance(bar)
        raw = draw_final(logits, noise, eval_mask_type, final_mask, temperature)
        chosen = rescaled(raw)
        if adamerging:  # AdaMerging with the final mask, λ from its start
            reset()
            optimizer = torch.optim.Adam([weights], lr=adamerging_lr)
            for _ in range(max_adamerging_steps):
                step(chosen, optimizer)
                bars.advance(bar)
    with torch.no_grad():
        learned = weights.detach()
        if adamerging:
            trace.append(learned.cpu().clone())
        merged = masked_merge(pretrained, task_vectors, learned, chosen, clamp_weights)
    state = {names[own]: t.detach().cpu().contiguous() for own, t in merged.items()}
    saved = {f"mask_logits/{names[n]}": x.detach().cpu().contiguous() for n, x in logits.items()}
    saved.update({f"final_mask/{names[n]}": m.cpu().contiguous() for n, m in raw.items()})
    statistics: dict[str, Any] = {"entropy": losses}
    if adamerging:
        statistics["granularity"] = granularity
    return DataAwareResult(
        {name: state[name] for name in pool.tensor_names},
        rows_of(data),
        merging_weights=learned.cpu().clone(),
        weight_names=list(names.values()),
        statistics=statistics,
        saved=saved,
        trace=torch.stack(trace) if trace else None,
    )


def concrete_task_arithmetic(
    pool: ModelPool, data: list[TaskData], preprocess: Preprocess, heads: dict, **settings: Any
) -> DataAwareResult:
    """Concrete Task Arithmetic (``concrete(..., adamerging=False)``)."""
    return concrete(pool, data, preprocess, heads, adamerging=False, **settings)


def concrete_adamerging(
    pool: ModelPool, data: list[TaskData], preprocess: Preprocess, heads: dict, **settings: Any
) -> DataAwareResult:
    """Concrete AdaMerging, task- or layer-wise (``concrete(..., adamerging=True)``)."""
    return concrete(pool, data, preprocess, heads, adamerging=True, **settings)


@torch.no_grad()
def merge_with_mask(
    pool: ModelPool,
    weights: torch.Tensor,
    weight_names: list[str] | None,
    mask: dict[str, torch.Tensor],
    clamp_weights: bool = False,
) -> dict[str, torch.Tensor]:
    """θ₀ + Σ_t τ_t · (λ_t · m̂) from a saved λ and final mask (``--merging-weights``), without
    data, one tensor at a time: ``mask`` is the raw final mask by ``vision_model.*`` name."""
    weights = weights.detach().float().cpu()
    names = pool.tensor_names
    if weights.dim() not in (1, 2) or weights.shape[0] != len(pool.models):
        raise MethodError(
            f"merging weights of shape {list(weights.shape)}: expected [{len(pool.models)}] "
            f"or [{len(pool.models)}, tensors]"
        )
    if weights.dim() == 2 and (weight_names is None or len(weight_names) != weights.shape[1]):
        raise MethodError("layer-wise merging weights need their weight_names, one per column")
    column = {name: i for i, name in enumerate(weight_names or [])}
    missing = [n for n in names if n not in mask or (weights.dim() == 2 and n not in column)]
    if missing:
        raise MethodError(f"the merging weights file has no final mask or λ for {missing[0]}")
    if clamp_weights:
        weights = weights.clamp(0, 1)
    state = {}
    for name in names:
        pretrained = pool.pretrained.read(name).float()
        if tuple(mask[name].shape) != tuple(pretrained.shape):
            raise MethodError(
                f"final mask {name} is {list(mask[name].shape)}, the tensor is "
                f"{list(pretrained.shape)}"
            )
        scaled = mask[name].float() / torch.mean(mask[name].float())
        merged = pretrained
        for t, model in enumerate(pool.models):
            weight = weights[t] if weights.dim() == 1 else weights[t, column[name]]
            merged = merged + (model.read(name).float() - pretrained) * (weight * scaled)
        state[name] = merged
    return state
