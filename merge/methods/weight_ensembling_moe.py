"""Weight-Ensembling MoE: task arithmetic outside the MLPs; every MLP a mixture of the pretrained
MLP and the task vectors, weighted per sample by a router trained at test time by entropy
minimisation on unlabeled test images (``clipship.merge.dataaware.wemoe``). The result is a
mixture folder (``AutoModel.from_pretrained(folder, trust_remote_code=True)``), not one tower.
FusionBench's packaged defaults (``method/wemoe/weight_ensembling_moe.yaml``).
"""

from __future__ import annotations

from clipship.merge.methods.regmean import unused
from clipship.merge.registry import (
    DataUse,
    Method,
    Param,
    finite,
    non_negative,
    parse_optional_int,
    positive,
)


def _depth(value: int) -> str | None:
    return None if value in (0, 1, 2) else "must be 0, 1 or 2"


def _optional_path(raw: object) -> str | None:
    text = None if raw is None else str(raw).strip()
    return None if text in (None, "", "null", "none", "None") else text


COMMON = (
    Param("router_hidden_layers", int, 2, "router depth: 0 vector, 1 linear, 2 MLP", check=_depth),
    Param("init_lambda", float, 0.3, "task arithmetic's λ, the routers' start", check=finite),
    Param("batch_reduce", bool, True, "average routing over the batch while adapting"),
    Param("lr", float, 1e-4, "Adam's learning rate for the routers", check=positive),
    Param("optimizer", str, "adam", "the routers' optimizer", choices=("adam",)),
    Param("batch_size", int, 16, "test images per task per step", check=positive),
    Param(
        "max_steps", int, 1000,
        "adaptation steps (each one batch per task); 0 keeps the routers as they start",
        check=non_negative,
    ),
    Param(
        "max_examples", int, None,
        "use only the first N test images per task (clipship's; null: all, as FusionBench)",
        check=positive, parse=parse_optional_int,
    ),
    Param(
        "router_init", str, None,
        "start from these routers (safetensors, FusionBench's keys) instead of seeded draws",
        parse=_optional_path,
    ),
)  # fmt: skip
KEYS = (
    "router_hidden_layers", "init_lambda", "batch_reduce", "lr", "max_steps",
    "use_grad_accumulate", "router_init",
)  # fmt: skip

METHOD = Method(
    name="weight_ensembling_moe",
    summary="Weight-ensembling MoE: per-sample routers over the MLPs' task vectors (a mixture).",
    paper="https://arxiv.org/abs/2402.00433",
    params=(
        *COMMON,
        Param(
            "use_grad_accumulate",
            bool,
            True,
            "FusionBench's loss path: the same gradient either way (taken task by task here)",
        ),
    ),
    merge=unused,
    data=DataUse(
        "test",
        "mixture_of_experts",
        KEYS,
        examples="max_examples",
        endless=True,
        heads=True,
        seeded=True,
        mixture=True,
    ),  # fmt: skip
)
