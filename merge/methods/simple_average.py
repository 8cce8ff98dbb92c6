"""Simple average (model soup): the element-wise mean of the fine-tuned models.

As in FusionBench, the pretrained model is not part of the average.
"""

from __future__ import annotations

import torch

from clipship.merge.registry import Method, TensorInputs


def simple_average(inputs: TensorInputs) -> torch.Tensor:
    total = inputs.finetuned[0].clone()
    for theta in inputs.finetuned[1:]:
        total += theta
    return total / len(inputs.finetuned)


METHOD = Method(
    name="simple_average",
    summary="Mean of the fine-tuned models (model soup).",
    paper="https://arxiv.org/abs/2203.05482",
    params=(),
    merge=simple_average,
)
