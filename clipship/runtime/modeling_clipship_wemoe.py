"""A CLIP model whose vision MLPs are weight-ensembling mixtures (WEMoE / E-WEMoE), written by
clipship (https://github.com/) into every mixture folder it makes, so that

    AutoModel.from_pretrained(folder, trust_remote_code=True)

gives a ``CLIPModel`` whose ``get_image_features`` and zero-shot pipeline route each image on its
own. It imports only torch and transformers. clipship itself loads mixtures with this same file.

Each vision layer's MLP is ``base_model`` (the pretrained MLP), one task vector per expert (the
four MLP tensors τ_t; E-WEMoE's pruned ones stored as a bit mask of the kept entries plus their
values, in row-major order) and a router over the MLP's input (``gate``: depth 0 a vector, 1 one
linear layer, 2 fc1 → ReLU → fc2), shared by all layers when ``shared_gate``. For an image with
hidden states h [tokens, d], w = mean over tokens of gate(h) and MLP(h) = base(h; θ₀ + Σ_t w_t τ_t).
``config.wemoe`` records the experts, the router and the storage.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import CLIPConfig, CLIPModel

MLP_PARAMS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
FORMAT = "clipship-wemoe/1"  # config.wemoe.format: the layout this file reads
SYNTHESIS_BYTES = 64 << 20  # per-sample MLP weights made at once, at most


class CLIPWEMoEConfig(CLIPConfig):
    model_type = "clipship_wemoe"

    def __init__(self, wemoe: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self.wemoe = dict(wemoe or {})


class Gate(nn.Module):
    """The router, with FusionBench's parameter names for each depth."""

    def __init__(self, width: int, experts: int, depth: int):
        super().__init__()
        self.depth = depth
        if depth == 0:
            self.weight = nn.Parameter(torch.zeros(experts))
        elif depth == 1:
            self.fc = nn.Linear(width, experts)
        else:
            self.fc1 = nn.Linear(width, width)
            self.fc2 = nn.Linear(width, experts)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.depth == 0:
            return self.weight
        if self.depth == 1:
            return self.fc(hidden)
        return self.fc2(torch.relu(self.fc1(hidden)))


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as uint8 bytes, 8 entries per byte, least significant bit first."""
    flat = mask.reshape(-1).to(torch.uint8)
    flat = torch.nn.functional.pad(flat, (0, -flat.numel() % 8))
    bits = flat.reshape(-1, 8) << torch.arange(8, dtype=torch.uint8)
    return bits.sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, numel: int) -> torch.Tensor:
    bits = (packed.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    return bits.reshape(-1)[:numel].bool()


class TaskVector(nn.Module):
    """One expert's τ for the four MLP tensors: dense buffers (``fc1.weight``, ...) or, sparse,
    ``fc1.weight_mask`` (packed bits) and ``fc1.weight_values`` (the kept entries)."""

    def __init__(self, shapes: dict[str, tuple], kept: dict[str, int] | None = None):
        super().__init__()
        self.shapes = shapes
        self.sparse = kept is not None
        for name in MLP_PARAMS:
            module, tensor = name.split(".")
            holder = getattr(self, module, None)
            if holder is None:
                holder = nn.Module()
                setattr(self, module, holder)
            if kept is None:
                holder.register_buffer(tensor, torch.zeros(shapes[name]))
            else:
                numel = math.prod(shapes[name])
                holder.register_buffer(
                    f"{tensor}_mask", torch.zeros((numel + 7) // 8, dtype=torch.uint8)
                )
                holder.register_buffer(f"{tensor}_values", torch.zeros(kept[name]))

    def dense(self, name: str) -> torch.Tensor:
        module, tensor = name.split(".")
        holder = getattr(self, module)
        if not self.sparse:
            return getattr(holder, tensor)
        values = getattr(holder, f"{tensor}_values")
        mask = unpack_mask(getattr(holder, f"{tensor}_mask"), math.prod(self.shapes[name]))
        out = torch.zeros(mask.numel(), dtype=values.dtype, device=values.device)
        return out.masked_scatter_(mask, values).reshape(self.shapes[name])


def synthesised_mlp(
    hidden: torch.Tensor,
    base: dict[str, torch.Tensor],
    vectors: list[dict[str, torch.Tensor]],
    weights: torch.Tensor,
    activation,
) -> torch.Tensor:
    """Each sample b of ``hidden`` [B, tokens, d] through its own MLP weights
    θ₀ + Σ_t weights[b, t] τ_t (terms added in expert order), a few samples at a time."""
    per = sum(base[n].numel() for n in MLP_PARAMS) * base["fc1.weight"].element_size()
    chunk = max(1, SYNTHESIS_BYTES // per)
    outputs = []
    for start in range(0, hidden.shape[0], chunk):
        w = weights[start : start + chunk]
        made = {}
        for name in MLP_PARAMS:
            value = base[name].expand(w.shape[0], *base[name].shape)
            for t, vector in enumerate(vectors):
                value = value + w[:, t].reshape(-1, *([1] * base[name].dim())) * vector[name]
            made[name] = value
        h = hidden[start : start + chunk]
        h = torch.baddbmm(made["fc1.bias"].unsqueeze(1), h, made["fc1.weight"].transpose(1, 2))
        h = activation(h)
        h = torch.baddbmm(made["fc2.bias"].unsqueeze(1), h, made["fc2.weight"].transpose(1, 2))
        outputs.append(h)
    return torch.cat(outputs)


def layer_code(layer: int, dim: int) -> torch.Tensor:
    """sin then cos of ``layer`` at 10000^(−2i/dim) (FusionBench's positional_encoding)."""
    i = torch.arange(dim // 2, dtype=torch.float64)
    rates = 1 / torch.pow(torch.tensor(10000.0, dtype=torch.float64), (2 * i) / dim)
    return torch.cat([torch.sin(layer * rates), torch.cos(layer * rates)]).float()


class WEMoEMLP(nn.Module):
    def __init__(self, base: nn.Module, experts: list[TaskVector], gate: Gate, code):
        super().__init__()
        self.base_model = base
        self.task_vectors = nn.ModuleList(experts)
        self.gate = gate
        self.register_buffer("code", code, persistent=False)
        self.batch_reduce = False  # True: FusionBench's evaluation, one routing for the batch
        self.routing_sum: torch.Tensor | None = None  # when set, each image's weights add here
        self.routed = 0

    def routing_weights(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.gate.depth == 0:
            return self.gate(hidden).expand(hidden.shape[0], -1)
        inputs = hidden
        if self.code is not None:
            code = self.code.to(hidden).expand(*hidden.shape[:2], self.code.numel())
            inputs = torch.cat((code, hidden), dim=-1)
        return self.gate(inputs).mean(dim=1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weights = self.routing_weights(hidden)
        if self.batch_reduce:
            weights = weights.mean(dim=0, keepdim=True).expand_as(weights)
        if self.routing_sum is not None:
            self.routing_sum += weights.detach().float().sum(dim=0).to(self.routing_sum)
            self.routed += weights.shape[0]
        base = {n: p for n, p in self.base_model.named_parameters()}
        vectors = [{n: v.dense(n) for n in MLP_PARAMS} for v in self.task_vectors]
        activation = self.base_model.activation_fn
        if self.batch_reduce:  # one set of weights: the batch's tokens as one sample
            flat = hidden.reshape(1, -1, hidden.shape[-1])
            out = synthesised_mlp(flat, base, vectors, weights[:1], activation)
            return out.reshape(*hidden.shape[:2], -1)
        return synthesised_mlp(hidden, base, vectors, weights, activation)


class CLIPWEMoEModel(CLIPModel):
    """``CLIPModel`` with every vision MLP a :class:`WEMoEMLP` (per-sample routing)."""

    config_class = CLIPWEMoEConfig

    def __init__(self, config: CLIPWEMoEConfig):
        super().__init__(config)
        spec = config.wemoe
        experts = len(spec["experts"])
        vision = config.vision_config
        width = vision.hidden_size + (
            spec.get("position_encoding_dim", 0) if spec.get("position_encoding") else 0
        )
        depth = spec["router_hidden_layers"]
        shared = Gate(width, experts, depth) if spec.get("shared_gate") else None
        kept = spec.get("kept")  # sparse: "layer.expert.fc1.weight" → entries kept
        for index, layer in enumerate(self.vision_model.encoder.layers):
            shapes = {n: tuple(p.shape) for n, p in layer.mlp.named_parameters()}
            vectors = [
                TaskVector(
                    shapes,
                    None if kept is None else {n: kept[f"{index}.{t}.{n}"] for n in MLP_PARAMS},
                )
                for t in range(experts)
            ]
            code = None
            if spec.get("shared_gate") and spec.get("position_encoding"):
                code = layer_code(index, spec["position_encoding_dim"])
            gate = shared if shared is not None else Gate(width, experts, depth)
            layer.mlp = WEMoEMLP(layer.mlp, vectors, gate, code)
        self.post_init()
