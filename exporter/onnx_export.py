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
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipship import machine
from clipship.errors import ClipshipError, ExportValidationError
from clipship.exporter.quantize import (
    AUTO,
    AUTO_ORDER,
    DEFAULT_SCHEME,
    SCHEMES,
    Scheme,
    check_integer_products,
    integer_ops,
    quantize_int8,
)
from clipship.hashing import file_sha256
from clipship.outputs import atomic_folder, check_target, json_text, library_versions
from clipship.requests import VALIDATION_SIZE, Choice, choice
from clipship.runtime.data import ImageSource, Preprocess
from clipship.runtime.heads import check_heads, load_heads
from clipship.runtime.model import ZeroShotModel, load_zero_shot
from clipship.runtime.tasks import Task
from clipship.schemas import record_sha256

OPSET = 20
# Graphs whose weights pass this many bytes keep them in one ``<graph>.data`` file beside the
# graph (ONNX's external data): a protobuf file cannot pass 2 GiB, and a mixture of 8 ViT-B/32
# experts is 2.2 GB. Smaller graphs stay one self-contained file.
EXTERNAL_DATA_BYTES = 1 << 30


class Variant(Choice):
    """A graph variant: the precision its weights (and, for fp16, its arithmetic) run in."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


FILES = {
    Variant.FP32: "model.onnx",
    Variant.FP16: "model_fp16.onnx",
    Variant.INT8: "model_int8.onnx",
}


@dataclass(frozen=True)
class Gates:
    """A variant fails when its images show, at ``CONFIDENCE`` one-sided, that its top-1
    agreement with PyTorch is below the minimum (see :func:`agreement_bounds`)."""

    max_logit_diff: float = 1e-3  # fp32
    min_agreement_fp32: float = 1.0
    min_agreement_fp16: float = 0.995
    min_agreement_int8: float = 0.98

    def __post_init__(self) -> None:
        """Every gate a finite number in its range (a NaN gate would pass everything)."""
        for name in ("max_logit_diff", *(f"min_agreement_{v}" for v in ("fp32", "fp16", "int8"))):
            value = getattr(self, name)
            ok = not isinstance(value, bool) and isinstance(value, (int, float))
            ok = ok and math.isfinite(value) and value >= 0
            if not ok or (name != "max_logit_diff" and value > 1):
                bound = "a finite number ≥ 0" if name == "max_logit_diff" else "in [0, 1]"
                raise ClipshipError(f"`{name}` {value}: must be {bound}", option=name)


CONFIDENCE = 0.95


def agreement_bounds(agreeing: int, images: int, confidence: float = CONFIDENCE):
    """One-sided Clopper–Pearson bounds (lower, upper) on the agreement rate behind ``agreeing``
    of ``images``: the true rate is below ``upper`` (and above ``lower``) with ``confidence``.
    Exact binomial tails, found by bisection (no scipy)."""
    if not 0 <= agreeing <= images or images < 1:
        raise ValueError(f"{agreeing} agreeing of {images} images")
    alpha = 1 - confidence
    log_factorial = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, images + 1)))])

    def at_most(x: int, p: float) -> float:  # P(X ≤ x), X ~ Binomial(images, p)
        if x < 0:
            return 0.0
        if x >= images:
            return 1.0
        p = min(max(p, 1e-300), 1 - 2**-53)
        k = np.arange(x + 1)
        log_pmf = (
            log_factorial[images]
            - log_factorial[k]
            - log_factorial[images - k]
            + k * np.log(p)
            + (images - k) * np.log1p(-p)
        )
        top = log_pmf.max()
        return float(np.exp(top) * np.exp(log_pmf - top).sum())

    def crossing(x: int, target: float) -> float:  # the p where P(X ≤ x | p) = target
        lo, hi = 0.0, 1.0
        for _ in range(60):  # P(X ≤ x | p) decreases as p grows
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if at_most(x, mid) > target else (lo, mid)
        return (lo + hi) / 2

    # upper: P(X ≤ agreeing | p) = α; lower: P(X ≥ agreeing | p) = α.
    upper = 1.0 if agreeing == images else crossing(agreeing, alpha)
    lower = 0.0 if agreeing == 0 else crossing(agreeing - 1, 1 - alpha)
    return lower, upper


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
    """Real images (uint8 [N, 3, H, W]) and the task each belongs to: up to ``size`` from ``data``
    (image files under a folder, or a parquet / save_to_disk dataset; they count for every
    task, "*"), else the first ``size`` of each task's local test data."""
    from clipship.imaging import open_lazily
    from clipship.runtime.data import IMAGE_SUFFIXES, DataError

    images, where = [], []
    if data is not None:
        data = Path(data)
        files = (
            sorted(p for p in data.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if data.is_dir()
            else []
        )
        if files:
            images = [preprocess.to_uint8(open_lazily(f, str(f)), str(f)) for f in files[:size]]
        else:
            source = ImageSource(Task("validation", ("?",), ("{c}",), None, str(data)))
            images = [preprocess.to_uint8(source.load(i)[0]) for i in range(min(size, len(source)))]
        where = ["*"] * len(images)
    else:
        for task in tasks:
            try:
                source = ImageSource(task)
            except DataError as e:
                why = str(e).removeprefix(f"task {task.name}: ")
                raise DataError(
                    f"task {task.name}: no test images to validate on ({why}); give its data "
                    "(`taskfile` / `data_dir`) or pass `validation_data`",
                    option="validation_data",
                ) from None
            for index in range(min(size, len(source))):
                images.append(preprocess.to_uint8(source.load(index)[0]))
                where.append(task.name)
    if not images:
        raise ClipshipError(
            "no validation images: pass `validation_data` (images or a dataset) or tasks with "
            "local test data (`taskfile` / `data_dir`)",
            option="validation_data",
        )
    return np.stack(images), where


def external_data(model: torch.nn.Module) -> bool:
    """Whether ``model``'s graph keeps its weights in a separate data file."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) > EXTERNAL_DATA_BYTES


def data_file(graph: Path) -> Path:
    """The external data file of the graph at ``graph``."""
    return graph.with_name(f"{graph.name}.data")


def save_graph(model: Any, path: Path, external: bool) -> None:
    """An ``onnx.ModelProto`` to ``path``, its weights in ``data_file(path)`` when ``external``."""
    import onnx

    if not external:
        onnx.save(model, str(path))
        return
    data_file(path).unlink(missing_ok=True)
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
        location=data_file(path).name, size_threshold=1024,  # shapes stay in the graph
    )  # fmt: skip


def _onnx_export(
    model: DeployModel,
    example: torch.Tensor,
    path: Path,
    names: list[str],
    external: bool | None = None,
) -> None:
    """``model`` as a graph at ``path``; its weights in ``data_file(path)`` when ``external``
    (by default when they pass ``EXTERNAL_DATA_BYTES``)."""
    external = external_data(model) if external is None else external
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
            external_data=external,
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
        save_graph(model.model, target, data_file(source).exists())


def _to_int8(source: Path, target: Path, scheme: Scheme) -> dict[str, Any]:
    """The int8 variant (:mod:`clipship.exporter.quantize`), refused unless every integer
    product of the file is exact on every CPU. Returns its ``export.json`` record."""
    import onnx

    with _quiet():
        rewrites = quantize_int8(source, target, scheme, data_file(source).exists())
    graph = onnx.load(str(target))
    problems = check_integer_products(graph)
    if problems:
        raise ExportValidationError(f"int8 graph is not portable: {problems[0]}")
    return {**scheme.record(), "integer_ops": integer_ops(graph), "rewrites": rewrites}


def _session(path: Path, provider: str = "CPUExecutionProvider"):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = torch.get_num_threads()  # as PyTorch's (OMP_NUM_THREADS)
    return ort.InferenceSession(str(path), options, providers=[provider])


class _Validation:
    """The validation images (uint8, normalised a batch at a time: a float copy of thousands of
    224² images would take gigabytes), the task each counts for, and PyTorch's logits on them,
    computed once for every variant."""

    def __init__(self, uint8: np.ndarray, where: list[str], preprocess: Preprocess, batch=32):
        self.uint8, self.where, self.batch = uint8, where, batch
        self.preprocess, self.table = preprocess, preprocess.lookup_table()
        self.reference: np.ndarray | None = None

    def pixels(self, start: int, stop: int) -> torch.Tensor:
        return self.preprocess.normalize(torch.from_numpy(self.uint8[start:stop]), self.table)

    def batches(self):
        for start in range(0, len(self.uint8), self.batch):
            yield self.pixels(start, start + self.batch)

    def logits(self, run) -> np.ndarray:
        return np.concatenate([run(chunk) for chunk in self.batches()])

    def torch_logits(self, model: DeployModel) -> np.ndarray:
        if self.reference is None:
            with torch.inference_mode():
                self.reference = self.logits(lambda chunk: model(chunk)[1].numpy())
        return self.reference


def _compare(session, model: DeployModel, images: _Validation, tasks: list[str]) -> dict[str, Any]:
    onnx_logits = images.logits(
        lambda chunk: session.run(["logits"], {"pixel_values": chunk.numpy()})[0]
    )
    torch_logits = images.torch_logits(model)
    for label, logits in (("the exported graph", onnx_logits), ("PyTorch", torch_logits)):
        if not np.isfinite(logits).all():  # nothing non-finite is validated, gated or written
            raise ExportValidationError(f"{label} gives NaN or Inf logits; nothing was written")
    report: dict[str, Any] = {}
    for task, (a, b) in zip(tasks, model.bounds):
        # Each task's own images, or every image where they count for all tasks ("*").
        rows = [i for i, w in enumerate(images.where) if w in (task, "*")]
        diff = np.abs(onnx_logits[rows, a:b] - torch_logits[rows, a:b])
        agree = onnx_logits[rows, a:b].argmax(1) == torch_logits[rows, a:b].argmax(1)
        lower, upper = agreement_bounds(int(agree.sum()), len(rows))
        report[task] = {
            "max_abs_logit_diff": float(diff.max()),
            "top1_agreement": float(agree.mean()),
            "disagreements": int((~agree).sum()),
            "images": len(rows),
            "agreement_lower": lower,
            "agreement_upper": upper,
        }
    return report


def allowed_disagreements(images: int, minimum: float) -> int:
    """The most disagreements among ``images`` that still pass a gate of ``minimum``."""
    lo, hi = 0, images  # upper bound of agreement falls as disagreements grow
    if agreement_bounds(images, images)[1] < minimum:
        return -1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (
            (mid, hi) if agreement_bounds(images - mid, images)[1] >= minimum else (lo, mid - 1)
        )
    return lo


def _batch_consistency(session, images: _Validation) -> float:
    """Max |Δ| between rows computed at batch 32 and at batches 1 and 7."""
    sample = images.pixels(0, 32).numpy()
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
    validation_size: int = VALIDATION_SIZE,
    gates: Gates = Gates(),
    force: bool = False,
    tensorrt: bool = False,
    max_batch: int = 64,
    int8_scheme: str = DEFAULT_SCHEME,
) -> dict[str, Any]:
    """Export, validate against PyTorch on up to ``validation_size`` images per task, and write
    ``out`` (nothing is written if a gate fails). With ``tensorrt``, also an fp16 engine (batch
    1 … ``max_batch``), validated the same way."""
    out = Path(out)
    check_target(out, force, inputs=(model, heads_dir, pretrained, validation_data))
    variants = check_settings(precisions, validation_size, int8_scheme, tensorrt, max_batch)
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
    graph = deploy  # what is exported; deploy gives the reference logits
    if info.get("routing") == "per_sample":  # a mixture: the batch's weights in one product
        from clipship.exporter.mixture import exportable

        graph = DeployModel(exportable(zero_shot), heads).eval()
    preprocess = Preprocess.from_pretrained(pretrained_folder)
    val_tasks = [t for t in validation_tasks or [] if t.name in names]
    unvalidated = [n for n in names if n not in {t.name for t in val_tasks}]
    if unvalidated and validation_data is None:
        raise ClipshipError(
            f"task {unvalidated[0]}: no validation images (every exported task needs its own: "
            "`taskfile` / `data_dir` with its test data, or `validation_data` for all)",
            option="validation_data",
        )
    images = _Validation(
        *validation_images(val_tasks, preprocess, validation_size, validation_data), preprocess
    )
    record = _record(model, names, heads, meta, preprocess, info, variants)
    report: dict[str, Any] = {
        "validation_images": len(images.where),
        "confidence": CONFIDENCE,
        "cpu": machine.describe(),  # the float kernels around int8 products differ per CPU
        "variants": {},
    }

    def validate(session, variant: str, gate: Variant) -> None:
        result = _compare(session, deploy, images, names)
        result["batch_1_7_vs_32_max_diff"] = _batch_consistency(session, images)
        need = _minimum(gate, gates)
        for name in names:
            result[name]["disagreements_allowed"] = allowed_disagreements(
                result[name]["images"], need
            )
        report["variants"][variant] = result
        _gate(gate, result, names, gates)

    with atomic_folder(out, force) as tmp:
        _write_variants(tmp, graph, images, record, variants)
        for variant in variants:
            if variant == Variant.INT8:  # written here: auto keeps the first scheme that passes
                record["int8"] = _chosen_int8(tmp, int8_scheme, validate, report, names, gates)
                report["int8_scheme"] = {"name": record["int8"]["name"], **record["int8"]["chosen"]}
            else:
                validate(_session(tmp / FILES[variant]), str(variant), variant)
        if tensorrt:
            _write_engine(tmp, images, record, variants, max_batch)
            from clipship.exporter.tensorrt import ENGINE_FILE, EngineSession

            validate(EngineSession(tmp / ENGINE_FILE), "tensorrt_fp16", Variant.FP16)
        if Variant.FP32 not in variants:
            (tmp / FILES[Variant.FP32]).unlink()
            data_file(tmp / FILES[Variant.FP32]).unlink(missing_ok=True)
        _embed_metadata(tmp, record)
        graphs = sorted(set(record["variants"].values()))
        files = [*graphs, *(data_file(Path(g)).name for g in graphs if data_file(tmp / g).exists())]
        record["sha256"] = {  # predict refuses a graph that changed since it was validated
            name: file_sha256(tmp / name) for name in sorted(files)
        }
        record["record_sha256"] = record_sha256(record)  # covers labels and preprocessing
        (tmp / "export.json").write_text(json_text(record, "export.json", ensure_ascii=False))
        (tmp / "export_report.json").write_text(json_text(report, "export_report.json"))
    return {"out": str(out), "record": record, "report": report}


def check_settings(
    precisions: Any, validation_size: int, int8_scheme: str, tensorrt: bool, max_batch: int
) -> list[Variant]:
    """An export's settings, checked before anything loads: the variants to write."""
    if validation_size < 1:
        raise ClipshipError(
            f"`validation_size` {validation_size}: must be at least 1", option="validation_size"
        )
    if not precisions:
        raise ClipshipError(
            f"`precision`: name at least one of {', '.join(map(str, Variant))}", option="precision"
        )
    variants = [choice(Variant, p, "precision") for p in precisions]
    if int8_scheme not in (AUTO, *SCHEMES):
        raise ClipshipError(
            f"`int8_scheme` {int8_scheme}: choose among {', '.join((AUTO, *SCHEMES))}",
            option="int8_scheme",
        )
    if tensorrt:
        from clipship.exporter.tensorrt import require_tensorrt

        require_tensorrt()
        if max_batch < 32:
            raise ClipshipError(
                "`max_batch` must be at least 32 (validation runs batches of 32)",
                option="max_batch",
            )
    return variants


def _record(
    model: str,
    names: list[str],
    heads: dict[str, torch.Tensor],
    meta: dict[str, Any],
    preprocess: Preprocess,
    info: dict[str, Any],
    variants: list[Variant],
) -> dict[str, Any]:
    """``export.json``: what ``clipship predict`` needs besides the graph."""
    offsets, start = {}, 0
    for name in names:
        offsets[name] = [start, start + heads[name].shape[0]]
        start += heads[name].shape[0]
    return {
        "format": "clipship-export/1",
        "model": Path(model).name if Path(model).is_dir() else str(model),  # no local paths
        "opset": OPSET,
        "input": {
            "name": "pixel_values",
            "shape": ["batch", 3, *preprocess.crop_hw] if preprocess.crop_hw else None,
        },
        "outputs": ["image_embeds", "logits", *[f"logits_{n}" for n in names]],
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
        "variants": {str(v): FILES[v] for v in variants},
        "versions": {**library_versions(), **_onnx_versions()},
    }


def _write_variants(
    tmp: Path,
    deploy: DeployModel,
    images: _Validation,
    record: dict[str, Any],
    variants: list[Variant],
) -> None:
    """The fp32 graph (always: the others derive from it), then fp16 when asked (int8 is made
    where it is validated, :func:`_chosen_int8`)."""
    fp32 = tmp / FILES[Variant.FP32]
    _onnx_export(deploy, images.pixels(0, 2), fp32, record["outputs"])
    _check_graph(fp32)
    if Variant.FP16 in variants:
        _to_fp16(fp32, tmp / FILES[Variant.FP16])


def _chosen_int8(
    tmp: Path,
    scheme: str,
    validate: Any,
    report: dict[str, Any],
    names: list[str],
    gates: Gates,
) -> dict[str, Any]:
    """The int8 file: the given scheme, or with ``auto`` the first of ``AUTO_ORDER`` (fastest
    first) whose file passes the agreement gates, each candidate built from the fp32 graph and
    validated in turn. Returns ``export.json``'s int8 record: the scheme kept, why, and each
    validated candidate's agreement with PyTorch (``report`` keeps the last one's full rows)."""
    candidates = AUTO_ORDER if scheme == AUTO else (scheme,)
    tried: dict[str, dict[str, Any]] = {}
    target = tmp / FILES[Variant.INT8]
    for name in candidates:
        record = _to_int8(tmp / FILES[Variant.FP32], target, SCHEMES[name])
        try:
            validate(_session(target), str(Variant.INT8), Variant.INT8)
        except ExportValidationError as failure:
            tried[name] = {**_agreement(report["variants"]["int8"], names), "passed": False}
            if len(candidates) == 1:
                raise
            last = failure
            continue
        tried[name] = {**_agreement(report["variants"]["int8"], names), "passed": True}
        why = (
            "given (int8_scheme)"
            if scheme != AUTO
            else "auto: the fastest portable scheme that passes the agreement gates"
            + (f" ({', '.join(n for n in tried if n != name)} did not)" if len(tried) > 1 else "")
        )
        return {**record, "chosen": {"by": why, "candidates": tried}}
    both = "; ".join(
        f"{n} {t['top1_agreement']:.4f} (lowest: {t['lowest_task']} {t['lowest_agreement']:.4f})"
        for n, t in tried.items()
    )
    raise ExportValidationError(
        f"int8 export disagrees with PyTorch under every portable scheme (min agreement "
        f"{gates.min_agreement_int8}): {both}"
    ) from last


def _agreement(result: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """A validated int8 candidate in brief: agreement over every image, and its lowest task."""
    images = sum(result[n]["images"] for n in names)
    disagree = sum(result[n]["disagreements"] for n in names)
    lowest = min(names, key=lambda n: result[n]["top1_agreement"])
    return {
        "top1_agreement": (images - disagree) / images,
        "disagreements": disagree,
        "images": images,
        "lowest_task": lowest,
        "lowest_agreement": result[lowest]["top1_agreement"],
    }


def _write_engine(
    tmp: Path, images: _Validation, record: dict[str, Any], variants: list[Variant], max_batch: int
) -> None:
    """A TensorRT fp16 engine built from the fp16 graph (made for it when not kept)."""
    from clipship.exporter.tensorrt import ENGINE_FILE, build_engine

    fp16 = tmp / FILES[Variant.FP16]
    if Variant.FP16 not in variants:
        _to_fp16(tmp / FILES[Variant.FP32], fp16)
    shape = tuple(images.uint8.shape[1:])
    record["tensorrt"] = build_engine(fp16, tmp / ENGINE_FILE, shape, max_batch)
    if Variant.FP16 not in variants:
        fp16.unlink()
        data_file(fp16).unlink(missing_ok=True)


def _minimum(variant: Variant, gates: Gates) -> float:
    return {
        Variant.FP32: gates.min_agreement_fp32,
        Variant.FP16: gates.min_agreement_fp16,
        Variant.INT8: gates.min_agreement_int8,
    }[variant]


def _gate(precision: Variant, result: dict[str, Any], names: list[str], gates: Gates) -> None:
    need = _minimum(precision, gates)
    for name in names:
        row = result[name]
        # Fail on evidence, not on one image: the agreement's upper confidence bound is below
        # the minimum (with need = 1, any disagreement).
        if not row["agreement_upper"] >= need:  # a NaN fails
            raise ExportValidationError(
                f"{precision} export disagrees with PyTorch on {name}: top-1 agreement "
                f"{row['top1_agreement']:.4f} ({row['disagreements']} of {row['images']} images "
                f"disagree; {100 * CONFIDENCE:.0f} % upper bound {row['agreement_upper']:.4f}) "
                f"< {need}"
            )
        if precision == Variant.FP32 and not row["max_abs_logit_diff"] <= gates.max_logit_diff:
            raise ExportValidationError(
                f"fp32 export differs from PyTorch on {name}: max |Δlogit| "
                f"{row['max_abs_logit_diff']:.2e} > {gates.max_logit_diff}"
            )
    if precision == Variant.FP32 and not result["batch_1_7_vs_32_max_diff"] <= gates.max_logit_diff:
        raise ExportValidationError(
            "fp32 export gives different rows at batch 1 or 7 than at batch 32"
        )


def _check_graph(path: Path) -> None:
    import onnx

    onnx.checker.check_model(str(path), full_check=True)  # by path: also past 2 GiB


def _embed_metadata(folder: Path, record: dict[str, Any]) -> None:
    """Write the record's keys into each published graph, and drop the exporter's per-node
    stack traces: they hold the absolute paths of this machine's sources and virtual environment
    (a home folder, a CI workspace), and without them the bytes do not depend on where clipship
    is installed. Module names (``name_scopes``) stay."""
    import onnx

    for name in set(record["variants"].values()):
        path = folder / name
        model = onnx.load(str(path))
        for graph in [model.graph, *model.functions]:
            for node in graph.node:
                kept = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
                del node.metadata_props[:]
                node.metadata_props.extend(kept)
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
        save_graph(model, path, data_file(path).exists())


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
