"""Fine-tune a task encoder the way the public ``tanganke/clip-vit-*_<task>`` checkpoints were made.

Only the vision tower trains; the text tower, both projections and the logit scale stay frozen,
and the task's frozen zero-shot head is the classifier (cross-entropy on
exp(logit_scale)·image_embeds @ headᵀ). Adam, lr 1e-5, 4000 steps of batch 32 by default.
Batches come from a seeded permutation per epoch, so a run resumed from a checkpoint continues
exactly where it stopped and ends with the same weights as an uninterrupted one. Checkpoints
(weights and optimizer state) are safetensors, never pickles.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from clipship.errors import ClipshipError
from clipship.machine import pick_device
from clipship.memory import load_owned, own_module
from clipship.outputs import atomic_folder, check_target, json_text, library_versions, refuse_link
from clipship.pool import resolve_folder
from clipship.requests import check_seed, choice
from clipship.runtime.data import DataError, ImageSource, Preprocess, TaskImages, collate
from clipship.runtime.heads import build_heads
from clipship.runtime.model import PRECISIONS, Precision, ZeroShotModel
from clipship.runtime.state import borrows_process_state
from clipship.runtime.tasks import Task
from clipship.schemas import Schema, parse, read_json

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RECIPE_FILE = "clipship_finetune.json"


def batch_indices(
    n: int, batch_size: int, seed: int, start: int, steps: int
) -> Iterator[list[int]]:
    """Indices for steps ``start`` to ``steps - 1``: a seeded permutation per epoch."""
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise DataError(f"{n} training images are fewer than one batch of {batch_size}")
    for step in range(start, steps):
        epoch, position = divmod(step, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        yield order[position * batch_size : (position + 1) * batch_size].tolist()


def _save_checkpoint(
    folder: Path, vision: Any, optimizer: torch.optim.Optimizer, step: int
) -> None:
    from safetensors.torch import save_file

    refuse_link(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    vision.save_pretrained(tmp)
    state = optimizer.state_dict()
    tensors, steps = {}, {}
    for index, slots in state["state"].items():
        for key, value in slots.items():
            if key == "step":
                steps[str(index)] = float(value)
            else:
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
    save_file(tensors, str(tmp / OPTIMIZER_FILE))
    (tmp / STATE_FILE).write_text(json_text({"step": step, "adam_steps": steps}, STATE_FILE))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


class CheckpointState(Schema):
    """A checkpoint's ``state.json`` (written by ``_save_checkpoint``)."""

    step: int = Field(ge=0)
    adam_steps: dict[str, float]


def _restore_optimizer(optimizer: torch.optim.Optimizer, folder: Path, device: str) -> int:
    """Load a checkpoint's Adam state into ``optimizer`` (owned memory); returns its step."""
    record = read_json(folder / STATE_FILE, DataError, "checkpoint state")
    state = parse(CheckpointState, record, str(folder / STATE_FILE), DataError).model_dump()
    saved = load_owned(folder / OPTIMIZER_FILE)
    groups = optimizer.state_dict()["param_groups"]
    restored: dict[str, Any] = {"state": {}, "param_groups": groups}
    for index in groups[0]["params"]:
        slots = {
            k.split(".", 1)[1]: v.to(device)
            for k, v in saved.items()
            if k.split(".", 1)[0] == str(index)
        }
        if slots:
            slots["step"] = torch.tensor(state["adam_steps"][str(index)])
            restored["state"][index] = slots
    optimizer.load_state_dict(restored)
    return state["step"]


def _latest_checkpoint(root: Path) -> Path | None:
    found = sorted(
        (int(p.name.removeprefix("step-")), p)
        for p in root.glob("step-*")
        if (p / STATE_FILE).is_file()
    )
    return found[-1][1] if found else None


@dataclass(frozen=True)
class Settings:
    """How a fine-tuning run trains (what its recipe records)."""

    steps: int = 4000
    batch_size: int = 32
    lr: float = 1e-5
    weight_decay: float = 0.0
    seed: int = 0
    precision: str = "fp32"

    def check(self) -> None:
        for option in ("steps", "batch_size"):
            if getattr(self, option) < 1:
                value = getattr(self, option)
                raise ClipshipError(f"`{option}` {value}: must be positive", option=option)
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise ClipshipError(f"`lr` {self.lr}: must be a positive finite number", option="lr")
        if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise ClipshipError(
                f"`weight_decay` {self.weight_decay}: must be a finite number ≥ 0",
                option="weight_decay",
            )
        choice(Precision, self.precision, "precision")
        check_seed(self.seed)


