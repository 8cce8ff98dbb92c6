"""`clipship predict`: classify images with an exported graph — onnxruntime, numpy and Pillow only.

Nothing here imports torch or transformers: the export folder is self-contained. Preprocessing
follows ``export.json`` exactly (the same code path as evaluation, ``clipship.imaging``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from clipship.errors import ClipshipError
from clipship.imaging import ImagePreprocess

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def _preprocess(record: dict[str, Any]) -> ImagePreprocess:
    p = record["preprocessing"]
    return ImagePreprocess(
        shortest_edge=p["shortest_edge"],
        size_hw=tuple(p["size"]) if p["size"] else None,
        crop_hw=tuple(p["crop"]) if p["crop"] else None,
        rescale_factor=p["rescale_factor"],
        mean=tuple(p["mean"]),
        std=tuple(p["std"]),
        resample=3 if p["resample"] == "bicubic" else p["resample"],
    )


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
    from PIL import Image, UnidentifiedImageError

    folder = Path(export_dir)
    try:
        record = json.loads((folder / "export.json").read_text())
    except FileNotFoundError:
        raise ClipshipError(f"{folder}: not an export folder (no export.json)") from None
    if variant not in record["variants"]:
        raise ClipshipError(
            f"variant {variant!r} was not exported (have: {', '.join(record['variants'])})"
        )
    task = task or record["tasks"][0]
    if task not in record["tasks"]:
        raise ClipshipError(f"unknown task {task!r} (exported: {', '.join(record['tasks'])})")
    if provider not in PROVIDERS:
        raise ClipshipError(f"--provider {provider}: choose {', '.join(PROVIDERS)}")
    if PROVIDERS[provider] not in ort.get_available_providers():
        raise ClipshipError(
            f"onnxruntime here has no {PROVIDERS[provider]} (install onnxruntime-gpu)"
        )
    preprocess = _preprocess(record)
    table = preprocess.table()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        str(folder / record["variants"][variant]),
        options,
        providers=list(dict.fromkeys([PROVIDERS[provider], "CPUExecutionProvider"])),
    )
    classnames = record["classnames"][task]
    results = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        arrays = []
        for path in chunk:
            try:
                arrays.append(preprocess.to_uint8(Image.open(path)))
            except (OSError, UnidentifiedImageError) as e:
                raise ClipshipError(f"{path}: cannot read the image ({e})") from None
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
