"""The streaming merge: read one tensor of every model, merge it, write it, move on.

Memory stays at a few tensors whatever the pool size: models are lazy checkpoints, methods see
one tensor at a time (plus statistics from streaming pre-passes), and the output goes straight to
its offset in the safetensors file. Weight files are hashed in a background thread for the
recipe while the merge runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from clipship.errors import MethodError, NonFiniteError, PoolMismatchError, RecipeError
from clipship.hashing import file_sha256
from clipship.machine import pick_device
from clipship.merge.linearized import in_adapter_space, merge_adapters
from clipship.merge.registry import Method, TensorInputs, get_method
from clipship.outputs import atomic_folder, check_target, json_text, library_versions
from clipship.pool import (
    PROCESSOR_FILES,
    TOKENIZER_FILES,
    Model,
    ModelPool,
    card_metadata,
    open_pool,
)
from clipship.progress import Bars
from clipship.safetensors_io import Checkpoint, ShardedWriter, parse_size

if TYPE_CHECKING:
    from clipship.merge.dataaware.plan import DataOptions

RECIPE_NAME = "clipship_recipe.json"
RECIPE_FORMAT = "clipship-recipe/1"
CHUNK = 1 << 18  # elements per streamed piece (1 MiB of float32 per model)


@dataclass
class MergeResult:
    out: Path
    method: str
    parameters: dict[str, Any]
    files: list[str]
    tensors: int
    seconds: float
    statistics: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "method": self.method,
            "parameters": self.parameters,
            "files": self.files,
            "tensors": self.tensors,
            "seconds": round(self.seconds, 3),
            "statistics": self.statistics,
        }


def merge(
    pretrained: str,
    models: dict[str, str],
    method: str,
    out: Path | str,
    params: dict[str, Any] | None = None,
    *,
    seed: int = 0,
    vision_only: bool = False,
    force: bool = False,
    allow_pickle: bool = False,
    max_shard_size: str | int = "5GB",
    quiet: bool = True,
    expected_hashes: dict[str, dict[str, str]] | None = None,
    device: str = "cpu",
    data: DataOptions | None = None,
) -> MergeResult:
    """Merge task encoders into ``out``: a CLIPModel folder (CLIPVisionModel with ``vision_only``).

    >>> merge("openai/clip-vit-base-patch32",
    ...       {"mnist": "tanganke/clip-vit-base-patch32_mnist",
    ...        "svhn": "tanganke/clip-vit-base-patch32_svhn"},
    ...       "ties", "merged/", {"scaling_factor": 0.3})  # doctest: +SKIP

    A data-aware method (RegMean, Fisher, AdaMerging) reads each task model's images from
    ``data.tasks`` (see ``clipship.merge.dataaware.plan``).
    """
    started = time.perf_counter()
    out = Path(out)
    check_target(out, force, inputs=(pretrained, *models.values()))
    spec = get_method(method)
    values = spec.resolve(params or {})
    device = pick_device(device)
    shard_bytes = parse_size(max_shard_size)
    pool = open_pool(pretrained, models, allow_pickle=allow_pickle)
    try:
        if len(pool.models) < spec.min_models:
            raise MethodError(f"{spec.name} needs at least {spec.min_models} fine-tuned model(s)")
        if spec.exact_models is not None and len(pool.models) != spec.exact_models:
            raise MethodError(
                f"{spec.name} takes exactly {spec.exact_models} fine-tuned model(s) "
                f"({len(pool.models)} given)"
            )
        if spec.check_pool:
            problem = spec.check_pool(values, len(pool.models))
            if problem:
                raise MethodError(f"{spec.name}: {problem}")
        if not vision_only and not pool.pretrained.has_text_tower:
            raise PoolMismatchError(
                f"{pretrained} is a vision-only model, so the output cannot be a full CLIPModel "
                "(pass `vision_only`)",
                option="vision_only",
            )
        data_record, mixture = None, None
        if spec.data is not None and spec.data.mixture:
            if vision_only:
                raise MethodError(
                    f"{spec.name} writes a mixture as a full CLIP model: drop `vision_only`",
                    option="vision_only",
                )
            from clipship.merge.dataaware.plan import DataOptions, compute

            # the adapted mixture itself (no per-tensor merge follows) and the recipe's entry
            mixture, data_record = compute(
                pool, spec, values, data or DataOptions(), seed, device, quiet
            )
        elif spec.data is not None:
            spec, data_record = _computed(pool, spec, values, data, seed, device, quiet)
        hasher = ThreadPoolExecutor(1)
        try:
            with atomic_folder(out, force) as tmp, Bars(quiet, "elapsed") as bar:
                hashes = {m.name: hasher.submit(m.file_hashes) for m in pool.all}
                if mixture is not None:
                    from clipship.merge.mixture import write_mixture

                    files = write_mixture(mixture, pool, tmp, shard_bytes)
                    stats = mixture.statistics
                else:
                    # an L-LoRA pool with a linear method merges its adapters (exact there)
                    step = merge_adapters if in_adapter_space(pool, spec) else _merge_weights
                    files, stats = step(
                        pool, spec, values, seed, vision_only, tmp, shard_bytes, bar, device
                    )
                    _copy_metadata(pool.pretrained, tmp, vision_only)
                recipe = _recipe(pool, spec, values, seed, vision_only, shard_bytes, hashes, stats)
                if device != "cpu":  # results equal CPU's within float rounding, not bitwise
                    recipe["device"] = device
                if data_record is not None:
                    recipe["data"] = data_record
                if data_record is not None and data_record.get("merging_weights_sha256"):
                    # a Concrete merge from a saved mask: the file travels with its recipe
                    shutil.copyfile(data.merging_weights, tmp / MERGING_WEIGHTS)
                    files.append(MERGING_WEIGHTS)
                for key, name in KEPT_INPUTS.items():  # given routers or noise travel along
                    if values.get(key) and spec.data is not None:
                        files.append(_keep_input(key, name, values[key], tmp, recipe))
                if expected_hashes is not None:
                    _check_hashes(recipe, expected_hashes)
                (tmp / RECIPE_NAME).write_text(json_text(recipe, RECIPE_NAME))
        finally:
            hasher.shutdown(wait=False, cancel_futures=True)  # an error need not wait for hashes
        return MergeResult(
            out,
            spec.name,
            values,
            [*files, RECIPE_NAME],
            len(pool.tensor_names),
            time.perf_counter() - started,
            stats,
        )
    finally:
        pool.close()


def _computed(
    pool: ModelPool,
    spec: Method,
    values: dict[str, Any],
    data: DataOptions | None,
    seed: int,
    device: str,
    quiet: bool,
) -> tuple[Method, dict[str, Any]]:
    """A data-aware method's merged tower, computed from the images first, as a per-tensor
    method that hands each tensor to the writer; and the recipe's ``data`` entry."""
    from clipship.merge.dataaware.plan import DataOptions, compute

    tower, record = compute(pool, spec, values, data or DataOptions(), seed, device, quiet)

    def computed(x: TensorInputs, **_: Any) -> torch.Tensor:
        return tower[x.name].reshape(-1)

    return dataclasses.replace(spec, merge=computed, per_tensor=True, prepass=None), record


