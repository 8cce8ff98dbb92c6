"""RegMean: per linear layer, the weights that best reproduce every task model's outputs on its
own task's inputs, in closed form (``clipship.merge.dataaware.regmean``).

W = (Σ_t G_t)⁻¹ Σ_t G_t W_tᵀ, with G_t the Gram matrix of the layer's inputs (token mean over
``num_regmean_examples`` training images of task t, off-diagonal entries scaled by
``reduce_non_diagonal_ratio``); every other tensor is the mean of the task models. FusionBench's
packaged defaults (``method/regmean/clip_regmean.yaml``).
"""

from __future__ import annotations

from typing import Any

from clipship.merge.registry import DataUse, Method, Param, parse_names, positive, unit_interval

PARAMS = (
    Param("num_regmean_examples", int, 256, "training images per task", check=positive),
    Param(
        "reduce_non_diagonal_ratio",
        float,
        0.95,
        "scale of the Grams' off-diagonal entries",
        check=unit_interval,
    ),
    Param(
        "exclude_param_names_regex",
        list,
        [],
        "tensors (re.match) kept at the pretrained value",
        parse=lambda raw: parse_names(raw) or [],
    ),
    Param("batch_size", int, 32, "images per forward pass", check=positive),
)


def unused(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("a data-aware method merges from its computed tower")


METHOD = Method(
    name="regmean",
    summary="Closed-form per-layer merge that matches every task model's layer outputs.",
    paper="https://arxiv.org/abs/2212.09849",
    params=PARAMS,
    merge=unused,
    data=DataUse(
        "train",
        "regmean",
        ("reduce_non_diagonal_ratio", "exclude_param_names_regex"),
        examples="num_regmean_examples",
    ),
)
