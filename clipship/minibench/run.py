"""`clipship minibench run`: merge the pool with each method and tabulate zero-shot accuracy.

Evaluates the pretrained model, every fine-tuned model on every task, and every merge, then
writes the table in the shape of the merging papers' results tables (method × task, with the
average) as ``results.md``, ``results.json`` and ``results.png``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clipship.eval.evaluate import evaluate
from clipship.eval.robustness import averages, robustness_heatmap
from clipship.minibench.build import pool_tasks
from clipship.outputs import (
    refuse_link,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)
from clipship.pool import read_pool_yaml
from clipship.runtime.state import figure

DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    "task_arithmetic": {"scaling_factor": 0.3},
    "ties": {"scaling_factor": 0.3, "threshold": 20},
}  # every other method runs with its registered (FusionBench's packaged) defaults, except:
# the test-time adaptation steps, scaled to the miniature's CPU budget (FusionBench's 1000
# steps take minutes here; the smoke pool's test splits are small). AdaMerging's:
ADAMERGING_STEPS = {"smoke": 20, "full": 300}
# WEMoE's and E-WEMoE's router adaptation (FusionBench: 1000 steps of Adam at 1e-4), scaled
# as AdaMerging's: 300 steps (one batch per task each) adapt in 33 s each on the full pool,
# AdaMerging's 300 in 37 s (seed 0, 2 threads, AMD EPYC Zen 3, idle machine). Evaluating a
# mixture costs more than one tower (per-sample routing: 14-24 s against 3 s), not counted here.
MIXTURE_STEPS = {
    "weight_ensembling_moe": {"smoke": 20, "full": 300},
    "sparse_weight_ensembling_moe": {"smoke": 20, "full": 300},
}
# Concrete TA's mask steps and Concrete AdaMerging's meta steps and AdaMerging steps
# (FusionBench: 2000, and 1000 + 1000), scaled the same way; each step reads one image per task
# (FusionBench's D5), so a step costs a fraction of AdaMerging's.
CONCRETE_STEPS = {"smoke": 20, "full": 300}


def adaptation_params(method: str, budget: str) -> dict[str, int]:
    """The step counts a test-time-adapted method runs with on ``budget`` (empty: not one)."""
    if method == "adamerging":
        return {"max_steps": ADAMERGING_STEPS[budget]}
    if method == "concrete_task_arithmetic":
        return {"max_steps": CONCRETE_STEPS[budget]}
    if method == "concrete_adamerging":
        steps = CONCRETE_STEPS[budget]
        return {"max_steps": steps, "max_adamerging_steps": steps}
    steps = MIXTURE_STEPS.get(method)
    return {} if steps is None else {"max_steps": steps[budget]}


def expand_methods(names: list[str]) -> list[str]:
    """``all`` → every registered method that runs on its defaults (not weighted_average, whose
    weights are the pool's); unknown names fail before any work."""
    from clipship.merge import get_method, method_table

    runnable = [m.name for m in method_table().values() if not any(p.required for p in m.params)]
    chosen: list[str] = []
    for name in names:
        for method in runnable if name == "all" else [get_method(name).name]:
            if method not in chosen:
                chosen.append(method)
    return chosen


def merged_tasks(method: str, tasks: list[str]) -> list[str]:
    """The task models a method merges: all of them, or the first two (SLERP) / first one
    (magnitude pruning), in pool order."""
    from clipship.merge import get_method

    exact = get_method(method).exact_models
    return tasks if exact is None else tasks[:exact]


def run(
    pool_dir: Path,
    methods: list[str],
    out: Path | None = None,
    quiet: bool = True,
    corruptions: list[str] | None = None,
    severity: int | None = None,
) -> dict[str, Any]:
    """Merge with every method, evaluate everything, write the tables; returns the results.
    With ``corruptions``, the pretrained and every merged model are also evaluated under each
    (``results["robustness"]``, a methods × corruptions table and heatmap)."""
    from clipship.merge import merge
    from clipship.merge.dataaware.plan import DataOptions

    pool_dir = Path(pool_dir)
    out = Path(out) if out else Path(DEFAULT_OUT)  # the working directory, not the cache
    pretrained, models = read_pool_yaml(pool_dir / "pool.yaml")
    tasks = pool_tasks(pool_dir)
    names = [t.name for t in tasks]
    budget = json.loads((pool_dir / "build.json").read_text())["budget"]["name"]

    robust: dict[str, Any] = {}

    def accuracy(
        model: str, pretrained_for: str | None = None, label: str | None = None
    ) -> dict[str, float]:
        under = corruptions if label is not None else None
        report = evaluate(
            model, tasks, pretrained=pretrained_for, device="cpu", workers=0,
            corruptions=under, severity=severity,
        )  # fmt: skip
        if under:
            robust[label] = report
        return report.accuracies()

    def log(message: str) -> None:
        if not quiet:
            print(message, flush=True)

    log("evaluating the pretrained model")
    results: dict[str, Any] = {
        "tasks": names,
        "pretrained": accuracy(pretrained, None, "Pretrained"),
    }
    results["finetuned"] = {}
    for task, source in models.items():
        log(f"evaluating the {task} encoder on every task")
        results["finetuned"][task] = accuracy(source, pretrained)
    results["individual"] = {
        t: results["finetuned"][t][t] for t in names if t in results["finetuned"]
    }
    results["merged"] = {}
    results["pools"] = {}
    for method in methods:
        log(f"merging with {method}")
        folder = out / "merged" / method
        used = merged_tasks(method, list(models))
        pool = {t: models[t] for t in used}
        params = dict(DEFAULT_PARAMS.get(method, {}))
        params.update(adaptation_params(method, budget))
        data = DataOptions(tuple(t for t in tasks if t.name in pool))
        merge(pretrained, pool, method, folder, params, force=True, data=data)
        results["merged"][method] = accuracy(str(folder), None, method)
        if used != list(models):
            results["pools"][method] = used
    results["chance"] = {t.name: 1 / len(t.classnames) for t in tasks}
    if robust:
        first = next(iter(robust.values())).robustness
        results["robustness"] = {
            "severity": first["severity"],
            "corruptions": list(first["corruptions"]),
            "average": {label: averages(r.to_json()) for label, r in robust.items()},
            "tasks": {
                label: {c: {t: rows[t]["accuracy"] for t in names}
                        for c, rows in r.robustness["corruptions"].items()}
                for label, r in robust.items()
            },
        }  # fmt: skip
    write_tables(out, results, robust)
    return results


DEFAULT_OUT = "minibench_results"


def benchmark(
    methods: str,
    pool_dir: Path | None = None,
    budget: str = "full",
    seed: int = 0,
    out: Path | None = None,
    quiet: bool = True,
    corruptions: str | None = None,
    severity: int | None = None,
) -> tuple[dict[str, Any], str]:
    """``clipship minibench run``: the methods (comma-separated, or ``all``) on a built pool
    (built first when none is given), optionally under corruptions; (results, markdown)."""
    from clipship.eval.robustness import corruptions as checked
    from clipship.minibench.build import build, check_budget

    chosen = expand_methods([m for m in methods.split(",") if m])
    names = checked(corruptions, severity)
    folder = pool_dir or build(None, check_budget(budget), seed, quiet=quiet)
    results = run(folder, chosen, out, quiet=quiet, corruptions=names, severity=severity)
    return results, markdown(results)


def rows(results: dict[str, Any]) -> list[tuple[str, dict[str, float]]]:
    table = [
        ("Chance", results["chance"]),
        ("Pretrained", results["pretrained"]),
        ("Individual (fine-tuned)", results["individual"]),
    ]
    pools = results.get("pools", {})
    table += [
        (f"{name} ({', '.join(pools[name])})" if name in pools else name, acc)
        for name, acc in results["merged"].items()
    ]
    return table


def markdown(results: dict[str, Any]) -> str:
    names = results["tasks"]
    lines = ["| Method | " + " | ".join(names) + " | Avg. |", "|---" * (len(names) + 2) + "|"]
    for label, acc in rows(results):
        values = [100 * acc[t] for t in names]
        cells = " | ".join(f"{v:.1f}" for v in values)
        lines.append(f"| {label} | {cells} | {sum(values) / len(values):.1f} |")
    robust = results.get("robustness")
    if robust:
        columns = ["clean", *robust["corruptions"]]
        lines += [
            "",
            f"Average accuracy (%) under corruption (severity {robust['severity']}):",
            "",
            "| Method | " + " | ".join(columns) + " |",
            "|---" * (len(columns) + 1) + "|",
        ]
        for label, values in robust["average"].items():
            cells = " | ".join(f"{100 * values[c]:.1f}" for c in columns)
            lines.append(f"| {label} | {cells} |")
    return "\n".join(lines) + "\n"


def write_tables(out: Path, results: dict[str, Any], robust: dict[str, Any] | None = None) -> None:
    for name in ("results.json", "results.md", "results.png", "robustness.png"):
        refuse_link(out / name)  # all checked before any is written
    out.mkdir(parents=True, exist_ok=True)
    if robust:
        write_bytes_atomic(out / "robustness.png", robustness_heatmap(robust))
    write_json_atomic(out / "results.json", results)
    write_text_atomic(out / "results.md", markdown(results))
    import io

    names = results["tasks"]
    table = rows(results)
    fig = figure(figsize=(1.6 + 1.4 * len(names), 4), dpi=110)
    ax = fig.subplots()
    width = 0.8 / len(table)
    for i, (label, acc) in enumerate(table):
        ax.bar(
            [j + i * width for j in range(len(names))],
            [100 * acc[t] for t in names],
            width,
            label=label,
        )
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names)
    ax.set_ylabel("zero-shot accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, ncols=2)
    ax.set_title("clipship mini-benchmark")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    write_bytes_atomic(out / "results.png", buffer.getvalue())
