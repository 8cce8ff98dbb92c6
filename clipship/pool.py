"""The model pool: one pretrained CLIP model plus N fine-tuned task vision encoders.

Sources are local folders, hub ids (``owner/name`` with an optional ``@revision``, fetched with
``huggingface_hub.snapshot_download``) or a FusionBench modelpool YAML file read as it is.
Weights are never loaded whole: each model is a lazy ``Checkpoint`` and tensors are read one at a
time by their canonical ``vision_model.*`` name, whatever layout the file stores. ``validate``
checks the whole pool from the headers (names, shapes, dtypes, architecture) before any work.
"""

from __future__ import annotations

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
HUB_PATTERNS = [
    "*.json",
    "*.txt",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "adapter_model.safetensors",  # a LoRA task model (clipship.lora)
    "linearized_adapter_model.safetensors",  # an L-LoRA task model (FusionBench's)
]
MODELSCOPE = "modelscope:"  # a source on ModelScope (``modelscope:owner/name[@revision]``)
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
# Files of the pretrained folder that make the output a loadable CLIPModel's processor.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
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
    """``owner/name@revision`` → (``owner/name``, revision); the revision must be a name."""
    from clipship.errors import shown
    from clipship.schemas import revision_problem

    if "@" in source and not Path(source).exists():
        repo, _, rev = source.rpartition("@")
        problem = revision_problem(rev) if rev else None
        if problem:
            raise SourceNotFoundError(f"{shown(source)}: the revision {shown(rev)} {problem}")
        return repo, rev or None
    return source, None


def resolve_folder(source: str, allow_pickle: bool = False) -> tuple[Path, str | None, str | None]:
    """Find a source on disk: ``(folder, repo_id, revision)``; hub ids go through the HF cache,
    ``modelscope:owner/name`` through ModelScope's."""
    if source.startswith(MODELSCOPE):
        return modelscope_folder(source, allow_pickle)
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

    from clipship.runtime.state import hub_offline, hub_reachable, hub_state

    patterns = HUB_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
    online = hub_reachable()  # else the local cache only, without the client's retries
    try:
        with hub_offline(not online):
            folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        # Older huggingface_hub releases refuse a pinned commit offline even when it is cached.
        folder = cached_snapshot(repo_id, revision)
        if folder is None:
            raise SourceNotFoundError(
                f"{source}: no such folder, and not in the local Hub cache; the Hub is "
                f"{hub_state()}"
            ) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SourceNotFoundError(f"{source}: no such folder, and the Hub says: {reason}") from None
    return folder, repo_id, folder.name


def hf_id(repo_id: str | None) -> str | None:
    """A recorded repo id if it is a Hugging Face Hub id (not ``modelscope:…``), else None."""
    return repo_id if repo_id and not repo_id.startswith(MODELSCOPE) else None


def modelscope_folder(source: str, allow_pickle: bool = False) -> tuple[Path, str, str]:
    """A ``modelscope:owner/name[@revision]`` model through ModelScope's own client (the
    ``modelscope`` extra): the revision (a branch or tag; ``master`` when none is given) is
    resolved first and recorded, so a recipe replays it; the weight files' sha256 are recorded
    as for any source, and a replay checks them. The repo id keeps its prefix, so a recipe's
    source names the platform."""
    repo_id, revision = split_revision(source.removeprefix(MODELSCOPE))
    if not _REPO_ID.match(repo_id) or "/" not in repo_id or repo_id.startswith((".", "~")):
        raise SourceNotFoundError(f"{source}: not a ModelScope model id (modelscope:owner/name)")
    try:
        from modelscope.hub.api import HubApi
        from modelscope.hub.snapshot_download import snapshot_download as download
    except ImportError:
        raise SourceNotFoundError(
            f"{source}: ModelScope sources need its client, clipship's `modelscope` extra "
            "(in a checkout: pip install -e '.[modelscope]')"
        ) from None
    patterns = HUB_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
    try:
        try:
            pinned, local = str(HubApi().get_valid_revision(repo_id, revision=revision)), False
        except OSError:  # unreachable (requests' errors are OSErrors): its cached snapshot
            pinned, local = revision or "master", True
        folder = download(repo_id, revision=pinned, allow_patterns=patterns, local_files_only=local)
    except Exception as e:  # the client raises its own types, requests' and OS errors
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SourceNotFoundError(f"{source}: ModelScope says: {reason}") from None
    return Path(folder), MODELSCOPE + repo_id, str(pinned)


def cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The cached snapshot of ``repo_id`` at ``revision`` (a branch, tag or commit), if any."""
    from huggingface_hub import constants

    repo = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    commit = revision or "main"
    ref = repo / "refs" / commit
    if ref.is_file():
        commit = ref.read_text().strip()
    snapshot = repo / "snapshots" / commit
    found = any((snapshot / f).is_file() for f in ("config.json", "adapter_config.json"))
    return snapshot if found else None


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


def load_model(
    name: str, source: str, allow_pickle: bool = False, base: Model | None = None
) -> Model:
    """A pool member; a LoRA adapter folder (``adapter_config.json``) is read over ``base``, the
    pool's pretrained model, as the task encoder it makes (``clipship.lora``)."""
    from clipship.lora import is_adapter, open_lora
    from clipship.schemas import read_json

    folder, repo_id, revision = resolve_folder(source, allow_pickle)
    if is_adapter(folder):
        if base is None:
            raise CheckpointError(
                f"{source}: a LoRA adapter, not a model; give it as a task model of a pool, "
                "whose pretrained model it adapts"
            )
        lora, keys = open_lora(source, folder, base)
        return Model(name, source, folder, repo_id, revision, lora, base.config, keys)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise SourceNotFoundError(f"{source}: no config.json in {folder}")
    config = read_json(config_file, CheckpointError, "model config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file}: not a model config (a JSON object)")
    ckpt = open_checkpoint(folder, source, allow_pickle)
    keys = vision_key_map(list(ckpt.tensors), source)
    check_config(config, {n: ckpt.tensors[s].shape for n, s in keys.items()}, ckpt, source)
    return Model(name, source, folder, repo_id, revision, ckpt, config, keys)


# transformers' CLIP defaults, used when config.json leaves a key out.
VISION_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 32,
}
TEXT_DEFAULTS = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
}


def check_config(config: dict, vision: dict[str, tuple], ckpt: Any, source: str) -> None:
    """``config.json`` agrees with the weights it describes: a config that lies (an
    ``intermediate_size`` the tensors do not have) would merge into a folder transformers cannot
    load. ``vision`` maps canonical vision names to shapes; the text tower and projections are
    checked too when the checkpoint has them."""
    where = f"{source}: config.json"
    vision_config = config.get("vision_config", config)
    if not isinstance(vision_config, dict):
        raise CheckpointError(f"{where}: vision_config is not a mapping")
    _check_tower(vision_config, VISION_DEFAULTS, vision, "vision_model.", where, "vision")
    text = {n: ckpt.tensors[n].shape for n in ckpt.tensors if n.startswith("text_model.")}
    if text:
        text_config = config.get("text_config", {})
        if not isinstance(text_config, dict):
            raise CheckpointError(f"{where}: text_config is not a mapping")
        _check_tower(text_config, TEXT_DEFAULTS, text, "text_model.", where, "text")
    projection = config.get("projection_dim", 512)
    for name in ("visual_projection.weight", "text_projection.weight"):
        if name in ckpt.tensors and ckpt.tensors[name].shape[0] != projection:
            raise CheckpointError(
                f"{where} says projection_dim={projection!r} but {name} has "
                f"{ckpt.tensors[name].shape[0]} rows"
            )


def _check_tower(
    config: dict, defaults: dict, shapes: dict[str, tuple], prefix: str, where: str, tower: str
) -> None:
    values = {key: config.get(key, default) for key, default in defaults.items()}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CheckpointError(f"{where}: {tower} {key}={value!r} is not a positive integer")

    def expect(key: str, actual: int, tensor: str) -> None:
        if values[key] != actual:
            raise CheckpointError(
                f"{where} says {tower} {key}={values[key]} but the weights have {actual} ({tensor})"
            )

    hidden = values["hidden_size"]
    indices = {int(n.split(".")[3]) for n in shapes if n.startswith(f"{prefix}encoder.layers.")}
    if indices:
        expect("num_hidden_layers", max(indices) + 1, f"{prefix}encoder.layers.{max(indices)}")
    for i in sorted(indices)[:1]:
        fc1 = shapes.get(f"{prefix}encoder.layers.{i}.mlp.fc1.weight")
        if fc1 is not None and len(fc1) == 2:
            expect("intermediate_size", fc1[0], "mlp.fc1.weight")
            expect("hidden_size", fc1[1], "mlp.fc1.weight")
    if hidden % values["num_attention_heads"]:
        raise CheckpointError(
            f"{where}: {tower} hidden_size={hidden} is not a multiple of "
            f"num_attention_heads={values['num_attention_heads']}"
        )
    patch = shapes.get(f"{prefix}embeddings.patch_embedding.weight")
    if patch is not None and len(patch) == 4:
        expect("hidden_size", patch[0], "patch_embedding.weight")
        expect("num_channels", patch[1], "patch_embedding.weight")
        expect("patch_size", patch[2], "patch_embedding.weight")
        positions = shapes.get(f"{prefix}embeddings.position_embedding.weight")
        grid = values["image_size"] // values["patch_size"]
        if positions is not None and positions[0] != grid * grid + 1:
            raise CheckpointError(
                f"{where} says image_size={values['image_size']} (a {grid}×{grid} patch grid) "
                f"but position_embedding.weight has {positions[0]} rows"
            )
    tokens = shapes.get(f"{prefix}embeddings.token_embedding.weight")
    if tokens is not None and "vocab_size" in values:
        expect("vocab_size", tokens[0], "token_embedding.weight")
        positions = shapes.get(f"{prefix}embeddings.position_embedding.weight")
        if positions is not None:
            expect("max_position_embeddings", positions[0], "position_embedding.weight")


