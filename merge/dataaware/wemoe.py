"""Weight-Ensembling MoE ("Merging Multi-Task Models via Weight-Ensembling Mixture of Experts",
Tang et al., ICML 2024) and its sparse variant E-WEMoE, as FusionBench 0.2.33 builds and adapts
them for CLIP (``shared/mixing/README.md`` says what is matched).

Construction. Every vision tensor outside the MLPs is task arithmetic at ``init_lambda``:
θ₀ + λ₀·((τ₁ + τ₂) + …). Every layer's MLP becomes a mixture: the pretrained MLP θ₀, one task
vector τ_t per task model (E-WEMoE: each τ tensor magnitude-pruned, keeping |τ| > its
``tv_prune_ratio`` quantile) and a router over the MLP's input (depth 0: a free vector; 1: one
linear layer; 2: fc1 → ReLU → fc2), whose outputs, averaged over the tokens, are the experts'
unnormalised weights w: MLP(h) = base_mlp(h; θ₀ + Σ_t w_t τ_t). E-WEMoE's router is one module
shared by every layer (``shared_gate``), optionally fed a sinusoidal code of the layer index.

Test-time adaptation. Adam on the routers only, ``max_steps`` steps; each step takes one batch
of every task's unlabeled test images in pool order and minimises the entropy of its zero-shot
predictions. FusionBench either backpropagates each task's loss (``use_grad_accumulate``) or
their sum once; both give the router gradient Σ_t ∂e_t/∂θ (to float rounding), and here it is
always taken task by task, so one task's graph is held at a time, not all T of them.
``batch_reduce`` averages the routing weights over the batch while adapting (FusionBench's
default); the result routes each sample on its own (:class:`MoEMLP` with ``batch_reduce`` off).

Routers start from a generator seeded by (seed, layer) — or from a file with FusionBench's key
names (``router_init``), which is how parity with FusionBench's own runs is checked.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from clipship.errors import MethodError
from clipship.merge.dataaware.adamerging import entropy_loss
from clipship.merge.dataaware.batches import TaskData, pixel_batches
from clipship.merge.dataaware.common import (
    check_data,
    check_heads,
    layers,
    load_vision,
    rows_of,
    zero_shot,
)
from clipship.merge.matrices import canonical
from clipship.pool import ModelPool
from clipship.progress import Bars
from clipship.runtime.data import Preprocess
from clipship.runtime.modeling_clipship_wemoe import MLP_PARAMS, Gate, layer_code
from clipship.runtime.state import borrows_process_state

# --- routers -------------------------------------------------------------------------------------


class Router(Gate):
    """FusionBench's gates by depth, with its parameter names: 0 ``weight`` [T]; 1 ``fc``;
    2 ``fc1`` (d → d), ReLU, ``fc2`` (d → T) (the mixture folder's ``Gate``), initialised as
    FusionBench does."""

    def __init__(self, width: int, experts: int, depth: int):
        if depth not in (0, 1, 2):
            raise MethodError(f"router_hidden_layers {depth}: choose 0, 1 or 2")
        super().__init__(width, experts, depth)

    @torch.no_grad()
    def initialise(self, init_lambda: float, generator: torch.Generator) -> None:
        """FusionBench's init: weights N(0, 0.01²), the first bias 0, the last ``init_lambda``;
        depth 0 all ``init_lambda``. Draws come from ``generator`` (FusionBench: the global RNG)."""
        if self.depth == 0:
            self.weight.fill_(init_lambda)
            return
        last = self.fc if self.depth == 1 else self.fc2
        if self.depth == 2:
            self.fc1.weight.copy_(torch.randn(self.fc1.weight.shape, generator=generator) * 0.01)
            self.fc1.bias.zero_()
        last.weight.copy_(torch.randn(last.weight.shape, generator=generator) * 0.01)
        last.bias.fill_(init_lambda)


def router_generator(seed: int, index: int) -> torch.Generator:
    """The generator of router ``index``'s initial draws, from (``seed``, ``index``)."""
    digest = hashlib.sha256(f"clipship-wemoe-router\0{seed}\0{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


# --- the mixture MLP -----------------------------------------------------------------------------


@dataclass
class Pruned:
    """A pruned task-vector tensor held sparse: the flat (row-major) positions of its kept
    entries, ascending, as int32, and their values: 8 bytes per kept entry, 20 % of the dense
    tensor at ``tv_prune_ratio`` 0.9, and added into a weight with one ``index_add_``."""

    indices: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, ...]

    def dense(self) -> torch.Tensor:
        out = torch.zeros(math.prod(self.shape), dtype=self.values.dtype, device=self.values.device)
        return out.index_put_((self.indices.long(),), self.values).reshape(self.shape)


Vector = torch.Tensor | Pruned  # one MLP tensor of one task vector


def dense(value: Vector) -> torch.Tensor:
    return value.dense() if isinstance(value, Pruned) else value


def synthesise(base: torch.Tensor, terms: list[Vector], weights: torch.Tensor) -> torch.Tensor:
    """θ₀ + Σ_t w_t τ_t for one MLP tensor, the terms added in pool order, each as FusionBench's
    ``state + w_t · τ_t`` (a pruned τ adds w_t · value at its kept positions only, which is the
    same sum: its other terms are zeros)."""
    value = base
    for weight, term in zip(weights, terms):
        if isinstance(term, Pruned):
            value = value.clone() if value is base else value
            value.view(-1).index_add_(0, term.indices, term.values * weight)
        else:
            value = value + weight * term
    return value


def contract(grad: torch.Tensor, terms: list[Vector]) -> torch.Tensor:
    """[T]: ⟨∂L/∂W, τ_t⟩ for one MLP tensor W, each expert's share of its weight's gradient."""
    parts = []
    for term in terms:
        if isinstance(term, Pruned):
            parts.append((grad.reshape(-1)[term.indices] * term.values).sum())
        else:
            parts.append((grad * term).sum())
    return torch.stack(parts)


class MixedMLP(torch.autograd.Function):
    """A CLIP MLP with the weights θ₀ + Σ_t w_t τ_t, differentiable in the hidden states and w
    only. It keeps the layer's input, its pre-activation and w for the backward pass and makes
    the weights again there, one tensor at a time, rather than holding them (autograd would keep
    both synthesised matrices of every layer of every task until its backward: 19 MiB a layer
    for ViT-B/32)."""

    @staticmethod
    def forward(ctx, hidden, weights, base, vectors, activation):
        w = weights.detach()
        terms = {name: [v[name] for v in vectors] for name in MLP_PARAMS}
        made = {name: synthesise(base[name], terms[name], w) for name in ("fc1.weight", "fc1.bias")}
        pre = torch.nn.functional.linear(hidden, made["fc1.weight"], made["fc1.bias"])
        del made
        act = activation(pre)
        out = torch.nn.functional.linear(
            act,
            synthesise(base["fc2.weight"], terms["fc2.weight"], w),
            synthesise(base["fc2.bias"], terms["fc2.bias"], w),
        )
        ctx.save_for_backward(hidden, weights, pre)
        ctx.base, ctx.terms, ctx.activation = base, terms, activation
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weights, pre = ctx.saved_tensors
        w, base, terms = weights.detach(), ctx.base, ctx.terms
        with torch.enable_grad():
            pre = pre.detach().requires_grad_(True)
            act = ctx.activation(pre)
        flat_out = grad_out.reshape(-1, grad_out.shape[-1])
        flat_act = act.detach().reshape(-1, act.shape[-1])
        grad_w = contract(flat_out.T @ flat_act, terms["fc2.weight"])
        grad_w = grad_w + contract(flat_out.sum(dim=0), terms["fc2.bias"])
        grad_act = grad_out @ synthesise(base["fc2.weight"], terms["fc2.weight"], w)
        (grad_pre,) = torch.autograd.grad(act, pre, grad_act)
        del act, flat_act, grad_act
        flat_pre = grad_pre.reshape(-1, grad_pre.shape[-1])
        grad_w = grad_w + contract(
            flat_pre.T @ hidden.reshape(-1, hidden.shape[-1]), terms["fc1.weight"]
        )
        grad_w = grad_w + contract(flat_pre.sum(dim=0), terms["fc1.bias"])
        grad_hidden = grad_pre @ synthesise(base["fc1.weight"], terms["fc1.weight"], w)
        return grad_hidden, grad_w if ctx.needs_input_grad[1] else None, None, None, None


class MoEMLP(nn.Module):
    """One layer's MLP mixture: ``base`` (the pretrained ``CLIPMLP``, frozen), the task vectors
    of its four tensors (dense, or :class:`Pruned`), and a router (possibly shared)."""

    def __init__(
        self,
        base: nn.Module,
        task_vectors: list[dict[str, Vector]],
        router: Router,
        code: torch.Tensor | None = None,
    ):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.task_vectors = task_vectors
        self.router = router
        self.code = code  # the layer code prepended to the router's input, or None
        self.batch_reduce = False
        self.last_weights: torch.Tensor | None = None  # [B, T] of the last forward (routing maps)

    def routing_weights(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, T] per sample (the router's output averaged over the tokens), or [T] (depth 0)."""
        if self.router.depth == 0:
            return self.router(hidden)
        inputs = hidden
        if self.code is not None:
            code = self.code.to(hidden).expand(*hidden.shape[:2], self.code.numel())
            inputs = torch.cat((code, hidden), dim=-1)
        return self.router(inputs).mean(dim=1)

    def mlp(self, hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        base = dict(self.base.named_parameters())
        activation = self.base.activation_fn
        return MixedMLP.apply(hidden, weights, base, self.task_vectors, activation)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weights = self.routing_weights(hidden)
        self.last_weights = weights.detach() if weights.dim() == 2 else None
        if weights.dim() == 1 or self.batch_reduce:
            return self.mlp(hidden, weights if weights.dim() == 1 else weights.mean(dim=0))
        # each sample through its own weights, as FusionBench's per-sample loop
        return torch.cat([self.mlp(hidden[b : b + 1], w) for b, w in enumerate(weights)])


# --- construction --------------------------------------------------------------------------------


@dataclass
class MixtureSettings:
    """What shapes a mixture (FusionBench's keys)."""

    router_hidden_layers: int = 2
    init_lambda: float = 0.3
    tv_prune_ratio: float | None = None  # None: dense task vectors (WEMoE)
    shared_gate: bool = False
    position_encoding: bool = False
    position_encoding_dim: int = 8
    router_init: dict[str, torch.Tensor] | None = None  # FusionBench router key → tensor


@dataclass
class Mixture:
    """A built mixture: the vision model (θ₀'s module with the task-arithmetic tensors and the
    MLPs replaced by :class:`MoEMLP`), its MoE layers and routers (one per layer, or one shared)."""

    vision: Any
    mlps: list[MoEMLP]
    routers: list[Router]
    settings: MixtureSettings
    statistics: dict[str, Any] = field(default_factory=dict)

    def set_batch_reduce(self, value: bool) -> None:
        for mlp in self.mlps:
            mlp.batch_reduce = value


def prune_threshold(magnitude: torch.Tensor, ratio: float) -> torch.Tensor:
    """``torch.quantile(magnitude, ratio)`` (linear interpolation; FusionBench's
    ``_magnitude_prune``) from two order statistics instead of a sort, with quantile's own
    arithmetic (the rank ``ratio · (n − 1)`` in the tensor's dtype), at any size: torch.quantile
    refuses more than 2²⁴ entries (FusionBench's D8)."""
    flat = magnitude.reshape(-1)
    last = flat.numel() - 1
    rank = torch.tensor(ratio, dtype=flat.dtype, device=flat.device) * last
    # above 2²⁴ entries the float32 rank can round past the last index: clamp it
    below, above = min(int(rank.floor()), last), min(int(rank.ceil()), last)
    low = flat.kthvalue(below + 1).values
    high = low if above == below else flat.kthvalue(above + 1).values
    return torch.lerp(low, high, (rank - below).clamp(0, 1))


def magnitude_prune(vector: torch.Tensor, ratio: float) -> torch.Tensor:
    """``vector`` with |τ| ≤ its ``ratio`` quantile zeroed (FusionBench's rule, strict ``>``)."""
    magnitude = vector.abs()
    return vector * (magnitude > prune_threshold(magnitude, ratio))


def prune_sparse(vector: torch.Tensor, ratio: float) -> Pruned:
    """:func:`magnitude_prune` held as :class:`Pruned`."""
    flat = vector.reshape(-1)
    magnitude = flat.abs()
    indices = (magnitude > prune_threshold(magnitude, ratio)).nonzero().squeeze(1)
    return Pruned(indices.to(torch.int32), flat[indices].clone(), tuple(vector.shape))


def build_mixture(
    pool: ModelPool, settings: MixtureSettings, seed: int = 0, device: str = "cpu"
) -> Mixture:
    """The mixture of ``pool``: θ₀'s vision module, task arithmetic at ``init_lambda`` outside
    the MLPs, and an :class:`MoEMLP` per layer. One task tensor is read at a time."""
    vision = load_vision(pool.pretrained, device).requires_grad_(False)
    own = dict(vision.named_parameters())
    names = {canonical(name): name for name in own}
    encoder_layers = layers(vision)
    mlp_names = {
        canonical(f"encoder.layers.{i}.mlp.{p}")
        for i in range(len(encoder_layers))
        for p in MLP_PARAMS
    }
    task_vectors: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for name in pool.tensor_names:
            if not pool.pretrained.info(name).is_float or name not in names:
                continue
            pretrained = own[names[name]].detach()
            vectors = [model.read(name).float().to(device) - pretrained for model in pool.models]
            if name in mlp_names:
                if settings.tv_prune_ratio is not None:
                    vectors = [prune_sparse(v, settings.tv_prune_ratio) for v in vectors]
                task_vectors[name] = vectors
            else:  # FusionBench's task_arithmetic_merge: θ₀ + λ₀ · ((τ₁ + τ₂) + …)
                total = vectors[0].clone()
                for vector in vectors[1:]:
                    total = total + vector
                own[names[name]].copy_(pretrained + settings.init_lambda * total)
    width = vision.config.hidden_size
    experts = len(pool.models)
    router_width = width + (settings.position_encoding_dim if settings.position_encoding else 0)
    count = 1 if settings.shared_gate else len(encoder_layers)
    routers = [Router(router_width, experts, settings.router_hidden_layers) for _ in range(count)]
    for index, router in enumerate(routers):
        router.initialise(settings.init_lambda, router_generator(seed, index))
    if settings.router_init is not None:
        load_routers(routers, settings.router_init, len(encoder_layers))
    mlps = []
    for i, layer in enumerate(encoder_layers):
        prefix = canonical(f"encoder.layers.{i}.mlp.")
        vectors = [{p: task_vectors[f"{prefix}{p}"][t] for p in MLP_PARAMS} for t in range(experts)]
        code = None
        if settings.shared_gate and settings.position_encoding:
            code = layer_code(i, settings.position_encoding_dim).to(device)
        mlp = MoEMLP(layer.mlp, vectors, routers[0 if settings.shared_gate else i], code)
        layer.mlp = mlp
        mlps.append(mlp)
    for router in routers:
        router.to(device).requires_grad_(True)
    return Mixture(vision, mlps, routers, settings)


# --- FusionBench's names ------------------------------------------------------------------------


def router_keys(router: Router, layer: int) -> dict[str, str]:
    """FusionBench's state-dict key of each of ``router``'s parameters, as used at ``layer``."""
    prefix = f"vision_model.encoder.layers.{layer}.mlp.gate."
    return {prefix + name: name for name, _ in router.named_parameters()}


def load_routers(routers: list[Router], given: dict[str, torch.Tensor], n_layers: int) -> None:
    """Router values from FusionBench's keys (``gate_init.safetensors``): every key present,
    none extra, every shape right; a shared router's copies must agree."""
    expected: dict[str, tuple[Router, str]] = {}
    for layer in range(n_layers):
        router = routers[0] if len(routers) == 1 else routers[layer]
        for key, name in router_keys(router, layer).items():
            expected[key] = (router, name)
    missing = sorted(set(expected) - set(given))
    extra = sorted(set(given) - set(expected))
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has an extra tensor {extra[0]}"
        raise MethodError(f"router_init {what} ({len(expected)} router tensors expected)")
    params = {id(r): dict(r.named_parameters()) for r in routers}
    seen: dict[tuple[int, str], torch.Tensor] = {}
    with torch.no_grad():
        for key in sorted(expected):
            router, name = expected[key]
            target, value = params[id(router)][name], given[key]
            if tuple(value.shape) != tuple(target.shape):
                raise MethodError(
                    f"router_init: {key} is {list(value.shape)}, the mixture's is "
                    f"{list(target.shape)}"
                )
            if not bool(torch.isfinite(value).all()):
                raise MethodError(f"router_init: {key} has NaN or Inf values")
            first = seen.setdefault((id(router), name), value)
            if not torch.equal(first, value):
                raise MethodError(
                    f"router_init: {key} differs from the shared router's other copies"
                )
            target.copy_(value.to(target))


def fusionbench_state_dict(mixture: Mixture) -> dict[str, torch.Tensor]:
    """The mixture under FusionBench's module names (``vision_model.`` + its keys): the task-
    arithmetic tensors, ``...mlp.base_model.*``, ``...mlp.task_vectors.{t}.*`` and
    ``...mlp.gate.*`` (a shared router under every layer's key)."""
    state = {}
    for name, param in mixture.vision.named_parameters():
        key = canonical(name)
        if ".mlp." in key:
            continue
        state[key] = param.detach()
    for layer, mlp in enumerate(mixture.mlps):
        prefix = f"vision_model.encoder.layers.{layer}.mlp."
        for name, param in mlp.base.named_parameters():
            state[f"{prefix}base_model.{name}"] = param.detach()
        for t, vector in enumerate(mlp.task_vectors):
            for name in MLP_PARAMS:
                state[f"{prefix}task_vectors.{t}.{name}"] = dense(vector[name])
        for key, name in router_keys(mlp.router, layer).items():
            state[key] = dict(mlp.router.named_parameters())[name].detach()
    return state


# --- test-time adaptation ------------------------------------------------------------------------


@dataclass
class MixtureResult:
    mixture: Mixture
    rows: dict[str, list[int]]
    statistics: dict[str, Any] = field(default_factory=dict)


@borrows_process_state
def weight_ensembling_moe(
    pool: ModelPool,
    data: list[TaskData],
    preprocess: Preprocess,
    heads: dict[str, torch.Tensor],
    *,
    settings: MixtureSettings,
    batch_reduce: bool = True,
    lr: float = 1e-4,
    max_steps: int = 1000,
    use_grad_accumulate: bool = True,
    seed: int = 0,
    device: str = "cpu",
    workers: int = 0,
    quiet: bool = True,
) -> MixtureResult:
    """Build the mixture of ``pool`` and adapt its routers for ``max_steps`` steps on each
    task's unlabeled ``data`` (one batch per task per step, pool order) with its zero-shot
    ``heads``. The returned mixture routes each sample on its own.

    >>> data = [endless_data(t, "test", 1000, 16) for t in tasks]          # doctest: +SKIP
    >>> result = weight_ensembling_moe(pool, data, preprocess, heads, settings=MixtureSettings())
    """
    check_data(pool, data)
    check_heads(data, heads)
    if max_steps < 0:
        raise MethodError(f"max_steps {max_steps}: must be 0 or more")
    short = [d.task.name for d in data if len(d.batches()) < max_steps]
    if short:
        raise MethodError(f"task {short[0]}: its data has fewer batches than {max_steps} steps")
    mixture = build_mixture(pool, settings, seed, device)
    mixture.set_batch_reduce(batch_reduce)
    scorer = zero_shot(pool.pretrained, mixture.vision, device)
    task_heads = {d.task.name: heads[d.task.name].to(device) for d in data}
    loaders = {d.task.name: pixel_batches(d, preprocess, device, workers) for d in data}
    params = [p for router in mixture.routers for p in router.parameters()]
    optimizer = torch.optim.Adam(params, lr=lr)
    losses: list[float] = []
    mixture.vision.train()
    with Bars(quiet, "elapsed") as bars, torch.enable_grad():
        bar = bars.add("test-time adaptation (routers)", max_steps)
        for _ in range(max_steps):
            for task_data in data:
                name = task_data.task.name
                pixels = next(loaders[name])
                loss = entropy_loss(scorer.logits(scorer.embed(pixels), task_heads[name]))
                loss.backward()  # one task's graph held at a time, either loss path
                losses.append(float(loss.detach()))
            optimizer.step()
            optimizer.zero_grad()
            bars.advance(bar)
    mixture.vision.eval()
    mixture.set_batch_reduce(False)
    for router in mixture.routers:
        router.requires_grad_(False)
    return MixtureResult(mixture, rows_of(data), {"entropy": losses})


def mixture_of_experts(
    pool: ModelPool,
    data: list[TaskData],
    preprocess: Preprocess,
    heads: dict[str, torch.Tensor],
    *,
    router_hidden_layers: int,
    init_lambda: float,
    batch_reduce: bool,
    lr: float,
    max_steps: int,
    use_grad_accumulate: bool,
    router_init: str | None = None,
    tv_prune_ratio: float | None = None,
    shared_gate: bool = False,
    position_encoding: bool = False,
    position_encoding_dim: int = 8,
    post_sparse_gate: bool = False,
    gate_prune_ratio: float = 0.0,
    seed: int = 0,
    device: str = "cpu",
    quiet: bool = True,
) -> MixtureResult:
    """:func:`weight_ensembling_moe` from a method's flat parameters (FusionBench's keys);
    ``router_init`` a safetensors file of routers under FusionBench's keys. With
    ``post_sparse_gate``, each router tensor is magnitude-pruned at ``gate_prune_ratio`` after
    adaptation (FusionBench's post sparse gate)."""
    from clipship.merge.dataaware.plan import read_router_file

    settings = MixtureSettings(
        router_hidden_layers=router_hidden_layers,
        init_lambda=init_lambda,
        tv_prune_ratio=tv_prune_ratio,
        shared_gate=shared_gate,
        position_encoding=position_encoding,
        position_encoding_dim=position_encoding_dim,
        router_init=read_router_file(router_init) if router_init else None,
    )
    result = weight_ensembling_moe(
        pool, data, preprocess, heads, settings=settings, batch_reduce=batch_reduce, lr=lr,
        max_steps=max_steps, use_grad_accumulate=use_grad_accumulate, seed=seed, device=device,
        quiet=quiet,
    )  # fmt: skip
    if post_sparse_gate:
        with torch.no_grad():
            for router in result.mixture.routers:
                for param in router.parameters():
                    param.copy_(magnitude_prune(param, gate_prune_ratio))
    return result
