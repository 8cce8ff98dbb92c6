"""`clipship sweep`: each point equals its own merge and evaluation, the best is `clipship merge`'s
bytes and replays from its recipe, validation rows are FusionBench's (or a stratified hold-out of
train, never test), a resumed or a torchrun sweep writes the same sweep.json, and bad input is one
error line. On the data-aware fixture: a tiny CLIP, three built-in tasks with 64 train and 64 test
images each (local parquet)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from clipship.eval import sweep as sweeping
from clipship.eval.evaluate import evaluate
from clipship.merge.engine import merge, merge_direction, merge_from_recipe
from clipship.merge.registry import combine, get_method
from clipship.pool import open_pool
from clipship.progress import Bars
from clipship.runtime.data import ImageSource
from clipship.runtime.tasks import get_tasks, with_local_data

from .conftest import DATA, run_cli

HERE = DATA / "dataaware" / "fixture"
PRETRAINED = DATA / "evalref" / "fixture" / "pretrained"
NAMES = ["mnist", "svhn", "eurosat"]
MODELS = {name: str(HERE / name) for name in NAMES}
POOL = ["--pretrained", str(PRETRAINED)] + [f"--model={n}={HERE / n}" for n in NAMES]
COMMON = [*POOL, "--data-dir", HERE / "data", "--device", "cpu", "--workers", "0", "-q"]


def sweep_cli(out, *args):
    return run_cli("sweep", *COMMON, "--out", out, *args)


def tasks():
    return with_local_data(get_tasks(NAMES), HERE / "data")


def test_points_report_their_merge_and_best_is_merges_bytes(tmp_path, monkeypatch):
    real, decoded = sweeping.decode, []
    monkeypatch.setattr(sweeping, "decode", lambda split, *a: decoded.append(1) or real(split, *a))
    ran = sweep_cli(
        tmp_path / "s",
        "--method", "ties", "--grid", "scaling_factor=0.2:1.0:0.4", "--grid", "threshold=20,60",
        "--report-test", "--json",
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    # one pool pass per threshold (λ made from M), images decoded once per task and split
    assert json.loads(ran.stdout)["timings"]["pool_passes"] == 2
    assert len(decoded) == 2 * len(NAMES)
    report = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert [p["parameters"] for p in report["points"]] == [
        {"scaling_factor": s, "threshold": t} for s in (0.2, 0.6, 1.0) for t in (20.0, 60.0)
    ]
    assert report["selection"]["split"] == "validation" and not report["selection"]["on_test_data"]
    for name in NAMES:  # FusionBench's validation split: int(64 · 0.1) train images
        assert report["selection"]["tasks"][name]["images"] == 6
        assert report["selection"]["tasks"][name]["source"] == "FusionBench's validation split"
    # each point's test scores are `clipship eval` of `clipship merge` at that point
    for point in report["points"][::3]:
        folder = tmp_path / f"p{len(list(tmp_path.iterdir()))}"
        merge(str(PRETRAINED), MODELS, "ties", folder, point["parameters"])
        evaluated = evaluate(str(folder), tasks(), device="cpu", workers=0)
        for name in NAMES:
            assert point["test"][name]["accuracy"] == evaluated.to_json()[name]["accuracy"]
            assert point["test"][name]["loss"] == pytest.approx(
                evaluated.to_json()[name]["loss"], abs=1e-6
            )
    # the best point is the highest validation average; best/ holds merge's bytes
    averages = [p["validation"]["average"]["accuracy"] for p in report["points"]]
    assert averages[report["best"]["index"]] == max(averages)
    chosen = report["best"]["parameters"]
    merge(str(PRETRAINED), MODELS, "ties", tmp_path / "again", chosen)
    best = tmp_path / "s" / "best"
    weights = (best / "model.safetensors").read_bytes()
    assert weights == (tmp_path / "again" / "model.safetensors").read_bytes()
    recipe = json.loads((best / "clipship_recipe.json").read_text())
    assert recipe["sweep"]["chosen"] == chosen and recipe["sweep"]["select_on"] == "validation"
    assert recipe["sweep"]["grid"] == {"scaling_factor": [0.2, 0.6, 1.0], "threshold": [20, 60]}
    merge_from_recipe(best / "clipship_recipe.json", tmp_path / "replay", str(PRETRAINED), MODELS)
    assert (tmp_path / "replay" / "model.safetensors").read_bytes() == weights
    assert "| **" in (best.parent / "sweep.md").read_text()
    assert (best.parent / "sweep.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "method, values",
    [
        ("task_arithmetic", {}),
        ("ties", {"threshold": 30.0, "merge_func": "mean"}),
        ("dare", {"base": "ties", "sparsity_ratio": 0.3}),
        ("dare", {"base": "task_arithmetic", "sparsity_ratio": 0.5}),
        ("magmax", {}),
        ("iso_c", {}),
        ("iso_cts", {"common_space_fraction": 0.5}),
        ("task_singular_vector", {}),
    ],
)
def test_one_direction_gives_every_scale_with_merges_bits(tmp_path, method, values):
    """θ_pre + M·λ from one pass equals `merge` at each λ, bit for bit."""
    spec = get_method(method)
    pool = open_pool(str(PRETRAINED), MODELS)
    try:
        resolved = spec.resolve(values)
        direction, _ = merge_direction(pool, spec, resolved, 7, Bars(True))
        for scale in (0.35, 1.7):
            out = merge(str(PRETRAINED), MODELS, method, tmp_path / f"{scale}",
                        {**values, spec.scale: scale}, seed=7, vision_only=True)  # fmt: skip
            merged = load_file(out.out / "model.safetensors")
            for name in pool.float_names():
                theta = pool.pretrained.read(name).to(torch.float32).reshape(-1)
                made = combine(theta, direction[name].reshape(-1), scale)
                stored = merged[pool.pretrained.vision_keys[name]].reshape(-1)
                assert torch.equal(made.to(stored.dtype), stored), name
    finally:
        pool.close()


def test_methods_say_what_is_cheap_to_sweep():
    ran = run_cli("methods", "--json")
    rows = {r["name"]: r["cheap_to_sweep"] for r in json.loads(ran.stdout)}
    assert rows["task_arithmetic"] == rows["ties"] == rows["dare"] == ["scaling_factor"]
    assert rows["task_singular_vector"] == ["alpha"]
    assert rows["regmean"] == rows["slerp"] == rows["weight_ensembling_moe"] == []


def test_validation_rows_are_fusionbench_and_stratified_holdouts_of_train():
    # FusionBench's train_validation_split: random_split(train, [n - int(0.1 n), int(0.1 n)])
    for size in (64, 1000, 73257):
        generator = torch.Generator().manual_seed(0)
        held = int(size * 0.1)
        _, theirs = torch.utils.data.random_split(range(size), [size - held, held], generator)
        assert sweeping.fusionbench_rows(size, 0.1, None, 0) == theirs.indices
    labels = [i % 5 for i in range(103)] + [7]  # a class of one image keeps it in train
    rows = sweeping.stratified_rows(labels, 0.2, 3, "t")
    assert rows == sweeping.stratified_rows(labels, 0.2, 3, "t")
    assert rows != sweeping.stratified_rows(labels, 0.2, 4, "t")
    assert rows != sorted(rows)  # shuffled: a --limit takes from every class
    counts = [sum(1 for r in rows if labels[r] == c) for c in (0, 1, 2, 3, 4, 7)]
    assert counts == [4, 4, 4, 4, 4, 0]  # round(21 · 0.2) or round(20 · 0.2) per class
    task = tasks()[0]
    split = sweeping.selection_split(task, "validation", 0.25, 0, None)
    assert split.source == "train" and split.record["source"] == "stratified hold-out"
    labels = ImageSource(task, "train").labels()
    for c in set(labels):
        assert sum(labels[r] == c for r in split.rows) == pytest.approx(
            0.25 * labels.count(c), abs=1
        )


def test_hub_sources_hold_out_fusionbench_rows_through_load_dataset():
    """A built-in task read from its hub source (``datasets.load_dataset``; here a local repo
    folder in its place) gets FusionBench's validation rows of its train split."""
    from dataclasses import replace

    task = get_tasks(["mnist"])[0]
    local = replace(task, dataset={**task.dataset, "path": str(HERE / "data" / "mnist")})
    split = sweeping.selection_split(local, "validation", None, 5, None)
    assert split.source == "train" and split.record["source"] == "FusionBench's validation split"
    assert list(split.rows) == sorted(sweeping.fusionbench_rows(64, 0.1, None, 0))
    assert split.record["rule"] == "train_validation_split of train: 0.1, random_split seed 0"


