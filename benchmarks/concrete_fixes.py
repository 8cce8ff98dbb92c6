"""Concrete TA and Concrete layer-wise AdaMerging on the mini-benchmark, with FusionBench's
defects followed (its defaults, as `clipship minibench run`) and fixed (D5: batches of
`batch_size`; D6: reset λ before the inner merge; D7: the expected final mask), beside task
arithmetic and layer-wise AdaMerging: average accuracy over the four tasks, per seed.

    python benchmarks/concrete_fixes.py [--seeds 0,1,2] [--steps 300]

Each seed's pool is built once (cached, `clipship minibench build --seed N`).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

FIXES = {"use_batch_size": True, "final_mask": "expected"}  # + reset_before_merge (AdaMerging)


def main() -> None:
    from clipship.eval.evaluate import evaluate
    from clipship.machine import describe
    from clipship.merge import merge
    from clipship.merge.dataaware.plan import DataOptions
    from clipship.minibench.build import build, pool_tasks
    from clipship.pool import read_pool_yaml

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    steps = args.steps
    rows = {
        "task_arithmetic": ("task_arithmetic", {"scaling_factor": 0.3}),
        "concrete_task_arithmetic": ("concrete_task_arithmetic", {"max_steps": steps}),
        "concrete_task_arithmetic (D5-D7 fixed)": (
            "concrete_task_arithmetic",
            {"max_steps": steps, **FIXES},
        ),
        "adamerging (layer)": ("adamerging", {"max_steps": steps}),
        "concrete_adamerging (layer)": (
            "concrete_adamerging",
            {"max_steps": steps, "max_adamerging_steps": steps},
        ),
        "concrete_adamerging (layer, D5-D7 fixed)": (
            "concrete_adamerging",
            {
                "max_steps": steps,
                "max_adamerging_steps": steps,
                "reset_before_merge": True,
                **FIXES,
            },
        ),
    }
    print(f"{describe()}; {steps} steps")
    for seed in [int(s) for s in args.seeds.split(",")]:
        folder = build(None, "full", seed, quiet=True)
        pretrained, models = read_pool_yaml(folder / "pool.yaml")
        tasks = pool_tasks(folder)
        data = DataOptions(tuple(tasks))
        with tempfile.TemporaryDirectory() as tmp:
            for label, (method, params) in rows.items():
                out = Path(tmp) / label.replace(" ", "_")
                started = time.perf_counter()
                merge(pretrained, models, method, out, params, force=True, data=data, seed=seed)
                seconds = time.perf_counter() - started
                accuracy = evaluate(str(out), tasks, device="cpu", workers=0).accuracies()
                average = 100 * sum(accuracy.values()) / len(accuracy)
                print(f"seed {seed} | {label} | {average:.1f} | merge {seconds:.0f} s", flush=True)


if __name__ == "__main__":
    main()
