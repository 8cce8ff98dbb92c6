"""Which images a data-aware merge sees, in what order, as pixel values.

FusionBench draws its batches from a shuffled DataLoader seeded by the global RNG, so its order
cannot be re-derived, only recorded (its ``data_order``). Here an order is data: the rows of a
task's split in fetch order, either given (a recorded order, a recipe's) or drawn from a seed with
a ``torch.Generator`` per task, never the global RNG. ``TaskData.rows`` is what a recipe stores.

FusionBench consumes an order in one of two ways:

* **one pass** (RegMean, RegMean++, Fisher): batches in order, and before each batch it stops if
  ``examples`` were seen, so a batch size that does not divide ``examples`` uses a few more;
* **endless** (AdaMerging's ``InfiniteDataLoader``): epochs, each a fresh permutation of the whole
  split cut into batches. When the loader runs out it is restarted, so a batch never spans two
  epochs: each epoch ends with a short batch when the batch size does not divide the split.

Pixel values come from the runtime's processor-exact path (``ImageSource`` → ``to_uint8`` →
``normalize``), the bits of FusionBench's ``CLIPDataset``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from clipship.errors import DataError
from clipship.runtime.data import ImageSource, Preprocess, TaskImages, collate
from clipship.runtime.tasks import Task

SPLITS = ("train", "test")


@dataclass(frozen=True)
class TaskData:
    """The images one task contributes: ``rows`` of ``split`` in fetch order, in batches.

    With ``epoch_size`` (endless loaders), every ``epoch_size`` rows form one epoch whose last
    batch may be short; otherwise the rows are cut into batches of ``batch_size`` in order.
    """

    task: Task
    split: str
    rows: tuple[int, ...]
    batch_size: int
    epoch_size: int | None = None

    def batches(self) -> list[list[int]]:
        return cut_batches(list(self.rows), self.batch_size, self.epoch_size)

    def record(self) -> dict:
        """What a recipe keeps to replay this data."""
        return {
            "split": self.split,
            "batch_size": self.batch_size,
            "epoch_size": self.epoch_size,
            "rows": list(self.rows),
        }


def task_generator(seed: int, task: str) -> torch.Generator:
    """A generator for one task's order, seeded from (``seed``, task name): adding, removing or
    reordering tasks leaves every other task's order as it was."""
    digest = hashlib.sha256(f"clipship-dataaware\0{seed}\0{task}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def one_pass_rows(
    size: int, examples: int, batch_size: int, generator: torch.Generator | None
) -> list[int]:
    """The rows a one-pass consumer fetches: a permutation of ``range(size)`` drawn from
    ``generator`` (sequential rows with None), cut after the batch that reaches ``examples``."""
    order = list(range(size)) if generator is None else torch.randperm(size, generator=generator)
    return [int(i) for i in order[: one_pass_count(size, examples, batch_size)]]


def one_pass_count(size: int, examples: int, batch_size: int) -> int:
    """How many rows FusionBench's stopping rule uses: whole batches until ``examples``."""
    return min(size, math.ceil(examples / batch_size) * batch_size)


def endless_rows(size: int, steps: int, batch_size: int, generator: torch.Generator) -> list[int]:
    """The rows of ``steps`` batches from an endless loader, flattened in fetch order: a fresh
    permutation per epoch, the last epoch cut after the batch of step ``steps``."""
    per_epoch = math.ceil(size / batch_size)
    rows: list[int] = []
    for first_step in range(0, steps, per_epoch):
        epoch = torch.randperm(size, generator=generator).tolist()
        rows += epoch[: min(size, (steps - first_step) * batch_size)]
    return rows


def cut_batches(rows: list[int], batch_size: int, epoch_size: int | None = None) -> list[list[int]]:
    """``rows`` in batches of ``batch_size``; with ``epoch_size``, each epoch is cut on its own."""
    epochs = [rows] if epoch_size is None else chunks(rows, epoch_size)
    return [batch for epoch in epochs for batch in chunks(epoch, batch_size)]


def chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def one_pass_data(
    task: Task,
    split: str,
    examples: int,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    rows: list[int] | None = None,
) -> TaskData:
    """A task's data for a one-pass method: ``rows`` as given (a recorded order, cut by the
    stopping rule), else a seeded permutation (or rows 0, 1, … without ``shuffle``).

    >>> one_pass_data(task, "train", examples=256, batch_size=32)    # doctest: +SKIP
    """
    _check_sizes(task, split, batch_size, examples=examples)
    size = split_size(task, split)
    if rows is None:
        rows = one_pass_rows(
            size, examples, batch_size, task_generator(seed, task.name) if shuffle else None
        )
    else:
        rows = _checked_rows(task, split, rows, size)
        rows = rows[: one_pass_count(len(rows), examples, batch_size)]
    return TaskData(task, split, tuple(rows), batch_size)


def endless_data(
    task: Task,
    split: str,
    steps: int,
    batch_size: int,
    *,
    seed: int = 0,
    rows: list[int] | None = None,
    examples: int | None = None,
) -> TaskData:
    """A task's data for ``steps`` batches of an endless shuffled loader: ``rows`` as given (a
    recorded order: epochs of the split's size, each cut into batches), else drawn from ``seed``.
    ``examples`` limits the split to its first ``examples`` images (None: all of them).

    >>> endless_data(task, "test", steps=1000, batch_size=16)    # doctest: +SKIP
    """
    _check_sizes(task, split, batch_size, examples=examples, steps=steps)
    size = split_size(task, split)
    size = size if examples is None else min(size, examples)
    if steps == 0:  # nothing is read (a mixture shipped with its starting routers)
        return TaskData(task, split, (), batch_size, size)
    if rows is None:
        rows = endless_rows(size, steps, batch_size, task_generator(seed, task.name))
    rows = _checked_rows(task, split, rows, size)
    batches = cut_batches(rows, batch_size, size)
    if len(batches) < steps:
        raise DataError(
            f"task {task.name}: {len(rows)} rows make {len(batches)} batches, "
            f"{steps} steps need more"
        )
    used = sum(len(batch) for batch in batches[:steps])  # a longer recorded order is cut
    return TaskData(task, split, tuple(rows[:used]), batch_size, size)


def split_size(task: Task, split: str) -> int:
    """The number of images in ``task``'s ``split``."""
    return len(ImageSource(task, split))


def pixel_batches(
    data: TaskData, preprocess: Preprocess, device: str = "cpu", workers: int = 0
) -> Iterator[torch.Tensor]:
    """float32 pixel values [B, 3, H, W] on ``device``, batch by batch in ``data``'s order."""
    images = TaskImages(ImageSource(data.task, data.split), preprocess)
    loader = torch.utils.data.DataLoader(
        images, batch_sampler=data.batches(), num_workers=workers, collate_fn=collate
    )
    table = preprocess.lookup_table().to(device)
    for batch, _labels, _index, bad in loader:
        if bad:
            position, message = bad[0]
            raise DataError(
                f"task {data.task.name}: {data.split} image {position} cannot be read ({message})"
            )
        yield preprocess.normalize(batch.to(device), table)


def _check_sizes(
    task: Task, split: str, batch_size: int, examples: int | None = None, steps: int | None = None
) -> None:
    if split not in SPLITS:
        raise DataError(f"task {task.name}: split {split!r}: choose train or test")
    if batch_size < 1:
        raise DataError(f"batch size {batch_size}: must be at least 1")
    if examples is not None and examples < 1:
        raise DataError(f"{examples} examples: must be at least 1")
    if steps is not None and steps < 0:
        raise DataError(f"{steps} steps: must be 0 or more")


def _checked_rows(task: Task, split: str, rows: list[int], size: int) -> list[int]:
    rows = [int(r) for r in rows]
    outside = [r for r in rows if not 0 <= r < size]
    if outside:
        raise DataError(
            f"task {task.name}: row {outside[0]} is outside its {split} split ({size} images)"
        )
    if not rows:
        raise DataError(f"task {task.name}: no rows of its {split} split to use")
    return rows
