"""The mini-benchmark's method ranking under variants of its build: how much labelled
pretraining, how gentle the fine-tuning, how wide the vision tower.

Each variant builds a full-budget pool with some of `clipship.minibench.build`'s settings
replaced (the Budget fields, VISION keys), in its own cache folder, then runs `minibench run`'s
merges and evaluation on it; one process per variant, each on ``--threads`` threads, so two
variants can run side by side on two cores. Prints one row per variant: the pretrained and
fine-tuned averages, each method's average accuracy, and the build and run seconds.

    python benchmarks/minibench_variants.py [--variants default,pretrain30,wide128] [--parallel 2]
        [--methods task_arithmetic,ties,regmean,adamerging] [--variant NAME=JSON ...]

A variant is JSON: ``{"pretrain_per_class": 30, "pretrain_steps": 800, "finetune_steps": 1000,
"finetune_lr": 2e-4, "vision": {"hidden_size": 128}, "adamerging_steps": 300}``; keys left out
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

VARIANTS = {
    "default": {},
    "pretrain20": {
        "pretrain_per_class": 20,
        "pretrain_steps": 800,
        "finetune_steps": 1000,
        "finetune_lr": 1e-4,
    },
    "pretrain30": {
        "pretrain_per_class": 30,
        "pretrain_steps": 800,
        "finetune_steps": 1000,
        "finetune_lr": 2e-4,
    },
    "pretrain30-gentle": {
        "pretrain_per_class": 30,
        "pretrain_steps": 800,
        "finetune_steps": 1500,
        "finetune_lr": 3e-5,
        "adamerging_steps": 500,
    },
    "pretrain60": {
        "pretrain_per_class": 60,
        "pretrain_steps": 1000,
        "finetune_steps": 1000,
        "finetune_lr": 1e-4,
    },
    "wide128": {  # not run by default: pretraining ~3.5× slower per step
        "pretrain_per_class": 20,
        "pretrain_steps": 800,
        "finetune_steps": 1000,
        "finetune_lr": 1e-4,
        "vision": {"hidden_size": 128, "intermediate_size": 512},
    },
}
METHODS = "task_arithmetic,ties,simple_average,regmean,regmean_plusplus,adamerging"


def child(spec: dict, methods: list[str], out: Path, threads: int) -> None:
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
    folder = build.build(None, "full", 0)
    built = time.perf_counter() - started
    results = run.run(folder, methods, out / "results")
    ran = time.perf_counter() - started - built
    results["seconds"] = {"build": round(built), "run": round(ran)}
    (out / "variant.json").write_text(json.dumps(results, indent=1) + "\n")


def average(acc: dict[str, float]) -> float:
    return 100 * sum(acc.values()) / len(acc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(n for n in VARIANTS if n != "wide128"))
    parser.add_argument("--variant", action="append", default=[], help="NAME=JSON (repeatable)")
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per variant")
    parser.add_argument("--work", type=Path, help="where the pools go (default: a temp folder)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    if args.child:
        child(json.loads(args.child[0]), methods, Path(args.child[1]), args.threads)
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
    queue = list(chosen.items())
    while queue or running:
        while queue and len(running) < args.parallel:
            name, spec = queue.pop(0)
            folder = work / name
            (folder / "cache" / "minibench").mkdir(parents=True, exist_ok=True)
            link = folder / "cache" / "minibench" / "wheels"
            if wheels.is_dir() and not link.exists():
                link.symlink_to(wheels)
            env = {**os.environ, "CLIPSHIP_CACHE": str(folder / "cache")}
            command = [sys.executable, __file__, "--child", json.dumps(spec), str(folder)]
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
    for name, r in done.items():
        cells = [average(r["pretrained"]), average(r["individual"])]
        cells += [average(r["merged"][m]) for m in methods]
        seconds = r["seconds"]
        row = " | ".join(f"{v:.1f}" for v in cells)
        print(f"| {name} | {row} | {seconds['build']} | {seconds['run']} |")


if __name__ == "__main__":
    main()
