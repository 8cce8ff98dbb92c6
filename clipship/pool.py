"""The model pool: one pretrained CLIP model plus N fine-tuned task vision encoders.

Sources are local folders, hub ids (``owner/name`` with an optional ``@revision``, fetched with
``huggingface_hub.snapshot_download``) or a FusionBench modelpool YAML file read as it is.
Weights are never loaded whole: each model is a lazy ``Checkpoint`` and tensors are read one at a
time by their canonical ``vision_model.*`` name, whatever layout the file stores. ``validate``
checks the whole pool from the headers (names, shapes, dtypes, architecture) before any work.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from clipship.errors import (
    CheckpointError,
    NonFiniteWeightsError,
    PoolMismatchError,
    SourceNotFoundError,
)
from clipship.hashing import file_sha256
from clipship.safetensors_io import DTYPES, INDEX_NAME, WEIGHTS_NAME, Checkpoint, TensorInfo

PRETRAINED = "_pretrained_"
VISION_PREFIX = "vision_model."
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# What a merge needs from a hub repo: weights, configs, tokenizer and processor files.
HUB_PATTERNS = ["*.json", "*.txt", "model.safetensors", "model-*-of-*.safetensors"]
PICKLE_PATTERNS = ["pytorch_model.bin", "pytorch_model-*-of-*.bin"]
# Vision settings that must agree across a pool (checked before the tensors, for a clear message).
ARCH_KEYS = (
    "hidden_size",
    "patch_size",
    "image_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "num_channels",
)
# The files that make a folder's tokenizer (copied into merged models, hashed for heads).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class PickleCheckpoint:
    """A ``pytorch_model.bin`` opened with ``torch.load(weights_only=True, mmap=True)``.

    Only built when the user passed the explicit pickle flag.
    """

    file: Path
    state: dict[str, torch.Tensor]
    tensors: dict[str, TensorInfo] = field(init=False)

    def __post_init__(self) -> None:
        dtype_names = {v: k for k, v in DTYPES.items()}
        self.tensors = {
            name: TensorInfo(self.file, dtype_names[t.dtype], tuple(t.shape), 0, t.nbytes)
            for name, t in self.state.items()
        }

    @property
    def files(self) -> list[Path]:
        return [self.file]

    def read(
        self, name: str, start: int = 0, count: int | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        tensor = self.state[name]
        if count is not None:
            tensor = tensor.reshape(-1)[start : start + count]
        return tensor.clone() if out is None else out.copy_(tensor)

    def close(self) -> None:
        self.state = {}


@dataclass
class Model:
    """One resolved pool member: where it is, what it stores, and how to read its vision tensors."""

    name: str
    source: str  # as the user gave it
    folder: Path
    repo_id: str | None
    revision: str | None  # hub commit hash, None for local folders
    checkpoint: Checkpoint | PickleCheckpoint
    config: dict
    vision_keys: dict[str, str]  # canonical "vision_model.*" name -> name stored in the file

    @property
    def vision_config(self) -> dict:
        return self.config.get("vision_config", self.config)

    @property
    def has_text_tower(self) -> bool:
        return "text_config" in self.config

    def info(self, name: str) -> TensorInfo:
        return self.checkpoint.tensors[self.vision_keys[name]]

    def read(
        self,
        name: str,
        start: int = 0,
        count: int | None = None,
        check: bool = True,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Read a vision tensor (or flat elements ``[start, start + count)``) by canonical name.

        ``out`` (1-D, any float dtype) receives the values. With ``check``, NaN or Inf raises
        ``NonFiniteWeightsError``; a finite sum proves every element finite, so the exact
        (slower) test runs only when the sum is not finite.
        """
        stored = self.vision_keys[name]
        if out is not None and self.checkpoint.tensors[stored].dtype_torch == out.dtype:
            tensor = self.checkpoint.read(stored, start, count, out=out)
        else:
            tensor = self.checkpoint.read(stored, start, count)
            if out is not None:
                tensor = out.copy_(tensor.reshape(-1))
        if check and tensor.is_floating_point() and not math.isfinite(float(tensor.sum())):
            if not bool(torch.isfinite(tensor).all()):
                raise NonFiniteWeightsError(
                    f"{self.name} ({self.source}): tensor {name} has NaN or Inf values"
                )
        return tensor

    def file_hashes(self) -> dict[str, str]:
        """sha256 of each weight file, free for hub files (their cache blob is named by it)."""
        return {f.name: file_sha256(f) for f in self.checkpoint.files}