def merge_from_recipe(
    recipe_path: Path | str,
    out: Path | str,
    pretrained: str | None = None,
    models: dict[str, str] | None = None,
    **kwargs: Any,
) -> MergeResult:
    """Rerun the merge a ``clipship_recipe.json`` describes; the weights come out byte-identical.

    Hub sources come from the recipe (pinned to their commits). Local folders are named there
    by folder name only, so they come from ``pretrained`` / ``models`` (by task name), which can
    also stand in for hub sources; every weight file must match the recipe's sha256."""
    recipe = read_recipe(Path(recipe_path))
    for key in KEPT_INPUTS:
        _find_input(key, recipe, Path(recipe_path).parent)
    given = dict(models or {})
    unknown = sorted(set(given) - {m["name"] for m in recipe["models"]})
    if unknown:
        known = ", ".join(m["name"] for m in recipe["models"])
        raise RecipeError(
            f"`model` {unknown[0]}: not in the recipe (its models: {known})", option="model"
        )
    base = pretrained or _pinned(recipe["pretrained"], "pretrained")
    sources = {m["name"]: given.get(m["name"]) or _pinned(m) for m in recipe["models"]}
    if "data" in recipe:
        folder = Path(recipe_path).parent
        kwargs["data"] = _recorded_data(recipe["data"], kwargs.get("data"), folder)
    return merge(
        base,
        sources,
        recipe["method"],
        out,
        recipe["parameters"],
        seed=recipe["seed"],
        vision_only=recipe["vision_only"],
        max_shard_size=recipe["max_shard_bytes"],
        expected_hashes={m["name"]: m["files"] for m in [recipe["pretrained"], *recipe["models"]]},
        **{"device": recipe.get("device", "cpu"), **kwargs},
    )


