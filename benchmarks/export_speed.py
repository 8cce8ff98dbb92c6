"""Images/s of the exported graph vs PyTorch eager, and the export's validation on real images.

Part 1 (speed): a ViT-B/32-shaped encoder with the eight tasks' 758 classes of heads (random
weights: speed does not depend on them), exported the way `clipship export` does; PyTorch eager
fp32 (`inference_mode`), onnxruntime fp32 and onnxruntime int8 (dynamic, per-channel) at batch 1
and 32, all with the same thread count, timed in turns in one run (medians).

Part 2 (validation): the mini-benchmark's trained models (task arithmetic merge of its task
encoders, its heads), exported in fp32/fp16/int8 by `clipship export` and compared with PyTorch
on its real test images: max |Δlogit| and top-1 agreement per task.

    python benchmarks/export_speed.py [--budget full|smoke] [--threads 2] [--repeats 5]
        [--skip-speed] [--skip-validation] [--gpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

# Multiply-adds ×2 of one 224×224 image through ViT-B/32 (50 tokens, width 768, MLP 3072, 12
# layers: projections 4·768² + 2·768·3072 per token, attention 2·50·768 per token, the patch
# embedding 49·3072·768) plus the projection and the 758-class heads: the work eager and ORT share.
GFLOP_PER_IMAGE = (
    2
    * (
        12 * 50 * (4 * 768**2 + 2 * 768 * 3072 + 2 * 50 * 768)
        + 49 * 3072 * 768
        + 768 * 512
        + 512 * 758
    )
    / 1e9
)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def interleaved(contenders: dict, repeats: int, calls: int = 3) -> dict[str, float]:
    """Median seconds per call of each contender, timed in turns (a block of ``calls`` per
    contender per round) so that a slow spell of this shared machine hits all of them alike.
    Each block starts with one untimed call: both runtimes leave their worker threads spinning
    for a while after a call, which would otherwise slow the next contender down."""
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            fn()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            seconds[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(values) for name, values in seconds.items()}


def _peak_note(sustained: float) -> str:
    """How close that is to this CPU's fp32 peak, where /proc/cpuinfo tells: two 512-bit FMA
    units per core (Xeon Scalable) = 64 FLOP per cycle at the reported clock."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    mhz = [float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz")]
    if "avx512f" not in info or not mhz:
        return ""
    peak = 64 * mhz[0] / 1000
    return f", ≈ {100 * sustained / peak:.0f} % of a 2×FMA-512 core's {peak:.0f} GFLOP/s"


