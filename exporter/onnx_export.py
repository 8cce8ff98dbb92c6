"""`clipship export --onnx`: the merged encoder and every task's text head as one ONNX graph.

Input ``pixel_values`` [batch, 3, H, W] (dynamic batch). Outputs ``image_embeds`` (L2-normalised),
``logits`` over all tasks' classes concatenated (exp(logit_scale) folded in, FusionBench's
operation order) and one ``logits_<task>`` per task. Every variant (fp32; fp16 through
onnxruntime's float16 converter with float32 inputs and outputs; int8 through dynamic
per-channel weight quantization) is run with onnxruntime on real images next to PyTorch and must
pass its gates before anything is written. ``export.json`` (also in the graph's metadata) records
task order, class offsets, class names, the preprocessing and versions, so ``clipship predict``
needs nothing but onnxruntime, numpy and Pillow.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipship.errors import ClipshipError
from clipship.eval.data import ImageSource, Preprocess
from clipship.eval.evaluate import ZeroShotModel, load_zero_shot
from clipship.eval.heads import check_heads, load_heads
from clipship.eval.tasks import Task
from clipship.outputs import atomic_folder, check_target, library_versions

OPSET = 20
FILES = {"fp32": "model.onnx", "fp16": "model_fp16.onnx", "int8": "model_int8.onnx"}


class ExportValidationError(ClipshipError):
    """An exported graph that disagrees with PyTorch beyond its gate."""


@dataclass(frozen=True)
class Gates:
    max_logit_diff: float = 1e-3  # fp32
    min_agreement_fp32: float = 1.0
    min_agreement_fp16: float = 0.995
    min_agreement_int8: float = 0.99


class DeployModel(torch.nn.Module):
    """Encoder + projection + concatenated heads: (image_embeds, logits, logits_<task>...)."""

    def __init__(self, zero_shot: ZeroShotModel, heads: dict[str, torch.Tensor]):
        super().__init__()
        self.zero_shot = zero_shot
        self.register_buffer("head", torch.cat(list(heads.values())).float())
        sizes = [h.shape[0] for h in heads.values()]
        self.bounds = [(sum(sizes[:i]), sum(sizes[: i + 1])) for i in range(len(sizes))]

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        embeds = self.zero_shot.embed(pixel_values)
        logits = self.zero_shot.logits(embeds, self.head)
        return (embeds, logits, *[logits[:, a:b] for a, b in self.bounds])


def validation_images(
    tasks: list[Task], preprocess: Preprocess, size: int, data: Path | None = None
) -> tuple[np.ndarray, list[str]]:
    """Up to ``size`` real images (uint8 [N, 3, H, W]): from ``data`` (image files under a folder,
    or a parquet / save_to_disk dataset), else spread over the tasks' local test data."""
    from PIL import Image

    from clipship.eval.data import IMAGE_SUFFIXES, DataError

    images, where = [], []
    if data is not None:
        data = Path(data)
        files = (
            sorted(p for p in data.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if data.is_dir()
            else []
        )
        if files:
            images = [preprocess.to_uint8(Image.open(f)) for f in files[:size]]
        else:
            source = ImageSource(Task("validation", ("?",), ("{c}",), None, str(data)))
            images = [preprocess.to_uint8(source.load(i)[0]) for i in range(min(size, len(source)))]
        where = ["*"] * len(images)
    else:
        per_task = max(1, size // max(1, len(tasks)))
        for task in tasks:
            try:
                source = ImageSource(task)
            except DataError:
                continue
            for index in range(min(per_task, len(source))):
                images.append(preprocess.to_uint8(source.load(index)[0]))
                where.append(task.name)
    if not images:
        raise ClipshipError(
            "no validation images: pass --validation-data (images or a dataset) or tasks with "
            "local test data (--taskfile / --data-dir)"
        )
    return np.stack(images), where


def _onnx_export(model: DeployModel, example: torch.Tensor, path: Path, names: list[str]) -> None:
    batch = torch.export.Dim("batch", min=1, max=65536)
    with _quiet():
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["pixel_values"],
            output_names=names,
            dynamic_shapes=({0: batch},),
            dynamo=True,
            external_data=False,
            opset_version=OPSET,
        )


@contextlib.contextmanager
def _quiet():
    """The exporter and onnxruntime's converters log advice (and torchvision's absence) to
    loggers and stdout; keep the CLI clean."""
    import logging
    import warnings

    loggers = [logging.getLogger(), logging.getLogger("torch.onnx")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _to_fp16(source: Path, target: Path) -> None:
    import onnx
    from onnxruntime.transformers.onnx_model import OnnxModel

    with _quiet():
        model = OnnxModel(onnx.load(str(source)))
        model.convert_float_to_float16(keep_io_types=True)
        model.save_model_to_file(str(target))


def _to_int8(source: Path, target: Path) -> dict[str, int]:
    """Dynamic per-channel int8 weights for the encoder's matrix products, after the CPU rewrites
    of :mod:`clipship.exporter.cpu_graph` (fused attention; the patch embedding as a MatMul, so it
    is quantized too). The projection (a Gemm: one row per image, no time to save) and the heads
    (their weight is MatMul's first input) stay fp32. Returns what was rewritten, for
    ``export.json``."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from clipship.exporter.cpu_graph import fuse_attention, patch_embedding_as_matmul

    model = onnx.load(str(source))
    rewrites = {
        "fused_attention": fuse_attention(model),
        "patch_embedding_matmul": patch_embedding_as_matmul(model),
    }
    with _quiet():
        quantize_dynamic(
            model,
            str(target),
            per_channel=True,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul"],
            # onnxruntime turns each Gemm into a MatMul named "<gemm>_MatMul" and quantizes it.
            nodes_to_exclude=[f"{n.name}_MatMul" for n in model.graph.node if n.op_type == "Gemm"],
        )
    return rewrites


def _session(path: Path, provider: str = "CPUExecutionProvider"):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=[provider])


def _compare(
    session,
    model: DeployModel,
    pixels: torch.Tensor,
    where: list[str],
    tasks: list[str],
    batch: int = 32,
) -> dict[str, Any]:
    ours, theirs = [], []
    for start in range(0, len(pixels), batch):
        chunk = pixels[start : start + batch]
        ours.append(session.run(["logits"], {"pixel_values": chunk.numpy()})[0])
        with torch.inference_mode():
            theirs.append(model(chunk)[1].numpy())
    onnx_logits, torch_logits = np.concatenate(ours), np.concatenate(theirs)
    report: dict[str, Any] = {}
    for task, (a, b) in zip(tasks, model.bounds):
        rows = [i for i, w in enumerate(where) if w == task] or list(range(len(where)))  # "*": all
        diff = np.abs(onnx_logits[rows, a:b] - torch_logits[rows, a:b])
        agree = onnx_logits[rows, a:b].argmax(1) == torch_logits[rows, a:b].argmax(1)
        report[task] = {
            "max_abs_logit_diff": float(diff.max()),
            "top1_agreement": float(agree.mean()),
            "disagreements": int((~agree).sum()),
            "images": len(rows),
        }
    return report


def _batch_consistency(session, pixels: torch.Tensor) -> float:
    """Max |Δ| between rows computed at batch 32 and at batches 1 and 7."""
    sample = pixels[:32].numpy()
    reference = session.run(["logits"], {"pixel_values": sample})[0]
    worst = 0.0
    for size in (1, 7):
        rows = np.concatenate(
            [
                session.run(["logits"], {"pixel_values": sample[i : i + size]})[0]
                for i in range(0, len(sample), size)
            ]
        )
        worst = max(worst, float(np.abs(rows - reference).max()))
    return worst


def export(
    model: str,
    heads_dir: Path,
    out: Path | str,
    *,
    pretrained: str | None = None,
    tasks: list[str] | None = None,
    precisions: list[str] = ("fp32",),
    validation_tasks: list[Task] | None = None,
    validation_data: Path | None = None,
    validation_size: int = 64,
    gates: Gates = Gates(),
    force: bool = False,
    tensorrt: bool = False,
    max_batch: int = 64,
) -> dict[str, Any]:
    """Export, validate against PyTorch, and write ``out`` (nothing is written if a gate fails).
    With ``tensorrt``, also an fp16 engine (batch 1 … ``max_batch``), validated the same way."""
    out = Path(out)
    check_target(out, force)
    if tensorrt:
        from clipship.exporter.tensorrt import require_tensorrt

        require_tensorrt()
        if max_batch < 32:
            raise ClipshipError("--max-batch must be at least 32 (validation runs batches of 32)")
    unknown = [p for p in precisions if p not in FILES]
    if unknown:
        raise ClipshipError(f"--precision {unknown[0]}: choose among {', '.join(FILES)}")
    zero_shot, pretrained_folder, info = load_zero_shot(model, pretrained, "cpu")
    table, meta = load_heads(heads_dir)
    check_heads(meta, pretrained_folder)
    names = tasks or [n for n in meta["tasks"] if n in table]  # the order heads were built in
    missing = [n for n in names if n not in table]
    if missing:
        raise ClipshipError(
            f"unknown task {missing[0]!r}: {heads_dir} has heads for {', '.join(table)}"
        )
    heads = {n: table[n] for n in names}
    deploy = DeployModel(zero_shot, heads).eval()
    preprocess = Preprocess.from_pretrained(pretrained_folder)
    val_tasks = validation_tasks or []
    uint8, where = validation_images(val_tasks, preprocess, validation_size, validation_data)
    pixels = preprocess.normalize(torch.from_numpy(uint8), preprocess.lookup_table())
    outputs = ["image_embeds", "logits", *[f"logits_{n}" for n in names]]
    offsets, start = {}, 0
    for name in names:
        offsets[name] = [start, start + heads[name].shape[0]]
        start += heads[name].shape[0]
    record = {
        "format": "clipship-export/1",
        "model": Path(model).name if Path(model).is_dir() else str(model),  # no local paths
        "opset": OPSET,
        "input": {
            "name": "pixel_values",
            "shape": ["batch", 3, *preprocess.crop_hw] if preprocess.crop_hw else None,
        },
        "outputs": outputs,
        "tasks": names,
        "class_offsets": offsets,
        "classnames": {n: meta["tasks"][n]["classnames"] for n in names},
        "templates_sha256": hashlib.sha256(
            json.dumps({n: meta["tasks"][n]["templates"] for n in names}, sort_keys=True).encode()
        ).hexdigest(),
        "logit_scale": meta["logit_scale"],
        "preprocessing": preprocess.record(),
        "recipe_sha256": _recipe_hash(model),
        "model_info": info,
        "variants": {p: FILES[p] for p in precisions},
        "versions": {**library_versions(), **_onnx_versions()},
    }
    report: dict[str, Any] = {"validation_images": len(where), "variants": {}}
    with atomic_folder(out, force) as tmp:
        _onnx_export(deploy, pixels[:2], tmp / FILES["fp32"], outputs)
        _check_graph(tmp / FILES["fp32"])
        if "fp16" in precisions:
            _to_fp16(tmp / FILES["fp32"], tmp / FILES["fp16"])
        if "int8" in precisions:
            record["int8_rewrites"] = _to_int8(tmp / FILES["fp32"], tmp / FILES["int8"])

        def validate(session, variant: str, gate: str) -> None:
            result = _compare(session, deploy, pixels, where, names)
            result["batch_1_7_vs_32_max_diff"] = _batch_consistency(session, pixels)
            report["variants"][variant] = result
            _gate(gate, result, names, gates)

        for precision in precisions:
            validate(_session(tmp / FILES[precision]), precision, precision)
        if tensorrt:
            from clipship.exporter.tensorrt import ENGINE_FILE, EngineSession, build_engine

            if "fp16" not in precisions:
                _to_fp16(tmp / FILES["fp32"], tmp / FILES["fp16"])
            shape = tuple(pixels.shape[1:])
            record["tensorrt"] = build_engine(
                tmp / FILES["fp16"], tmp / ENGINE_FILE, shape, max_batch
            )
            if "fp16" not in precisions:
                (tmp / FILES["fp16"]).unlink()
            validate(EngineSession(tmp / ENGINE_FILE), "tensorrt_fp16", "fp16")
        if "fp32" not in precisions:
            (tmp / FILES["fp32"]).unlink()
        _embed_metadata(tmp, record)
        (tmp / "export.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        (tmp / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return {"out": str(out), "record": record, "report": report}


def _gate(precision: str, result: dict[str, Any], names: list[str], gates: Gates) -> None:
    for name in names:
        row = result[name]
        need = {
            "fp32": gates.min_agreement_fp32,
            "fp16": gates.min_agreement_fp16,
            "int8": gates.min_agreement_int8,
        }[precision]
        if row["top1_agreement"] < need:
            raise ExportValidationError(
                f"{precision} export disagrees with PyTorch on {name}: top-1 agreement "
                f"{row['top1_agreement']:.4f} < {need} ({row['disagreements']} of "
                f"{row['images']} images)"
            )
        if precision == "fp32" and row["max_abs_logit_diff"] > gates.max_logit_diff:
            raise ExportValidationError(
                f"fp32 export differs from PyTorch on {name}: max |Δlogit| "
                f"{row['max_abs_logit_diff']:.2e} > {gates.max_logit_diff}"
            )
    if precision == "fp32" and result["batch_1_7_vs_32_max_diff"] > gates.max_logit_diff:
        raise ExportValidationError(
            "fp32 export gives different rows at batch 1 or 7 than at batch 32"
        )


def _check_graph(path: Path) -> None:
    import onnx

    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)


def _embed_metadata(folder: Path, record: dict[str, Any]) -> None:
    import onnx

    for name in set(record["variants"].values()):
        path = folder / name
        model = onnx.load(str(path))
        del model.metadata_props[:]
        for key in (
            "format",
            "tasks",
            "class_offsets",
            "classnames",
            "preprocessing",
            "templates_sha256",
        ):
            entry = model.metadata_props.add()
            entry.key, entry.value = f"clipship.{key}", json.dumps(record[key], ensure_ascii=False)
        onnx.save(model, str(path))


def _recipe_hash(model: str) -> str | None:
    recipe = Path(model) / "clipship_recipe.json"
    return hashlib.sha256(recipe.read_bytes()).hexdigest() if recipe.is_file() else None


def _onnx_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("onnx", "onnxruntime", "onnxscript"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out
