"""Properties every merge must have, and TIES against a flat implementation of SPEC §2."""

import pytest
import torch

from clipship.merge import engine, merge

from .conftest import FIXTURE, TASKS, load_weights, max_abs_diff, write_model

PRE = FIXTURE / "pretrained"


def vision(weights):
    return {k: v for k, v in weights.items() if k.startswith("vision_model.")}


def merged(tmp_path, name, pretrained, models, method, params=None):
    merge(
        str(pretrained),
        {k: str(v) for k, v in models.items()},
        method,
        tmp_path / name,
        params,
        vision_only=True,
    )
    return load_weights(tmp_path / name)


def test_task_arithmetic_with_one_task_and_lambda_1_is_that_task(tmp_path):
    out = merged(
        tmp_path,
        "ta",
        PRE,
        {"task_a": FIXTURE / "task_a"},
        "task_arithmetic",
        {"scaling_factor": 1},
    )
    assert max_abs_diff(out, load_weights(FIXTURE / "task_a")) <= 1e-7


def test_simple_average_of_identical_models_is_the_model(tmp_path):
    models = {f"copy{i}": FIXTURE / "task_b" for i in range(3)}
    out = merged(tmp_path, "avg", PRE, models, "simple_average")
    assert max_abs_diff(out, load_weights(FIXTURE / "task_b")) <= 1e-7


@pytest.mark.parametrize("merge_func", ["mean", "sum", "max"])
def test_ties_keeping_everything_with_one_task_is_that_task(tmp_path, merge_func):
    params = {"scaling_factor": 1.0, "threshold": 100, "merge_func": merge_func}
    out = merged(tmp_path, "ties", PRE, {"task_d": FIXTURE / "task_d"}, "ties", params)
    assert max_abs_diff(out, load_weights(FIXTURE / "task_d")) <= 1e-7


@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "magmax", "dare"])
def test_result_does_not_depend_on_key_layout(tmp_path, method):
    bare = {}
    for task in TASKS:
        weights = load_weights(FIXTURE / task)
        bare[task] = write_model(
            tmp_path / f"bare_{task}",
            {k.removeprefix("vision_model."): v for k, v in weights.items()},
            FIXTURE / task,
        )
    prefixed = {t: FIXTURE / t for t in TASKS}
    merge(
        str(PRE), {k: str(v) for k, v in prefixed.items()}, method, tmp_path / "a", vision_only=True
    )
    merge(str(PRE), {k: str(v) for k, v in bare.items()}, method, tmp_path / "b", vision_only=True)
    assert (tmp_path / "a/model.safetensors").read_bytes() == (
        tmp_path / "b/model.safetensors"
    ).read_bytes()


def reference_ties(pretrained, tasks, threshold, merge_func, scaling_factor):
    """SPEC §2 written out on flattened vectors, as FusionBench computes it."""
    keys = sorted(pretrained)
    flat_pre = torch.cat([pretrained[k].reshape(-1) for k in keys])
    vectors = torch.stack([torch.cat([t[k].reshape(-1) for k in keys]) for t in tasks]) - flat_pre
    d = vectors.shape[1]
    k = d - int(d * (threshold / 100 if threshold > 1 else threshold))
    if k > 0:
        kth = vectors.abs().kthvalue(k, dim=1, keepdim=True).values
        vectors = vectors * (vectors.abs() >= kth)
    sign = torch.sign(vectors.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())
    selected = vectors * torch.where(sign > 0, vectors > 0, vectors < 0)
    if merge_func == "sum":
        agg = selected.sum(dim=0)
    elif merge_func == "mean":
        agg = selected.sum(dim=0) / torch.clamp((selected != 0).sum(dim=0).float(), min=1)
    else:
        agg = selected.abs().max(dim=0)[0] * sign
    flat = flat_pre + scaling_factor * agg
    out, start = {}, 0
    for key in keys:
        n = pretrained[key].numel()
        out[key] = flat[start : start + n].reshape(pretrained[key].shape)
        start += n
    return out


@pytest.mark.parametrize("majority", [1, -1])
@pytest.mark.parametrize("merge_func", ["sum", "mean", "max"])
def test_ties_exact_cancellations_use_the_majority_sign(
    tmp_path, monkeypatch, majority, merge_func
):
    """task_b = −task_a exactly, so many elected sums are exactly 0 and take the majority sign,
    which c and d (all one sign) decide. Small pieces make the settle-and-revisit path run."""
    monkeypatch.setattr(engine, "CHUNK", 777)
    zero = {
        k: torch.zeros_like(v) if k.startswith("vision_model.") else v
        for k, v in load_weights(PRE).items()
    }
    pre = write_model(tmp_path / "pre", zero, PRE)
    a = load_weights(FIXTURE / "task_a")
    c, d = load_weights(FIXTURE / "task_c"), load_weights(FIXTURE / "task_d")
    tasks = {
        "a": a,
        "b": {k: -v for k, v in a.items()},
        "c": {k: majority * v.abs() for k, v in c.items()},
        "d": {k: majority * v.abs() for k, v in d.items()},
    }
    folders = {n: write_model(tmp_path / n, t, FIXTURE / "task_a") for n, t in tasks.items()}
    params = {"scaling_factor": 0.3, "threshold": 20, "merge_func": merge_func}
    out = merged(tmp_path, "out", pre, folders, "ties", params)
    expected = reference_ties(vision(zero), list(tasks.values()), 20, merge_func, 0.3)
    assert max_abs_diff(out, expected) == 0.0


@pytest.mark.parametrize("threshold", [100, 1, 0.5, 73.3])
def test_ties_thresholds_match_the_flat_reference(tmp_path, fixture_pool, threshold):
    out = merged(tmp_path, "out", *fixture_pool, "ties", {"threshold": threshold})
    pre = vision(load_weights(PRE))
    tasks = [load_weights(FIXTURE / t) for t in TASKS]
    assert max_abs_diff(out, reference_ties(pre, tasks, threshold, "sum", 0.3)) <= 1e-6
