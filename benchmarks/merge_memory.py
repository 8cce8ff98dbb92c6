"""Wall time and peak RSS of `clipship merge` on N ViT-B/32-shaped task encoders (or L/14),
with FusionBench's own implementation on the same files side by side.

Builds a seeded pool in a temporary folder (a full CLIPModel as `_pretrained_` plus N
CLIPVisionModel task encoders, random weights of the real shapes), then runs `clipship merge`
once per method (FusionBench's default parameters; SLERP on the first two task models,
magnitude pruning on the first), each in its own process, and prints wall seconds and the
process's peak RSS next to one encoder's fp32 size. Target for 8 × B/32 on a 2-core box: peak
RSS ≤ 1.5× one encoder for every method.

With ``--lora R``, the same methods also run on the pool with every task model replaced by a
rank-R LoRA adapter of the pretrained tower (``synthetic.write_lora_pool``: q/k/v/out and both MLP
layers), which clipship reads as the merged encoder tensor by tensor; each row then has a second
figure, ``lora``. Target: the same ≤ 1.5× one encoder.

With ``--fusionbench PYTHON`` (a virtualenv with fusion-bench==0.2.33 installed), each method
also runs through `fusionbench_merge.py` on the same pool, stopped after ``--fusionbench-timeout``
seconds or above ``--fusionbench-memory`` GiB resident.

    python benchmarks/merge_memory.py [--models 8] [--large] [--methods all|ta,ties,...]
                                      [--fusionbench /path/to/venv/bin/python] [--lora 16]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from clipship.machine import describe

NOT_WIRED = 3  # fusionbench_merge.py's exit status for a method it has no counterpart for


def weight_bytes(path: Path) -> int:
    """Bytes of tensor data in a safetensors file, from its header."""
    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    return sum(
        v["data_offsets"][1] - v["data_offsets"][0]
        for k, v in header.items()
        if k != "__metadata__"
    )


def resident(pid: int) -> int:
    """A live process's resident set in bytes (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run(
    cmd: list[str],
    timeout: float | None = None,
    memory: float | None = None,
    failures_are_results: bool = False,
) -> tuple[float, int] | str:
    """Wall seconds and peak RSS (bytes) of one child process, or why it was stopped (past
    ``timeout`` seconds, or above ``memory`` bytes resident: FusionBench can fill the machine),
    or, with ``failures_are_results``, the error it failed with."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = None if timeout is None else start + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        stop = None
        if deadline is not None and time.perf_counter() > deadline:
            stop = f"did not finish in {timeout:.0f} s"
        elif memory is not None and resident(proc.pid) > memory:
            stop = f"stopped above {memory / 2**30:.0f} GiB"
        if stop:
            proc.kill()
            os.wait4(proc.pid, 0)
            return stop
        time.sleep(0.05)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) == NOT_WIRED:
        return "no FusionBench counterpart"
    if os.waitstatus_to_exitcode(status) != 0:
        lines = proc.stderr.read().decode(errors="replace").strip().splitlines()
        if not failures_are_results:
            raise SystemExit(f"failed: {' '.join(cmd)}: {' '.join(lines[-1:])}")
        # the exception's class: the last line that starts "SomeError:" (messages may wrap)
        raised = [ln.split(":")[0] for ln in lines if re.match(r"^[\w.]+(Error|Exception):", ln)]
        return f"failed: {(raised or ['error'])[-1].split('.')[-1][:28]}"
    return wall, usage.ru_maxrss * 1024


def method_rows() -> dict[str, dict]:
    """Every registered method, asked of a child (this process stays torch-free)."""
    listing = subprocess.run(
        [sys.executable, "-m", "clipship.cli", "methods", "--json"],
        check=True,
        capture_output=True,
        text=True,
    )
    return {m["name"]: m for m in json.loads(listing.stdout)}


def task_names(work: Path) -> list[str]:
    """The pool's task models, in pool order (from its pool.yaml)."""
    lines = (work / "pool.yaml").read_text().split("models:", 1)[1].splitlines()
    names = [line.strip().split(":")[0] for line in lines if line.strip()]
    return [n for n in names if n != "_pretrained_"]


def members(method: str, work: Path) -> list[str]:
    """The pool arguments: the whole pool, or the first two / first task model."""
    if method not in ("slerp", "magnitude_prune"):
        return ["--pool", str(work / "pool.yaml")]
    names = task_names(work)[: 2 if method == "slerp" else 1]
    models = [f"--model={n}={work / n}" for n in names]
    return ["--pretrained", str(work / "pretrained"), *models]