MERGING_WEIGHTS = "merging_weights.safetensors"  # a Concrete merge's given λ and final mask
# A data-aware merge's given inputs (a mixture's initial routers, a Concrete mask's noise), copied
# beside the recipe under these names.
KEPT_INPUTS = {"router_init": "router_init.safetensors", "mask_noise": "mask_noise.safetensors"}
ROUTER_INIT = KEPT_INPUTS["router_init"]


def _keep_input(key: str, name: str, source: str, folder: Path, recipe: dict[str, Any]) -> str:
    """A given input file, copied beside its recipe (which names the copy and its sha256, not
    this machine's path), so the folder replays on its own."""
    shutil.copyfile(source, folder / name)
    recipe["parameters"][key] = name
    recipe["data"][f"{key}_sha256"] = file_sha256(folder / name)
    return name


def _find_input(key: str, recipe: dict[str, Any], folder: Path) -> None:
    """A replayed merge's given input: the copy beside the recipe, checked by sha256."""
    name = recipe["parameters"].get(key)
    if not name:
        return
    expected = (recipe.get("data") or {}).get(f"{key}_sha256")
    path = folder / name
    if Path(name).name != name or not path.is_file():
        raise RecipeError(f"{key} {name}: not beside the recipe in {folder}")
    if expected is None or file_sha256(path) != expected:
        raise RecipeError(f"{path}: its sha256 is not the recipe's {key}_sha256")
    recipe["parameters"][key] = str(path)


def _recorded_data(record: dict[str, Any], given: DataOptions | None, folder: Path) -> DataOptions:
    """A data-aware recipe's images: the tasks (and their data) from the caller, the rows and
    the local data's sha256 from the recipe; merging weights that were given come back too (a
    Concrete merge's from the file beside the recipe, checked by sha256)."""
    from clipship.merge.dataaware.plan import DataOptions

    given = given or DataOptions()
    expected = record.get("merging_weights_sha256")
    if record.get("given_merging_weights") and expected:
        path = folder / MERGING_WEIGHTS
        if not path.is_file() or file_sha256(path) != expected:
            raise RecipeError(f"{path}: missing, or not the recipe's merging_weights_sha256")
        return dataclasses.replace(given, merging_weights=path)
    if record.get("given_merging_weights"):
        return dataclasses.replace(given, merging_weights=torch.tensor(record["merging_weights"]))
    tasks = record.get("tasks", {})
    return dataclasses.replace(
        given,
        rows={name: entry["rows"] for name, entry in tasks.items()},
        data_sha256={name: entry.get("sha256") for name, entry in tasks.items()},
    )


