"""The mini-benchmark's method ranking under variants of its build: how much labelled
pretraining, how gentle the fine-tuning, how wide the vision tower.

Each variant builds a full-budget pool with some of `clipship.minibench.build`'s settings
replaced (the Budget fields, VISION keys), in its own cache folder, then runs `minibench run`'s
merges and evaluation on it; one process per variant and seed, each on ``--threads`` threads,
so two builds can run side by side on two cores. Prints one row per variant: the pretrained and
fine-tuned averages, each method's average accuracy, and the build and run seconds, per seed
and, with several ``--seeds``, their mean.

    python benchmarks/minibench_variants.py [--variants default,v2,wide256] [--parallel 2]
        [--methods task_arithmetic,ties,regmean,adamerging] [--variant NAME=JSON ...]
        [--seeds 0,1,2]

A variant is JSON: ``{"pretrain_per_class": 30, "pretrain_steps": 800, "finetune_steps": 1000,
"finetune_lr": 2e-4, "vision": {"hidden_size": 256}, "adamerging_steps": 300}``; keys left out
keep the shipped build's values.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import fmean

VARIANTS = {
    "default": {},
    "v2": {  # the miniature shipped before recipe 3: patch 4, width 64, less pretraining
        "pretrain_per_class": 10,
        "pretrain_steps": 300,
        "finetune_steps": 1500,
        "finetune_lr": 5e-4,
        "vision": {"patch_size": 4, "hidden_size": 64, "intermediate_size": 256},
    },
    "width64": {"vision": {"patch_size": 4, "hidden_size": 64, "intermediate_size": 256}},
    "gentle": {"finetune_steps": 1500, "finetune_lr": 3e-5},
    "wide256": {  # not run by default: ~3× slower to build
        "finetune_lr": 1e-4,
        "vision": {"hidden_size": 256, "intermediate_size": 1024},
    },
}
METHODS = "task_arithmetic,ties,simple_average,regmean,regmean_plusplus,adamerging"


def child(spec: dict, methods: list[str], out: Path, threads: int, seed: int) -> None:
    """One variant, in this process: patch the build settings, build, run, write results."""
    import torch

    torch.set_num_threads(threads)
    from clipship.minibench import build, run

    spec = dict(spec)
    build.VISION.update(spec.pop("vision", {}))
    run.ADAMERGING_STEPS["full"] = spec.pop("adamerging_steps", run.ADAMERGING_STEPS["full"])
    fields = {**build.BUDGETS["full"].__dict__, **spec}
    build.BUDGETS["full"] = build.Budget(**fields)
    started = time.perf_counter()
    folder = build.build(None, "full", seed)
    built = time.perf_counter() - started
    results = run.run(folder, methods, out / "results")
    ran = time.perf_counter() - started - built
    results["seconds"] = {"build": round(built), "run": round(ran)}
    (out / "variant.json").write_text(json.dumps(results, indent=1) + "\n")


def average(acc: dict[str, float]) -> float:
    return 100 * fmean(acc.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(n for n in VARIANTS if n != "wide256"))
    parser.add_argument("--variant", action="append", default=[], help="NAME=JSON (repeatable)")
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per variant")
    parser.add_argument("--work", type=Path, help="where the pools go (default: a temp folder)")
    parser.add_argument("--seeds", default="0", help="build seeds, comma-separated (default 0)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    if args.child:
        spec, out, seed = args.child
        child(json.loads(spec), methods, Path(out), args.threads, int(seed))
        return

    from clipship.machine import describe
    from clipship.minibench.sources import wheel_folder

    chosen = {n: VARIANTS[n] for n in args.variants.split(",") if n}
    for item in args.variant:
        name, _, text = item.partition("=")
        chosen[name] = json.loads(text)
    work = args.work or Path(tempfile.mkdtemp(prefix="minibench-variants-"))
    wheels = wheel_folder()  # pinned downloads, shared by every variant
    running: list[tuple[str, subprocess.Popen, object]] = []
    done: dict[str, dict] = {}
    seeds = list(dict.fromkeys(int(s) for s in args.seeds.split(",") if s))  # once each
    queue = [(f"{n}-seed{s}", spec, s) for n, spec in chosen.items() for s in seeds]
    while queue or running:
        while queue and len(running) < args.parallel:
            name, spec, seed = queue.pop(0)
            folder = work / name
            (folder / "cache" / "minibench").mkdir(parents=True, exist_ok=True)
            link = folder / "cache" / "minibench" / "wheels"
            if wheels.is_dir() and not link.exists():
                link.symlink_to(wheels)
            env = {**os.environ, "CLIPSHIP_CACHE": str(folder / "cache")}
            command = [sys.executable, __file__, "--child", json.dumps(spec), str(folder)]
            command += [str(seed)]
            command += ["--methods", ",".join(methods), "--threads", str(args.threads)]
            log = open(folder / "log.txt", "w")  # noqa: SIM115 (closed when the process ends)
            process = subprocess.Popen(command, env=env, stdout=log, stderr=log)
            running.append((name, process, log))
        time.sleep(5)
        for name, process, log in list(running):
            if process.poll() is not None:
                running.remove((name, process, log))
                log.close()
                result = work / name / "variant.json"
                if process.returncode != 0 or not result.is_file():
                    sys.exit(f"variant {name} failed: see {work / name / 'log.txt'}")
                done[name] = json.loads(result.read_text())
    print(f"# {describe()}, {args.threads} thread(s) per variant, {args.parallel} at a time")
    print(f"# pools and logs: {work}")
    print("| variant | pretrained | fine-tuned | " + " | ".join(methods) + " | build s | run s |")
    print("|---" * (len(methods) + 5) + "|")
    for name in chosen:
        runs = [done[f"{name}-seed{s}"] for s in seeds]
        for seed, r in zip(seeds, runs):
            print(row(f"{name}, seed {seed}", [r], methods))
        if len(runs) > 1:
            print(row(f"{name}, mean of {len(runs)} seeds", runs, methods))


def row(label: str, runs: list[dict], methods: list[str]) -> str:
    """One table row: each column's average accuracy, averaged over ``runs``."""
    cells = [fmean(average(r["pretrained"]) for r in runs)]
    cells += [fmean(average(r["individual"]) for r in runs)]
    cells += [fmean(average(r["merged"][m]) for r in runs) for m in methods]
    build_s = round(fmean(r["seconds"]["build"] for r in runs))
    run_s = round(fmean(r["seconds"]["run"] for r in runs))
    return f"| {label} | " + " | ".join(f"{v:.1f}" for v in cells) + f" | {build_s} | {run_s} |"


if __name__ == "__main__":
    main()
