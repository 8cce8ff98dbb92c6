"""Zero-shot evaluation of a (merged) CLIP vision encoder, FusionBench's protocol (SPEC §3).

logits = exp(logit_scale) · normalised(visual_projection(pooler_output)) @ headᵀ, with the heads,
the projection and the logit scale taken from the pretrained CLIPModel. Per task: ``accuracy``
(correct / total) and ``loss``, the per-sample mean cross-entropy. FusionBench instead averages
per-batch means without weighting, so its figure depends on the batch size; that variant is
reported too, as ``loss_batch_mean``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from clipship.errors import ClipshipError, NonFiniteError
from clipship.eval.robustness import DEFAULT_SEVERITY
from clipship.machine import pick_device
from clipship.outputs import first_nonfinite
from clipship.progress import Bars
from clipship.reports import EvalReport
from clipship.requests import choice
from clipship.runtime.corruptions import HUB_CORRUPTED, Corruption
from clipship.runtime.data import DataError, ImageSource, Preprocess, TaskImages, collate
from clipship.runtime.heads import build_heads, check_heads, load_heads
from clipship.runtime.model import (
    PRECISIONS,
    Precision,
    Routing,
    ZeroShotModel,
    hub_dataset,
    load_zero_shot,
    set_routing,
)
from clipship.runtime.state import borrows_process_state
from clipship.runtime.tasks import Task, unseen

MAX_BATCH = 65536


@borrows_process_state
def evaluate(
    model: str,
    tasks: list[Task],
    *,
    pretrained: str | None = None,
    heads: Path | None = None,
    device: str = "auto",
    precision: str = "fp32",
    batch_size: int = 128,
    limit: int | None = None,
    workers: int | None = None,
    seed: int = 0,
    skip_bad_images: bool = False,
    quiet: bool = True,
    routing: str = "per_sample",
    corruptions: list[str] | None = None,
    severity: int | None = None,
) -> EvalReport:
    """Accuracy and loss per task, their average and the model's size (FusionBench's report
    shape, ``EvalReport.to_json()``). With ``corruptions``, also each task's accuracy under
    each corruption (``robustness``): the hub's corrupted split where the task's test set has
    one (FusionBench's robustness tasks), otherwise its images corrupted here at ``severity``.

    >>> evaluate("merged/", get_tasks("all"), device="cuda")   # doctest: +SKIP
    """
    check_options(precision, batch_size, limit, workers, routing)
    device = init_distributed(pick_device(device))
    if precision == "fp16" and device == "cpu":
        raise ClipshipError(
            "`precision` fp16 needs a GPU (use bf16 or fp32 on CPU)", option="precision"
        )
    torch.manual_seed(seed)
    zero_shot, pretrained_folder, info = load_zero_shot(model, pretrained, device)
    layers = set_routing(zero_shot, info, routing)
    if heads is not None:
        head_table, meta = load_heads(heads)
        check_heads(meta, pretrained_folder)
        absent = [t.name for t in tasks if t.name not in head_table]
        if absent:
            raise ClipshipError(f"{heads}: no head for task {absent[0]!r}")
    else:
        head_table, _ = build_heads(pretrained_folder, tasks)
    preprocess = Preprocess.from_pretrained(pretrained_folder)
    rows: dict[str, dict[str, Any]] = {}
    for task in tasks:
        for layer in layers:  # a mixture: the mean routing weights of this task's images
            layer.routing_sum = torch.zeros(len(info["experts"]), dtype=torch.float64)
            layer.routed = 0
        rows[task.name] = evaluate_task(
            zero_shot,
            task,
            head_table[task.name],
            preprocess,
            device,
            precision,
            batch_size,
            limit,
            workers,
            skip_bad_images,
            quiet,
        )
        if layers:  # [layer][expert], this process's images
            rows[task.name]["routing_weights"] = [
                [round(float(w), 6) for w in layer.routing_sum / max(layer.routed, 1)]
                for layer in layers
            ]
            for layer in layers:
                layer.routing_sum = None
    names = [t.name for t in tasks]
    report = {**rows, "average": mean_of(rows, names)}
    hidden = unseen(names, info.get("task_models") or info.get("experts") or [])
    if hidden:  # generalization: tasks none of the merged task models was tuned on
        for name in hidden:
            rows[name]["unseen"] = True
        seen = [n for n in names if n not in hidden]
        if seen:
            report["average_seen"] = mean_of(rows, seen)
        report["average_unseen"] = mean_of(rows, hidden)
    if corruptions:
        level = severity or DEFAULT_SEVERITY
        section: dict[str, Any] = {}
        for name in corruptions:
            corrupted: dict[str, dict[str, Any]] = {}
            for task in tasks:
                row = evaluate_task(
                    zero_shot, task, head_table[task.name], preprocess, device, precision,
                    batch_size, limit, workers, skip_bad_images, quiet,
                    corruption=Corruption(name, level, seed, task.name),
                )  # fmt: skip
                keep = ("accuracy", "loss", "samples", "skipped", "dataset", "source")
                corrupted[task.name] = {k: row[k] for k in keep if k in row}
            corrupted["average"] = mean_of(corrupted, names)
            section[name] = corrupted
        report["robustness"] = {"severity": level, "corruptions": section}
    report["model_info"] = info
    bad = first_nonfinite(report)
    if bad is not None:  # a metric that is not a number is never reported, gated or written
        raise NonFiniteError(
            f"{model}: {bad[0]} is {bad[1]} (the model's logits overflow at `precision` "
            f"{precision}?); nothing was written",
            option="precision",
        )
    return EvalReport.from_json(report)


def mean_of(rows: dict[str, dict[str, Any]], names: list[str]) -> dict[str, float]:
    return {key: sum(rows[n][key] for n in names) / len(names) for key in ("accuracy", "loss")}


def check_options(
    precision: str,
    batch_size: int,
    limit: int | None,
    workers: int | None,
    routing: str = "per_sample",
) -> None:
    """An evaluation's settings, checked before anything loads."""
    choice(Precision, precision, "precision")
    choice(Routing, routing, "routing")
    if batch_size < 1:
        raise ClipshipError(f"`batch_size` {batch_size}: must be positive", option="batch_size")
    if batch_size > MAX_BATCH:
        raise ClipshipError(f"`batch_size` {batch_size}: at most {MAX_BATCH}", option="batch_size")
    if limit is not None and limit < 1:
        raise ClipshipError(f"`limit` {limit}: must be positive", option="limit")
    if workers is not None and workers < 0:
        raise ClipshipError(
            f"`workers` {workers}: must be 0 (load in this process) or more", option="workers"
        )


@torch.no_grad()
def evaluate_task(
    zero_shot: ZeroShotModel,
    task: Task,
    head: torch.Tensor,
    preprocess: Preprocess,
    device: str,
    precision: str,
    batch_size: int,
    limit: int | None,
    workers: int | None,
    skip_bad_images: bool,
    quiet: bool,
    corruption: Corruption | None = None,
) -> dict[str, Any]:
    split, generated = "test", None
    if corruption is not None:  # the hub's corrupted split if it has one, else made here
        if hub_dataset(task) in HUB_CORRUPTED:
            split = corruption.name
        else:
            generated = corruption
    images = TaskImages(ImageSource(task, split), preprocess, limit, generated)
    rank, world = distributed_rank()
    shard = (
        torch.utils.data.Subset(images, range(rank, len(images), world)) if world > 1 else images
    )
    if workers is None:
        workers = min(8, max(0, (torch.get_num_threads() or 1) - 1)) if len(shard) > 256 else 0
    loader = torch.utils.data.DataLoader(
        shard,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.startswith("cuda"),
    )
    scorer = BatchScorer(zero_shot, head, preprocess, device, precision, task.name)
    ids, losses, right, skipped = [], [], [], []
    started = time.perf_counter()
    with Bars(quiet or rank > 0, "rate") as bars:
        label = task.name if corruption is None else f"{task.name} ({corruption.name})"
        bar = bars.add(label, len(shard), rate="")

        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            rate = done / max(time.perf_counter() - started, 1e-9)
            bars.advance(bar, n, rate=f"{rate:,.0f} img/s")

        for batch, labels, index, bad in loader:
            for position, message in bad:
                if not skip_bad_images:
                    raise DataError(
                        f"task {task.name}: image {position} cannot be read ({message}); "
                        "pass `skip_bad_images` to skip it",
                        option="skip_bad_images",
                    )
                skipped.append(position)
            if len(labels):
                loss, correct = scorer(batch, labels)
                losses.append(loss)
                right.append(correct)
                ids.append(index)
            advance(len(labels) + len(bad))
    seconds = time.perf_counter() - started
    parts = (_cat(ids, torch.long), _cat(losses, torch.float32), _cat(right, torch.bool), skipped)
    index, loss, correct, skipped = _gather(parts) if world > 1 else parts
    if len(index) == 0:
        raise DataError(f"task {task.name}: no images were evaluated")
    order = torch.argsort(index)
    index, loss, correct = index[order], loss[order], correct[order]
    # FusionBench's figure: the mean of per-batch means, batches as one process forms them.
    batch_of = index // batch_size
    batch_means = [float(loss[batch_of == b].mean()) for b in torch.unique(batch_of).tolist()]
    row = {
        "accuracy": int(correct.sum()) / len(index),
        "loss": float(loss.double().sum()) / len(index),
        "loss_batch_mean": sum(batch_means) / len(batch_means),
        "samples": len(index),
        "skipped": sorted(skipped),
        # The hub test set these images came from; None for local data (a card must not claim
        # a hub dataset for a local copy or another set).
        "dataset": hub_dataset(task),
        "images_per_second": round(len(index) / seconds, 1) if seconds > 0 else None,
    }
    if corruption is not None:
        row["source"] = "hub split" if generated is None else f"severity {corruption.severity}"
    return row


class BatchScorer:
    """One batch of uint8 crops through the zero-shot model: each image's cross-entropy and
    whether its top-1 class is right, on the CPU. ``eval`` and ``sweep`` both score with it, so a
    sweep point scores exactly what evaluating its merged folder would."""

    def __init__(
        self,
        zero_shot: Any,
        head: torch.Tensor,
        preprocess: Preprocess,
        device: str,
        precision: str,
        task: str,
    ):
        self.zero_shot, self.preprocess = zero_shot, preprocess
        self.device, self.task = device, task
        self.table = preprocess.lookup_table().to(device)
        self.head = head.to(device)
        self.autocast = torch.autocast(
            device.split(":")[0], dtype=PRECISIONS[precision], enabled=precision != "fp32"
        )

    def __call__(
        self, batch: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        classes, low, high = self.head.shape[0], int(labels.min()), int(labels.max())
        if low < 0 or high >= classes:
            label = high if high >= classes else low
            raise DataError(f"task {self.task}: label {label} is outside the {classes} classes")
        pixels = self.preprocess.normalize(batch.to(self.device, non_blocking=True), self.table)
        with self.autocast:
            embeds = self.zero_shot.embed(pixels)
        logits = self.zero_shot.logits(embeds.float(), self.head)
        labels = labels.to(self.device)
        loss = F.cross_entropy(logits, labels, reduction="none").cpu()
        return loss, (logits.argmax(dim=1) == labels).cpu()


def _cat(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.empty(0, dtype=dtype)


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) when launched by torchrun / accelerate, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str) -> str:
    """Join the process group torchrun describes (WORLD_SIZE > 1); returns this rank's device."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    cuda = device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else device


def _gather(parts: tuple) -> tuple:
    """Every rank's (indices, losses, correct, skipped), concatenated, on every rank."""
    import torch.distributed as dist

    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, parts)
    return (
        torch.cat([p[0] for p in everyone]),
        torch.cat([p[1] for p in everyone]),
        torch.cat([p[2] for p in everyone]),
        [i for p in everyone for i in p[3]],
    )


def evaluate_pool(
    pretrained: str, models: dict[str, str], tasks: list[Task], **options: Any
) -> dict[str, EvalReport]:
    """One report per pool member: the pretrained model first, then each fine-tuned model."""
    from clipship.pool import PRETRAINED

    members = {PRETRAINED: pretrained, **models}  # heads are built once, then cached
    return {
        name: evaluate(source, tasks, pretrained=pretrained, **options)
        for name, source in members.items()
    }