@dataclass
class ModelPool:
    pretrained: Model
    models: list[Model]

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]

    @property
    def all(self) -> list[Model]:
        return [self.pretrained, *self.models]

    @property
    def tensor_names(self) -> list[str]:
        """Canonical vision tensor names, sorted (FusionBench flattens in this order)."""
        return sorted(self.pretrained.vision_keys)

    def float_names(self) -> list[str]:
        return [n for n in self.tensor_names if self.pretrained.info(n).is_float]

    def validate(self) -> None:
        """Refuse pools that cannot be merged, naming the first problem found."""
        ref = self.pretrained
        seen = {}
        for model in self.all:
            if model.name in seen:
                raise PoolMismatchError(f"model name {model.name!r} appears twice in the pool")
            seen[model.name] = model
        ref_arch = ref.vision_config
        for model in self.models:
            arch = model.vision_config
            for key in ARCH_KEYS:
                if key in arch and key in ref_arch and arch[key] != ref_arch[key]:
                    raise PoolMismatchError(
                        f"pool mixes architectures: {model.name} has {key}={arch[key]}, "
                        f"{ref.name} has {key}={ref_arch[key]}"
                    )
        ref_names = set(ref.vision_keys)
        for model in self.models:
            names = set(model.vision_keys)
            if names != ref_names:
                missing = sorted(ref_names - names)
                extra = sorted(names - ref_names)
                what = f"lacks {missing[0]}" if missing else f"has an extra tensor {extra[0]}"
                raise PoolMismatchError(
                    f"{model.name} ({model.source}) {what} (differs from {ref.name})"
                )
            for name in self.tensor_names:
                a, b = ref.info(name), model.info(name)
                if a.shape != b.shape:
                    raise PoolMismatchError(
                        f"pool mixes architectures: {name} is {list(b.shape)} in {model.name}, "
                        f"{list(a.shape)} in {ref.name}"
                    )
                if a.dtype != b.dtype:
                    raise PoolMismatchError(
                        f"{name} is {b.dtype} in {model.name}, {a.dtype} in {ref.name}"
                    )

    def close(self) -> None:
        for model in self.all:
            model.checkpoint.close()


def split_revision(source: str) -> tuple[str, str | None]:
    if "@" in source and not Path(source).exists():
        repo, _, rev = source.rpartition("@")
        return repo, rev or None
    return source, None


def resolve_folder(source: str, allow_pickle: bool = False) -> tuple[Path, str | None, str | None]:
    """Find a source on disk: ``(folder, repo_id, revision)``; hub ids go through the HF cache."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path, None, None
    if path.exists():
        raise SourceNotFoundError(f"{source}: expected a model folder, got a file")
    repo_id, revision = split_revision(source)
    if not _REPO_ID.match(repo_id) or repo_id.startswith((".", "~")):
        raise SourceNotFoundError(f"{source}: no such folder")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    patterns = HUB_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        # Older huggingface_hub releases refuse a pinned commit offline even when it is cached.
        folder = cached_snapshot(repo_id, revision)
        if folder is None:
            raise SourceNotFoundError(
                f"{source}: no such folder, and not in the local Hub cache "
                "(offline or unreachable Hub)"
            ) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SourceNotFoundError(f"{source}: no such folder, and the Hub says: {reason}") from None
    return folder, repo_id, folder.name


def cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The cached snapshot of ``repo_id`` at ``revision`` (a branch, tag or commit), if any."""
    from huggingface_hub import constants

    repo = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    commit = revision or "main"
    ref = repo / "refs" / commit
    if ref.is_file():
        commit = ref.read_text().strip()
    snapshot = repo / "snapshots" / commit
    return snapshot if (snapshot / "config.json").is_file() else None