def test_validation_needs_a_train_split(tmp_path):
    folder = HERE / "imagefolder" / "mnist" / "train"
    ran = sweep_cli(tmp_path / "s", "--method", "task_arithmetic", "--grid",
                    "scaling_factor=0.3,0.5", "--task", f"digits={folder}")  # fmt: skip
    assert ran.returncode == 1 and "no training split" in ran.stderr
    assert ran.stderr.count("\n") == 1 and not (tmp_path / "s").exists()


def test_an_interrupted_sweep_resumes_to_the_same_report(tmp_path, monkeypatch):
    args = ["--method", "task_arithmetic", "--grid", "scaling_factor=0.1:0.9:0.2", "--limit", "4"]
    assert sweep_cli(tmp_path / "whole", *args).returncode == 0
    real, calls, fail_at = sweeping.score, [], [7]  # during the third point (three tasks each)

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == fail_at[0]:
            raise RuntimeError("interrupted")
        return real(*a, **k)

    monkeypatch.setattr(sweeping, "score", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        sweep_cli(tmp_path / "part", *args)
    assert not (tmp_path / "part").exists()
    assert len(list((tmp_path / ".part.sweep" / "points").iterdir())) == 2
    calls.clear()
    fail_at[0] = 0
    assert sweep_cli(tmp_path / "part", *args).returncode == 0
    assert len(calls) == 3 * 3  # only the three points left
    assert not (tmp_path / ".part.sweep").exists()
    for name in ("sweep.json", "sweep.md", "best/model.safetensors"):
        assert (tmp_path / "part" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    # a leftover sweep with other settings is not resumed silently
    calls.clear()
    fail_at[0] = 7
    with pytest.raises(RuntimeError, match="interrupted"):
        sweep_cli(tmp_path / "other", *args)
    ran = sweep_cli(tmp_path / "other", *args[:-1], "5")
    assert ran.returncode == 1 and "other settings" in ran.stderr


def test_selecting_on_test_data_takes_a_flag_and_says_so(tmp_path):
    args = ["--method", "task_arithmetic", "--grid", "scaling_factor=0.3,0.6", "--limit", "8"]
    ran = sweep_cli(tmp_path / "s", *args, "--select-on", "test")
    assert ran.returncode == 1 and "--allow-test-selection" in ran.stderr
    assert not (tmp_path / "s").exists()
    ran = sweep_cli(tmp_path / "s", *args, "--select-on", "test", "--allow-test-selection")
    assert ran.returncode == 0, ran.stderr
    report = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert report["selection"]["on_test_data"] and "TEST" in report["selection"]["warning"]
    assert "Warning" in (tmp_path / "s" / "sweep.md").read_text()
    recipe = json.loads((tmp_path / "s" / "best" / "clipship_recipe.json").read_text())
    assert recipe["sweep"]["select_on"] == "test" and "warning" in recipe["sweep"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "ties"], "empty grid"),
        (["--method", "ties", "--grid", "scaling_factor="], "no values"),
        (["--method", "ties", "--grid", "scaling_factor=1.0:0.1:0.1"], "stop ≥ start"),
        (["--method", "ties", "--grid", "sparsity_ratio=0.1,0.2"], "no parameter"),
        (["--method", "ties", "--grid", "threshold=10,300"], "threshold"),
        (["--method", "ties", "--grid", "scaling_factor=0.1,0.1"], "listed twice"),
        (["--method", "ties", "--grid", "threshold=10,20", "--threshold", "5"], "both swept"),
        (["--method", "task_arithmetic", "--grid", "scaling_factor=0.1", "--val-fraction", "1"],
         "between 0 and 1"),
        (["--method", "task_arithmetic", "--grid", "scaling_factor=0.1", "--val-fraction", "0"],
         "between 0 and 1"),
        (["--method", "task_arithmetic", "--grid", "scaling_factor=0.1", "--select-on", "train"],
         "choose validation or test"),
    ],
)  # fmt: skip
def test_bad_input_is_one_error_line(tmp_path, args, message):
    ran = sweep_cli(tmp_path / "s", *args)
    assert ran.returncode == 1, ran.stdout
    assert ran.stderr.startswith("error: ") and ran.stderr.count("\n") == 1
    assert message in ran.stderr, ran.stderr
    assert not (tmp_path / "s").exists() and not (tmp_path / ".s.sweep").exists()


