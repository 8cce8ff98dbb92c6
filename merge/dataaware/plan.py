"""A data-aware merge inside ``clipship.merge.merge``: which images each task model reads, the
method's run, and the recipe entry that replays it.

Each task model's images come from the task of the same name (built-in, task file or
``--data-dir``: the sources ``clipship eval`` reads), from the split the method uses. The rows
are drawn from the seed (one ``torch.Generator`` per task) or given (``rows``: a recipe's, or an
order recorded elsewhere); the recipe records them with the data's identity: a hub dataset's
id, or the sha256 of a local copy's files, checked again on replay.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clipship.errors import DataError, MethodError, NonFiniteError, RecipeError
from clipship.hashing import file_sha256, tree_sha256
from clipship.merge.dataaware.batches import TaskData, endless_data, one_pass_data
from clipship.merge.registry import Method
from clipship.pool import ModelPool
from clipship.runtime.tasks import Task
from clipship.schemas import loads_json

WEIGHTS_KEY = "merging_weights"
CONCRETE = ("concrete_task_arithmetic", "concrete_adamerging")
LEARNS_WEIGHTS = ("adamerging", *CONCRETE)  # their merging weights can be saved and given


@dataclass(frozen=True)
class DataOptions:
    """Where a data-aware merge's images come from, and AdaMerging's merging weights.

    ``tasks``: the tasks with their data (one per task model, matched by name); ``rows``: a
    fixed fetch order per task (otherwise drawn from the seed); ``merging_weights``: merge with
    these instead of learning them (no data is read); ``save_merging_weights``: keep the learned
    ones; ``data_sha256``: what a replay expects each task's local data to hash to."""

    tasks: tuple[Task, ...] = ()
    rows: dict[str, list[int]] | None = None
    merging_weights: Path | torch.Tensor | None = None
    save_merging_weights: Path | None = None
    data_sha256: dict[str, str | None] | None = None


