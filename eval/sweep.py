"""``clipship sweep``: merge parameters chosen on validation data, recorded and replayable.

Every point of a grid over the method's parameters is merged and evaluated on the selection split
(validation, by default), the best point by average accuracy is merged again into ``best/`` with
a recipe that records the grid, the split and the rule. Test accuracy is measured only when asked
(``report_test``), next to it and labelled; selecting on test data takes an explicit flag.

Validation images are never test images: a task FusionBench gives a validation split
(``val/<task>.yaml``, the eight tasks) gets exactly that split, ``train_validation_split``'s random
10 % of the training split with seed 0; any other task a seeded, stratified hold-out of its
training split (``val_fraction`` of each class, default 10 %). An explicit ``val_fraction`` holds
out that stratified share for every task.

Cost: a scaled method (θ_pre + λ·M, ``Method.scale``: task arithmetic, TIES at a fixed threshold,
DARE over them, MagMax, Iso-C/CTS, TSV-M) reads the pool once per setting of its other
parameters (``merge.engine.merge_direction``) and makes each λ from M and θ_pre alone, with the
bits ``clipship merge`` writes; other methods merge once per point. Each task's images are decoded
once into the work folder and reused by every point, as are the text heads.

Under ``torchrun --nproc_per_node N`` each rank takes every N-th point (points, not images, are
shared out: a point's merge is the cost that does not shrink with more images per rank); rank 0
writes the outputs, which equal one process's. The work folder ``.<out>.sweep`` beside the output
holds each finished point's result (written atomically), so an interrupted sweep resumes where it
stopped; it is removed when the sweep is done.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipship.errors import ClipshipError, DataError, MethodError, SweepError
from clipship.eval.evaluate import BatchScorer, distributed_rank, init_distributed
from clipship.machine import pick_device
from clipship.merge.engine import RECIPE_NAME, check_finite, merge, merge_direction
from clipship.merge.registry import Method, combine, get_method, parse_value
from clipship.outputs import (
    atomic_folder,
    check_target,
    json_text,
    library_versions,
    refuse_link,
    write_json_atomic,
)
from clipship.pool import ModelPool, open_pool
from clipship.progress import Bars
from clipship.runtime.tasks import Task

SWEEP_FORMAT = "clipship-sweep/1"
DEFAULT_VAL_FRACTION = 0.1  # FusionBench's validation_fraction for its eight tasks
MAX_POINTS = 10_000
VALIDATION, TEST = "validation", "test"
RULE = (
    "highest average accuracy over the tasks on the selection split; on a tie, the lower "
    "average loss, then the earlier grid point"
)


# --- the grid -----------------------------------------------------------------------------------


def parse_grid(items: list[str], spec: Method) -> dict[str, list[Any]]:
    """``NAME=a,b,c`` (values) or ``NAME=start:stop:step`` (inclusive range) per swept parameter,
    each value parsed and checked as the method parses it."""
    if not items:
        raise SweepError(
            "empty grid: give `grid` NAME=VALUES (a,b,c or start:stop:step)", option="grid"
        )
    grid: dict[str, list[Any]] = {}
    for item in items:
        name, sep, text = (part.strip() for part in item.partition("="))
        if not sep or not name:
            raise SweepError(f"`grid` {item!r}: expected NAME=VALUES", option="grid")
        try:
            param = spec.param(name)
        except MethodError as e:
            raise SweepError(f"`grid` {name}: {e}", option="grid") from None
        if name in grid:
            raise SweepError(f"`grid` {name} is given twice", option="grid")
        raw = _range(text, name) if text.count(":") == 2 else [v for v in text.split(",") if v]
        if not raw:
            raise SweepError(f"`grid` {name}: no values (an empty grid)", option="grid")
        values = []
        for value in raw:
            try:
                parsed = parse_value(param, value.strip() if isinstance(value, str) else value)
            except MethodError as e:
                raise SweepError(f"`grid` {name}: {e}", option="grid") from None
            if parsed in values:
                raise SweepError(f"`grid` {name}: {value} is listed twice", option="grid")
            values.append(parsed)
        grid[name] = values
    if math.prod(len(v) for v in grid.values()) > MAX_POINTS:
        raise SweepError(f"the grid has more than {MAX_POINTS} points", option="grid")
    return grid


def _range(text: str, name: str) -> list[float]:
    """start:stop:step, both ends included, each value rounded to 10 significant digits (so
    0.1:1.0:0.1 gives 0.3, not 0.30000000000000004)."""
    try:
        start, stop, step = (float(x) for x in text.split(":"))
    except ValueError:
        raise SweepError(f"`grid` {name}={text}: not start:stop:step", option="grid") from None
    if not all(math.isfinite(x) for x in (start, stop, step)) or step <= 0 or stop < start:
        raise SweepError(
            f"`grid` {name}={text}: a range needs finite numbers, step > 0 and stop ≥ start",
            option="grid",
        )
    count = int(math.floor((stop - start) / step + 1e-9)) + 1
    if count > MAX_POINTS:
        raise SweepError(f"the grid has more than {MAX_POINTS} points", option="grid")
    return [float(f"{start + i * step:.10g}") for i in range(count)]


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination, the last parameter varying fastest."""
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


