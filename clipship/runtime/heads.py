"""Zero-shot text heads: one [C, d] matrix of normalised class embeddings per task.

FusionBench's procedure exactly (SPEC §3): for each class, every template is rendered and the
class's prompts are tokenised together, padded to the longest of them, with no truncation; the
pretrained text tower's pooled output goes through ``text_projection``; each prompt embedding is
L2-normalised, averaged over templates and normalised again. No logit scale in the head.

Heads are cached by content: the key covers the text-tower weights, the tokenizer files, the
class names, the templates and the dtype, so a cached head can never be stale.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from clipship.errors import CheckpointError, HeadsMismatchError, PromptTooLongError
from clipship.hashing import file_sha256
from clipship.memory import load_owned, own_module
from clipship.outputs import atomic_folder, library_versions, usual_modes
from clipship.pool import TOKENIZER_FILES
from clipship.runtime.state import quiet_transformers
from clipship.runtime.tasks import Task
from clipship.safetensors_io import Checkpoint

HEADS_FILE = "text_heads.safetensors"
HEADS_META = "text_heads.json"


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


def head_key(text_sha: str, tokenizer_sha: str, task: Task, dtype: torch.dtype) -> str:
    spec = {
        "text_tower": text_sha,
        "tokenizer": tokenizer_sha,
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
    """Heads for ``tasks`` from a pretrained CLIPModel folder or hub id: ``(heads, metadata)``."""
    from safetensors.torch import save_file

    from clipship.pool import resolve_folder

    folder, repo_id, revision = resolve_folder(str(pretrained))
    text_sha, tok_sha = text_tower_sha256(folder), tokenizer_sha256(folder)
    config = json.loads((folder / "config.json").read_text())
    heads: dict[str, torch.Tensor] = {}
    missing = []
    for task in tasks:
        cached = cache_dir() / "heads" / f"{head_key(text_sha, tok_sha, task, dtype)}.safetensors"
        if use_cache and cached.is_file():
            heads[task.name] = load_owned(cached)["head"]
        else:
            missing.append((task, cached))
    if missing:
        model, tokenizer = load_clip(folder, device, dtype)
        for task, cached in missing:
            heads[task.name] = text_head(model, tokenizer, task, device)
            if use_cache:
                cached.parent.mkdir(parents=True, exist_ok=True)
                tmp = cached.with_name(f".{cached.name}.{os.getpid()}")
                save_file({"head": heads[task.name].contiguous()}, str(tmp))
                usual_modes(tmp)
                os.replace(tmp, cached)
    meta = {
        "model": repo_id or folder.resolve().name,  # never a local path: heads get published
        "repo_id": repo_id,
        "revision": revision,
        "text_tower_sha256": text_sha,
        "tokenizer_sha256": tok_sha,
        "logit_scale": _logit_scale(folder),
        "projection_dim": config.get("projection_dim"),
        "dtype": str(dtype).removeprefix("torch."),
        "tasks": {
            t.name: {"classnames": list(t.classnames), "templates": list(t.templates)}
            for t in tasks
        },
        "versions": library_versions(),
    }
    return {t.name: heads[t.name] for t in tasks}, meta


def _logit_scale(folder: Path) -> float:
    with Checkpoint.open(folder) as ckpt:
        if "logit_scale" not in ckpt.tensors:
            raise CheckpointError(f"{folder}: no logit_scale (heads need the pretrained CLIPModel)")
        return float(ckpt.read("logit_scale").float())


def load_clip(folder: Path, device: str, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    from transformers import CLIPModel, CLIPTokenizer

    with quiet_transformers():
        model = own_module(CLIPModel.from_pretrained(folder, dtype=dtype).to(device).eval())
        return model, CLIPTokenizer.from_pretrained(folder)


def save_heads(
    out: Path, heads: dict[str, torch.Tensor], meta: dict[str, Any], force: bool
) -> Path:
    from safetensors.torch import save_file

    with atomic_folder(Path(out), force) as tmp:
        save_file(
            {k: v.contiguous() for k, v in heads.items()},
            str(tmp / HEADS_FILE),
            metadata={"format": "pt"},
        )
        meta = {**meta, "heads_sha256": file_sha256(tmp / HEADS_FILE)}
        (tmp / HEADS_META).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return Path(out)


def load_heads(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    folder = Path(folder)
    try:
        meta = json.loads((folder / HEADS_META).read_text())
        digest = file_sha256(folder / HEADS_FILE)
    except FileNotFoundError as e:
        raise CheckpointError(
            f"{folder}: not a heads folder ({Path(e.filename).name} missing)"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError, NotADirectoryError):
        raise CheckpointError(f"{folder}: not a heads folder ({HEADS_META} is not JSON)") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("tasks"), dict):
        raise CheckpointError(f"{folder}: not a heads folder ({HEADS_META} has no tasks)")
    if meta.get("heads_sha256") not in (None, digest):
        raise HeadsMismatchError(
            f"{folder}: the heads changed since they were built ({HEADS_FILE}'s sha256 differs)"
        )
    try:
        heads = load_owned(folder / HEADS_FILE)
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise CheckpointError(f"{folder}/{HEADS_FILE}: unreadable ({type(e).__name__})") from None
    return heads, meta


def check_heads(meta: dict[str, Any], pretrained_folder: Path) -> None:
    """Refuse heads built from another text tower or tokenizer than ``pretrained_folder``'s."""
    if meta.get("text_tower_sha256") != text_tower_sha256(pretrained_folder):
        raise HeadsMismatchError(
            f"heads were built for another model ({meta.get('model')}): text-tower hash differs"
        )
    if meta.get("tokenizer_sha256") != tokenizer_sha256(pretrained_folder):
        raise HeadsMismatchError(f"heads were built with another tokenizer ({meta.get('model')})")
