"""AdaMerging: θ = θ₀ + Σ_t λ_t τ_t with the merging weights λ learned by minimising the entropy
of the merged model's zero-shot predictions on each task's unlabeled test images
(``clipship.merge.dataaware.adamerging``). ``granularity`` task: one λ per task model; layer:
one per task model and tensor. Adam, ``max_steps`` steps, each summing one batch per task.
FusionBench's packaged defaults (``method/adamerging/clip.yaml``); ``--save-merging-weights``
keeps the learned λ and ``--merging-weights`` merges with given ones, without data.
"""

from __future__ import annotations

from clipship.merge.dataaware.adamerging import Granularity
from clipship.merge.methods.regmean import unused
from clipship.merge.registry import DataUse, Method, Param, finite, parse_optional_int, positive

METHOD = Method(
    name="adamerging",
    summary="Task arithmetic with merging weights learned by test-time entropy minimisation.",
    paper="https://arxiv.org/abs/2310.02575",
    params=(
        Param(
            "granularity",
            str,
            "layer",
            "one weight per task, or per task and tensor",
            choices=tuple(Granularity),
        ),  # fmt: skip
        Param("init_values", float, 0.3, "every merging weight's start", check=finite),
        Param("max_steps", int, 1000, "Adam steps (each one batch per task)", check=positive),
        Param("lr", float, 1e-3, "Adam's learning rate", check=positive),
        Param("clamp_weights", bool, False, "clamp the merging weights to [0, 1]"),
        Param("batch_size", int, 16, "test images per task per step", check=positive),
        Param(
            "max_examples",
            int,
            None,
            "use only the first N test images per task (clipship's; null: all, as FusionBench)",
            check=positive,
            parse=parse_optional_int,
        ),
    ),
    merge=unused,
    data=DataUse(
        "test",
        "adamerging",
        ("granularity", "max_steps", "lr", "init_values", "clamp_weights"),
        examples="max_examples",
        endless=True,
        heads=True,
    ),
)