# --- validation and test images -----------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """The images of one task a sweep evaluates on: ``rows`` of the data's ``source`` split."""

    task: Task
    name: str  # validation or test
    source: str  # the data's split the rows come from
    rows: tuple[int, ...]
    record: dict[str, Any]


def fusionbench_rows(size: int, fraction: float | None, count: int | None, seed: int) -> list[int]:
    """The rows FusionBench's ``train_validation_split`` returns as its validation set, in its
    order: ``random_split`` of ``randperm(size)`` (seed ``seed``), the last
    ``int(size · fraction)``."""
    held = count if count is not None else int(size * fraction)
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    return order[size - held :]


def stratified_rows(labels: list[int], fraction: float, seed: int, task: str) -> list[int]:
    """``fraction`` of each class (rounded; at least one image of a class with two or more, and
    never all of them), drawn from a generator seeded by (seed, task), in a shuffled order (so
    the first N are a random subset of every class, not the first classes)."""
    from clipship.merge.dataaware.batches import task_generator

    generator = task_generator(seed, f"validation\0{task}")
    by_class: dict[int, list[int]] = {}
    for row, label in enumerate(labels):
        by_class.setdefault(label, []).append(row)
    held: list[int] = []
    for label in sorted(by_class):
        rows = by_class[label]
        take = min(max(round(len(rows) * fraction), 1), len(rows) - 1) if len(rows) > 1 else 0
        order = torch.randperm(len(rows), generator=generator).tolist()
        held += [rows[i] for i in order[:take]]
    return [held[i] for i in torch.randperm(len(held), generator=generator).tolist()]


def check_fraction(fraction: float | None) -> None:
    if fraction is not None and not (math.isfinite(fraction) and 0 < fraction < 1):
        raise SweepError(
            f"`val_fraction` {fraction}: must be between 0 and 1 (exclusive)", option="val_fraction"
        )


def selection_split(
    task: Task, select_on: str, fraction: float | None, seed: int, limit: int | None
) -> Split:
    """The images a point is chosen on: the task's validation split, or its test split."""
    from clipship.runtime.data import ImageSource

    if select_on == TEST:
        return test_split(task, limit)
    source = ImageSource(task, "train")
    if not source.named_split:
        raise SweepError(
            f"task {task.name}: {source.where} has no training split to hold validation images "
            "out of (they never come from test images): give data with a train split",
            option="select_on",
        )
    size = len(source)
    given = task.extra.get("validation")
    if (
        fraction is None
        and given
        and given.get("from", "train") == "train"
        and given["seed"] is not None
    ):
        rows = fusionbench_rows(size, given.get("fraction"), given.get("size"), given["seed"])
        record = {
            "source": "FusionBench's validation split",
            "rule": f"train_validation_split of {given['from']}: "
            + (f"{given['size']} images" if given.get("size") else f"{given['fraction']:g}")
            + f", random_split seed {given['seed']}",
        }
    else:
        share = DEFAULT_VAL_FRACTION if fraction is None else fraction
        rows = stratified_rows(source.labels(), share, seed, task.name)
        record = {
            "source": "stratified hold-out",
            "rule": f"{share:g} of each class of train, seed {seed}",
        }
    if not rows:
        raise SweepError(
            f"task {task.name}: the validation fraction leaves no image of its {size} training "
            "images",
            option="val_fraction",
        )
    rows = sorted(rows[:limit] if limit is not None else rows)  # read in file order
    record.update({"from": "train", "images": len(rows), "of": size})
    return Split(task, VALIDATION, "train", tuple(rows), record)