def compute(
    pool: ModelPool,
    spec: Method,
    values: dict[str, Any],
    options: DataOptions,
    seed: int,
    device: str,
    quiet: bool,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(the merged vision tower by tensor name — a mixture method's ``MixtureResult`` —, the
    recipe's ``data`` entry)."""
    assert spec.data is not None
    if options.merging_weights is not None:
        return _with_weights(pool, spec, values, options.merging_weights)
    if options.save_merging_weights is not None and spec.name not in LEARNS_WEIGHTS:
        raise MethodError(
            f"{spec.name} learns no merging weights to save", option="save_merging_weights"
        )
    from clipship.runtime.data import Preprocess
    from clipship.runtime.heads import build_heads

    tasks = _tasks_of(pool, options.tasks)
    identities = {t.name: data_identity(t) for t in tasks}
    if options.data_sha256 is not None:
        for name, expected in options.data_sha256.items():
            if identities.get(name, {}).get("sha256") != expected:
                raise RecipeError(
                    f"task {name}: its data differs from the recipe's (sha256 of its files)",
                    task=name,
                )
    data = [task_data(spec, values, t, seed, (options.rows or {}).get(t.name)) for t in tasks]
    preprocess = Preprocess.from_pretrained(pool.pretrained.folder)
    heads = build_heads(pool.pretrained.folder, tasks)[0] if spec.data.heads else {}
    from clipship.merge import dataaware

    use = spec.data
    run = getattr(dataaware, use.function)
    settings = {key: values[key] for key in use.keys}
    given = (heads,) if use.heads else ()
    if use.seeded:
        settings["seed"] = seed
    result = run(pool, data, preprocess, *given, **settings, device=device, quiet=quiet)
    record: dict[str, Any] = {
        "tasks": {d.task.name: {**identities[d.task.name], **d.record()} for d in data},
        "preprocessing": preprocess.record(),
    }
    if use.mixture:  # the mixture itself, not a merged tower: the engine writes it
        return result, record
    if result.merging_weights is not None:
        record["merging_weights"] = result.merging_weights.tolist()
        if options.save_merging_weights is not None:
            save_weights(
                options.save_merging_weights,
                result.merging_weights,
                result.weight_names,
                result.saved,
            )
    return result.state_dict, record


def task_data(
    spec: Method, values: dict[str, Any], task: Task, seed: int, rows: list[int] | None
) -> TaskData:
    """The rows of ``task``'s split a method reads, in fetch order and batches."""
    use = spec.data
    assert use is not None
    examples = values[use.examples] if use.examples else None
    if use.endless:
        steps, size = (use.schedule or _steps)(values)
        return endless_data(task, use.split, steps, size, seed=seed, rows=rows, examples=examples)
    return one_pass_data(
        task,
        use.split,
        examples,
        values["batch_size"],
        shuffle=use.shuffle,
        seed=seed,
        rows=rows,
    )


def _steps(values: dict[str, Any]) -> tuple[int, int]:
    return values["max_steps"], values["batch_size"]


def _tasks_of(pool: ModelPool, tasks: tuple[Task, ...]) -> list[Task]:
    by_name = {t.name: t for t in tasks}
    missing = [name for name in pool.names if name not in by_name]
    if missing:
        raise DataError(
            f"task model {missing[0]!r} has no task to read images from: name the task models "
            "after tasks (mnist, svhn, ...) or give a `taskfile`, and the data with `data_dir`",
            option="data_dir",
        )
    return [by_name[name] for name in pool.names]


def data_identity(task: Task) -> dict[str, Any]:
    """What identifies a task's images: a hub dataset's id and configuration, or the sha256 of
    every file of a local copy (a replay checks it)."""
    if task.data is None:
        return {"dataset": dict(task.dataset or {}), "sha256": None}
    return {"dataset": None, "sha256": folder_sha256(Path(task.data))}


def folder_sha256(path: Path) -> str:
    """One digest of a file, or of a folder's files (relative names and contents)."""
    files = tree_sha256(path) if path.is_dir() else {path.name: file_sha256(path)}
    digest = hashlib.sha256()
    for name, file_digest in files.items():
        digest.update(f"{name}\0{file_digest}\n".encode())
    return digest.hexdigest()


def read_router_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Routers under FusionBench's keys (``gate_init.safetensors``), every value finite."""
    from safetensors import SafetensorError

    from clipship.memory import load_owned

    try:
        return load_owned(path)
    except FileNotFoundError:
        raise DataError(f"router_init {path}: no such file") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise DataError(f"router_init {path}: not a safetensors file ({e})") from None


def save_weights(
    path: Path,
    weights: torch.Tensor,
    names: list[str] | None,
    extra: dict[str, torch.Tensor] | None = None,
) -> None:
    """``merging_weights`` as safetensors (a Concrete merge's mask logits and final mask
    beside them, ``mask_logits/<name>``, ``final_mask/<name>``); a layer-wise file names its
    columns."""
    from safetensors.torch import save

    from clipship.outputs import write_bytes_atomic

    metadata = {"weight_names": json.dumps(names)} if weights.dim() == 2 and names else None
    tensors = {WEIGHTS_KEY: weights.contiguous(), **(extra or {})}
    write_bytes_atomic(Path(path), save(tensors, metadata=metadata))


def load_final_mask(path: Path) -> dict[str, torch.Tensor]:
    """The ``final_mask/<name>`` tensors of a Concrete merge's merging-weights file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            mask = {k.removeprefix("final_mask/"): f.get_tensor(k) for k in f.keys()
                    if k.startswith("final_mask/")}  # fmt: skip
    except SafetensorError as e:
        raise DataError(f"{path}: not a safetensors file ({e})") from None
    if not mask:
        raise DataError(f"{path}: no final_mask/ tensors (saved by a Concrete merge?)")
    bad = [k for k, v in mask.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise NonFiniteError(f"{path}: final_mask/{bad[0]} has NaN or Inf values")
    return mask


def load_weights(path: Path) -> tuple[torch.Tensor, list[str] | None]:
    """Merging weights from ``save_weights``' safetensors, or a ``.npy`` array (no pickles)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such merging-weights file", option="merging_weights")
    if path.suffix == ".npy":
        import numpy as np

        try:
            return torch.from_numpy(np.load(path, allow_pickle=False)).float(), None
        except ValueError as e:
            raise DataError(f"{path}: not a numeric array ({e})") from None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            if WEIGHTS_KEY not in f.keys():
                raise DataError(f"{path}: no {WEIGHTS_KEY!r} tensor")
            names = loads_json((f.metadata() or {}).get("weight_names", "null"))
            weights = f.get_tensor(WEIGHTS_KEY).float()
    except SafetensorError as e:
        raise DataError(f"{path}: not a safetensors file ({e})") from None
    except ValueError:  # malformed JSON, a duplicate key or NaN in the names
        raise DataError(f"{path}: its weight_names metadata is not a JSON list of names") from None
    if names is not None and not (
        isinstance(names, list) and all(isinstance(n, str) and n for n in names)
    ):
        raise DataError(f"{path}: its weight_names metadata is not a JSON list of names")
    if not bool(torch.isfinite(weights).all()):
        raise NonFiniteError(f"{path}: the merging weights have NaN or Inf values")
    return weights, names


def _with_weights(
    pool: ModelPool, spec: Method, values: dict[str, Any], given: Path | torch.Tensor
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """AdaMerging's merge with merging weights from a file (or a recipe), reading no data; a
    Concrete merge's file also holds its final mask."""
    if spec.name not in LEARNS_WEIGHTS:
        raise MethodError(f"{spec.name} takes no merging weights", option="merging_weights")
    if spec.name in CONCRETE:
        from clipship.merge.dataaware.concrete import merge_with_mask

        if isinstance(given, torch.Tensor):
            raise MethodError(f"{spec.name}: give the merging weights as the file it saved")
        weights, names = load_weights(given)
        mask = load_final_mask(Path(given))
        state = merge_with_mask(pool, weights, names, mask, values["clamp_weights"])
        record = {"merging_weights": weights.tolist(), "given_merging_weights": True}
        return state, {**record, "merging_weights_sha256": file_sha256(Path(given))}
    from clipship.merge.dataaware.adamerging import merge_with_weights

    weights, names = (given, None) if isinstance(given, torch.Tensor) else load_weights(given)
    state = merge_with_weights(pool, weights, names, clamp_weights=values["clamp_weights"])
    return state, {"merging_weights": weights.tolist(), "given_merging_weights": True}
