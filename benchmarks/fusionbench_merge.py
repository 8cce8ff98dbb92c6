"""Run FusionBench 0.2.33's own implementation of one merge method on a clipship pool file, for
`merge_memory.py --fusionbench PYTHON` to time side by side. Runs under FusionBench's virtualenv
(clipship is never imported there, nor FusionBench in clipship's):

    PYTHON benchmarks/fusionbench_merge.py METHOD POOL.yaml [EXAMPLES]

Parameters are FusionBench's packaged defaults, the ones clipship registers. The merged model is
not saved: the figure is FusionBench's merge itself (load the pool, merge), as its CLI runs it.
RegMean reads each task's training images from ``data/<task>`` beside the pool file (the pool's
task models are named after FusionBench's tasks, whose class names give the zero-shot heads),
``EXAMPLES`` per task in batches of 16.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

NOT_WIRED = 3  # exit status merge_memory.py reads as "no counterpart"


def algorithm(method: str, n_models: int):
    import fusion_bench.method as fb

    table = {
        "simple_average": lambda: fb.SimpleAverageAlgorithm(),
        "task_arithmetic": lambda: fb.TaskArithmeticAlgorithm(scaling_factor=0.3),
        "ties": lambda: fb.TiesMergingAlgorithm(
            scaling_factor=0.3, threshold=20, remove_keys=[], merge_func="sum"
        ),
        "magmax": lambda: fb.MagMaxAlgorithm(scaling_factor=1.0),
        "weighted_average": lambda: fb.WeightedAverageAlgorithm(
            normalize=True, weights=[1.0] * n_models
        ),
        "dare": lambda: fb.DareTaskArithmetic(
            scaling_factor=0.3, sparsity_ratio=0.5, only_on_linear_weights=False, rescale=True
        ),
        "task_singular_vector": lambda: fb.TaskSingularVectorMerging(alpha=1),
        "iso_c": lambda: fb.ISO_C_Merge(scaling_factor=1.0),
        "iso_cts": lambda: fb.ISO_CTS_Merge(scaling_factor=1.0, common_space_fraction=0.8),
        "wudi": lambda: fb.WUDIMerging(iter_num=400),
        "model_stock": lambda: fb.ModelStock(ignore_keys=[]),
        "slerp": lambda: fb.SlerpMergeAlgorithm(t=0.5),
        "magnitude_prune": lambda: fb.MagnitudeDiffPruningAlgorithm(prune_ratio=0.5, rescale=False),
    }
    if method not in table:
        print(f"no FusionBench counterpart wired for {method}", file=sys.stderr)
        raise SystemExit(NOT_WIRED)
    return table[method]()


def data_aware(method: str, pool_file: Path, members: dict[str, str], examples: int) -> None:
    """RegMean with FusionBench's own classes: the pool built with its training sets and
    processor, in a fresh working folder (its head cache is ``./outputs``)."""
    import os
    import tempfile

    import torch
    import transformers.models.clip.modeling_clip as modeling_clip

    if not hasattr(modeling_clip, "CLIPVisionTransformer"):  # transformers 5: type hints only
        modeling_clip.CLIPVisionTransformer = type("CLIPVisionTransformer", (torch.nn.Module,), {})
    import fusion_bench.method as fb
    from fusion_bench.modelpool import CLIPVisionModelPool
    from omegaconf import DictConfig

    if method != "regmean":
        print(f"no FusionBench counterpart wired for {method}", file=sys.stderr)
        raise SystemExit(NOT_WIRED)
    names = [n for n in members if n != "_pretrained_"]
    data = {n: str(pool_file.parent / "data" / n) for n in names}
    os.chdir(tempfile.mkdtemp(prefix="fusionbench-"))
    pool = CLIPVisionModelPool(
        DictConfig(members), train_datasets=DictConfig(data), processor=members["_pretrained_"]
    )
    algorithm = fb.RegMeanAlgorithmForCLIP(
        exclude_param_names_regex=[],
        num_regmean_examples=examples,
        weight_transpose=True,
        reduce_non_diagonal_ratio=0.95,
        dataloader_kwargs={"batch_size": 16, "num_workers": 0},
    )
    algorithm.run(pool)


def main() -> None:
    method, pool_file = sys.argv[1], Path(sys.argv[2])
    from fusion_bench.modelpool import CLIPVisionModelPool

    members = {k: str(v) for k, v in yaml.safe_load(pool_file.read_text())["models"].items()}
    if method in ("regmean", "regmean_plusplus", "fisher_merging", "adamerging"):
        return data_aware(method, pool_file, members, int(sys.argv[3]))
    names = [n for n in members if n != "_pretrained_"]
    if method == "slerp":  # two task models, no base
        members = {n: members[n] for n in names[:2]}
    elif method == "magnitude_prune":  # the base and one task model
        members = {"_pretrained_": members["_pretrained_"], names[0]: members[names[0]]}
    algorithm(method, len(names)).run(CLIPVisionModelPool(models=members))


if __name__ == "__main__":
    main()
