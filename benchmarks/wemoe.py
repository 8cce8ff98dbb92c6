"""Weight-ensembling mixtures (WEMoE, E-WEMoE) on ViT-B/32 shapes: folder size, construction
memory and exported throughput, each next to a plain merge of the same pool, measured in one run.

Builds a seeded synthetic pool in a temporary folder (``synthetic.py``: a CLIPModel as
``_pretrained_`` plus ``--experts`` CLIPVisionModel task encoders of the real shapes, random
weights, and ``--batch`` tiny 32×32 random images per task), then:

1. Folder size. ``clipship merge --method sparse_weight_ensembling_moe`` (E-WEMoE,
   tv_prune_ratio 0.9) and ``--method weight_ensembling_moe`` (dense WEMoE), each ÷ a
   task_arithmetic merge of the same pool: the whole folders (all three are full CLIP models with
   the pretrained text tower; the synthetic tokenizer has 514 tokens, the real one 49 408, so
   this text tower is ≈ 95 MiB lighter than B/32's) and the vision tensors alone (the
   architecture's own figure). Targets: E-WEMoE ≤ 1.7×, WEMoE ≈ 6.2× (vision tensors).
   Each mixture merge runs one adaptation step of ``--batch`` images per task, so that the
   adaptation's memory counts (``max_steps=0`` would skip it).
2. Construction peak RSS of each mixture merge, in its own process (``wait4``'s ru_maxrss; this
   process stays torch-free until then, since a child's peak counts what its parent held when it
   forked), against the target: its folder size + 1.5 × one encoder's fp32 size. A merge is
   stopped above ``--memory`` GiB resident (the machine is shared: before 20b056c, E-WEMoE on
   8 × B/32 was killed by the kernel's OOM killer at 21.8 GiB); one that fails runs again with
   ``MALLOC_MMAP_THRESHOLD_`` set (glibc then returns freed MLP-sized blocks to the system) so
   that the other figures still have a folder, and both rows are printed.
3. Throughput, images/s, fp32 at batch 1 and 32, all with the same thread count, timed in turns
   (medians): (a) the E-WEMoE mixture's exported graph on onnxruntime CPU (every MLP
   ``exporter/mixture.py``'s ``BatchedWEMoEMLP``: the batch's per-image weights in one product),
   (b) the task_arithmetic merge's exported graph on onnxruntime CPU, (c) FusionBench's per-sample
   PyTorch loop (``WeightEnsemblingMoE.forward`` with ``batch_reduce=False``: per image,
   θ₀ + Σ_t w_t τ_t for the MLP's four tensors, then the MLP on that image alone; written out
   below in plain torch with the mixture's own routers and dense task vectors, as FusionBench
   holds them). Targets: (a)/(b) ≥ 0.5, (a)/(c) ≥ 2. Before timing, (a)'s embeddings are
   checked against (c)'s. (c) takes minutes per batch of 32 on 2 cores, so batch 32 is timed
   ``--repeats-32`` times (default once), batch 1 ``--repeats`` times.

How (a) is exported: here, not through `clipship export`. A B/32 mixture's graph holds 8 dense
task vectors per MLP (E-WEMoE's too: they are made dense in the graph), 2.02 GiB of weights,
past the 2 GiB one protobuf file can hold (serialising it as one file fails: "Failed to
serialize proto"). `clipship export` wrote one file (``external_data=False``) when this script
was written; since 8c7d66e it keeps graphs past 1 GiB of weights in ``<graph>.data``, and
``--cli-export`` runs it on the E-WEMoE folder and prints what it wrote, or its error. Both
graphs here are built the same way either way: ``load_zero_shot`` → (for the mixture,
``exporter/mixture.py``'s ``exportable``) → ``DeployModel`` with random unit-norm heads (10
classes per task) → ``torch.onnx.export(dynamo=True, external_data=True)`` with clipship's opset
and dynamic batch, into the temporary folder; `clipship export`'s validation against PyTorch is
left out (minutes for a mixture), the (a)-vs-(c) check stands in for it.

The first line names the CPU (clipship.machine). Figures only: nothing here asserts a timing.
The full B/32 run took 17 minutes on a loaded 2-core box, most of it the mixture merges.

    python benchmarks/wemoe.py [--shape b32|tiny] [--experts 8] [--threads N] [--repeats 3]
                               [--repeats-32 1] [--batch 4] [--memory 12] [--workdir DIR]
                               [--cli-export]

``--shape tiny`` (the parity fixture's 4-layer shape) checks the whole script in 75 s to 2 1/2
minutes here (most of it four fresh processes importing torch and transformers, 9 s each).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from merge_memory import resident  # benchmarks/: one reader of /proc's VmRSS

from clipship.machine import describe

MIXTURES = {"E-WEMoE": "sparse_weight_ensembling_moe", "WEMoE": "weight_ensembling_moe"}
CLASSES = 10  # per task, in the random heads of the exported graphs
BATCHES = (1, 32)
TARGETS = {"size E-WEMoE": 1.7, "a/b": 0.5, "a/c": 2.0}
# glibc keeps freed blocks below its (dynamic, up to 32 MiB) mmap threshold in the heap; a merge
# that fails as is runs again with this fixed threshold, so freed MLP-sized tensors go back.
MALLOC_FIX_MIB = 1
MALLOC_FIX = {"MALLOC_MMAP_THRESHOLD_": str(MALLOC_FIX_MIB << 20)}

# Run in a child (this process stays torch-free until the mixtures are merged): the pool, its
# tasks' images and task file, the task_arithmetic merge, and the heads' cache warmed so both
# mixture merges do the same work.
BUILD = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[5])
from synthetic import SIZES, TASKS, build_pool, write_pool_yaml, write_task_data
from clipship.merge import merge
from clipship.runtime.heads import build_heads
from clipship.runtime.tasks import read_taskfile

work, shape, experts, images = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
names = (TASKS + [f"task_{i}" for i in range(len(TASKS), experts)])[:experts]
pretrained, models = build_pool(work, shape, names, seed=0)
write_pool_yaml(work / "pool.yaml", pretrained, models)
size = min(32, SIZES[shape]["vision_config"]["image_size"])  # tiny images: preprocess resizes
taskfile = write_task_data(work, names, images, size)
spec = json.loads(taskfile.read_text())
for task in spec["tasks"].values():  # the tiny text tower takes 16 tokens
    task["templates"] = ["{c}"]
taskfile.write_text(json.dumps(spec, indent=1) + "\\n")
sources = {n: str(p) for n, p in models.items()}
merge(str(pretrained), sources, "task_arithmetic", work / "merged", {"scaling_factor": 0.3})
build_heads(pretrained, read_taskfile(taskfile))
"""