@borrows_process_state
def finetune(
    pretrained: str,
    task: Task,
    out: Path | str,
    *,
    steps: int = 4000,
    batch_size: int = 32,
    lr: float = 1e-5,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: str = "auto",
    precision: str = "fp32",
    workers: int = 0,
    checkpoint_every: int = 500,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    force: bool = False,
    quiet: bool = True,
    train_limit: int | None = None,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Tune the vision tower on ``task``'s train split; writes a CLIPVisionModel folder."""
    out = Path(out)
    check_target(out, force, inputs=(pretrained, task.data))
    settings = Settings(steps, batch_size, lr, weight_decay, seed, str(precision))
    settings.check()
    device = pick_device(device)
    checkpoints = (
        Path(checkpoint_dir) if checkpoint_dir else out.with_name(f"{out.name}.checkpoints")
    )
    refuse_link(checkpoints)  # checkpoints are written (and removed) there
    torch.manual_seed(seed)
    folder, repo_id, _ = resolve_folder(pretrained)
    latest = _latest_checkpoint(checkpoints) if resume else None
    run = _Run.load(folder, task, latest, settings, device, train_limit)
    started = time.perf_counter()
    losses = run.train(workers, checkpoints, checkpoint_every, quiet, on_step)
    recipe = {
        "task": task.name,
        "pretrained": repo_id or folder.resolve().name,  # never a local path: encoders get pushed
        "steps": steps,
        "resumed_from": run.start or None,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "optimizer": "Adam",
        "seed": seed,
        "precision": settings.precision,
        "train_images": len(run.images),
        "final_loss": losses[-1] if losses else None,
        "versions": library_versions(),
    }
    _write_encoder(out, force, run.vision, folder, recipe, task)
    shutil.rmtree(checkpoints, ignore_errors=True)
    recipe["seconds"] = round(time.perf_counter() - started, 2)
    recipe["out"] = str(out)
    return recipe


@dataclass
class _Run:
    """A training run's pieces: the model, its optimizer, the data and where it starts."""

    task: Task
    settings: Settings
    device: str
    model: ZeroShotModel
    vision: Any
    optimizer: torch.optim.Optimizer
    head: torch.Tensor
    images: TaskImages
    preprocess: Preprocess
    start: int

    @classmethod
    def load(
        cls,
        folder: Path,
        task: Task,
        latest: Path | None,
        settings: Settings,
        device: str,
        train_limit: int | None,
    ) -> _Run:
        from transformers import CLIPModel, CLIPVisionModel

        heads, _ = build_heads(folder, [task])
        clip = CLIPModel.from_pretrained(folder)
        vision = CLIPVisionModel.from_pretrained(latest or folder).to(device)
        # Out of the files' mappings (clipship.memory): a resumed run then computes what the
        # uninterrupted one did, bit for bit.
        model = own_module(
            ZeroShotModel(vision, clip.visual_projection, clip.logit_scale).to(device)
        )
        model.projection.requires_grad_(False)
        vision.train()
        optimizer = torch.optim.Adam(
            vision.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
        )
        start = _restore_optimizer(optimizer, latest, device) if latest is not None else 0
        preprocess = Preprocess.from_pretrained(folder)
        images = TaskImages(ImageSource(task, split="train"), preprocess, train_limit)
        head = heads[task.name].to(device)
        return cls(
            task, settings, device, model, vision, optimizer, head, images, preprocess, start
        )

    def train(
        self,
        workers: int,
        checkpoints: Path,
        checkpoint_every: int,
        quiet: bool,
        on_step: Callable[[int], None] | None,
    ) -> list[float]:
        """Steps ``start`` to ``steps``; returns each step's loss."""
        settings, device, task = self.settings, self.device, self.task
        table = self.preprocess.lookup_table().to(device)
        classes = self.head.shape[0]
        precision = settings.precision
        autocast = torch.autocast(
            device.split(":")[0], dtype=PRECISIONS[precision], enabled=precision != "fp32"
        )
        scaler = torch.amp.GradScaler(enabled=precision == "fp16")
        sampler = list(
            batch_indices(
                len(self.images), settings.batch_size, settings.seed, self.start, settings.steps
            )
        )
        loader = torch.utils.data.DataLoader(
            self.images,
            batch_sampler=sampler,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=device.startswith("cuda"),
        )
        losses: list[float] = []
        step = self.start
        for batch, labels, _, bad in loader:
            _check_batch(task, labels, bad, classes)
            pixels = self.preprocess.normalize(batch.to(device, non_blocking=True), table)
            with autocast:
                logits = self.model.logits(self.model.embed(pixels), self.head)
                loss = torch.nn.functional.cross_entropy(logits.float(), labels.to(device))
            self.optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(self.optimizer)
            scaler.update()
            losses.append(float(loss.detach()))
            if not math.isfinite(losses[-1]):
                raise DataError(
                    f"task {task.name}: the loss is not finite at step {step + 1} (is `lr` "
                    f"{settings.lr} too high?); nothing was written",
                    option="lr",
                )
            step += 1
            if on_step is not None:
                on_step(step)
            if checkpoint_every and step % checkpoint_every == 0 and step < settings.steps:
                checkpoints.mkdir(parents=True, exist_ok=True)
                _save_checkpoint(checkpoints / f"step-{step}", self.vision, self.optimizer, step)
            if not quiet and (step % 50 == 0 or step == settings.steps):
                recent = losses[-50:]
                print(
                    f"step {step}/{settings.steps}  loss {sum(recent) / len(recent):.4f}",
                    flush=True,
                )
        return losses


def _check_batch(task: Task, labels: torch.Tensor, bad: list, classes: int) -> None:
    if bad:
        index, message = bad[0]
        raise DataError(f"task {task.name}: training image {index} cannot be read ({message})")
    if int(labels.min()) < 0 or int(labels.max()) >= classes:
        raise DataError(
            f"task {task.name}: label {int(labels.max())} is outside the {classes} classes"
        )


def _write_encoder(
    out: Path, force: bool, vision: Any, folder: Path, recipe: dict[str, Any], task: Task
) -> None:
    """The tuned vision tower, the processor files and the recipe, atomically."""
    broken = [n for n, p in vision.named_parameters() if not torch.isfinite(p).all()]
    if broken:
        raise DataError(f"task {task.name}: training made {broken[0]} non-finite; nothing written")
    with atomic_folder(out, force) as tmp:
        vision.save_pretrained(tmp)
        for name in ("preprocessor_config.json", "processor_config.json"):
            if (folder / name).is_file():
                shutil.copyfile(folder / name, tmp / name)
        (tmp / RECIPE_FILE).write_text(json.dumps(recipe, indent=2) + "\n")
