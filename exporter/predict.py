"""`clipship predict`: classify images with an exported graph — onnxruntime, numpy and Pillow only.

Nothing here imports torch or transformers: the export folder is self-contained. Preprocessing
follows ``export.json`` exactly (the same code path as evaluation, ``clipship.imaging``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from clipship.errors import ClipshipError
from clipship.imaging import ImagePreprocess, open_image

RECORD_KEYS = {"format", "tasks", "classnames", "preprocessing", "variants"}

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def read_record(folder: Path) -> dict[str, Any]:
    """``export.json``, parsed by its schema (``clipship.schemas.ExportRecord``) and checked
    against its ``record_sha256``: a hand-edited label or preprocessing value is refused, not
    used. A broken record is one clear line, not a traceback."""
    from clipship.schemas import ExportRecord, check_record_hash, parse, read_json

    if not folder.is_dir() or not (folder / "export.json").is_file():
        raise ClipshipError(f"{folder}: not an export folder (no export.json)")
    where = f"{folder}/export.json"
    record = read_json(folder / "export.json", ClipshipError, "export record")
    if not isinstance(record, dict) or not RECORD_KEYS <= set(record):
        raise ClipshipError(f"{where}: not an export record (re-export the model)")
    check_record_hash(record, where, ClipshipError, "re-export the model")
    parse(ExportRecord, record, where, ClipshipError)
    return record


def _variant_graph(folder: Path, record: dict[str, Any], variant: str) -> tuple[str, bytes]:
    """The variant's graph (name, bytes), read once, from inside the export folder and with the
    sha256 the export recorded after validating it."""
    name = record["variants"][variant]
    path = folder / str(name)
    if not isinstance(name, str) or not path.resolve().is_relative_to(folder.resolve()):
        raise ClipshipError(f"export.json: variant {variant} points outside the export folder")
    if not path.is_file():
        raise ClipshipError(f"{name}: missing from {folder} (re-export the model)")
    expected = (record.get("sha256") or {}).get(name)
    if expected is None:
        raise ClipshipError(
            f"export.json records no sha256 for {name} (an older clipship exported it): re-export"
        )
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != expected:
        raise ClipshipError(f"{name}: changed since it was exported (sha256 differs)")
    weights = f"{name}.data"  # a large graph's external weights, beside it
    if weights not in (record.get("sha256") or {}):
        return name, data
    if not (folder / weights).is_file() or (folder / weights).is_symlink():
        raise ClipshipError(f"{weights}: missing from {folder} (re-export the model)")
    digest = hashlib.sha256()
    with open(folder / weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    if digest.hexdigest() != record["sha256"][weights]:
        raise ClipshipError(f"{weights}: changed since it was exported (sha256 differs)")
    return name, str(path)  # onnxruntime reads the data file from beside the graph


def _preprocess(record: dict[str, Any], where: str = "export.json") -> ImagePreprocess:
    """The record's preprocessing, every value checked (``ImagePreprocess.from_record``), and
    the size it makes the one the graph takes."""
    preprocess = ImagePreprocess.from_record(record.get("preprocessing"), where)
    graph_input = record.get("input")
    shape = graph_input.get("shape") if isinstance(graph_input, dict) else None
    key, made = ("crop", preprocess.crop_hw) if preprocess.crop_hw else ("size", preprocess.size_hw)
    if isinstance(shape, list) and len(shape) == 4 and made and tuple(shape[2:]) != made:
        raise ClipshipError(
            f"{where}: preprocessing.{key} makes {made[0]}×{made[1]} images, the graph "
            f"takes {shape[2]}×{shape[3]} (input.shape): re-export the model"
        )
    return preprocess


def predict(
    export_dir: Path | str,
    images: list[Path | str],
    task: str | None = None,
    top_k: int = 5,
    variant: str = "fp32",
    provider: str = "cpu",
    batch_size: int = 32,
) -> list[dict[str, Any]]:
    """Top-k classes per image for one task (default: the first exported task)."""
    import onnxruntime as ort

    folder = Path(export_dir)
    if top_k < 1:
        raise ClipshipError(f"`top_k` {top_k}: must be at least 1", option="top_k")
    if batch_size < 1:
        raise ClipshipError(f"batch size {batch_size}: must be at least 1")
    record = read_record(folder)
    if variant not in record["variants"]:
        raise ClipshipError(
            f"variant {variant!r} was not exported (have: {', '.join(record['variants'])})"
        )
    task = task or record["tasks"][0]
    if task not in record["tasks"]:
        raise ClipshipError(f"unknown task {task!r} (exported: {', '.join(record['tasks'])})")
    if provider not in PROVIDERS:
        raise ClipshipError(
            f"`provider` {provider}: choose {', '.join(PROVIDERS)}", option="provider"
        )
    if PROVIDERS[provider] not in ort.get_available_providers():
        raise ClipshipError(
            f"onnxruntime here has no {PROVIDERS[provider]} (install onnxruntime-gpu)"
        )
    graph_name, graph = _variant_graph(folder, record, variant)
    preprocess = _preprocess(record, f"{folder}/export.json")
    table = preprocess.table()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(
            graph,
            options,
            providers=list(dict.fromkeys([PROVIDERS[provider], "CPUExecutionProvider"])),
        )
    except Exception as e:  # onnxruntime raises its own types for a broken graph
        raise ClipshipError(
            f"{graph_name}: onnxruntime cannot load it ({type(e).__name__})"
        ) from None
    classnames = record["classnames"][task]
    results = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        arrays = []
        for path in chunk:
            arrays.append(preprocess.to_uint8(open_image(path), where=path))
        batch = np.stack(arrays)
        pixels = table[np.arange(3)[None, :, None, None], batch].astype(np.float32)
        logits = session.run([f"logits_{task}"], {"pixel_values": pixels})[0]
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = shifted / shifted.sum(axis=1, keepdims=True)
        for path, row, prob in zip(chunk, logits, probs):
            order = np.argsort(-row, kind="stable")[:top_k]
            results.append(
                {
                    "image": str(path),
                    "task": task,
                    "top": [
                        {
                            "label": classnames[i],
                            "index": int(i),
                            "score": float(prob[i]),
                            "logit": float(row[i]),
                        }
                        for i in order
                    ],
                }
            )
    return results
