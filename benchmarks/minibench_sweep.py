"""λ chosen on validation against λ = 0.3 and against the best λ on test, on the mini-benchmark.

For each seed's mini-benchmark (built once, cached) and each method, ``clipship sweep`` over
λ ∈ {0.1, …, 1.0} (TIES at threshold 20) chooses on the validation split (a stratified 10 %
hold-out of each task's training split) and reports every point's test accuracy beside it. The
table gives, per method and averaged over the seeds, the test accuracy of the λ chosen on
validation, of FusionBench's default λ = 0.3, and of the λ that is best on test (the optimistic
figure published tables use); the plot (``--plot``) shows validation and test average accuracy
against λ for seed 0.

    python benchmarks/minibench_sweep.py [--seeds 0,1,2] [--plot docs/minibench_sweep.png]
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

METHODS = {"task_arithmetic": [], "ties": ["--threshold", "20"]}
DEFAULT = 0.3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--plot", type=Path, default=None, help="write the seed-0 plot here")
    args = parser.parse_args()

    from clipship.machine import describe
    from clipship.minibench.build import build

    print(f"machine: {describe()}")
    seeds = [int(s) for s in args.seeds.split(",")]
    work = Path(tempfile.mkdtemp(prefix="clipship-minibench-sweep-"))
    reports: dict[str, list[dict]] = {m: [] for m in METHODS}
    try:
        for seed in seeds:
            folder = build(budget="full", seed=seed)
            for method, extra in METHODS.items():
                out = work / f"{method}-{seed}"
                command = [
                    sys.executable, "-m", "clipship", "sweep", "--pool", str(folder / "pool.yaml"),
                    "--taskfile", str(folder / "tasks.json"), "--method", method, *extra,
                    "--grid", "scaling_factor=0.1:1.0:0.1", "--report-test", "--device", "cpu",
                    "--out", str(out), "--quiet",
                ]  # fmt: skip
                subprocess.run(command, check=True)
                reports[method].append(json.loads((out / "sweep.json").read_text()))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"mini-benchmark (full budget), seeds {args.seeds}; test accuracy (%), mean over seeds")
    print(
        "| method | λ chosen on validation | its test acc. | λ = 0.3 test acc. | "
        "best λ on test | its test acc. (optimistic) |"
    )
    print("|---|---|---|---|---|---|")
    for method, runs in reports.items():
        chosen, at_chosen, at_default, best, at_best = [], [], [], [], []
        for report in runs:
            points = report["points"]
            test = [p["test"]["average"]["accuracy"] for p in points]
            scales = [p["parameters"]["scaling_factor"] for p in points]
            index = report["best"]["index"]
            chosen.append(scales[index])
            at_chosen.append(test[index])
            at_default.append(test[scales.index(DEFAULT)])
            top = max(range(len(test)), key=lambda i: (test[i], -i))
            best.append(scales[top])
            at_best.append(test[top])

        def mean(values: list[float]) -> float:
            return 100 * sum(values) / len(values)

        print(
            f"| {method} | {', '.join(map(str, chosen))} | {mean(at_chosen):.1f} | "
            f"{mean(at_default):.1f} | {', '.join(map(str, best))} | {mean(at_best):.1f} |"
        )
    if args.plot is not None:
        args.plot.write_bytes(plot({m: runs[0] for m, runs in reports.items()}))
        print(f"plot: {args.plot}")


def plot(reports: dict[str, dict]) -> bytes:
    from clipship.runtime.state import figure

    fig = figure(figsize=(5.2, 3.3), dpi=110)
    ax = fig.subplots()
    for method, report in reports.items():
        points = report["points"]
        scales = [p["parameters"]["scaling_factor"] for p in points]
        validation = [100 * p["validation"]["average"]["accuracy"] for p in points]
        test = [100 * p["test"]["average"]["accuracy"] for p in points]
        (line,) = ax.plot(scales, validation, marker="o", label=f"{method}, validation")
        ax.plot(scales, test, "--", marker="x", color=line.get_color(), label=f"{method}, test")
        chosen = points[report["best"]["index"]]["parameters"]["scaling_factor"]
        ax.axvline(chosen, color=line.get_color(), lw=0.8, ls=":")
    ax.set_xlabel("λ (scaling_factor)")
    ax.set_ylabel("average accuracy (%)")
    ax.set_title("mini-benchmark, seed 0: λ chosen on validation (dotted)", fontsize=8)
    ax.legend(fontsize=6)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


if __name__ == "__main__":
    main()