def test_split(task: Task, limit: int | None) -> Split:
    from clipship.runtime.data import ImageSource

    size = len(ImageSource(task, "test"))
    count = size if limit is None else min(limit, size)
    record = {"source": "test split", "from": "test", "images": count, "of": size}
    return Split(task, TEST, "test", tuple(range(count)), record)


def task_identity(task: Task) -> dict[str, Any]:
    """A task as a resumed sweep must find it again: its definition (classes, templates,
    source) and, for local data, every file's name, size and modification time."""
    identity = dataclasses.asdict(task)
    if task.data is not None:
        root = Path(task.data)
        files = sorted(root.rglob("*")) if root.is_dir() else [root]
        identity["files"] = [
            [str(f.relative_to(root)) if root.is_dir() else f.name, *_stamp(f)]
            for f in files
            if f.is_file()
        ]
    return identity


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def decode(split: Split, preprocess: Any, workers: int | None, folder: Path) -> tuple[Any, Any]:
    """(uint8 images [n, 3, H, W], labels [n]) of ``split``, decoded once into ``folder``
    (memory-mapped; reused by every point, and by a resumed sweep)."""
    from clipship.runtime.data import ImageSource, TaskImages, collate

    key = hashlib.sha256(json.dumps([task_identity(split.task), split.source, split.rows]).encode())
    path = folder / f"{split.task.name}-{split.name}-{key.hexdigest()[:16]}.npy"
    labels_path = path.with_suffix(".labels.npy")
    if path.is_file() and labels_path.is_file():
        return np.load(path, mmap_mode="r"), np.load(labels_path)
    images = TaskImages(ImageSource(split.task, split.source), preprocess)
    subset = torch.utils.data.Subset(images, list(split.rows))
    if workers is None:
        workers = min(8, max(0, (torch.get_num_threads() or 1) - 1)) if len(subset) > 256 else 0
    loader = torch.utils.data.DataLoader(
        subset, batch_size=64, shuffle=False, num_workers=workers, collate_fn=collate
    )
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    array, labels, done = None, np.empty(len(subset), dtype=np.int64), 0
    try:
        for batch, label, _, bad in loader:
            for row, message in bad:
                raise DataError(
                    f"task {split.task.name}: {split.source} image {row} cannot be read ({message})"
                )
            if array is None:
                shape = (len(subset), *batch.shape[1:])
                array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            array[done : done + len(batch)] = batch.numpy()
            labels[done : done + len(batch)] = label.numpy()
            done += len(batch)
        if array is None:
            raise DataError(f"task {split.task.name}: no {split.name} images")
        array.flush()
        del array
        labels_tmp = labels_path.with_name(f".{labels_path.name}.{os.getpid()}.tmp.npy")
        np.save(labels_tmp, labels)
        os.replace(labels_tmp, labels_path)  # torchrun's ranks may decode the same split
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return np.load(path, mmap_mode="r"), labels


# --- one point ------------------------------------------------------------------------------------


