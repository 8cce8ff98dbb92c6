"""One prepared GPU check (``make gpu-check``): the CUDA paths, each against the CPU, in one run.

Parts, most important first, each timed and written to ``OUT/gpu_check.json`` and
``OUT/gpu_check.md`` as soon as it finishes (``OUT``: ``--out``, else ``$OUT`` as the device tool
sets it, else ``gpu_check_out/``):

1. ``eval``: the zero-shot model of the in-tree evaluation fixture on CUDA and on the CPU, on the
   same 64 real digit images: same predictions, max |Δlogit| (fp32 within 1e-3); then images/s
   of a ViT-B/32-shaped model (seeded random weights) at batch 1, 32 and 256, fp32 and fp16
   autocast.
2. ``merge``: ``merge(device=...)`` of TSV-M, Iso-CTS, WUDI and RegMean on the in-tree fixtures
   against the same merge on the CPU (max |Δ| of the merged tower, seconds side by side), and
   TSV-M on four ViT-B/32-shaped task encoders (seconds on each device).
3. ``export``: the fixture exported by ``clipship export``, its fp32 / fp16 graphs run on
   onnxruntime's CUDA provider and a TensorRT fp16 engine, each compared with PyTorch; images/s
   at batch 1, 32 and 256 of the ViT-B/32-shaped graph next to PyTorch CUDA fp16 eager.
   onnxruntime-gpu and TensorRT are not in the device image (and their wheels exceed what the
   device tool carries), so these rows say "skipped" there, naming why, rather than failing.
4. ``wemoe``: a weight-ensembling mixture adapted on the fixture (10 steps) on CUDA and on the
   CPU, evaluated on both (predictions, Δlogit).

Without CUDA, ``make gpu-check`` is a dry run: it prints what it would run and exits 0 in
seconds. ``--device cpu`` runs every part with the CPU in CUDA's place (tiny sizes), which is
what ``tests/test_gpu_check.py`` does, so a first GPU run can fail only on GPU problems.

On the device machine nothing can be downloaded. Its image has torch (CUDA), transformers, onnx,
onnxruntime (CPU), safetensors, typer, rich, matplotlib, scipy, pyyaml and pyarrow; the rest of
clipship's needs travel as wheels (``make gpu-wheels`` downloads them here into ``.whl/``, about
4 MB, ignored by git) and clipship itself from the working tree:

    device run, carry [".whl"]:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=/tmp/site && python3 -m pip install -q --no-index --no-deps
    --no-build-isolation -e . && python3 scripts/gpu_check.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
EVALREF = DATA / "evalref" / "fixture"
DATAAWARE = DATA / "dataaware" / "fixture"
PARITY = DATA / "parity" / "fixture"
LOGIT_TOLERANCE = 1e-3  # fp32 CUDA against CPU: different kernels, same math
WEIGHT_TOLERANCE = 1e-4  # SVD and optimiser merges (the README's parity tolerance)
BATCHES = (1, 32, 256)


def part_eval(device: str, work: Path, small: bool) -> dict[str, Any]:
    import torch

    from clipship.runtime.model import load_zero_shot

    pixels = _digits()
    rows: dict[str, Any] = {}
    model = str(EVALREF / "mnist")
    outputs = {}
    for where in ("cpu", device):
        zero_shot, _, _ = load_zero_shot(model, str(EVALREF / "pretrained"), where)
        head = _head(where)
        with torch.no_grad():
            outputs[where] = zero_shot.logits(zero_shot.embed(pixels.to(where)), head).cpu()
    rows["fixture_same_predictions"] = bool(
        torch.equal(outputs["cpu"].argmax(1), outputs[device].argmax(1))
    )
    diff = float((outputs["cpu"] - outputs[device]).abs().max())
    rows["fixture_max_abs_logit_diff"] = diff
    rows["fixture_passed"] = rows["fixture_same_predictions"] and diff <= LOGIT_TOLERANCE
    rows["throughput"] = _throughput(device, work, small)
    return rows


def _digits() -> Any:
    from safetensors.torch import load_file

    return load_file(str(DATA / "evalref" / "reference" / "mnist_logits.safetensors"))[
        "pixel_values"
    ]


def _head(device: str) -> Any:
    from clipship.eval import build_heads, get_tasks

    heads, _ = build_heads(EVALREF / "pretrained", get_tasks("mnist"), use_cache=False)
    return heads["mnist"].to(device)


def _throughput(device: str, work: Path, small: bool) -> dict[str, Any]:
    """Images/s of a ViT-B/32-shaped zero-shot model (tiny with ``small``), fp32 and fp16."""
    import torch

    from clipship.runtime.model import load_zero_shot

    pretrained = _synthetic_pool(work, 1, small)[0]
    zero_shot, _, _ = load_zero_shot(str(pretrained), None, device)
    size = zero_shot.vision.config.image_size
    rates: dict[str, Any] = {}
    for precision in ("fp32", "fp16"):
        if precision == "fp16" and device == "cpu":
            continue
        for batch in BATCHES[:2] if small else BATCHES:
            x = torch.randn(batch, 3, size, size, device=device)

            def run(x=x, precision=precision) -> None:
                with (
                    torch.no_grad(),
                    torch.autocast(
                        device.split(":")[0], dtype=torch.float16, enabled=precision == "fp16"
                    ),
                ):
                    zero_shot.embed(x)
                _sync(device)

            rates[f"{precision} batch {batch}"] = round(batch / _timed(run), 1)
    return rates


def part_merge(device: str, work: Path, small: bool) -> dict[str, Any]:
    from safetensors.torch import load_file

    from clipship.merge import merge
    from clipship.merge.dataaware.plan import DataOptions
    from clipship.runtime.tasks import get_tasks, with_local_data

    parity = {t: str(PARITY / t) for t in ("task_a", "task_b", "task_c", "task_d")}
    aware = {t: str(DATAAWARE / t) for t in ("mnist", "svhn", "eurosat")}
    tasks = tuple(with_local_data(get_tasks(list(aware)), DATAAWARE / "data"))
    cases = {
        "task_singular_vector": (str(PARITY / "pretrained"), parity, {}, None),
        "iso_cts": (str(PARITY / "pretrained"), parity, {}, None),
        "wudi": (str(PARITY / "pretrained"), parity, {"iter_num": 20 if small else 400}, None),
        "regmean": (str(EVALREF / "pretrained"), aware, {"num_regmean_examples": 32},
                    DataOptions(tasks)),
    }  # fmt: skip
    rows: dict[str, Any] = {}
    for method, (pretrained, models, params, data) in cases.items():
        merged, seconds = {}, {}
        for where in ("cpu", device):
            out = work / f"{method}-{where.replace(':', '')}"
            started = time.perf_counter()
            merge(pretrained, models, method, out, params, vision_only=True, device=where,
                  data=data, force=True)  # fmt: skip
            seconds[where] = round(time.perf_counter() - started, 2)
            merged[where] = load_file(str(out / "model.safetensors"))
        diff = max(float((merged["cpu"][k] - merged[device][k]).abs().max()) for k in merged["cpu"])
        rows[method] = {
            "max_abs_diff": diff,
            "passed": diff <= WEIGHT_TOLERANCE,
            "seconds_cpu": seconds["cpu"],
            f"seconds_{device}": seconds[device],
        }
    pretrained, models = _synthetic_pool(work, 4, small)
    b32 = {}
    for where in ("cpu", device):
        started = time.perf_counter()
        merge(str(pretrained), {k: str(v) for k, v in models.items()}, "task_singular_vector",
              work / "tsv-b32", {}, vision_only=True, device=where, force=True)  # fmt: skip
        b32[f"seconds_{where}"] = round(time.perf_counter() - started, 2)
    rows["task_singular_vector, 4 × ViT-B/32 shapes" if not small else "tsv, 4 × tiny"] = b32
    return rows


def part_export(device: str, work: Path, small: bool) -> dict[str, Any]:
    import numpy as np
    import onnxruntime as ort
    import torch

    from clipship.exporter.onnx_export import DeployModel, _onnx_export, _to_fp16
    from clipship.runtime.model import load_zero_shot

    rows: dict[str, Any] = {}
    cuda_provider = "CUDAExecutionProvider" in ort.get_available_providers()
    zero_shot, _, _ = load_zero_shot(str(EVALREF / "mnist"), str(EVALREF / "pretrained"), "cpu")
    deploy = DeployModel(zero_shot, {"mnist": _head("cpu")}).eval()
    pixels = _digits()
    fp32, fp16 = work / "fixture.onnx", work / "fixture_fp16.onnx"
    _onnx_export(deploy, pixels[:2], fp32, ["image_embeds", "logits", "logits_mnist"])
    _to_fp16(fp32, fp16)
    with torch.no_grad():
        reference = deploy(pixels)[1].numpy()
    providers = ["CUDAExecutionProvider"] if device != "cpu" else ["CPUExecutionProvider"]
    if device != "cpu" and not cuda_provider:
        rows["onnx_cuda"] = (
            "skipped: this onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu is not in "
            "the device image, and its wheel is larger than the 64 MiB the device tool carries)"
        )
    else:
        for name, path in (("fp32", fp32), ("fp16", fp16)):
            session = ort.InferenceSession(str(path), providers=providers)
            logits = session.run(["logits"], {"pixel_values": pixels.numpy()})[0]
            rows[f"onnx_{name}"] = {
                "max_abs_logit_diff": float(np.abs(logits - reference).max()),
                "same_predictions": bool((logits.argmax(1) == reference.argmax(1)).all()),
            }
    try:
        import tensorrt  # noqa: F401

        from clipship.exporter.tensorrt import EngineSession, build_engine

        build_engine(fp16, work / "fixture.engine", tuple(pixels.shape[1:]), 64)
        engine = EngineSession(work / "fixture.engine")
        logits = engine.run(["logits"], {"pixel_values": pixels.numpy()})[0]
        rows["tensorrt_fp16"] = {
            "max_abs_logit_diff": float(np.abs(logits - reference).max()),
            "same_predictions": bool((logits.argmax(1) == reference.argmax(1)).all()),
        }
    except ImportError:
        rows["tensorrt_fp16"] = "skipped: no tensorrt package (not in the device image)"
    if device != "cpu":
        rows["pytorch_cuda_fp16_eager"] = _throughput(device, work, small)
    return rows


def part_wemoe(device: str, work: Path, small: bool) -> dict[str, Any]:
    import torch

    from clipship.merge import merge
    from clipship.merge.dataaware.plan import DataOptions
    from clipship.runtime.model import load_zero_shot
    from clipship.runtime.tasks import get_tasks, with_local_data

    aware = {t: str(DATAAWARE / t) for t in ("mnist", "svhn", "eurosat")}
    tasks = tuple(with_local_data(get_tasks(list(aware)), DATAAWARE / "data"))
    out = work / "wemoe"
    started = time.perf_counter()
    merge(str(EVALREF / "pretrained"), aware, "weight_ensembling_moe", out,
          {"max_steps": 10, "batch_size": 8}, device=device, data=DataOptions(tasks),
          force=True)  # fmt: skip
    seconds = round(time.perf_counter() - started, 2)
    pixels = _digits()
    outputs = {}
    for where in ("cpu", device):
        zero_shot, _, _ = load_zero_shot(str(out), None, where)
        with torch.no_grad():
            outputs[where] = zero_shot.logits(zero_shot.embed(pixels.to(where)), _head(where))
    diff = float((outputs["cpu"] - outputs[device].cpu()).abs().max())
    same = bool(torch.equal(outputs["cpu"].argmax(1), outputs[device].cpu().argmax(1)))
    return {
        "adapted_seconds": seconds,
        "max_abs_logit_diff": diff,
        "same_predictions": same,
        "passed": same and diff <= LOGIT_TOLERANCE,
    }


PARTS: dict[str, tuple[str, Callable[[str, Path, bool], dict[str, Any]]]] = {
    "eval": ("eval on CUDA vs CPU (fixture: predictions, Δlogit); ViT-B/32 images/s", part_eval),
    "merge": (
        "merge --device cuda vs cpu: TSV-M, Iso-CTS, WUDI, RegMean; TSV-M on B/32",
        part_merge,
    ),
    "export": ("ONNX fp32/fp16 on the CUDA provider, TensorRT fp16, vs PyTorch", part_export),
    "wemoe": ("WEMoE adapted on CUDA, evaluated on CUDA vs CPU", part_wemoe),
}


def _synthetic_pool(work: Path, models: int, small: bool) -> tuple[Path, dict[str, Path]]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from synthetic import build_pool

    folder = work / f"pool-{models}-{'tiny' if small else 'b32'}"
    if not (folder / "pretrained").is_dir():
        return build_pool(folder, "tiny" if small else "b32", models, seed=0)
    names = [f"task_{chr(97 + i)}" for i in range(models)]
    return folder / "pretrained", {n: folder / n for n in names}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _timed(fn: Callable[[], None], repeats: int = 5) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def _has_failure(result: Any) -> bool:
    """Whether a part's result holds a check that did not pass (``passed: false``)."""
    if isinstance(result, dict):
        return result.get("passed") is False or any(_has_failure(v) for v in result.values())
    return False