# --- sizes ---------------------------------------------------------------------------------------


def header(path: Path) -> dict:
    with open(path, "rb") as f:
        return json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))


def tensor_bytes(folder: Path) -> dict[str, int]:
    """Bytes of every tensor in a folder's safetensors files, by name (from their headers)."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        for name, v in header(path).items():
            if name != "__metadata__":
                out[name] = v["data_offsets"][1] - v["data_offsets"][0]
    return out


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def vision_bytes(folder: Path) -> int:
    return sum(b for n, b in tensor_bytes(folder).items() if n.startswith("vision_model."))


def mib(n: float) -> str:
    return f"{n / 2**20:8.1f} MiB"


# --- child processes -----------------------------------------------------------------------------


def run(cmd: list[str], env: dict[str, str], memory: float, log: Path) -> tuple[float, int] | str:
    """Wall seconds and peak RSS (bytes) of one child process, or why it stopped: above
    ``memory`` bytes resident (stopped here: the machine is shared), killed by a signal (the
    kernel's OOM killer), or its last error line (stderr goes to ``log``)."""
    start = time.perf_counter()
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if resident(proc.pid) > memory:
                proc.kill()
                os.wait4(proc.pid, 0)
                wall = time.perf_counter() - start
                return f"stopped above {memory / 2**30:.0f} GiB resident after {wall:.0f} s"
            time.sleep(0.05)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        return f"killed by signal {-code} after {wall:.0f} s (out of memory?)"
    if code != 0:
        lines = log.read_text(errors="replace").strip().splitlines()
        return f"failed after {wall:.0f} s: {' '.join(lines[-1:])[:200]}"
    return wall, usage.ru_maxrss * 1024


def clipship(*args: str) -> list[str]:
    return [sys.executable, "-m", "clipship.cli", *args]


def merge_mixture(
    work: Path, method: str, batch: int, env: dict[str, str], memory: float
) -> tuple[float, int] | str:
    cmd = clipship(
        "merge", "--pool", str(work / "pool.yaml"), "--method", method,
        "--param", "max_steps=1", "--batch-size", str(batch),
        "--taskfile", str(work / "tasks.json"), "--out", str(work / method), "--force", "--quiet",
    )  # fmt: skip
    if method == MIXTURES["E-WEMoE"]:
        cmd += ["--param", "tv_prune_ratio=0.9"]
    return run(cmd, env, memory, work / f"{method}.stderr")


def try_cli_export(work: Path, env: dict[str, str]) -> str:
    """`clipship export` of the E-WEMoE folder (heads from `clipship heads`): what happened."""
    heads, out = work / "heads", work / "cli-export"
    subprocess.run(
        clipship("heads", str(work / "pretrained"), "--taskfile", str(work / "tasks.json"),
                 "--out", str(heads), "--force"),
        check=True, capture_output=True, env=env,
    )  # fmt: skip
    first = json.loads((work / "tasks.json").read_text())["tasks"]
    data = work / "data" / next(iter(first))
    start = time.perf_counter()
    done = subprocess.run(
        clipship("export", str(work / MIXTURES["E-WEMoE"]), "--heads", str(heads),
                 "--out", str(out), "--validation-data", str(data), "--validation-size", "4",
                 "--force"),
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    wall = time.perf_counter() - start
    lines = (done.stderr.strip() or done.stdout.strip()).splitlines()
    if done.returncode == 0:
        files = ", ".join(
            f"{p.name} {p.stat().st_size / 2**20:.1f} MiB" for p in sorted(out.iterdir())
        )
        shutil.rmtree(out, ignore_errors=True)
        return f"written in {wall:.0f} s: {files}"
    return f"failed after {wall:.0f} s: {' '.join(lines[-1:])[:300]}"


# --- (c): FusionBench's per-sample loop -----------------------------------------------------------


def fusionbench_loop(zero_shot):
    """``zero_shot`` (a loaded mixture) with each vision MLP replaced, in place, by FusionBench's
    per-sample loop over the same routers, base MLP and task vectors (made dense once, as
    FusionBench holds its pruned ones)."""
    import torch
    from torch import nn
    from torch.func import functional_call

    from clipship.runtime.modeling_clipship_wemoe import MLP_PARAMS

    class PerSampleLoop(nn.Module):
        """``WeightEnsemblingMoE.forward`` with ``batch_reduce=False`` (FusionBench 0.2.33):
        routing weights = gate(h).mean(tokens); then for each sample b, merge_weights(w_b)
        (state[n] = state[n] + w_bt · τ_t[n], experts in order) and
        functional_call(base_model, state, h[b : b + 1]); outputs concatenated."""

        def __init__(self, moe):
            super().__init__()
            self.base_model, self.gate = moe.base_model, moe.gate
            self.code = moe.code
            self.task_vectors = [{n: v.dense(n) for n in MLP_PARAMS} for v in moe.task_vectors]

        def forward(self, hidden):
            if self.gate.depth == 0:
                weights = self.gate(hidden).expand(hidden.shape[0], -1)
            else:
                inputs = hidden
                if self.code is not None:
                    code = self.code.to(hidden).expand(*hidden.shape[:2], self.code.numel())
                    inputs = torch.cat((code, hidden), dim=-1)
                weights = self.gate(inputs).mean(dim=1)
            outputs = []
            for b, w in enumerate(weights):
                state = self.base_model.state_dict(keep_vars=True)
                for weight, vector in zip(w, self.task_vectors):
                    for name, param in vector.items():
                        state[name] = state[name] + weight * param
                outputs.append(functional_call(self.base_model, state, (hidden[b : b + 1],)))
            return torch.cat(outputs, dim=0)

    for layer in zero_shot.vision.encoder.layers:
        layer.mlp = PerSampleLoop(layer.mlp)
    return zero_shot


# --- throughput ----------------------------------------------------------------------------------


def export_graph(model, example, path: Path, outputs: list[str]) -> None:
    """clipship's export (``_onnx_export``: dynamo, its opset, dynamic batch), with the weights
    in an external data file: a mixture's graph is above protobuf's 2 GB."""
    from clipship.exporter.onnx_export import _onnx_export

    _onnx_export(model, example, path, outputs, external=True)


def graph_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(path.name))


def interleaved(contenders: dict, repeats: int, warm: set[str]) -> dict[str, float]:
    """Median seconds per call of each contender, timed in turns (one call per contender per
    round, after one untimed call of those in ``warm``) so that a slow spell of this shared
    machine hits all of them alike; a pause before each call lets the other runtime's worker
    threads stop spinning."""
    for name in warm:
        contenders[name]()
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            time.sleep(0.3)
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def throughput(work: Path, names: list[str], threads: int | None, repeats: dict[int, int]) -> None:
    import gc

    import torch

    from clipship.exporter.mixture import exportable
    from clipship.exporter.onnx_export import DeployModel, _session
    from clipship.runtime.model import load_zero_shot

    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()  # _session gives onnxruntime the same count
    config = json.loads((work / "pretrained" / "config.json").read_text())
    side, width = config["vision_config"]["image_size"], config["projection_dim"]
    generator = torch.Generator().manual_seed(0)
    heads = {
        n: torch.nn.functional.normalize(torch.randn(CLASSES, width, generator=generator), dim=1)
        for n in names
    }
    outputs = ["image_embeds", "logits", *[f"logits_{n}" for n in names]]
    example = torch.randn(2, 3, side, side, generator=generator)
    graphs = {"a": work / "onnx-a" / "model.onnx", "b": work / "onnx-b" / "model.onnx"}
    for path in graphs.values():
        path.parent.mkdir(exist_ok=True)

    start = time.perf_counter()
    plain, _, _ = load_zero_shot(str(work / "merged"), None, "cpu")
    export_graph(DeployModel(plain, heads).eval(), example, graphs["b"], outputs)
    del plain
    seconds_b = time.perf_counter() - start
    start = time.perf_counter()
    mixture, _, info = load_zero_shot(str(work / MIXTURES["E-WEMoE"]), None, "cpu")
    assert info.get("routing") == "per_sample", info
    graph = DeployModel(exportable(mixture), heads).eval()
    export_graph(graph, example, graphs["a"], outputs)
    del graph
    gc.collect()
    seconds_a = time.perf_counter() - start
    print(
        f"exported (a) E-WEMoE graph {graph_bytes(graphs['a']) / 2**30:.2f} GiB in "
        f"{seconds_a:.0f} s, (b) merged graph {graph_bytes(graphs['b']) / 2**30:.2f} GiB in "
        f"{seconds_b:.0f} s (dynamo, external data)"
    )
    loop = DeployModel(fusionbench_loop(mixture), heads).eval()
    sessions = {k: _session(path) for k, path in graphs.items()}

    # (a) and (c) compute the same function: check it on a few images first.
    x = torch.randn(3, 3, side, side, generator=generator)
    with torch.inference_mode():
        reference = loop(x)[0].numpy()
    got = sessions["a"].run(["image_embeds"], {"pixel_values": x.numpy()})[0]
    print(f"(a) vs (c) image embeddings on 3 images: max |Δ| {abs(got - reference).max():.1e}")

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"\nimages/s, onnxruntime CPU fp32 / PyTorch fp32 eager, {threads} threads, median of "
        f"{repeats[1]} (batch 1) / {repeats[32]} (batch 32) interleaved calls; (a) E-WEMoE "
        "exported graph, (b) task_arithmetic merge exported, (c) FusionBench's per-sample loop "
        f"(PyTorch); load average {load}"
    )
    print(
        f"{'batch':>5} {'(a) E-WEMoE':>11} {'(b) merged':>11} {'(c) FB loop':>12} "
        f"{'(a)/(b)':>9} {'(a)/(c)':>9}"
    )
    for batch in BATCHES:
        pixels = torch.randn(batch, 3, side, side, generator=generator)

        def infer(pixels=pixels):
            with torch.inference_mode():
                loop(pixels)

        contenders = {
            k: lambda s=s, x=pixels.numpy(): s.run(["logits"], {"pixel_values": x})
            for k, s in sessions.items()
        }
        contenders["c"] = infer
        # at batch 32 the loop (c) takes minutes a call: warmed at batch 1 only
        warm = set(contenders) if batch == 1 else {"a", "b"}
        rates = {k: batch / v for k, v in interleaved(contenders, repeats[batch], warm).items()}
        ab, ac = rates["a"] / rates["b"], rates["a"] / rates["c"]
        print(
            f"{batch:>5} {rates['a']:>11.2f} {rates['b']:>11.2f} {rates['c']:>12.2f} "
            f"{ab:>8.2f}× {ac:>8.2f}×",
            flush=True,
        )
    print(
        f"targets: (a)/(b) ≥ {TARGETS['a/b']}×, (a)/(c) ≥ {TARGETS['a/c']}× "
        "(figures only: nothing is asserted)"
    )