def read_recipe(path: Path) -> dict[str, Any]:
    """A recipe, checked by its schema (``clipship.schemas.Recipe``): every source with the
    sha256 of each weight file (a replay checks them, so none may be missing)."""
    from clipship.schemas import Recipe, parse, read_json

    recipe = read_json(path, RecipeError, "recipe file")
    if not isinstance(recipe, dict) or recipe.get("format") != RECIPE_FORMAT:
        raise RecipeError(f"{path}: not a clipship recipe (expected format {RECIPE_FORMAT})")
    parse(Recipe, recipe, str(path), RecipeError)
    return recipe


def _pinned(source: dict[str, Any], option: str | None = None) -> str:
    if source.get("repo_id"):
        rev = source.get("revision")
        return f"{source['repo_id']}@{rev}" if rev else source["repo_id"]
    if source.get("path"):  # recipes written before local paths were left out
        return source["path"]
    option = option or "model"
    label = "the pretrained model" if option == "pretrained" else source["name"]
    given = "`pretrained` PATH" if option == "pretrained" else f"`model` {source['name']}=PATH"
    raise RecipeError(
        f"{label} was merged from a local folder ({source['source']}), which a recipe "
        f"does not locate: give it with {given} (or `pool`); its files are checked against "
        "the recipe's sha256",
        option=option,
    )


def _check_hashes(recipe: dict[str, Any], expected: dict[str, dict[str, str]]) -> None:
    for entry in [recipe["pretrained"], *recipe["models"]]:
        want = expected.get(entry["name"])
        if want is not None and want != entry["files"]:
            raise RecipeError(
                f"{entry['name']} ({entry['source']}) changed since the recipe was written "
                "(weight file sha256 differs)"
            )


def iter_inputs(
    pool: ModelPool,
    names: list[str],
    seed: int,
    check: bool,
    start: int = 0,
    whole: bool = False,
    device: str = "cpu",
) -> Iterator[TensorInputs]:
    """Every listed tensor of every pool member, in flat pieces of at most ``CHUNK`` elements
    (or whole, with ``whole``: one tensor of each model at a time, for per-tensor methods).

    Pieces this size stay in the CPU cache through a method's few element-wise passes, and
    bound memory to a few MB per model whatever the tensor size. The next piece is read in a
    background thread while the current one is merged. Whole tensors share one buffer: a
    yielded ``finetuned`` is valid until the next one is requested.
    """
    pieces = []
    for name in names:
        numel = pool.pretrained.info(name).numel
        step = max(numel, 1) if whole else CHUNK
        pieces += [(name, off, min(step, numel - off)) for off in range(start, max(numel, 1), step)]

    # Whole tensors are read into one buffer sized for the largest: a fresh [N, n] block per
    # tensor would leave the allocator holding freed blocks of every size (RSS creeps up).
    largest = max((count for _, _, count in pieces), default=0)
    shared = torch.empty(len(pool.models) * largest) if whole else None

    def load(piece: tuple[str, int, int]) -> TensorInputs:
        name, offset, count = piece
        if shared is not None:
            block = shared[: len(pool.models) * count].view(len(pool.models), count)
        else:
            block = torch.empty(len(pool.models), count, dtype=torch.float32)
        for row, model in zip(block, pool.models):
            model.read(name, offset, count, check, out=row)
        pretrained = pool.pretrained.read(name, offset, count, check).to(torch.float32)
        shape = pool.pretrained.info(name).shape
        return TensorInputs(name, pretrained, block, pool.names, seed, offset, shape, device=device)

    if whole:  # compute dominates and a whole tensor of every model is large: no read-ahead
        for piece in pieces:
            yield load(piece)
        return
    with ThreadPoolExecutor(1) as reader:
        ahead = reader.submit(load, pieces[0]) if pieces else None
        for i in range(len(pieces)):
            current = ahead.result()
            ahead = reader.submit(load, pieces[i + 1]) if i + 1 < len(pieces) else None
            yield current