def card_metadata(readme: Path) -> dict[str, Any]:
    """A model card's front matter (``README.md``); empty when there is none or it is malformed."""
    from huggingface_hub import metadata_load

    try:
        return (metadata_load(readme) or {}) if Path(readme).is_file() else {}
    except (ValueError, UnicodeDecodeError):
        return {}


def read_pool_yaml(path: Path) -> tuple[str, dict[str, str]]:
    """Read a FusionBench modelpool YAML: ``(pretrained source, {task: source})`` in file order
    (``clipship.schemas.PoolFile``; Hydra's other keys are ignored)."""
    from clipship.schemas import PoolFile, parse, read_yaml

    data = read_yaml(path, SourceNotFoundError, "pool file")
    if isinstance(data, dict) and data.get("models") in (None, "???"):
        grouped = model_group(data.get("defaults"), path)
        if grouped:
            data = {**data, "models": grouped}
    if not isinstance(data, dict) or "models" not in data:
        raise SourceNotFoundError(f"{path}: a modelpool needs a 'models:' mapping")
    pool = parse(PoolFile, data, str(path), SourceNotFoundError)
    sources: dict[str, str] = {}

    def located(src: str) -> str:
        local = Path(path).parent / src
        if not Path(src).is_absolute() and local.exists():
            return str(local)
        if pool.platform == "modelscope" and not Path(src).expanduser().exists():
            return src if src.startswith(MODELSCOPE) else MODELSCOPE + src  # FusionBench's key
        return src

    for name, value in pool.models.items():
        src = value.source or ""
        if value.revision:
            src = f"{src}@{value.revision}"
        sources[name] = located(src)
    pretrained = sources.pop(PRETRAINED)
    unpinned = split_revision(pretrained)[0]  # the _pretrained_ may name a revision
    for name, value in pool.models.items():  # a LoRA entry names the base it adapts
        if value.base_model_name and located(value.base_model_name) not in (pretrained, unpinned):
            raise PoolMismatchError(
                f"{path}: {name} adapts base_model_name {value.base_model_name}, not the pool's "
                f"_pretrained_ ({pretrained})"
            )
    return pretrained, sources


MODEL_GROUP = "/model/clip-vit@models"
_GROUP_ENTRY = re.compile(r"^(clip-vit-(?:base-patch32|base-patch16|large-patch14))(?:_(.+))?$")


def model_group(defaults: Any, path: Path) -> dict[str, str]:
    """The ``models`` a modelpool names through FusionBench's model config group (Hydra
    ``defaults: [/model/clip-vit@models: [...]]``, as its robustness pool does). Each entry of
    that group is one line, by one rule (checked against all of FusionBench 0.2.33's in the
    tests): ``clip-vit-<arch>`` is ``_pretrained_: openai/clip-vit-<arch>`` and
    ``clip-vit-<arch>_<task>`` is ``<task>: tanganke/clip-vit-<arch>_<task>``."""
    names: list[Any] = []
    for item in defaults if isinstance(defaults, list) else []:
        if isinstance(item, dict) and MODEL_GROUP in item:
            value = item[MODEL_GROUP]
            names += value if isinstance(value, list) else [value]
    models: dict[str, str] = {}
    for name in names:
        match = _GROUP_ENTRY.match(name) if isinstance(name, str) else None
        if match is None or (match.group(2) or "").startswith(("TALL", "eight_tasks")):
            raise SourceNotFoundError(
                f"{path}: model group entry {name!r} is not one model of FusionBench's "
                "clip-vit group; list the models under 'models:'"
            )
        key = match.group(2) or PRETRAINED
        models[key] = f"openai/{name}" if key == PRETRAINED else f"tanganke/{name}"
    return models


def parse_model_args(items: list[str]) -> dict[str, str]:
    """``["sun397=tanganke/...", ...]`` → ``{"sun397": "tanganke/..."}``."""
    from clipship.schemas import check_name

    out: dict[str, str] = {}
    for item in items:
        name, sep, src = item.partition("=")
        if not sep or not name or not src:
            raise SourceNotFoundError(f"`model` {item!r}: expected NAME=SOURCE", option="model")
        check_name(name, "`model` name", option="model")
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
    base = load_model(PRETRAINED, pretrained, allow_pickle)
    pool = ModelPool(base, [load_model(n, src, allow_pickle, base) for n, src in models.items()])
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