# --- main ----------------------------------------------------------------------------------------


def sizes_table(work: Path, folders: dict[str, Path]) -> None:
    base_folder, base_vision = folder_bytes(work / "merged"), vision_bytes(work / "merged")
    print(
        f"\nfolder sizes (÷ the task_arithmetic merge: {mib(base_folder).strip()} folder, "
        f"{mib(base_vision).strip()} vision tensors)"
    )
    print(
        f"{'':9s} {'folder':>12s} {'÷ merged':>9s} {'vision':>12s} {'÷ merged':>9s}  "
        f"{'of which: task vectors':>22s} {'routers':>12s}"
    )
    for label, folder in folders.items():
        tensors = tensor_bytes(folder)
        vision = sum(b for n, b in tensors.items() if n.startswith("vision_model."))
        vectors = sum(b for n, b in tensors.items() if ".mlp.task_vectors." in n)
        routers = sum(b for n, b in tensors.items() if ".mlp.gate." in n)
        size = folder_bytes(folder)
        print(
            f"{label:9s} {mib(size):>12s} {size / base_folder:8.2f}× {mib(vision):>12s} "
            f"{vision / base_vision:8.2f}×  {mib(vectors):>22s} {mib(routers):>12s}"
        )
    print(
        f"targets: E-WEMoE ≤ {TARGETS['size E-WEMoE']}×, WEMoE ≈ 6.2× (B/32 vision tensors); "
        "E-WEMoE's one shared router is stored under every layer's key"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="b32", choices=["b32", "tiny"])
    parser.add_argument("--experts", type=int, default=8, help="task models (experts)")
    parser.add_argument("--threads", type=int, default=None, help="default: torch's")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls each, batch 1")
    parser.add_argument("--repeats-32", type=int, default=1, help="timed calls each, batch 32")
    parser.add_argument("--batch", type=int, default=4, help="images per task in the one step")
    parser.add_argument(
        "--memory", type=float, default=12, help="GiB: stop a merge above this resident"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="keep everything here")
    parser.add_argument(
        "--cli-export", action="store_true", help="also try `clipship export` of E-WEMoE"
    )
    args = parser.parse_args()
    if args.experts < 2:
        parser.error("--experts: at least 2")
    print(describe())
    begun = time.perf_counter()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="clipship-wemoe-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CLIPSHIP_CACHE": str(work / "cache")}  # the heads' cache, ours alone
    try:
        t = time.perf_counter()
        if not (work / "merged" / "config.json").exists():  # a kept --workdir is reused
            here = str(Path(__file__).resolve().parent)
            build = [sys.executable, "-c", BUILD, str(work), args.shape, str(args.experts)]
            done = subprocess.run([*build, str(args.batch), here], capture_output=True, env=env)
            if done.returncode != 0:
                raise SystemExit(f"building the pool failed:\n{done.stderr.decode()}")
        names = list(json.loads((work / "tasks.json").read_text())["tasks"])
        encoder = sum(tensor_bytes(work / names[0]).values())
        print(
            f"{len(names)} × {args.shape} pool, {args.batch} images per task and its "
            f"task_arithmetic merge ready in {time.perf_counter() - t:.0f} s at {work}; one "
            f"encoder (fp32) {mib(encoder).strip()}",
            flush=True,
        )

        # 2. construction (first: this process stays torch-free while the merges run)
        limit = args.memory * 2**30
        runs: dict[str, list[tuple[str, tuple[float, int] | str]]] = {}
        for label, method in MIXTURES.items():
            runs[label] = [("as is", merge_mixture(work, method, args.batch, env, limit))]
            if isinstance(runs[label][0][1], str):  # again, large blocks given back on free
                fixed = {**env, **MALLOC_FIX}
                again = merge_mixture(work, method, args.batch, fixed, limit)
                runs[label].append((f"MALLOC_MMAP_THRESHOLD_={MALLOC_FIX_MIB} MiB", again))
        made = {
            label: work / method
            for label, method in MIXTURES.items()
            if not isinstance(runs[label][-1][1], str)
        }

        # 1. folder sizes
        sizes_table(work, made)
        print(
            f"\nconstruction (`clipship merge`, 1 adaptation step of {args.batch} images per "
            "task, its own process)"
        )
        print(
            f"{'':9s} {'glibc malloc':30s} {'wall s':>7s} {'peak RSS':>12s} {'target':>12s} "
            f"{'RSS ÷ target':>13s}"
        )
        for label in MIXTURES:
            target = folder_bytes(made[label]) + 1.5 * encoder if label in made else None
            for setting, result in runs[label]:
                if isinstance(result, str):
                    print(f"{label:9s} {setting:30s} {result}")
                    continue
                wall, rss = result
                print(
                    f"{label:9s} {setting:30s} {wall:7.1f} {mib(rss):>12s} {mib(target):>12s} "
                    f"{rss / target:12.2f}×"
                )
        print(
            "target: the mixture's folder size + 1.5 × one encoder (fp32); a merge that fails "
            f"as is runs again with glibc returning blocks ≥ {MALLOC_FIX_MIB} MiB to the system "
            "when freed (MALLOC_MMAP_THRESHOLD_)",
            flush=True,
        )

        if args.cli_export and "E-WEMoE" in made:
            print(f"\n`clipship export` of the E-WEMoE folder: {try_cli_export(work, env)}")

        # 3. throughput
        print()
        if "E-WEMoE" in made:
            repeats = {1: args.repeats, 32: args.repeats_32}
            throughput(work, names, args.threads, repeats)
        else:
            print("throughput: skipped (no E-WEMoE folder)")
        print(f"\nwall time of this script: {time.perf_counter() - begun:.0f} s")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