def _merge_weights(
    pool: ModelPool,
    spec: Method,
    values: dict[str, Any],
    seed: int,
    vision_only: bool,
    folder: Path,
    shard_bytes: int,
    bar: Bars,
    device: str = "cpu",
) -> tuple[list[str], dict[str, Any]]:
    pre = pool.pretrained
    vision = pool.tensor_names
    layout = {n: (pre.info(n).dtype, pre.info(n).shape) for n in vision}
    extra: list[str] = []
    if not vision_only:
        stored_vision = set(pre.vision_keys.values())
        extra = sorted(n for n in pre.checkpoint.tensors if n not in stored_vision)
        for n in extra:
            info = pre.checkpoint.tensors[n]
            layout[n] = (info.dtype, info.shape)
    writer = ShardedWriter(folder, layout, shard_bytes)

    def write(x: TensorInputs, merged: torch.Tensor) -> None:
        merged = merged.reshape(-1).to("cpu", pre.info(x.name).dtype_torch)
        check_finite(merged, f"merged tensor {x.name}", spec.name)
        writer.write(x.name, merged, x.offset)

    try:
        stats = run_method(pool, spec, values, seed, bar, device, write)
        floats = set(pool.float_names())
        for name in vision:
            if name not in floats:
                writer.write(name, _same_everywhere(pool, name))
        copy_extra(writer, pre, extra)
        files = writer.close()
    finally:
        writer.abort()
    return files, stats


def run_method(
    pool: ModelPool,
    spec: Method,
    values: dict[str, Any],
    seed: int,
    bar: Bars,
    device: str,
    write: Callable[[TensorInputs, torch.Tensor], None],
) -> dict[str, Any]:
    """Stream the pool through ``spec``: its pre-pass, then every float tensor merged and handed
    to ``write`` (a piece merged again if the settled statistics change it, written again at
    the same place). Returns the statistics the recipe records."""
    pre = pool.pretrained
    floats = pool.float_names()
    passes = 0

    def stream(label: str) -> Iterator[TensorInputs]:
        nonlocal passes
        passes += 1  # values are checked for NaN/Inf on the first pass only
        task = bar.add(label, len(floats))
        for x in iter_inputs(pool, floats, seed, passes == 1, whole=spec.per_tensor, device=device):
            yield x
            if x.offset + x.pretrained.numel() == math.prod(x.shape):
                bar.advance(task)

    stats: dict[str, Any] = {}
    if spec.prepass:
        numel = sum(pre.info(n).numel for n in floats)
        stats = spec.prepass(stream, numel=numel, tasks=pool.names, **values)

    def merged(x: TensorInputs) -> tuple[object, bool]:
        out = spec.merge(x, **values, **stats)
        tally, depends = None, False
        if spec.settle:
            out, tally, depends = out
        write(x, out)
        return tally, depends

    tallies, revisit = [], []
    for x in stream(f"merging ({spec.name})"):
        tally, depends = merged(x)
        tallies.append(tally)
        if depends:
            revisit.append((x.name, x.offset))
    if spec.settle:
        final = spec.settle(tallies)
        changed = any(stats.get(k) != v for k, v in final.items())
        stats.update(final)
        for name, offset in revisit if changed else []:
            merged(next(iter_inputs(pool, [name], seed, False, offset, spec.per_tensor, device)))
    return stats