@torch.no_grad()
def score(
    zero_shot: Any,
    images: Any,
    labels: Any,
    head: torch.Tensor,
    preprocess: Any,
    device: str,
    precision: str,
    batch_size: int,
    task: str,
) -> dict[str, Any]:
    """Accuracy and per-sample mean loss, as ``clipship eval`` computes them (the same batches
    through the same ``BatchScorer``: a point scores what evaluating its merged folder would)."""
    scorer = BatchScorer(zero_shot, head, preprocess, device, precision, task)
    losses, right = [], []
    for start in range(0, len(labels), batch_size):
        batch = torch.from_numpy(np.array(images[start : start + batch_size]))
        loss, correct = scorer(batch, torch.from_numpy(labels[start : start + batch_size]))
        losses.append(loss)
        right.append(correct)
    loss, correct = torch.cat(losses), torch.cat(right)
    return {
        "accuracy": int(correct.sum()) / len(correct),
        "loss": float(loss.double().sum()) / len(correct),
        "samples": len(correct),
    }


class PointModels:
    """The model of each grid point, on the device. A scaled method's points are made in place
    from θ_pre and the direction of their group (one pool pass per group); any other method's
    point is merged into the work folder and loaded."""

    def __init__(self, pool: ModelPool, spec: Method, fixed: dict[str, Any], sweep: Sweep):
        self.pool, self.spec, self.fixed, self.sweep = pool, spec, fixed, sweep
        self.group: tuple | None = None
        self.direction: dict[str, torch.Tensor] | None = None  # M, flat, on the device
        self.theta: dict[str, torch.Tensor] | None = None  # θ_pre, flat float32, on the device
        self.zero_shot: Any = None
        self.passes = 0  # reads of the whole pool (direction passes, or merges)
        self.merge_seconds = 0.0

    def group_of(self, point: dict[str, Any]) -> tuple | None:
        """The point's group (the values besides λ), or None when it is merged on its own: a
        method not of the scaled form at these values, or an L-LoRA pool, which ``merge``
        merges in adapter space."""
        from clipship.merge.linearized import in_adapter_space

        values = self.spec.resolve({**self.fixed, **point})
        if not self.spec.cheap(values) or in_adapter_space(self.pool, self.spec):
            return None
        return tuple((k, json.dumps(v)) for k, v in sorted(values.items()) if k != self.spec.scale)

    def load(self, point: dict[str, Any], work: Path) -> Any:
        started = time.perf_counter()
        values = self.spec.resolve({**self.fixed, **point})
        group = self.group_of(point)
        if group is None:
            model = self._merged(point, work)
        else:
            if group != self.group:
                self._direction(values, group)
            model = self._scaled(values[self.spec.scale])
        self.merge_seconds += time.perf_counter() - started
        return model

    def _direction(self, values: dict[str, Any], group: tuple) -> None:
        """M of this group, and θ_pre, on the device (a point is then two operations per
        tensor there)."""
        self.direction = None  # the last group's M goes before this one is made
        with Bars(True) as bar:
            tensors, _ = merge_direction(
                self.pool, self.spec, values, self.sweep.seed, bar, self.sweep.device
            )
        self.passes += 1
        device = self.sweep.device
        self.direction = {k: v.to(device) for k, v in tensors.items()}
        if self.theta is None:
            pre = self.pool.pretrained
            self.theta = {
                k: pre.read(k).to(device, torch.float32).reshape(-1) for k in self.direction
            }
        self.group = group

    def _scaled(self, scale: float) -> Any:
        """θ_pre + M·λ per tensor, in the pretrained dtype (as ``merge`` writes it), into the
        vision tower kept on the device."""
        from clipship.lora import canonical
        from clipship.runtime.model import ZeroShotModel, load_vision

        pre = self.pool.pretrained
        if self.zero_shot is None:
            clip = _pretrained_clip(pre.folder)
            vision = load_vision(pre)
            self.zero_shot = ZeroShotModel(vision, clip.visual_projection, clip.logit_scale)
            self.zero_shot = self.zero_shot.to(self.sweep.device).eval()
        with torch.no_grad():
            for name, param in self.zero_shot.vision.named_parameters():
                key = canonical(name)
                if key not in self.direction:
                    continue
                flat = param.view(-1)  # float32, filled in place
                combine(self.theta[key], self.direction[key], scale, out=flat)
                stored = pre.info(key).dtype_torch
                if stored != torch.float32:  # as merge writes it, read back as float32
                    flat.copy_(flat.to(stored))
                check_finite(flat, f"merged tensor {key}", self.spec.name)
        return self.zero_shot

    def _merged(self, point: dict[str, Any], work: Path) -> Any:
        from clipship.runtime.model import load_zero_shot

        folder = work / f"point-{distributed_rank()[0]}"
        shutil.rmtree(folder, ignore_errors=True)
        merge(
            self.sweep.pretrained,
            self.sweep.models,
            self.spec.name,
            folder,
            {**self.fixed, **point},
            seed=self.sweep.seed,
            device=self.sweep.device,
            allow_pickle=self.sweep.allow_pickle,
            data=self.sweep.merge_data(),
        )
        self.passes += 1
        zero_shot, _, _ = load_zero_shot(str(folder), None, self.sweep.device)
        shutil.rmtree(folder, ignore_errors=True)
        return zero_shot


