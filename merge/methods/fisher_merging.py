"""Fisher merging: each tensor the task models' average weighted by their diagonal Fisher
information (``clipship.merge.dataaware.fisher``), FusionBench's estimator: the squared gradient
of each batch's expected log-likelihood under the model's own predictions, over
``num_fisher_examples`` training images read in order, each task's Fisher scaled by its global
norm (``normalize_fisher_weight``), ``minimal_fisher_weight`` added.
"""

from __future__ import annotations

from clipship.merge.methods.regmean import unused
from clipship.merge.registry import DataUse, Method, Param, finite, parse_names, positive

METHOD = Method(
    name="fisher_merging",
    summary="Average weighted by each task model's diagonal Fisher information.",
    paper="https://arxiv.org/abs/2111.09832",
    params=(
        Param("num_fisher_examples", int, 256, "training images per task", check=positive),
        Param("normalize_fisher_weight", bool, True, "scale each task's Fisher by its norm"),
        Param("minimal_fisher_weight", float, 1e-6, "added to every Fisher value", check=finite),
        Param(
            "exclude_param_names_regex",
            list,
            [],
            "tensors (re.match) kept at the pretrained value",
            parse=lambda raw: parse_names(raw) or [],
        ),
        Param(
            "batch_size", int, 32, "images per backward pass (changes the estimate)", check=positive
        ),
    ),
    merge=unused,
    data=DataUse(
        "train",
        "fisher_merging",
        ("normalize_fisher_weight", "minimal_fisher_weight", "exclude_param_names_regex"),
        examples="num_fisher_examples",
        shuffle=False,
        heads=True,
    ),
)
