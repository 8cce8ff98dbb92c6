"""``clipship info``: parameter counts and an architecture summary, read from headers only."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from clipship.errors import SourceNotFoundError
from clipship.pool import PRETRAINED, Model, count_params, load_model

_VISION_KEYS = (
    "image_size",
    "patch_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "projection_dim",
)
_TEXT_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
)


def describe(model: Model) -> dict[str, Any]:
    """FusionBench's ``model_info`` keys plus what the model is."""
    config = model.config
    arch = (config.get("architectures") or ["?"])[0]
    info: dict[str, Any] = {
        "name": model.name,
        "source": model.source,
        "revision": model.revision,
        "architecture": arch,
        "model_info": count_params(model),
        "vision_params": count_params(model, vision_only=True)["all_params"],
        "dtype": sorted({model.info(n).dtype for n in model.vision_keys}),
        "vision": {k: model.vision_config.get(k) for k in _VISION_KEYS if k in model.vision_config},
    }
    if model.has_text_tower:
        text = config["text_config"]
        info["text"] = {k: text.get(k) for k in _TEXT_KEYS if k in text}
    if config.get("model_type") == "clipship_wemoe":
        info["mixture"] = describe_mixture(model)
        routers = info["mixture"]["router_params"]
        total = info["model_info"]["all_params"]
        info["model_info"] = {  # FusionBench's: only the routers train
            "trainable_params": routers,
            "all_params": total,
            "trainable_percentage": routers / total if total else 0.0,
        }
    return info


def describe_mixture(model: Model) -> dict[str, Any]:
    """A WEMoE / E-WEMoE folder: its experts, router, routing, and the task vectors' storage
    (``density``: the share of entries kept, 1.0 dense)."""
    from clipship.runtime.model import check_mixture

    spec = check_mixture(model.config, model.source)
    tensors = model.checkpoint.tensors
    size = {n: math.prod(t.shape) for n, t in tensors.items()}
    routers = sum(size[n] for n in tensors if ".mlp.gate." in n)
    if spec["shared_gate"]:  # one router, stored under every layer's names
        routers //= model.vision_config["num_hidden_layers"]
    base = sum(size[n] for n in tensors if ".mlp.base_model." in n)  # one expert's entries
    vectors = base * len(spec["experts"])
    kept = sum(size[n] for n in tensors if ".task_vectors." in n and not n.endswith("_mask"))
    return {
        "experts": spec["experts"],
        "router_hidden_layers": spec["router_hidden_layers"],
        "shared_gate": spec["shared_gate"],
        "routing": spec["routing"],
        "storage": spec["storage"],
        "tv_prune_ratio": spec.get("tv_prune_ratio"),
        "router_params": routers,
        "task_vector_entries": vectors,
        "density": round(kept / vectors, 6) if vectors else None,
    }


def model_info(sources: dict[str, str], allow_pickle: bool = False) -> list[dict[str, Any]]:
    """Describe each ``{name: source}``; a pool passes its pretrained model as ``_pretrained_``."""
    out = []
    for name, source in sources.items():
        model = load_model(name or PRETRAINED, source, allow_pickle)
        try:
            out.append(describe(model))
        finally:
            model.checkpoint.close()
    return out


def pool_info(
    sources: list[str], pool: Path | None = None, allow_pickle: bool = False
) -> list[dict[str, Any]]:
    """``clipship info``: the models named, or every model of a pool file."""
    from clipship.requests import resolve_sources

    if pool is not None:
        return model_info(resolve_sources(pool).members(), allow_pickle)
    if not sources:
        raise SourceNotFoundError(
            "give one or more model sources, or `pool` POOL.yaml", option="pool"
        )
    return model_info({src: src for src in sources}, allow_pickle)