def _pretrained_clip(folder: Path) -> Any:
    from clipship.runtime.model import clip_class
    from clipship.runtime.state import quiet_transformers

    with quiet_transformers():
        return clip_class(folder).from_pretrained(folder)


# --- the sweep ------------------------------------------------------------------------------------


@dataclass
class SweepResult:
    out: Path
    best: dict[str, Any]
    report: dict[str, Any]
    seconds: float
    timings: dict[str, Any] = field(default_factory=dict)
    primary: bool = True

    def summary(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "best": self.best,
            "select_on": self.report["selection"]["split"],
            "points": len(self.report["points"]),
            "seconds": round(self.seconds, 3),
            "timings": self.timings,
        }


@dataclass
class Sweep:
    """One sweep's settings (``SweepRequest`` checks them; ``run`` sweeps)."""

    pretrained: str
    models: dict[str, str]
    method: str
    grid: dict[str, list[Any]]
    fixed: dict[str, Any]
    tasks: list[Task]
    out: Path
    select_on: str = VALIDATION
    val_fraction: float | None = None
    report_test: bool = False
    seed: int = 0
    vision_only: bool = False
    device: str = "cpu"
    precision: str = "fp32"
    batch_size: int = 128
    limit: int | None = None
    workers: int | None = None
    allow_pickle: bool = False
    force: bool = False
    quiet: bool = True

    def merge_data(self) -> Any:
        """A data-aware method's images: the swept tasks' (each task model's own task)."""
        from clipship.merge.dataaware.plan import DataOptions

        return DataOptions(tuple(self.tasks)) if get_method(self.method).data else None

    def identity(self, pool: ModelPool, splits: list[list[Split]]) -> str:
        """What a resumed sweep must share with the one it continues: every setting, the
        pool's weight files (name, size, modification time) and the evaluated rows."""
        files = {
            m.name: [[p.name, *_stamp(p)] for p in sorted(m.folder.iterdir()) if p.is_file()]
            for m in pool.all
        }
        settings = {
            "format": SWEEP_FORMAT,
            "method": self.method,
            "grid": self.grid,
            "fixed": self.fixed,
            "seed": self.seed,
            "precision": self.precision,
            "device": self.device.split(":")[0],  # cuda:0 and cuda:1 compute alike
            "batch_size": self.batch_size,
            "files": files,
            "splits": [
                [task_identity(s.task), s.name, s.source, s.rows] for row in splits for s in row
            ],
        }
        text = json.dumps(settings, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def run(self) -> SweepResult:
        started = time.perf_counter()
        self.out = Path(os.path.abspath(self.out))  # "." has a name, and a parent for the work
        spec = get_method(self.method)
        check_target(self.out, self.force, inputs=(self.pretrained, *self.models.values()))
        self.device = init_distributed(pick_device(self.device))
        if self.precision == "fp16" and self.device == "cpu":
            raise ClipshipError(
                "`precision` fp16 needs a GPU (use bf16 or fp32 on CPU)", option="precision"
            )
        rank, world = distributed_rank()
        points = grid_points(self.grid)
        pool = open_pool(self.pretrained, self.models, allow_pickle=self.allow_pickle)
        try:
            return self._run(spec, pool, points, rank, world, started)
        finally:
            pool.close()

    def _run(
        self,
        spec: Method,
        pool: ModelPool,
        points: list[dict[str, Any]],
        rank: int,
        world: int,
        started: float,
    ) -> SweepResult:
        splits = [[selection_split(t, self.select_on, self.val_fraction, self.seed, self.limit)]
                  for t in self.tasks]  # fmt: skip
        if self.report_test and self.select_on != TEST:
            for row, task in zip(splits, self.tasks):
                row.append(test_split(task, self.limit))
        work = self.out.with_name(f".{self.out.name}.sweep")
        identity = self.identity(pool, splits)
        for path in (work, work / "points", work / "images"):
            refuse_link(path)  # the work folder's writes stay beside the output
        state = work / "sweep.json"
        if state.is_file() and _recorded(state, "identity") != identity:
            if not self.force:
                raise SweepError(
                    f"{work} holds an unfinished sweep with other settings or models: pass "
                    "`force` to start over",
                    option="force",
                )
            if rank == 0:
                shutil.rmtree(work)
        _barrier(world)
        (work / "points").mkdir(parents=True, exist_ok=True)
        (work / "images").mkdir(exist_ok=True)
        if rank == 0:
            write_json_atomic(state, {"identity": identity})
        try:
            done, timings = self._points(spec, pool, points, splits, work, rank, world)
        except ClipshipError:
            if world == 1 and not any((work / "points").iterdir()):
                shutil.rmtree(work, ignore_errors=True)  # nothing to resume: leave nothing
            raise
        if rank > 0:
            return SweepResult(self.out, {}, {}, time.perf_counter() - started, timings, False)
        report = self._report(spec, points, done, splits)
        best = report["best"]["parameters"]
        with atomic_folder(self.out, self.force) as tmp:
            (tmp / "sweep.json").write_text(json_text(report, "sweep.json"))
            (tmp / "sweep.md").write_text(sweep_markdown(report))
            (tmp / "sweep.png").write_bytes(sweep_plot(report))
            merge(
                self.pretrained, self.models, spec.name, tmp / "best", {**self.fixed, **best},
                seed=self.seed, vision_only=self.vision_only, device=self.device.split(":")[0],
                allow_pickle=self.allow_pickle, data=self.merge_data(),
            )  # fmt: skip
            recipe = json.loads((tmp / "best" / RECIPE_NAME).read_text())
            recipe["sweep"] = sweep_record(report)
            (tmp / "best" / RECIPE_NAME).write_text(json_text(recipe, RECIPE_NAME))
        shutil.rmtree(work, ignore_errors=True)
        return SweepResult(self.out, best, report, time.perf_counter() - started, timings)

    def _points(
        self,
        spec: Method,
        pool: ModelPool,
        points: list[dict[str, Any]],
        splits: list[list[Split]],
        work: Path,
        rank: int,
        world: int,
    ) -> tuple[dict[int, dict[str, Any]], dict[str, Any]]:
        """Every point's scores (this rank's evaluated here, each written to the work folder as
        it finishes; the others' read back or gathered), and the timings."""
        from clipship.runtime.data import Preprocess
        from clipship.runtime.heads import build_heads

        head_table, _ = build_heads(pool.pretrained.folder, self.tasks, device=self.device)
        preprocess = Preprocess.from_pretrained(pool.pretrained.folder)
        done = {i: r for i in range(len(points)) if (r := _read_point(work, i, points[i]))}
        models = PointModels(pool, spec, self.fixed, self)
        mine = [i for i in range(len(points)) if i % world == rank and i not in done]
        mine.sort(key=lambda i: (str(models.group_of(points[i])), i))  # a group's points together
        decoded: dict[tuple[str, str], tuple[Any, Any]] = {}
        eval_seconds = 0.0
        with Bars(self.quiet or rank > 0, "elapsed") as bars:
            bar = bars.add(f"sweep ({spec.name})", len(points))
            bars.advance(bar, len(done))
            for i in mine:
                zero_shot = models.load(points[i], work)
                begun = time.perf_counter()
                result: dict[str, Any] = {"parameters": points[i]}
                for row in splits:
                    for split in row:
                        key = (split.task.name, split.name)
                        if key not in decoded:
                            decoded[key] = decode(split, preprocess, self.workers, work / "images")
                        images, labels = decoded[key]
                        scores = score(
                            zero_shot, images, labels, head_table[split.task.name], preprocess,
                            self.device, self.precision, self.batch_size, split.task.name,
                        )  # fmt: skip
                        result.setdefault(split.name, {})[split.task.name] = scores
                for name, rows in list(result.items()):
                    if name != "parameters":
                        rows["average"] = _average(rows, [t.name for t in self.tasks])
                eval_seconds += time.perf_counter() - begun
                write_json_atomic(work / "points" / f"{i:05d}.json", result)
                done[i] = result
                bars.advance(bar)
        done = _gathered(done, world)
        timings = {
            "merge_seconds": round(models.merge_seconds, 3),
            "eval_seconds": round(eval_seconds, 3),
            "pool_passes": models.passes,
            "world_size": world,
        }
        return done, timings

    def _report(
        self,
        spec: Method,
        points: list[dict[str, Any]],
        done: dict[int, dict[str, Any]],
        splits: list[list[Split]],
    ) -> dict[str, Any]:
        chosen = self.select_on
        rows = [done[i] for i in range(len(points))]

        def rank_of(i: int) -> tuple:
            average = rows[i][chosen]["average"]
            return (-average["accuracy"], average["loss"], i)

        best = min(range(len(rows)), key=rank_of)
        fixed = {k: v for k, v in spec.resolve(self.fixed).items() if k not in self.grid}
        report: dict[str, Any] = {
            "format": SWEEP_FORMAT,
            "method": spec.name,
            "grid": self.grid,
            "fixed": fixed,
            "seed": self.seed,
            "selection": {
                "split": chosen,
                "rule": RULE,
                "on_test_data": chosen == TEST,
                "tasks": {row[0].task.name: row[0].record for row in splits},
            },
            "points": rows,
            "best": {"index": best, "parameters": rows[best]["parameters"]},
            "cheap_to_sweep": [spec.scale] if spec.direction is not None else [],
            "versions": library_versions(),
        }
        if len(splits[0]) > 1:
            report["test"] = {row[1].task.name: row[1].record for row in splits}
        if chosen == TEST:
            report["selection"]["warning"] = TEST_WARNING
        return report


TEST_WARNING = (
    "chosen on the TEST split: its test accuracy is an optimistic estimate, not a held-out one"
)


def sweep_record(report: dict[str, Any]) -> dict[str, Any]:
    """What ``best/``'s recipe (and a card) says about the choice."""
    selection = report["selection"]
    record = {
        "grid": report["grid"],
        "select_on": selection["split"],
        "rule": selection["rule"],
        "chosen": report["best"]["parameters"],
        "tasks": selection["tasks"],
    }
    if selection["on_test_data"]:
        record["warning"] = TEST_WARNING
    return record


def _average(rows: dict[str, dict[str, Any]], names: list[str]) -> dict[str, float]:
    return {key: sum(rows[n][key] for n in names) / len(names) for key in ("accuracy", "loss")}


def _work_file(path: Path) -> dict[str, Any] | None:
    """A work-folder JSON file; None when it cannot be read as one (it is then not resumed
    from)."""
    from clipship.schemas import read_json

    try:
        data = read_json(path, SweepError, "sweep work file")
    except SweepError:
        return None
    return data if isinstance(data, dict) else None


def _recorded(path: Path, key: str) -> Any:
    return (_work_file(path) or {}).get(key)


def _read_point(work: Path, index: int, point: dict[str, Any]) -> dict[str, Any] | None:
    """A finished point's result, if the work folder holds it for these parameters."""
    path = work / "points" / f"{index:05d}.json"
    result = _work_file(path) if path.is_file() else None
    return result if result is not None and result.get("parameters") == point else None


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _gathered(done: dict[int, dict[str, Any]], world: int) -> dict[int, dict[str, Any]]:
    """Every rank's finished points, on every rank."""
    if world <= 1:
        return done
    import torch.distributed as dist

    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, done)
    return {i: r for part in everyone for i, r in part.items()}


