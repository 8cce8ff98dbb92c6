"""RegMean++: RegMean layer by layer, each layer's inputs taken from the model merged so far
(``clipship.merge.dataaware.regmean``). Like FusionBench 0.2.33, ``post_layernorm`` keeps the
pretrained value and the embeddings and ``pre_layrnorm`` are the task models' mean.
"""

from __future__ import annotations

from clipship.merge.methods.regmean import PARAMS, unused
from clipship.merge.registry import DataUse, Method

METHOD = Method(
    name="regmean_plusplus",
    summary="RegMean with each layer's inputs from the partly merged model.",
    paper="https://arxiv.org/abs/2508.03121",
    params=PARAMS,
    merge=unused,
    data=DataUse(
        "train",
        "regmean_plusplus",
        ("reduce_non_diagonal_ratio", "exclude_param_names_regex"),
        examples="num_regmean_examples",
    ),
)