def cell(figure: tuple[float, int] | str, encoder: int) -> str:
    if isinstance(figure, str):
        return f"{figure:>37s}"
    wall, rss = figure
    return f"{wall:8.2f} {rss / 2**30:13.3f} {rss / encoder:13.2f}×"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--large", action="store_true", help="ViT-L/14 shapes instead of B/32")
    parser.add_argument("--methods", default="all", help="comma-separated, or all")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the pool here")
    parser.add_argument("--device", default="cpu", help="clipship's --device (cpu, cuda)")
    parser.add_argument("--fusionbench", default=None, help="python of a fusion-bench venv")
    parser.add_argument("--data-examples", type=int, default=64, help="RegMean/Fisher images")
    parser.add_argument(
        "--data-steps", type=int, default=10, help="AdaMerging's (and Concrete's) steps"
    )
    parser.add_argument("--fusionbench-timeout", type=float, default=900)
    parser.add_argument("--fusionbench-memory", type=float, default=16, help="GiB")
    parser.add_argument("--lora", type=int, default=None, help="also a pool of rank-R adapters")
    args = parser.parse_args()
    print(describe())

    size = "l14" if args.large else "b32"
    work = args.workdir or Path(tempfile.mkdtemp(prefix="clipship-bench-"))
    try:
        pool_yaml = work / "pool.yaml"
        if not pool_yaml.exists():
            # In a child: a process's peak RSS counts what its parent held when it forked
            # (Linux carries the high-water mark across exec), so this one stays torch-free.
            t = time.perf_counter()
            here = str(Path(__file__).parent)  # for `synthetic`, beside this script
            build = (
                "import json, sys; from pathlib import Path; sys.path.insert(0, sys.argv[4]); "
                "from synthetic import TASKS, build_pool, write_pool_yaml, write_task_data; "
                "work = Path(sys.argv[1]); "
                "pool = build_pool(work, sys.argv[2], TASKS[: int(sys.argv[3])], seed=0); "
                "write_pool_yaml(work / 'pool.yaml', *pool); "
                "size = json.loads((pool[0] / 'config.json').read_text())['vision_config']; "
                "write_task_data(work, list(pool[1]), 64, size['image_size'])"
            )
            subprocess.run(
                [
                    sys.executable,
                    "-c",
                    build,
                    str(work),
                    size,
                    str(args.models),
                    here,
                ],
                check=True,
            )
            print(f"built {args.models} × {size} pool in {time.perf_counter() - t:.1f}s at {work}")
        if args.lora and not (work / "pool_lora.yaml").exists():
            here = str(Path(__file__).parent)
            build = (
                "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[3]); "
                "from synthetic import write_lora_pool; "
                "write_lora_pool(Path(sys.argv[1]), int(sys.argv[2]))"
            )
            subprocess.run(
                [sys.executable, "-c", build, str(work), str(args.lora), here], check=True
            )
        encoder = weight_bytes(work / task_names(work)[0] / "model.safetensors")
        print(f"one encoder (fp32): {encoder / 2**30:.3f} GiB; cores: {os.cpu_count()}")
        rows = method_rows()
        methods = list(rows) if args.methods == "all" else args.methods.split(",")
        header = f"{'wall s':>8s} {'peak RSS GiB':>13s} {'RSS / encoder':>14s}"
        print(
            f"{'':22s} {'clipship':^37s}"
            + (f" {'FusionBench 0.2.33':^37s}" * bool(args.fusionbench))
        )
        print(f"{'method':22s} {header}" + (f" {header}" if args.fusionbench else ""))
        driver = Path(__file__).with_name("fusionbench_merge.py")
        for method in methods:
            out = work / f"merged-{method}"
            cmd = [
                sys.executable,
                "-m",
                "clipship.cli",
                "merge",
                *members(method, work),
            ]
            cmd += ["--method", method, "--out", str(out), "--device", args.device]
            if method == "weighted_average":  # its weights belong to the pool: uniform here
                cmd += ["--param", "weights=" + ",".join(["1"] * args.models)]
            if rows[method]["reads"]:  # data-aware: random images (time and memory only)
                cmd += ["--taskfile", str(work / "tasks.json"), "--batch-size", "16"]
                if "max_steps" in rows[method]["params"]:
                    cmd += ["--param", f"max_steps={args.data_steps}"]
                    if "max_adamerging_steps" in rows[method]["params"]:  # Concrete AdaMerging
                        cmd += ["--param", f"max_adamerging_steps={args.data_steps}"]
                else:
                    cmd += ["--data-examples", str(args.data_examples)]
            ours = run([*cmd, "--force", "--quiet"])
            shutil.rmtree(out, ignore_errors=True)
            line = f"{method:22s} {cell(ours, encoder)}"
            if args.lora and "--pool" in cmd:
                lora_cmd = [c if c != str(work / "pool.yaml") else str(work / "pool_lora.yaml")
                            for c in cmd]  # fmt: skip
                lora = run([*lora_cmd, "--force", "--quiet"])
                shutil.rmtree(out, ignore_errors=True)
                line += f"   lora r={args.lora}: {cell(lora, encoder)}"
            if args.fusionbench:
                fb_cmd = [args.fusionbench, str(driver), method, str(work / "pool.yaml")]
                fb_cmd += [str(args.data_examples)] if rows[method]["reads"] else []
                limit = args.fusionbench_memory * 2**30
                theirs = run(fb_cmd, args.fusionbench_timeout, limit, failures_are_results=True)
                line += f" {cell(theirs, encoder)}"
            print(line, flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
