"""A weight-ensembling mixture made exportable: every vision MLP computed for the whole batch at
once, each image through its own routing weights, with no loop over samples.

The runtime (``clipship.runtime.modeling_clipship_wemoe``) makes per-sample MLP weights a few
images at a time, a Python loop a graph cannot hold for a dynamic batch. Here the experts' task
vectors are stacked per tensor, τ [T, numel], and one product per tensor synthesises the whole
batch's weights, W_b = W₀ + (r τ)_b, then a batched matrix product applies them: about
T / tokens + 1 times the plain MLP's multiply-adds (1.16× for ViT-B/32's 50 tokens at 8 experts),
where stacking the experts' products instead would cost T + 1 times. E-WEMoE's pruned vectors
are made dense in the graph (a graph holds them as constants; the folder keeps them sparse).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from clipship.errors import ClipshipError
from clipship.runtime.modeling_clipship_wemoe import MLP_PARAMS, WEMoEMLP


class BatchedWEMoEMLP(nn.Module):
    """:class:`WEMoEMLP`'s function with the batch's weights synthesised in one product."""

    def __init__(self, moe: WEMoEMLP):
        super().__init__()
        self.moe = moe  # its router and layer code
        self.shapes = {n: tuple(p.shape) for n, p in moe.base_model.named_parameters()}
        for name in MLP_PARAMS:
            key = name.replace(".", "_")
            stacked = torch.stack([v.dense(name).reshape(-1) for v in moe.task_vectors])
            self.register_buffer(f"tau_{key}", stacked.detach().contiguous())  # [T, numel]
            base = moe.base_model.get_parameter(name).detach().reshape(-1)
            self.register_buffer(f"base_{key}", base.clone())
        self.activation = moe.base_model.activation_fn

    def weights(self, routing: torch.Tensor, name: str) -> torch.Tensor:
        """[B, *shape]: θ₀ + Σ_t r_bt τ_t, one Gemm (which int8 export leaves float: these are
        the images' weights, not a product to quantize)."""
        key = name.replace(".", "_")
        made = torch.addmm(getattr(self, f"base_{key}"), routing, getattr(self, f"tau_{key}"))
        return made.reshape(-1, *self.shapes[name])

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        routing = self.moe.routing_weights(hidden)  # [B, T], per image
        w1, b1 = self.weights(routing, "fc1.weight"), self.weights(routing, "fc1.bias")
        w2, b2 = self.weights(routing, "fc2.weight"), self.weights(routing, "fc2.bias")
        h = torch.matmul(hidden, w1.transpose(1, 2)) + b1.unsqueeze(1)
        h = self.activation(h)
        return torch.matmul(h, w2.transpose(1, 2)) + b2.unsqueeze(1)


def exportable(zero_shot: nn.Module) -> nn.Module:
    """A copy of a mixture's zero-shot model with :class:`BatchedWEMoEMLP` in every layer."""
    out = copy.deepcopy(zero_shot)
    for layer in out.vision.encoder.layers:
        if not isinstance(layer.mlp, WEMoEMLP):
            raise ClipshipError("the mixture's vision layers are not all WEMoE MLPs")
        layer.mlp = BatchedWEMoEMLP(layer.mlp)
    return out
