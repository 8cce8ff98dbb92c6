"""Concrete AdaMerging: a shared Concrete mask meta-learned around an inner AdaMerging step,
then λ learned with the final mask (``clipship.merge.dataaware.concrete``), task- or layer-wise.
FusionBench's packaged defaults (``method/concrete_subspace/clip_concrete_{task,layer}_wise_
adamerging.yaml``); its defects D5, D6 and D7 are followed unless ``use_batch_size``,
``reset_before_merge`` and ``final_mask: expected`` say otherwise.
"""

from __future__ import annotations

from clipship.merge.dataaware.adamerging import Granularity
from clipship.merge.methods.concrete_task_arithmetic import KEYS, MASK, _steps
from clipship.merge.methods.regmean import unused
from clipship.merge.registry import DataUse, Method, Param, non_negative, positive

METHOD = Method(
    name="concrete_adamerging",
    summary="AdaMerging through a shared Concrete mask, meta-learned by test-time entropy.",
    paper="https://arxiv.org/abs/2312.06173",
    params=(
        Param(
            "granularity",
            str,
            "layer",
            "one λ per task, or per task and tensor",
            choices=tuple(Granularity),
        ),
        *MASK,
        Param("max_steps", int, 1000, "meta steps (each two batches per task)", check=positive),
        Param("base_lr", float, 1.0, "Adam's learning rate for the inner λ step", check=positive),
        Param(
            "adamerging_lr",
            float,
            1e-3,
            "Adam's learning rate for λ with the final mask",
            check=positive,
        ),
        Param(
            "max_adamerging_steps",
            int,
            1000,
            "AdaMerging steps with the final mask",
            check=non_negative,
        ),
        Param(
            "reset_before_merge",
            bool,
            False,
            "reset λ before the inner merge (FusionBench merges with the previous λ: D6)",
        ),
    ),
    merge=unused,
    data=DataUse(
        "test",
        "concrete_adamerging",
        (
            *KEYS,
            "granularity",
            "base_lr",
            "adamerging_lr",
            "max_adamerging_steps",
            "reset_before_merge",
        ),
        examples="max_examples",
        endless=True,
        heads=True,
        seeded=True,
        schedule=_steps,
    ),  # fmt: skip
)
