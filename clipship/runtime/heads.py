"""Zero-shot text heads: one [C, d] matrix of normalised class embeddings per task.

FusionBench's procedure exactly (SPEC §3): for each class, every template is rendered and the
class's prompts are tokenised together, padded to the longest of them, with no truncation; the
pretrained text tower's pooled output goes through ``text_projection``; each prompt embedding is
L2-normalised, averaged over templates and normalised again. No logit scale in the head.

Heads are cached by content: the key covers the text-tower weights, the tokenizer files, the
model's configuration (its text part), the class names, the templates and the dtype, so a cached
head can never be stale. Each entry records its key and its tensor's sha256; an entry that does
not verify (truncated, replaced, not finite) is evicted and computed again, and a cache that
cannot be written (read-only, full) is simply not written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from clipship.errors import (
    CheckpointError,
    HeadsMismatchError,
    NonFiniteError,
    PromptTooLongError,
)
from clipship.hashing import file_sha256
from clipship.memory import load_owned, own_module
from clipship.outputs import atomic_folder, json_text, library_versions, usual_modes
from clipship.pool import TOKENIZER_FILES
from clipship.runtime.state import quiet_transformers
from clipship.runtime.tasks import Task
from clipship.safetensors_io import Checkpoint

HEADS_FILE = "text_heads.safetensors"
HEADS_META = "text_heads.json"
# exp(88.7) is float32's largest value: above 80, logits of unit vectors may overflow.
MAX_LOGIT_SCALE = 80.0


def cache_dir() -> Path:
    root = (
        os.environ.get("CLIPSHIP_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clipship"
    )
    return Path(root)


def text_tower_sha256(folder: Path) -> str:
    """sha256 over the text tower's tensors (names, dtypes, shapes, bytes) in sorted order."""
    digest = hashlib.sha256()
    with Checkpoint.open(folder) as ckpt:
        names = sorted(n for n in ckpt.tensors if n.startswith(("text_model.", "text_projection.")))
        if not names:
            raise CheckpointError(f"{folder}: no text tower (heads need the pretrained CLIPModel)")
        for name in names:
            info = ckpt.tensors[name]
            digest.update(f"{name}\0{info.dtype}\0{list(info.shape)}\0".encode())
            digest.update(ckpt.read(name).reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tokenizer_sha256(folder: Path) -> str:
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = Path(folder) / name
        if path.is_file():
            digest.update(f"{name}\0".encode() + path.read_bytes() + b"\0")
    return digest.hexdigest()


def config_sha256(config: dict[str, Any]) -> str:
    """sha256 of what the heads depend on in ``config.json``: the text tower's configuration and
    the projection size (so a merged model or a mixture shares its pretrained model's heads)."""
    text = {k: config.get(k) for k in ("text_config", "projection_dim")}
    return hashlib.sha256(json.dumps(text, sort_keys=True).encode()).hexdigest()


def head_key(
    text_sha: str, tokenizer_sha: str, config_sha: str, task: Task, dtype: torch.dtype
) -> str:
    spec = {
        "text_tower": text_sha,
        "tokenizer": tokenizer_sha,
        "config": config_sha,
        "classnames": list(task.classnames),
        "templates": list(task.templates),
        "dtype": str(dtype),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


@torch.no_grad()
def text_head(clip_model: Any, tokenizer: Any, task: Task, device: str = "cpu") -> torch.Tensor:
    """[C, d] head for one task, computed class by class as FusionBench does."""
    context = clip_model.config.text_config.max_position_embeddings
    rows = []
    for classname in task.classnames:
        prompts = task.prompts(classname)
        tokens = tokenizer(prompts, padding=True, return_tensors="pt")
        if tokens["input_ids"].shape[1] > context:
            raise PromptTooLongError(
                f"task {task.name}: prompt {prompts[0]!r} (or another for class {classname!r}) "
                f"has {tokens['input_ids'].shape[1]} tokens, the text tower takes {context}"
            )
        tokens = {k: v.to(device) for k, v in tokens.items()}
        pooled = clip_model.text_model(**tokens)[1]
        embeddings = clip_model.text_projection(pooled)
        embeddings = embeddings / embeddings.norm(p=2, dim=-1, keepdim=True)
        embedding = embeddings.mean(dim=0)
        rows.append(embedding / embedding.norm())
    return torch.stack(rows).cpu()


def build_heads(
    pretrained: str | Path,
    tasks: list[Task],
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    use_cache: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Heads for ``tasks`` from a pretrained CLIPModel folder or hub id: ``(heads, metadata)``.
    A head (or the logit scale) that is not finite is refused, naming the task."""
    from clipship.pool import resolve_folder
    from clipship.schemas import read_json

    folder, repo_id, revision = resolve_folder(str(pretrained))
    text_sha, tok_sha = text_tower_sha256(folder), tokenizer_sha256(folder)
    config = read_json(folder / "config.json", CheckpointError, "model config")
    config_sha = config_sha256(config)
    logit_scale = _logit_scale(folder)
    heads: dict[str, torch.Tensor] = {}
    missing = []
    for task in tasks:
        key = head_key(text_sha, tok_sha, config_sha, task, dtype)
        cached = _cached_head(key) if use_cache else None
        if cached is not None:
            heads[task.name] = cached
        else:
            missing.append((task, key))
    if missing:
        model, tokenizer = load_clip(folder, device, dtype)
        for task, key in missing:
            head = text_head(model, tokenizer, task, device)
            if not bool(torch.isfinite(head).all()):
                raise NonFiniteError(
                    f"task {task.name}: its text head has NaN or Inf values (the pretrained "
                    "text tower's weights are not usable)"
                )
            heads[task.name] = head
            if use_cache:
                _store_head(key, head)
    meta = {
        "model": repo_id or folder.resolve().name,  # never a local path: heads get published
        "repo_id": repo_id,
        "revision": revision,
        "text_tower_sha256": text_sha,
        "tokenizer_sha256": tok_sha,
        "config_sha256": config_sha,
        "logit_scale": logit_scale,
        "projection_dim": config.get("projection_dim"),
        "dtype": str(dtype).removeprefix("torch."),
        "tasks": {
            t.name: {"classnames": list(t.classnames), "templates": list(t.templates)}
            for t in tasks
        },
        "versions": library_versions(),
    }
    return {t.name: heads[t.name] for t in tasks}, meta


def _cached_head(key: str) -> torch.Tensor | None:
    """The cached head for ``key`` if its entry verifies; a bad entry is evicted."""
    from clipship.safetensors_io import read_header

    path = cache_dir() / "heads" / f"{key}.safetensors"
    if not path.is_file() or path.is_symlink():
        return None
    try:
        _, metadata = read_header(path)
        head = load_owned(path)["head"]
        digest = hashlib.sha256(head.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
        if metadata.get("key") == key and metadata.get("sha256") == digest:
            if bool(torch.isfinite(head).all()):
                return head
    except Exception:  # a damaged entry: safetensors and our reader raise several types
        pass
    with contextlib.suppress(OSError):
        path.unlink()
    return None


def _store_head(key: str, head: torch.Tensor) -> None:
    """Add a head to the cache (an unpredictable temporary name, then one rename); a cache
    that cannot be written is skipped: it only saves time."""
    from safetensors.torch import save_file

    head = head.contiguous()
    digest = hashlib.sha256(head.view(torch.uint8).numpy().tobytes()).hexdigest()
    folder = cache_dir() / "heads"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".head-", suffix=".tmp", dir=folder)
        os.close(fd)
    except OSError:
        return
    try:
        save_file({"head": head}, name, metadata={"key": key, "sha256": digest})
        usual_modes(Path(name))
        target = folder / f"{key}.safetensors"
        if not target.is_symlink():
            os.replace(name, target)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            os.unlink(name)


def _logit_scale(folder: Path) -> float:
    with Checkpoint.open(folder) as ckpt:
        if "logit_scale" not in ckpt.tensors:
            raise CheckpointError(f"{folder}: no logit_scale (heads need the pretrained CLIPModel)")
        value = float(ckpt.read("logit_scale").float())
    if not math.isfinite(value) or value > MAX_LOGIT_SCALE:
        raise NonFiniteError(
            f"{folder.name}: logit_scale is {value}; exp(logit_scale) multiplies every logit, so "
            f"it must be finite and at most {MAX_LOGIT_SCALE} (CLIP's is ln 100 = 4.6)"
        )
    return value


def load_clip(folder: Path, device: str, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    from transformers import CLIPTokenizer

    from clipship.runtime.model import clip_class

    with quiet_transformers():
        model = clip_class(folder).from_pretrained(folder, dtype=dtype)
        model = own_module(model.to(device).eval())
        return model, CLIPTokenizer.from_pretrained(folder)


def save_heads(
    out: Path, heads: dict[str, torch.Tensor], meta: dict[str, Any], force: bool
) -> Path:
    from safetensors.torch import save_file

    from clipship.schemas import record_sha256

    with atomic_folder(Path(out), force) as tmp:
        save_file(
            {k: v.contiguous() for k, v in heads.items()},
            str(tmp / HEADS_FILE),
            metadata={"format": "pt"},
        )
        meta = {**meta, "heads_sha256": file_sha256(tmp / HEADS_FILE)}
        meta["record_sha256"] = record_sha256(meta)  # the class names with the tensors
        (tmp / HEADS_META).write_text(json_text(meta, HEADS_META, ensure_ascii=False))
    return Path(out)


def load_heads(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A heads folder, checked: its ``text_heads.json`` by schema and by ``record_sha256``
    (covering the class names, templates and the tensors' sha256), the tensors by sha256."""
    from clipship.schemas import HeadsMeta, check_record_hash, parse, read_json

    folder = Path(folder)
    if not folder.is_dir() or not (folder / HEADS_META).is_file():
        raise CheckpointError(f"{folder}: not a heads folder ({HEADS_META} missing)")
    if not (folder / HEADS_FILE).is_file():
        raise CheckpointError(f"{folder}: not a heads folder ({HEADS_FILE} missing)")
    meta = read_json(folder / HEADS_META, CheckpointError, "heads record")
    if not isinstance(meta, dict) or not isinstance(meta.get("tasks"), dict):
        raise CheckpointError(f"{folder}: not a heads folder ({HEADS_META} has no tasks)")
    remedy = "rebuild them with `clipship heads`"
    check_record_hash(meta, f"{folder}/{HEADS_META}", HeadsMismatchError, remedy)
    parse(HeadsMeta, meta, f"{folder}/{HEADS_META}", CheckpointError)
    if meta["heads_sha256"] != file_sha256(folder / HEADS_FILE):
        raise HeadsMismatchError(
            f"{folder}: the heads changed since they were built ({HEADS_FILE}'s sha256 differs)"
        )
    try:
        heads = load_owned(folder / HEADS_FILE)
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise CheckpointError(f"{folder}/{HEADS_FILE}: unreadable ({type(e).__name__})") from None
    if set(heads) != set(meta["tasks"]):
        raise HeadsMismatchError(f"{folder}: {HEADS_FILE} and {HEADS_META} name other tasks")
    for name, head in heads.items():
        if head.ndim != 2 or head.shape[0] != len(meta["tasks"][name]["classnames"]):
            raise HeadsMismatchError(
                f"{folder}: the head of {name} has {list(head.shape)} rows, its record "
                f"{len(meta['tasks'][name]['classnames'])} class names"
            )
        if not bool(torch.isfinite(head).all()):
            raise NonFiniteError(f"{folder}: the head of {name} has NaN or Inf values")
    return heads, meta


def check_heads(meta: dict[str, Any], pretrained_folder: Path) -> None:
    """Refuse heads built from another text tower, tokenizer or configuration than
    ``pretrained_folder``'s."""
    if meta.get("text_tower_sha256") != text_tower_sha256(pretrained_folder):
        raise HeadsMismatchError(
            f"heads were built for another model ({meta.get('model')}): text-tower hash differs"
        )
    if meta.get("tokenizer_sha256") != tokenizer_sha256(pretrained_folder):
        raise HeadsMismatchError(f"heads were built with another tokenizer ({meta.get('model')})")
    from clipship.schemas import read_json

    config = read_json(Path(pretrained_folder) / "config.json", CheckpointError, "model config")
    if meta.get("config_sha256") != config_sha256(config):
        raise HeadsMismatchError(
            f"heads were built for another model configuration ({meta.get('model')})"
        )