def open_checkpoint(folder: Path, source: str, allow_pickle: bool) -> Checkpoint | PickleCheckpoint:
    if (folder / WEIGHTS_NAME).is_file() or (folder / INDEX_NAME).is_file():
        return Checkpoint.open(folder)
    pickled = folder / "pytorch_model.bin"
    if pickled.is_file():
        if not allow_pickle:
            raise CheckpointError(
                f"{source}: only a pickle checkpoint (pytorch_model.bin); pickles can run code "
                "when loaded, `allow_pickle` loads it with torch.load(weights_only=True)",
                option="allow_pickle",
            )
        try:
            state = torch.load(pickled, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many types for bad or unsafe pickles
            raise CheckpointError(f"{pickled}: cannot load with weights_only=True ({e})") from None
        return PickleCheckpoint(pickled, dict(state))
    if (folder / "pytorch_model.bin.index.json").is_file():
        raise CheckpointError(
            f"{source}: sharded pickle checkpoints are not supported; convert to safetensors"
        )
    raise CheckpointError(f"{source}: no model.safetensors in {folder}")


def vision_key_map(names: list[str], source: str) -> dict[str, str]:
    """Map canonical ``vision_model.*`` names to the names a checkpoint stores.

    Hub checkpoints (and every ``CLIPModel``) store ``vision_model.*``; a ``CLIPVisionModel``
    saved by transformers 5 may store them bare. Other top-level tensors of a full model (text
    tower, projections, logit scale) are not part of the vision tower and are left out.
    """
    prefixed = {n: n for n in names if n.startswith(VISION_PREFIX)}
    if prefixed:
        return prefixed
    bare = {
        VISION_PREFIX + n: n
        for n in names
        if n.startswith(("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm."))
    }
    if not bare:
        raise CheckpointError(f"{source}: no CLIP vision tower tensors found")
    return bare


def load_model(name: str, source: str, allow_pickle: bool = False) -> Model:
    folder, repo_id, revision = resolve_folder(source, allow_pickle)
    config_file = folder / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise SourceNotFoundError(f"{source}: no config.json in {folder}") from None
    except json.JSONDecodeError:
        raise CheckpointError(f"{config_file}: not valid JSON") from None
    ckpt = open_checkpoint(folder, source, allow_pickle)
    keys = vision_key_map(list(ckpt.tensors), source)
    return Model(name, source, folder, repo_id, revision, ckpt, config, keys)


def card_metadata(readme: Path) -> dict[str, Any]:
    """A model card's front matter (``README.md``); empty when there is none or it is malformed."""
    from huggingface_hub import metadata_load

    try:
        return (metadata_load(readme) or {}) if Path(readme).is_file() else {}
    except (ValueError, UnicodeDecodeError):
        return {}


def read_yaml(path: Path, error: type[Exception], what: str) -> Any:
    """A YAML file's data, or one ``error`` line for a missing or malformed file."""
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None


def read_pool_yaml(path: Path) -> tuple[str, dict[str, str]]:
    """Read a FusionBench modelpool YAML: ``(pretrained source, {task: source})`` in file order."""
    data = read_yaml(path, SourceNotFoundError, "pool file")
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict):
        raise SourceNotFoundError(f"{path}: a modelpool needs a 'models:' mapping")
    sources: dict[str, str] = {}
    for name, value in models.items():
        if isinstance(value, dict):
            src = value.get("pretrained_model_name_or_path") or value.get("path")
            if src and value.get("revision"):
                src = f"{src}@{value['revision']}"
        else:
            src = value
        if not isinstance(src, str) or "${" in src:
            raise SourceNotFoundError(f"{path}: model {name!r} has no plain source path or hub id")
        local = Path(path).parent / src
        sources[str(name)] = str(local) if not Path(src).is_absolute() and local.exists() else src
    if PRETRAINED not in sources:
        raise SourceNotFoundError(f"{path}: the pool has no '{PRETRAINED}' model")
    pretrained = sources.pop(PRETRAINED)
    return pretrained, sources


def parse_model_args(items: list[str]) -> dict[str, str]:
    """``["sun397=tanganke/...", ...]`` → ``{"sun397": "tanganke/..."}``."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, src = item.partition("=")
        if not sep or not name or not src:
            raise SourceNotFoundError(f"`model` {item!r}: expected NAME=SOURCE", option="model")
        if name in out:
            raise PoolMismatchError(f"model name {name!r} appears twice in the pool")
        out[name] = src
    return out


def open_pool(
    pretrained: str,
    models: dict[str, str],
    allow_pickle: bool = False,
    validate: bool = True,
) -> ModelPool:
    """Resolve every source and check the pool can be merged.

    >>> pool = open_pool("openai/clip-vit-base-patch32",
    ...                  {"mnist": "tanganke/clip-vit-base-patch32_mnist"})  # doctest: +SKIP
    """
    pool = ModelPool(
        load_model(PRETRAINED, pretrained, allow_pickle),
        [load_model(name, src, allow_pickle) for name, src in models.items()],
    )
    if validate:
        pool.validate()
    return pool


def count_params(model: Model, vision_only: bool = False) -> dict:
    """FusionBench's ``model_info`` keys from the headers alone (float tensors are parameters)."""
    names = model.vision_keys.values() if vision_only else model.checkpoint.tensors
    n = sum(
        math.prod(model.checkpoint.tensors[k].shape)
        for k in names
        if model.checkpoint.tensors[k].is_float
    )
    return {"trainable_params": n, "all_params": n, "trainable_percentage": 1.0 if n else 0.0}
