"""Images/s of the exported graph vs PyTorch eager, and the export's validation on real images.

Part 1 (speed): a ViT-B/32-shaped encoder with the eight tasks' 758 classes of heads (random
weights: speed does not depend on them), exported the way `clipship export` does; PyTorch eager
fp32 (`inference_mode`), onnxruntime fp32 and onnxruntime int8 (dynamic, per-channel) in each
int8 scheme (`exporter/quantize.py`: u8u8, reduce_range, and the saturating full-range s8 they
replace) at batch 1 and 32, all with the same thread count, timed in turns in one run (medians).

Part 2 (validation): the mini-benchmark's trained models (a task arithmetic or TIES merge of its
task encoders, its heads), exported in fp32/fp16 and each int8 scheme the way `clipship export` does
and compared with PyTorch on its real test images: max |Δlogit| and top-1 agreement per task,
whether each int8 file passes the portability check, what saturation would change, and which
scheme `--int8-scheme auto` keeps there (the first of reduce_range, u8u8 that passes the gate).

The first line names the CPU and its relevant instruction sets (clipship.machine).

    python benchmarks/export_speed.py [--budget full|smoke] [--per-task 1000]
        [--merge task_arithmetic|ties] [--threads 2] [--repeats 5] [--skip-speed]
        [--skip-validation] [--products] [--gpu]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from clipship.machine import describe

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
    from synthetic import B32
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from clipship.exporter.onnx_export import DeployModel
    from clipship.runtime.model import ZeroShotModel

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


def int8_schemes():
    """The schemes `clipship export` offers, then the saturating one they replace (measured)."""
    from clipship.exporter.quantize import SATURATING, SCHEMES

    return [*SCHEMES.values(), SATURATING]


def speed(threads: int, repeats: int) -> None:
    import onnxruntime as ort

    from clipship.exporter.onnx_export import FILES, _onnx_export, _quiet
    from clipship.exporter.quantize import quantize_int8

    torch.set_num_threads(threads)
    model, outputs = _b32_deploy()
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / FILES["fp32"]
        _onnx_export(model, torch.randn(2, 3, 224, 224), fp32, outputs)
        paths = {"ORT fp32": fp32}
        for scheme in int8_schemes():
            paths[f"int8 {scheme.name}"] = Path(tmp) / f"{scheme.name}.onnx"
            with _quiet():
                quantize_int8(fp32, paths[f"int8 {scheme.name}"], scheme)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        sessions = {
            name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            for name, path in paths.items()
        }
        print(
            f"ViT-B/32 + 758-class heads, {threads} threads, median of {repeats} interleaved runs "
            "(images/s, × PyTorch eager fp32); int8 s8 = the full-range int8 file these schemes "
            "replace, wrong on x86-64 CPUs without VNNI"
        )
        names = ["eager", *sessions]
        print(f"{'batch':>5} " + " ".join(f"{n:>17}" for n in names))
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
            cells = [f"{base:>17.1f}"] + [
                f"{rates[n]:>8.1f} ({rates[n] / base:.2f}×)" for n in names[1:]
            ]
            print(f"{batch:>5} " + " ".join(cells))
            if batch == 32:
                sustained = base * GFLOP_PER_IMAGE / threads
                print(
                    f"      eager fp32 sustains {sustained:.0f} GFLOP/s per thread "
                    f"({GFLOP_PER_IMAGE:.1f} GFLOP per image){_peak_note(sustained)}"
                )


# The matrix products of one ViT-B/32 layer at batch 32 (1600 token rows; q, k, v and the output
# projection 768→768, the MLP 768→3072→768) and the patch embedding (1568 patches, 3072→768).
LAYER_PRODUCTS = [(1600, 768, 768)] * 4 + [(1600, 768, 3072), (1600, 3072, 768)]
PATCH_PRODUCT = (1568, 3072, 768)


def products(threads: int, repeats: int) -> None:
    """The ceiling no int8 scheme can pass on this CPU: the encoder's matrix products alone
    (nothing else in the graph) as one PyTorch fp32 ``matmul`` each against onnxruntime's integer
    products (``DynamicQuantizeLinear`` + ``MatMulInteger``, quantized by each scheme), same
    threads, timed in turns. The integer products are ~90 % of the int8 model's time
    (onnxruntime's profiler) and the float ones most of eager's, so the model's int8 / eager
    ratio stays near the one printed here."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import quantize_dynamic

    from clipship.exporter.onnx_export import _quiet

    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    shapes = [*LAYER_PRODUCTS, PATCH_PRODUCT]
    inputs = [torch.randn(m, k, generator=generator) for m, k, _ in shapes]
    weights = [torch.randn(k, n, generator=generator) / k**0.5 for _, k, n in shapes]
    nodes, graph_inputs, outputs, initializers = [], [], [], []
    for i, ((m, k, n), w) in enumerate(zip(shapes, weights, strict=True)):
        graph_inputs.append(helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [m, k]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [m, n]))
        initializers.append(numpy_helper.from_array(w.numpy(), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [f"x{i}", f"w{i}"], [f"y{i}"], name=f"mm{i}"))
    graph = helper.make_graph(nodes, "products", graph_inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {f"x{i}": x.numpy() for i, x in enumerate(inputs)}
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        onnx.save(model, str(fp32))
        paths = {"ORT fp32": fp32}
        for scheme in int8_schemes():
            paths[f"int8 {scheme.name}"] = Path(tmp) / f"{scheme.name}.onnx"
            with _quiet():
                quantize_dynamic(fp32, paths[f"int8 {scheme.name}"], **scheme.settings())
        sessions = {
            name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            for name, path in paths.items()
        }

        def eager():
            with torch.inference_mode():
                for x, w in zip(inputs, weights, strict=True):
                    torch.matmul(x, w)

        contenders = {"eager fp32": eager}
        for name, session in sessions.items():
            contenders[name] = lambda s=session: s.run(None, feeds)
        seconds = interleaved(contenders, repeats)
    macs = sum(m * k * n for m, k, n in shapes)
    base = seconds["eager fp32"]
    print(
        f"Matrix products alone (one ViT-B/32 layer + patch embedding at batch 32, "
        f"{macs / 1e9:.2f} GMAC), {threads} threads, median of {repeats} interleaved runs:"
    )
    for name, value in seconds.items():
        print(
            f"  {name:>17}: {macs / value / threads / 1e9:6.1f} GMAC/s per thread "
            f"({base / value:.2f}× eager)"
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


MERGES = {
    "task_arithmetic": {"scaling_factor": 0.3},
    "ties": {"scaling_factor": 0.3, "threshold": 20},
}


def validation(budget: str, per_task: int, method: str) -> None:
    """Every variant against PyTorch on the mini-benchmark's real test images; for int8, each
    scheme, whether its file passes the portability check, and how many outputs of its integer
    products the saturating (non-VNNI) kernel would change on the first 64 images."""
    from clipship.exporter.onnx_export import (
        DeployModel,
        _compare,
        _onnx_export,
        _quiet,
        _session,
        _to_fp16,
        _Validation,
        validation_images,
    )
    from clipship.exporter.quantize import (
        check_integer_products,
        quantize_int8,
        saturation_effects,
    )
    from clipship.merge import merge
    from clipship.minibench.build import build, pool_tasks
    from clipship.pool import read_pool_yaml
    from clipship.runtime.data import Preprocess
    from clipship.runtime.heads import build_heads
    from clipship.runtime.model import load_zero_shot

    pool = build(None, budget, 0)
    pretrained, models = read_pool_yaml(pool / "pool.yaml")
    tasks = pool_tasks(pool)
    names = [t.name for t in tasks]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        merge(pretrained, models, method, tmp / "merged", MERGES[method])
        heads, _ = build_heads(pretrained, tasks)
        zero_shot, folder, _ = load_zero_shot(str(tmp / "merged"), None, "cpu")
        deploy = DeployModel(zero_shot, heads).eval()
        preprocess = Preprocess.from_pretrained(folder)
        images = _Validation(*validation_images(tasks, preprocess, per_task), preprocess)
        where = images.where
        outputs = ["image_embeds", "logits", *[f"logits_{n}" for n in names]]
        paths = {"fp32": tmp / "fp32.onnx", "fp16": tmp / "fp16.onnx"}
        _onnx_export(deploy, images.pixels(0, 2), paths["fp32"], outputs)
        with _quiet():
            _to_fp16(paths["fp32"], paths["fp16"])
            for scheme in int8_schemes():
                paths[f"int8 {scheme.name}"] = tmp / f"{scheme.name}.onnx"
                quantize_int8(paths["fp32"], paths[f"int8 {scheme.name}"], scheme)
        print(
            f"\nvalidation on the {budget} mini-benchmark's real test images (up to {per_task} "
            f"per task, {len(where)} in all), {method} merge; max |Δlogit| / top-1 "
            "agreement with PyTorch per task"
        )
        print(
            f"{'variant':17s} "
            + " ".join(f"{n:>18s}" for n in names)
            + f"{'all':>15s} {'portable':>9s} {'saturated':>10s}"
        )
        passed: dict[str, bool] = {}
        for variant, path in paths.items():
            rows = _compare(_session(path), deploy, images, names)
            if variant.startswith("int8"):  # the export's int8 gate, as `auto` applies it
                passed[variant.split()[1]] = _passes_int8_gate(rows, names)
            cells = [
                f"{rows[n]['max_abs_logit_diff']:.1e} / {100 * rows[n]['top1_agreement']:6.2f}%"
                for n in names
            ]
            wrong = sum(rows[n]["disagreements"] for n in names)
            overall = f"{100 * (1 - wrong / len(where)):6.2f}% ({wrong})"
            portable, saturated = "", ""
            if variant.startswith("int8"):
                import onnx

                portable = "yes" if not check_integer_products(onnx.load(str(path))) else "NO"
                effects = saturation_effects(path, images.pixels(0, 64).numpy())
                saturated = f"{100 * max(effects.values(), default=0.0):.2f}%"
            print(
                f"{variant:17s} "
                + " ".join(f"{c:>18s}" for c in cells)
                + f"{overall:>15s} {portable:>9s} {saturated:>10s}"
            )
    print(
        "(all: agreement over every image, disagreements in brackets; portable: every integer "
        "product exact on every CPU; saturated: the largest share of one integer product's "
        "outputs that a non-VNNI kernel changes, first 64 images)"
    )
    from clipship.exporter.onnx_export import Gates
    from clipship.exporter.quantize import AUTO_ORDER

    kept = next((name for name in AUTO_ORDER if passed.get(name)), None)
    print(
        f"int8_scheme auto (gate min_agreement_int8 {Gates().min_agreement_int8}) keeps: "
        + (kept or "none: the export would fail")
        + "; candidates in order: "
        + ", ".join(f"{n} {'passes' if passed.get(n) else 'fails'}" for n in AUTO_ORDER)
    )


def _passes_int8_gate(rows: dict, names: list[str]) -> bool:
    """Whether the export's default int8 gate passes these validation rows."""
    from clipship.errors import ExportValidationError
    from clipship.exporter.onnx_export import Gates, Variant, _gate

    try:
        _gate(Variant.INT8, rows, names, Gates())
    except ExportValidationError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", default="full", choices=["full", "smoke"])
    parser.add_argument("--per-task", type=int, default=1000, help="Validation images per task.")
    parser.add_argument("--merge", default="task_arithmetic", choices=sorted(MERGES))
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-validation", action="store_true")
    parser.add_argument(
        "--products", action="store_true", help="Also the matrix products alone (the ceiling)."
    )
    parser.add_argument("--gpu", action="store_true", help="Also the CUDA / TensorRT table.")
    args = parser.parse_args()
    print(describe())
    if args.gpu:
        gpu(args.repeats)
    if not args.skip_speed:
        speed(args.threads, args.repeats)
    if args.products:
        products(args.threads, args.repeats)
    if not args.skip_validation:
        validation(args.budget, args.per_task, args.merge)


if __name__ == "__main__":
    main()
