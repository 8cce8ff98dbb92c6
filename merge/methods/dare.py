"""DARE: drop each task-vector entry with probability p, rescale the rest by 1/(1−p), then merge
with a base method (task_arithmetic, ties or simple_average).

FusionBench draws every mask from one global RNG in model-then-parameter order, so its result
depends on that order and is not reproducible unless seeded. Here every (seed, task, tensor)
gets its own generator, so the merge is deterministic and independent of processing order.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace

import torch

from clipship.merge.methods.task_arithmetic import SCALING_FACTOR, sum_task_vectors
from clipship.merge.methods.ties import TIES_PARAMS, settle_majority, ties_direction, ties_prepass
from clipship.merge.registry import Method, Param, Stream, TensorInputs, scaled

# Masks are drawn per block of the flattened tensor, so a piece of any size and position gets
# the same entries as the whole tensor would (the engine streams pieces of this size).
BLOCK = 1 << 18


def mask_generator(seed: int, task: str, tensor: str, block: int) -> torch.Generator:
    key = f"{seed}\0{task}\0{tensor}\0{block}".encode()
    digest = hashlib.sha256(key).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def uniform(seed: int, task: str, tensor: str, numel: int, start: int, count: int) -> torch.Tensor:
    """Uniform [0, 1) draws for flat elements ``[start, start + count)`` of a ``numel`` tensor."""
    pieces = []
    for block in range(start // BLOCK, (start + count - 1) // BLOCK + 1 if count else 0):
        size = min(BLOCK, numel - block * BLOCK)
        draws = torch.rand(size, generator=mask_generator(seed, task, tensor, block))
        lo = max(start - block * BLOCK, 0)
        hi = min(start + count - block * BLOCK, size)
        pieces.append(draws[lo:hi])
    return torch.cat(pieces) if pieces else torch.empty(0)


def random_drop(
    task_vector: torch.Tensor, p: float, rescale: bool, draws: torch.Tensor
) -> torch.Tensor:
    """Zero each entry whose uniform draw is ≤ p; kept entries are divided by 1 − p."""
    dropped = task_vector * (draws > p)
    return dropped / (1 - p) if rescale else dropped


def is_linear_weight(name: str, shape: tuple[int, ...]) -> bool:
    """An ``nn.Linear`` weight of the CLIP vision tower (attention projections and MLP)."""
    return len(shape) == 2 and name.endswith(".weight") and ".embeddings." not in name


def dropped(
    inputs: TensorInputs, sparsity_ratio: float, rescale: bool, only_on_linear_weights: bool
) -> TensorInputs:
    if only_on_linear_weights and not is_linear_weight(inputs.name, inputs.shape):
        return inputs
    numel, count = math.prod(inputs.shape), inputs.pretrained.numel()
    vectors = [
        random_drop(
            tau,
            sparsity_ratio,
            rescale,
            uniform(inputs.seed, task, inputs.name, numel, inputs.offset, count),
        )
        for task, tau in zip(inputs.tasks, inputs.task_vectors)
    ]
    return replace(inputs, vectors=vectors)


def dare_direction(
    inputs: TensorInputs,
    base: str,
    sparsity_ratio: float,
    rescale: bool,
    only_on_linear_weights: bool,
    merge_func: str,
    **stats: object,
) -> tuple[torch.Tensor, int, bool]:
    """The base merge's task vector (before λ) of the dropped task vectors (task arithmetic or
    TIES; the masks depend on the seed, not on λ)."""
    x = dropped(inputs, sparsity_ratio, rescale, only_on_linear_weights)
    if base == "ties":
        return ties_direction(x, merge_func, **stats)  # type: ignore[arg-type]
    return sum_task_vectors(x.task_vectors), 0, False


def dare(inputs: TensorInputs, base: str, **values: object) -> tuple[torch.Tensor, int, bool]:
    if base != "simple_average":
        return scaled(dare_direction)(inputs, base=base, **values)
    x = dropped(
        inputs, values["sparsity_ratio"], values["rescale"], values["only_on_linear_weights"]
    )  # type: ignore[arg-type]
    return x.pretrained + sum_task_vectors(x.task_vectors) / len(x.task_vectors), 0, False


def dare_prepass(
    stream: Stream,
    numel: int,
    tasks: list[str],
    base: str,
    sparsity_ratio: float,
    rescale: bool,
    only_on_linear_weights: bool,
    threshold: float,
    **_: object,
) -> dict:
    if base != "ties":
        return {}

    def dropped_stream(label: str):
        for x in stream(label):
            yield dropped(x, sparsity_ratio, rescale, only_on_linear_weights)

    return ties_prepass(dropped_stream, numel, tasks, threshold)


def _check_p(p: float) -> str | None:
    return None if math.isfinite(p) and 0 <= p < 1 else "must be in [0, 1)"


METHOD = Method(
    name="dare",
    summary="Random drop-and-rescale of task vectors, then a base merge.",
    paper="https://arxiv.org/abs/2311.03099",
    params=(
        Param(
            "base",
            str,
            "task_arithmetic",
            "the merge applied after dropping",
            choices=("task_arithmetic", "ties", "simple_average"),
        ),
        Param(
            "sparsity_ratio", float, 0.5, "p, the probability of dropping an entry", check=_check_p
        ),
        Param("rescale", bool, True, "divide kept entries by 1 − p"),
        Param("only_on_linear_weights", bool, False, "drop only in nn.Linear weights"),
        SCALING_FACTOR,
        *TIES_PARAMS[1:],
    ),
    merge=dare,
    prepass=dare_prepass,
    settle=settle_majority,
    scale="scaling_factor",
    direction=dare_direction,
    scalable=lambda values: values["base"] != "simple_average",
)
