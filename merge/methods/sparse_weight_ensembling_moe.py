"""E-WEMoE (sparse weight-ensembling MoE): WEMoE whose task vectors keep only the entries above
each tensor's ``tv_prune_ratio`` quantile of |τ| (stored sparse in the mixture folder), with one
router shared by every layer. FusionBench's packaged defaults
(``method/wemoe/sparse_weight_ensembling_moe.yaml``).
"""

from __future__ import annotations

from clipship.merge.methods.regmean import unused
from clipship.merge.methods.weight_ensembling_moe import COMMON, KEYS
from clipship.merge.registry import DataUse, Method, Param, positive


def _below_one(value: float) -> str | None:
    return None if 0 <= value < 1 else "must be in [0, 1)"


METHOD = Method(
    name="sparse_weight_ensembling_moe",
    summary="E-WEMoE: WEMoE with magnitude-pruned task vectors and one shared router.",
    paper="https://arxiv.org/abs/2410.21804",
    params=(
        *COMMON,
        Param(
            "use_grad_accumulate",
            bool,
            False,
            "FusionBench's loss path: the same gradient either way (taken task by task here)",
        ),
        Param(
            "tv_prune_ratio",
            float,
            0.9,
            "share of each task-vector tensor zeroed",
            check=_below_one,
        ),
        Param("shared_gate", bool, True, "one router for every layer"),
        Param("position_encoding", bool, False, "feed the shared router a code of the layer index"),
        Param("position_encoding_dim", int, 8, "the layer code's size (even)", check=positive),
        Param("post_sparse_gate", bool, False, "magnitude-prune the routers after adaptation"),
        Param(
            "gate_prune_ratio", float, 0.0, "share of each router tensor zeroed", check=_below_one
        ),
    ),
    merge=unused,
    data=DataUse(
        "test",
        "mixture_of_experts",
        (
            *KEYS,
            "tv_prune_ratio",
            "shared_gate",
            "position_encoding",
            "position_encoding_dim",
            "post_sparse_gate",
            "gate_prune_ratio",
        ),
        examples="max_examples",
        endless=True,
        heads=True,
        seeded=True,
        mixture=True,
    ),  # fmt: skip
)
