"""The merge part of a 10-point λ sweep of task arithmetic against one merge and a loop of merges,
side by side in one run, on N ViT-B/32-shaped task encoders (seeded synthetic weights of the real
shapes, ``synthetic.build_pool``).

* one merge: ``clipship merge`` (``merge()``) at λ = 0.3, a full CLIPModel folder, as users run
  it;
* the sweep: what ``clipship sweep`` does for its points, per-point evaluation excluded: one pass
  over the pool for the direction M, then each λ's vision tower made from θ_pre and M on the
  device (``PointModels``, the sweep's own code), the bytes read from the task models counted;
* the loop: ``merge()`` once per λ, the hand-written loop the sweep replaces (``--loop 0``
  skips it).

Target: the sweep's merge part ≤ 2× one merge, reading the pool once (the loop: ~10×).

    python benchmarks/sweep_merge.py [--models 8] [--points 10] [--loop 10] [--size b32]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic import TASKS, build_pool  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--points", type=int, default=10)
    parser.add_argument("--loop", type=int, default=10, help="merges in the loop (0: skip it)")
    parser.add_argument("--size", default="b32", help="tiny, b32 or l14")
    args = parser.parse_args()

    import torch

    from clipship.eval.sweep import PointModels, Sweep
    from clipship.machine import describe
    from clipship.merge.engine import merge
    from clipship.merge.registry import get_method
    from clipship.pool import Model, open_pool

    print(f"machine: {describe()}; torch threads: {torch.get_num_threads()}")
    work = Path(tempfile.mkdtemp(prefix="clipship-sweep-bench-"))
    try:
        names = (TASKS * (1 + args.models // len(TASKS)))[: args.models]
        names = [f"{n}_{i}" for i, n in enumerate(names)]
        pretrained, folders = build_pool(work / "pool", args.size, names, seed=0)
        models = {n: str(f) for n, f in folders.items()}
        scales = [round(0.1 * (i + 1), 10) for i in range(args.points)]

        def one_merge(scale: float, tag: str) -> float:
            started = time.perf_counter()
            merge(str(pretrained), models, "task_arithmetic", work / tag, {"scaling_factor": scale})
            seconds = time.perf_counter() - started
            shutil.rmtree(work / tag)
            return seconds

        one_merge(0.3, "warm")  # page cache and imports warm for every contender
        from transformers import CLIPModel, CLIPVisionModel  # noqa: F401  (the evaluation's)

        single = one_merge(0.3, "single")

        read = {"bytes": 0}
        original = Model.read

        def counted(self, name, start=0, count=None, check=True, out=None):
            tensor = original(self, name, start, count, check, out)
            if self.name != "_pretrained_":
                read["bytes"] += tensor.numel() * tensor.element_size()
            return tensor

        Model.read = counted
        pool = open_pool(str(pretrained), models)
        task_bytes = sum(
            m.info(n).numel * m.info(n).dtype_torch.itemsize
            for m in pool.models
            for n in pool.float_names()
        )
        spec = get_method("task_arithmetic")
        sweep = Sweep(str(pretrained), models, spec.name, {"scaling_factor": scales}, {}, [],
                      work / "out")  # fmt: skip
        points = PointModels(pool, spec, {}, sweep)
        (work / "sweep").mkdir()
        started = time.perf_counter()
        for scale in scales:
            points.load({"scaling_factor": scale}, work / "sweep")
        swept = time.perf_counter() - started
        pool.close()
        Model.read = original

        print(f"pool: {args.models} × {args.size} task encoders (+ pretrained CLIPModel)")
        print(f"one merge (λ = 0.3, full CLIPModel folder): {single:7.2f} s")
        print(
            f"sweep, merge part ({args.points} points): {swept:7.2f} s = {swept / single:.2f}× "
            f"one merge; task-model bytes read: {read['bytes'] / task_bytes:.2f}× the pool, "
            f"{points.passes} pass(es)"
        )
        if args.loop:
            started = time.perf_counter()
            for i, scale in enumerate(scales[: args.loop]):
                one_merge(scale, f"loop{i}")
            loop = time.perf_counter() - started
            print(
                f"loop of {args.loop} merges: {loop:7.2f} s = {loop / single:.2f}× one merge "
                f"({loop / swept:.1f}× the sweep's merge part)"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
