"""Data-aware merging: methods that look at each task's images, not only at the weights.

RegMean, RegMean++, Fisher merging and task-/layer-wise AdaMerging, reproducing FusionBench
0.2.33 (``shared/dataaware/README.md`` describes what is matched). Each method takes the model
pool, one ``TaskData`` per task model (which rows of which split, in fetch order, in batches),
the processor-exact ``Preprocess`` and, where logits are needed, the zero-shot text heads; it
returns a ``DataAwareResult``: the merged vision tower by ``vision_model.*`` name, the rows used
and, for AdaMerging, the learned merging weights.

>>> from clipship.merge.dataaware import one_pass_data, regmean               # doctest: +SKIP
>>> data = [one_pass_data(t, "train", examples=256, batch_size=32) for t in tasks]
>>> result = regmean(open_pool(pretrained, models), data, Preprocess.from_pretrained(folder))
"""

import importlib
from typing import Any

from clipship.merge.dataaware.adamerging import adamerging, entropy_loss, merge_with_weights
from clipship.merge.dataaware.batches import (
    TaskData,
    endless_data,
    one_pass_data,
    pixel_batches,
    task_generator,
)
from clipship.merge.dataaware.common import DataAwareResult
from clipship.merge.dataaware.concrete import concrete_adamerging, concrete_task_arithmetic
from clipship.merge.dataaware.fisher import fisher_merging
from clipship.merge.dataaware.regmean import regmean, regmean_plusplus


def __getattr__(name: str) -> Any:
    """WEMoE's entry point on first use (PEP 562): its modeling file imports transformers, and a
    method's parameter table (`clipship methods`) must not wait seconds for it."""
    if name == "mixture_of_experts":
        return importlib.import_module(f"{__name__}.wemoe").mixture_of_experts
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DataAwareResult",
    "TaskData",
    "adamerging",
    "concrete_adamerging",
    "concrete_task_arithmetic",
    "endless_data",
    "entropy_loss",
    "fisher_merging",
    "merge_with_weights",
    "mixture_of_experts",
    "one_pass_data",
    "pixel_batches",
    "regmean",
    "regmean_plusplus",
    "task_generator",
]
