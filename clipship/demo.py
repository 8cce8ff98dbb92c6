"""``make demo``: the whole pipeline offline on the mini-benchmark (real data, a tiny CLIP).

Builds the mini-benchmark once (cached), merges its task encoders with task arithmetic and
TIES, evaluates the pretrained model, every fine-tuned model and both merges, and prints the
table.
"""

from __future__ import annotations

from pathlib import Path


def run_demo(out: Path, budget: str = "full", force: bool = False) -> str:
    from clipship.minibench.build import build
    from clipship.minibench.run import markdown, run
    from clipship.outputs import check_target

    out = Path(out)
    check_target(out, force)
    pool = build(None, budget, seed=0, quiet=False)
    print(f"pool: {pool} (FusionBench modelpool: {pool / 'pool.yaml'})")
    results = run(pool, ["task_arithmetic", "ties"], out, quiet=False)
    table = markdown(results)
    print()
    print(table)
    merged = out / "merged" / "ties"
    print(f"results: {out}/results.md, results.json, results.png")
    print(f"merged:  {merged}/ (ties, λ=0.3, threshold=20 %)")
    load = f"from transformers import CLIPModel; CLIPModel.from_pretrained('{merged}')"
    print(f'load it: python -c "{load}"')
    return table