@pytest.mark.slow
def test_two_processes_under_torchrun_write_the_one_process_report(tmp_path):
    args = [
        "sweep", *COMMON, "--method", "ties", "--grid", "scaling_factor=0.3,0.6,0.9",
        "--val-fraction", "0.3", "--report-test", "--limit", "12",
    ]  # fmt: skip
    env = {**os.environ, "CLIPSHIP_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    for procs in (1, 2):
        run = subprocess.run(
            [*launch, str(procs), "-m", "clipship.cli", *map(str, args), "--out",
             str(tmp_path / f"p{procs}")],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-2000:]
    one = (tmp_path / "p1" / "sweep.json").read_text()
    assert (tmp_path / "p2" / "sweep.json").read_text() == one
    assert json.loads(one)["selection"]["tasks"]["mnist"]["source"] == "stratified hold-out"


def test_an_l_lora_pool_sweeps_through_merges_adapter_space(tmp_path):
    """An L-LoRA pool merges in adapter space (``merge/linearized.py``): its points are merged
    one by one (no direction in weight space), and score what `merge` writes."""
    from .conftest import FIXTURE

    lora, pretrained = DATA / "l_lora", FIXTURE / "pretrained"
    data = HERE / "data" / "mnist"
    taskfile = tmp_path / "tasks.json"
    taskfile.write_text(json.dumps({"tasks": {
        t: {"classnames": [str(i) for i in range(10)], "templates": ["{c}"], "data": str(data)}
        for t in ("task_a", "task_b", "task_c")
    }}))  # fmt: skip
    models = {t: str(lora / t) for t in ("task_a", "task_b", "task_c")}
    ran = run_cli(
        "sweep", "--pretrained", pretrained, *[f"--model={t}={p}" for t, p in models.items()],
        "--taskfile", taskfile, "--method", "ties", "--grid", "scaling_factor=0.5,1.0",
        "--report-test", "--limit", "16", "--device", "cpu", "--workers", "0", "-q", "--json",
        "--out", tmp_path / "s",
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["timings"]["pool_passes"] == 2
    report = json.loads((tmp_path / "s" / "sweep.json").read_text())
    point = report["points"][0]
    merge(str(pretrained), models, "ties", tmp_path / "m", point["parameters"])
    assert (tmp_path / "m" / "l_lora").is_dir()  # merged in adapter space
    from clipship.runtime.tasks import read_taskfile

    evaluated = evaluate(str(tmp_path / "m"), read_taskfile(taskfile), device="cpu", limit=16,
                         workers=0).to_json()  # fmt: skip
    for task in models:
        assert point["test"][task]["accuracy"] == evaluated[task]["accuracy"]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"parameters": {"alpha": {"sweep": [[0.5, 1.0]]}}}, "not a number, boolean or name"),
        ({"parameters": {"alpha": {"sweep": []}}}, "{sweep: [values]}"),
        ({"parameters": {"alpha": {"sweep": [1], "step": 2}}}, "{sweep: [values]}"),
        ({"parameters": {"alpha": 1.0}, "select_on": "test"}, "needs a swept parameter"),
        ({"parameters": {"alpha": {"sweep": [1, 2]}}, "select_on": "test"},
         "allow_test_selection"),
        ({"parameters": {"alpha": {"sweep": [1, 2]}}, "val_fraction": 1.5}, "val_fraction"),
        ({"parameters": {"alpha": {"sweep": [1, -2e39]}}}, "alpha=-2e+39 is not a valid"),
    ],
)  # fmt: skip
def test_release_files_refuse_bad_sweeps(tmp_path, changes, message):
    import yaml

    from clipship.errors import ReleaseConfigError
    from clipship.release_file import read_release_file

    data = {"pool": {"minibench": "smoke"}, "method": "task_singular_vector", **changes}
    path = tmp_path / "release.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ReleaseConfigError, match=re.escape(message)):
        read_release_file(path)