def merge_direction(
    pool: ModelPool,
    spec: Method,
    values: dict[str, Any],
    seed: int,
    bar: Bars,
    device: str = "cpu",
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One pass over the pool for a scaled method (``Method.scale``): M, its merge before λ, as
    one flat float32 tensor per float vision tensor; θ_pre + M·λ (``registry.combine``) then is
    the merge at any λ, with its bits (``clipship sweep``). Returns (M by name, statistics)."""
    assert spec.direction is not None and spec.scale is not None
    rest = {k: v for k, v in values.items() if k != spec.scale}
    direction = dataclasses.replace(spec, merge=lambda x, **v: spec.direction(x, **v))
    tensors = {n: torch.empty(pool.pretrained.info(n).numel) for n in pool.float_names()}

    def write(x: TensorInputs, merged: torch.Tensor) -> None:
        piece = merged.reshape(-1)
        tensors[x.name][x.offset : x.offset + piece.numel()].copy_(piece)

    stats = run_method(pool, direction, rest, seed, bar, device, write)
    return tensors, stats


def copy_extra(writer: ShardedWriter, pretrained: Model, names: list[str]) -> None:
    """The pretrained tensors outside the vision tower (text tower, projections, logit scale),
    copied as they are (file to file where possible), each checked finite first."""
    for name in names:
        info = pretrained.checkpoint.tensors[name]
        if info.is_float:
            for start in range(0, info.numel, CHUNK):
                piece = pretrained.checkpoint.read(name, start, min(CHUNK, info.numel - start))
                check_finite(piece, f"{name} of the pretrained model", None)
        if isinstance(pretrained.checkpoint, Checkpoint):
            writer.copy(name, info, pretrained.checkpoint.fd(info.file))
        else:
            writer.write(name, pretrained.checkpoint.read(name))


def check_finite(tensor: torch.Tensor, what: str, method: str | None) -> None:
    """Nothing non-finite is written: a merged value that overflowed float32 (a huge
    parameter) or a NaN copied from an input stops the merge, naming the tensor. A finite sum
    proves every element finite, so the exact test runs only when it is not."""
    if not tensor.is_floating_point() or math.isfinite(float(tensor.sum())):
        return
    if bool(torch.isfinite(tensor).all()):
        return
    why = (
        f" (the {method} parameters take the merge outside float range, or an input has NaN)"
        if method
        else ""
    )
    raise NonFiniteError(f"{what} has NaN or Inf values{why}; nothing was written")


def _same_everywhere(pool: ModelPool, name: str) -> torch.Tensor:
    """A non-float tensor (e.g. position ids) is copied, and must not differ between models."""
    value = pool.pretrained.read(name)
    for model in pool.models:
        if not torch.equal(model.read(name), value):
            raise PoolMismatchError(
                f"non-float tensor {name} differs between {model.name} and _pretrained_"
            )
    return value


def _copy_metadata(pretrained: Model, folder: Path, vision_only: bool) -> None:
    config = json.loads((pretrained.folder / "config.json").read_text())
    if vision_only and "vision_config" in config:
        vision = dict(config["vision_config"])
        vision.update(architectures=["CLIPVisionModel"], model_type="clip_vision_model")
        for key in ("dtype", "transformers_version"):
            if key in config:
                vision.setdefault(key, config[key])
        config = vision
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    names = PROCESSOR_FILES if vision_only else PROCESSOR_FILES + TOKENIZER_FILES
    for name in names:
        if (pretrained.folder / name).is_file():
            shutil.copyfile(pretrained.folder / name, folder / name)


def _source_entry(model: Model, hashes: Future, base: bool = False) -> dict[str, Any]:
    """A pool member as the recipe names it: a hub id with its commit, or a local folder by its
    name only (recipes are published; a replay takes local folders from the command line and
    checks them by the sha256 of each weight file)."""
    entry: dict[str, Any] = {"name": model.name}
    if model.repo_id:
        entry.update(source=model.source, repo_id=model.repo_id, revision=model.revision)
    else:
        entry.update(source=model.folder.resolve().name, revision=None)
    if base:
        entry["license"] = card_metadata(model.folder / "README.md").get("license")
    entry["files"] = hashes.result()
    return entry


def _recipe(
    pool: ModelPool,
    spec: Method,
    values: dict[str, Any],
    seed: int,
    vision_only: bool,
    shard_bytes: int,
    hashes: dict[str, Future],
    stats: dict[str, Any],
) -> dict[str, Any]:
    return {
        "format": RECIPE_FORMAT,
        "method": spec.name,
        "parameters": values,
        "seed": seed,
        "vision_only": vision_only,
        "max_shard_bytes": shard_bytes,
        "pretrained": _source_entry(pool.pretrained, hashes[pool.pretrained.name], base=True),
        "models": [_source_entry(m, hashes[m.name]) for m in pool.models],
        "statistics": stats,
        "versions": library_versions(),
    }