# --- outputs --------------------------------------------------------------------------------------


def sweep_markdown(report: dict[str, Any]) -> str:
    """sweep.md: one row per point, the selection split's accuracies (%), and the test
    split's average when measured; the chosen point in bold."""
    chosen = report["selection"]["split"]
    swept = list(report["grid"])
    tasks = list(report["selection"]["tasks"])
    test = "test" in report
    label = "TEST (selection split)" if chosen == TEST else "validation"
    lines = [
        f"# Sweep: {report['method']}",
        "",
        f"Selected on the **{label}** split: {report['selection']['rule']}.",
    ]
    if chosen == TEST:
        lines += ["", f"**Warning: {TEST_WARNING}.**"]
    lines += ["", "| task | " + chosen + " images |", "|---|---|"]
    for name, record in report["selection"]["tasks"].items():
        lines.append(
            f"| {name} | {record['images']} ({record['source']}: {record.get('rule', '')}) |"
        )
    fixed = ", ".join(f"{k}={v}" for k, v in report["fixed"].items()) or "none"
    lines += ["", f"Other parameters: {fixed}. Accuracy in %.", ""]
    head = [*swept, *(f"{t} ({chosen})" for t in tasks), f"average ({chosen})"]
    head += ["average (test, not used to choose)"] if test else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, point in enumerate(report["points"]):
        cells = [str(point["parameters"][k]) for k in swept]
        cells += [f"{100 * point[chosen][t]['accuracy']:.2f}" for t in tasks]
        cells.append(f"{100 * point[chosen]['average']['accuracy']:.2f}")
        if test:
            cells.append(f"{100 * point['test']['average']['accuracy']:.2f}")
        if i == report["best"]["index"]:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    best = ", ".join(f"{k}={v}" for k, v in report["best"]["parameters"].items())
    lines += ["", f"Chosen: {best} (merged into `best/`)."]
    return "\n".join(lines) + "\n"


