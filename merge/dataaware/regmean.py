"""RegMean ("Dataless Knowledge Fusion by Merging Weights of Language Models", Jin et al., 2023)
and RegMean++ (Nguyen et al., 2025), as FusionBench 0.2.33 computes them for CLIP.

For every ``nn.Linear`` of the vision tower, each task model's Gram matrix of the layer's inputs
on its own task's data, G_t = XᵀX / rows with X all tokens of all images ([B·T, d_in]), kept as
a running mean weighted by rows: G ← (G·n + XᵀX) / (n + B·T). Off-diagonal entries are scaled by
``reduce_non_diagonal_ratio`` (G'), and the merged weight solves the regression
W = ((Σ_t G'_t)⁻¹ Σ_t G'_t W_tᵀ)ᵀ (``torch.inverse`` then a product, as FusionBench). Every
other tensor (biases, LayerNorms, embeddings) is the mean of the task models.

Streaming: one task model is resident at a time; what stays is Σ_t G'_t and Σ_t G'_t W_tᵀ per
Linear and the running sums of the averaged tensors. The Grams are float32 with FusionBench's
exact running mean; float64 was tried and lands further from FusionBench's output (see the
tests' parity figures).

RegMean++ merges layer by layer: the inputs of layer l come from the partially merged model
(embeddings and ``pre_layrnorm`` averaged first, then each merged layer in turn), while each
task's Grams come from its own fine-tuned layer l on those inputs. Only one task's layer is
resident at a time, read from its checkpoint. As in FusionBench, ``post_layernorm`` is never
merged and stays the pretrained one.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch

from clipship.merge.dataaware.batches import TaskData, pixel_batches
from clipship.merge.dataaware.common import (
    DataAwareResult,
    accumulate,
    canonical_params,
    check_data,
    excluded,
    layers,
    linear_modules,
    load_vision,
    mergeable,
    rows_of,
    run_layer,
    tower,
)
from clipship.merge.matrices import canonical
from clipship.pool import ModelPool
from clipship.progress import Bars
from clipship.runtime.data import Preprocess
from clipship.runtime.state import borrows_process_state


class GramCollector:
    """Forward hooks on ``linears`` that keep each input's running token-mean Gram matrix.

    >>> with GramCollector(linear_modules(model)) as grams:    # doctest: +SKIP
    ...     model(pixel_values=batch)
    >>> grams.grams["encoder.layers.0.mlp.fc1"].shape
    """

    def __init__(self, linears: dict[str, torch.nn.Linear]):
        self.grams: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in linears.items()]

    def _hook(self, name: str):
        def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            x = inputs[0].detach()
            x = x.reshape(-1, x.shape[-1])
            xtx = torch.matmul(x.transpose(0, 1), x)
            if name not in self.grams:
                self.grams[name] = xtx / x.shape[0]
                self.rows[name] = x.shape[0]
            else:
                n = self.rows[name]
                self.grams[name] = (self.grams[name] * n + xtx) / (n + x.shape[0])
                self.rows[name] = n + x.shape[0]

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def __enter__(self) -> GramCollector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def reduce_non_diagonal(gram: torch.Tensor, ratio: float) -> torch.Tensor:
    """G ⊙ M: off-diagonal entries times ``ratio``, the diagonal unchanged."""
    mask = torch.full_like(gram, ratio)
    mask.fill_diagonal_(1.0)
    return gram * mask


class RegMeanSums:
    """Σ_t G'_t and Σ_t G'_t W_tᵀ per Linear weight, Σ_t θ_t for the averaged tensors."""

    def __init__(self, ratio: float):
        self.ratio = ratio
        self.gram_sum: dict[str, torch.Tensor] = {}
        self.product_sum: dict[str, torch.Tensor] = {}
        self.tensor_sum: dict[str, torch.Tensor] = {}
        self.count = 0

    def add_task(self, params: dict[str, torch.Tensor], grams: dict[str, torch.Tensor]) -> None:
        """One task model: ``params`` by name, ``grams`` by the name of the weight they solve."""
        for name, value in params.items():
            value = value.detach()
            if name in grams:
                gram = reduce_non_diagonal(grams[name], self.ratio)
                product = torch.matmul(gram, value.transpose(0, 1))
                accumulate(self.gram_sum, name, gram)
                accumulate(self.product_sum, name, product)
            else:
                accumulate(self.tensor_sum, name, value)
        self.count += 1

    def merged(self) -> dict[str, torch.Tensor]:
        out = {name: total / self.count for name, total in self.tensor_sum.items()}
        for name, gram_sum in self.gram_sum.items():
            out[name] = regmean_solve(gram_sum, self.product_sum[name])
        return out


def regmean_solve(gram_sum: torch.Tensor, product_sum: torch.Tensor) -> torch.Tensor:
    """W = ((Σ G')⁻¹ Σ G' Wᵀ)ᵀ, with ``torch.inverse`` then a product (FusionBench's bits)."""
    return torch.matmul(torch.inverse(gram_sum), product_sum).transpose(0, 1)


@borrows_process_state
@torch.no_grad()
def regmean(
    pool: ModelPool,
    data: list[TaskData],
    preprocess: Preprocess,
    *,
    reduce_non_diagonal_ratio: float = 0.95,
    exclude_param_names_regex: Iterable[str] = (),
    device: str = "cpu",
    workers: int = 0,
    quiet: bool = True,
) -> DataAwareResult:
    """RegMean over ``pool``'s task models, each on its own task's ``data`` (one pass).

    Tensors matching ``exclude_param_names_regex`` (``re.match`` on the ``vision_model.*`` or
    the bare name) are not merged and keep the pretrained values.

    >>> data = [one_pass_data(t, "train", 256, 32) for t in tasks]     # doctest: +SKIP
    >>> regmean(pool, data, Preprocess.from_pretrained(folder)).state_dict
    """
    check_data(pool, data)
    patterns = list(exclude_param_names_regex)
    sums = RegMeanSums(reduce_non_diagonal_ratio)
    with Bars(quiet, "elapsed") as bars:
        bar = bars.add("RegMean", sum(len(d.batches()) for d in data))
        for model, task_data in zip(pool.models, data):
            vision = load_vision(model, device)
            linears = linear_modules(vision)
            with GramCollector(linears) as collector:
                for pixels in pixel_batches(task_data, preprocess, device, workers):
                    vision(pixel_values=pixels)
                    bars.advance(bar)
            params = mergeable(canonical_params(vision), patterns)
            grams = {canonical(f"{name}.weight"): g for name, g in collector.grams.items()}
            sums.add_task(params, grams)
            del vision, linears, collector, params, grams
    merged = _on_cpu(sums.merged())
    state = {**_pretrained_rest(pool, merged), **merged}
    return DataAwareResult(_ordered(pool, state), rows_of(data))


@borrows_process_state
@torch.no_grad()
def regmean_plusplus(
    pool: ModelPool,
    data: list[TaskData],
    preprocess: Preprocess,
    *,
    reduce_non_diagonal_ratio: float = 0.95,
    exclude_param_names_regex: Iterable[str] = (),
    device: str = "cpu",
    workers: int = 0,
    quiet: bool = True,
) -> DataAwareResult:
    """RegMean++ over ``pool``'s task models, each on its own task's ``data`` (one pass).

    As in FusionBench, ``exclude_param_names_regex`` is matched against the names inside a
    layer (``self_attn.q_proj.weight``); excluded tensors keep the pretrained values, and the
    embeddings and ``pre_layrnorm`` are always averaged.

    >>> regmean_plusplus(pool, data, preprocess).state_dict    # doctest: +SKIP
    """
    check_data(pool, data)
    patterns = list(exclude_param_names_regex)
    merged_model = load_vision(pool.pretrained, device)
    merged_tower = tower(merged_model)
    prefix = canonical("")
    # 1. embeddings and pre_layrnorm: the mean of the task models.
    front = {
        name: p
        for name, p in canonical_params(merged_model).items()
        if name.startswith((f"{prefix}embeddings.", f"{prefix}pre_layrnorm."))
    }
    for name, param in front.items():
        param.copy_(_mean_of(pool, name).to(device))
    # 2. each task's first-layer inputs through the merged embeddings.
    inputs: dict[str, list[torch.Tensor]] = {}
    for task_data in data:
        inputs[task_data.task.name] = [
            merged_tower.pre_layrnorm(merged_tower.embeddings(pixels))
            for pixels in pixel_batches(task_data, preprocess, device, workers)
        ]
    # 3. layer by layer: Grams from each task's own layer, merged, then inputs moved on.
    merged_layers = layers(merged_model)
    with Bars(quiet, "elapsed") as bars:
        bar = bars.add("RegMean++", len(merged_layers) * len(pool.models))
        for index, merged_layer in enumerate(merged_layers):
            layer_prefix = f"{prefix}encoder.layers.{index}."
            sums = RegMeanSums(reduce_non_diagonal_ratio)
            for model in pool.models:
                task_layer = _task_layer(model, merged_layer, layer_prefix)
                with GramCollector(linear_modules(task_layer)) as collector:
                    for hidden in inputs[model.name]:
                        run_layer(task_layer, hidden)
                params = {
                    name: p
                    for name, p in task_layer.named_parameters()
                    if not excluded(patterns, name)
                }
                grams = {f"{name}.weight": g for name, g in collector.grams.items()}
                sums.add_task(params, grams)
                del task_layer, collector
                bars.advance(bar)
            merged_layer.load_state_dict(sums.merged(), strict=False)
            if index < len(merged_layers) - 1:
                inputs = {
                    name: [run_layer(merged_layer, hidden) for hidden in batches]
                    for name, batches in inputs.items()
                }
    state = _on_cpu({name: p.detach() for name, p in canonical_params(merged_model).items()})
    return DataAwareResult(_ordered(pool, state), rows_of(data))


def _task_layer(model, like: torch.nn.Module, prefix: str) -> torch.nn.Module:
    """A copy of ``like`` holding ``model``'s values of that layer, read from its checkpoint."""
    layer = copy.deepcopy(like)
    for name, param in layer.named_parameters():
        param.copy_(model.read(prefix + name))
    return layer


def _mean_of(pool: ModelPool, name: str) -> torch.Tensor:
    total = pool.models[0].read(name).float()
    for model in pool.models[1:]:
        total += model.read(name).float()
    return total / len(pool.models)


def _pretrained_rest(pool: ModelPool, merged: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The pretrained values of the vision tensors a merge left out (excluded ones)."""
    return {
        name: pool.pretrained.read(name).float()
        for name in pool.pretrained.vision_keys
        if name not in merged
    }


def _on_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in state.items()}


def _ordered(pool: ModelPool, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: state[name] for name in pool.tensor_names if name in state}