def _markdown(results: dict[str, Any]) -> str:
    lines = [f"# clipship GPU check: {results['device']}", ""]
    for name, part in results["parts"].items():
        lines += [f"## {name} ({part.get('seconds', '?')} s)", "", "```json"]
        lines += [json.dumps(part.get("result", part.get("error")), indent=1), "```", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--device", default=None, help="cuda (default when there is one) or cpu")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset")
    parser.add_argument("--dry-run", action="store_true", help="say what would run; exit 0")
    args = parser.parse_args()
    chosen = [p for p in args.parts.split(",") if p]
    unknown = [p for p in chosen if p not in PARTS]
    if unknown:
        print(f"error: unknown part {unknown[0]!r} (parts: {', '.join(PARTS)})", file=sys.stderr)
        return 2
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else None)
    if args.dry_run or device is None:
        why = "dry run" if args.dry_run else "no CUDA device here: dry run"
        print(f"clipship GPU check ({why}); it would run, in this order:")
        for name in chosen:
            print(f"  {name}: {PARTS[name][0]}")
        return 0
    out = args.out or Path(os.environ.get("OUT") or "gpu_check_out")
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU (in CUDA's place)"
    results: dict[str, Any] = {"device": name, "torch": torch.__version__, "parts": {}}
    small = device == "cpu"
    work = Path(tempfile.mkdtemp(prefix="clipship-gpu-check-"))
    failed = False
    try:
        for part in chosen:
            started = time.perf_counter()
            try:
                entry: dict[str, Any] = {"result": PARTS[part][1](device, work, small)}
            except Exception as e:  # one part's failure is reported; the others still run
                entry = {"error": f"{type(e).__name__}: {e}"}
                failed = True
            entry["seconds"] = round(time.perf_counter() - started, 1)
            failed = failed or _has_failure(entry.get("result"))
            results["parts"][part] = entry
            (out / "gpu_check.json").write_text(json.dumps(results, indent=1) + "\n")
            (out / "gpu_check.md").write_text(_markdown(results))
            print(f"{part}: {entry['seconds']} s", "(error)" if "error" in entry else "")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(_markdown(results))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