def _b32_deploy():
    """A ViT-B/32-shaped encoder with the eight tasks' 758 classes of heads (random weights:
    speed does not depend on them) and the output names of the export."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from clipship.eval.evaluate import ZeroShotModel
    from clipship.exporter.onnx_export import DeployModel
    from clipship.synthetic import B32

    torch.manual_seed(0)
    vision = CLIPVisionModel(CLIPVisionConfig(**B32["vision_config"])).eval()
    projection = torch.nn.Linear(768, 512, bias=False)
    sizes = {
        "sun397": 397,
        "stanford-cars": 196,
        "resisc45": 45,
        "eurosat": 10,
        "svhn": 10,
        "gtsrb": 43,
        "mnist": 10,
        "dtd": 47,
    }
    heads = {k: torch.nn.functional.normalize(torch.randn(n, 512), dim=1) for k, n in sizes.items()}
    model = DeployModel(ZeroShotModel(vision, projection, torch.tensor(4.6052)), heads).eval()
    return model, ["image_embeds", "logits", *[f"logits_{k}" for k in heads]]


def speed(threads: int, repeats: int) -> None:
    import onnxruntime as ort

    from clipship.exporter.onnx_export import FILES, _onnx_export, _to_int8

    torch.set_num_threads(threads)
    model, outputs = _b32_deploy()
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = Path(tmp) / FILES["fp32"], Path(tmp) / FILES["int8"]
        _onnx_export(model, torch.randn(2, 3, 224, 224), fp32, outputs)
        _to_int8(fp32, int8)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        sessions = {
            name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            for name, path in (("ORT fp32", fp32), ("ORT int8", int8))
        }
        print(
            f"ViT-B/32 + 758-class heads, {threads} threads, median of {repeats} interleaved runs"
        )
        header = f"{'batch':>5} {'PyTorch eager':>14} {'ORT fp32':>10} {'ORT int8':>10}"
        print(header + "   (images/s; × eager)")
        for batch in (1, 32):
            x = torch.randn(batch, 3, 224, 224)

            def eager(x=x):
                with torch.inference_mode():
                    model(x)

            contenders = {"eager": eager}
            for name, session in sessions.items():
                contenders[name] = lambda s=session, x=x.numpy(): s.run(
                    ["logits"], {"pixel_values": x}
                )
            rates = {k: batch / v for k, v in interleaved(contenders, repeats).items()}
            base = rates["eager"]
            print(
                f"{batch:>5} {base:>14.1f} {rates['ORT fp32']:>10.1f} {rates['ORT int8']:>10.1f}"
                f"   (fp32 {rates['ORT fp32'] / base:.2f}×, int8 {rates['ORT int8'] / base:.2f}×)"
            )
            if batch == 32:
                sustained = base * GFLOP_PER_IMAGE / threads
                print(
                    f"      eager fp32 sustains {sustained:.0f} GFLOP/s per thread "
                    f"({GFLOP_PER_IMAGE:.1f} GFLOP per image){_peak_note(sustained)}"
                )


def gpu(repeats: int) -> None:
    """PyTorch CUDA fp16 (autocast) vs ORT CUDA fp16 vs TensorRT fp16, batch 1 and 32, where the
    packages exist (onnxruntime-gpu, tensorrt); each missing one is reported, not faked."""
    import onnxruntime as ort

    from clipship.exporter.onnx_export import FILES, _onnx_export, _to_fp16

    model, outputs = _b32_deploy()
    model = model.cuda()
    with tempfile.TemporaryDirectory() as tmp:
        fp32, fp16 = Path(tmp) / FILES["fp32"], Path(tmp) / FILES["fp16"]
        _onnx_export(model.cpu(), torch.randn(2, 3, 224, 224), fp32, outputs)
        model.cuda()
        _to_fp16(fp32, fp16)
        runners: dict[str, object] = {}
        if "CUDAExecutionProvider" in ort.get_available_providers():
            session = ort.InferenceSession(str(fp16), providers=["CUDAExecutionProvider"])
            runners["ORT CUDA fp16"] = lambda x: session.run(["logits"], {"pixel_values": x})
        else:
            print("ORT CUDA fp16: skipped (this onnxruntime has no CUDAExecutionProvider)")
        try:
            from clipship.exporter.tensorrt import EngineSession, build_engine

            build_engine(fp16, Path(tmp) / "model.engine", (3, 224, 224), 64)
            engine = EngineSession(Path(tmp) / "model.engine")
            runners["TensorRT fp16"] = lambda x: engine.run(["logits"], {"pixel_values": x})
        except ImportError:
            print("TensorRT fp16: skipped (no tensorrt package)")
        print(f"ViT-B/32 + 758-class heads on {torch.cuda.get_device_name()}, images/s")
        for batch in (1, 32):
            x = torch.randn(batch, 3, 224, 224)
            gpu_x = x.cuda()

            def eager(gpu_x=gpu_x):
                with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
                    model(gpu_x)
                torch.cuda.synchronize()

            rates = {"PyTorch CUDA fp16": batch / timed(eager, repeats * 10)}
            for name, run in runners.items():
                rates[name] = batch / timed(lambda run=run, x=x: run(x.numpy()), repeats * 10)
            print(f"batch {batch:>2}: " + ", ".join(f"{k} {v:.0f}" for k, v in rates.items()))


def validation(budget: str) -> None:
    from clipship.eval.heads import build_heads, save_heads
    from clipship.eval.minibench.build import build, pool_tasks
    from clipship.exporter.onnx_export import Gates, export
    from clipship.merge import merge
    from clipship.pool import read_pool_yaml

    pool = build(None, budget, 0)
    pretrained, models = read_pool_yaml(pool / "pool.yaml")
    tasks = pool_tasks(pool)
    with tempfile.TemporaryDirectory() as tmp:
        merged = Path(tmp) / "merged"
        merge(pretrained, models, "task_arithmetic", merged, {"scaling_factor": 0.3})
        heads, meta = build_heads(pretrained, tasks)
        save_heads(Path(tmp) / "heads", heads, meta, force=False)
        result = export(
            str(merged),
            Path(tmp) / "heads",
            Path(tmp) / "out",
            precisions=["fp32", "fp16", "int8"],
            validation_tasks=tasks,
            validation_size=2000,
            gates=Gates(0.0 + 1e-3, 1.0, 0.0, 0.0),
        )
    print(
        f"\nvalidation on the {budget} mini-benchmark's real test images "
        f"({result['report']['validation_images']} images), task-arithmetic merge:"
    )
    print(f"{'variant':8s} " + " ".join(f"{t.name:>22s}" for t in tasks) + f"{'all':>10s}")
    for variant, rows in result["report"]["variants"].items():
        cells, agreeing = [], 0.0
        for t in tasks:
            row = rows[t.name]
            cells.append(f"{row['max_abs_logit_diff']:.1e} / {100 * row['top1_agreement']:6.2f}%")
            agreeing += row["top1_agreement"] * row["images"]
        overall = 100 * agreeing / sum(rows[t.name]["images"] for t in tasks)
        print(f"{variant:8s} " + " ".join(f"{c:>22s}" for c in cells) + f"{overall:9.2f}%")
    print("(max |Δlogit| / top-1 agreement with PyTorch, per task; agreement over all images)")
    print(
        json.dumps(
            {
                v: {k: r for k, r in rows.items() if not isinstance(r, dict)}
                for v, rows in result["report"]["variants"].items()
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", default="full", choices=["full", "smoke"])
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-validation", action="store_true")
    parser.add_argument("--gpu", action="store_true", help="Also the CUDA / TensorRT table.")
    args = parser.parse_args()
    if args.gpu:
        gpu(args.repeats)
    if not args.skip_speed:
        speed(args.threads, args.repeats)
    if not args.skip_validation:
        validation(args.budget)


if __name__ == "__main__":
    main()