def sweep_plot(report: dict[str, Any]) -> bytes:
    """sweep.png: average accuracy against each swept parameter, one line per setting of the
    others; the test average dashed when measured."""
    from clipship.runtime.state import figure

    chosen = report["selection"]["split"]
    swept = [k for k, v in report["grid"].items() if _numeric(v)] or list(report["grid"])
    fig = figure(figsize=(4.2 * len(swept), 3.2), dpi=110)
    axes = fig.subplots(1, len(swept), squeeze=False)[0]
    for ax, name in zip(axes, swept):
        others = [k for k in report["grid"] if k != name]
        lines: dict[tuple, list[dict[str, Any]]] = {}
        for point in report["points"]:  # values may be lists: grouped by their JSON
            key = json.dumps([point["parameters"][k] for k in others])
            lines.setdefault(key, []).append(point)
        for key, members in lines.items():
            xs = [p["parameters"][name] for p in members]
            xs = xs if _numeric(xs) else [json.dumps(x) for x in xs]
            label = ", ".join(f"{k}={v}" for k, v in zip(others, json.loads(key))) or None
            ys = [100 * p[chosen]["average"]["accuracy"] for p in members]
            (line,) = ax.plot(xs, ys, marker="o", label=f"{label or chosen}")
            if "test" in report:
                ys = [100 * p["test"]["average"]["accuracy"] for p in members]
                ax.plot(xs, ys, "--", marker="x", color=line.get_color(), label="test")
        best = report["points"][report["best"]["index"]]["parameters"][name]
        ax.axvline(best if _numeric([best]) else json.dumps(best), color="grey", lw=0.8, ls=":")
        ax.set_xlabel(name)
        ax.set_ylabel("average accuracy (%)")
        ax.legend(fontsize=6)
    title = f"{report['method']}: chosen on {chosen}"
    fig.suptitle(title + (" — TEST DATA" if chosen == TEST else ""), fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _numeric(values: list[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
