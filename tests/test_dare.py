"""DARE: drop rate, exact rescale, seeding, and independence from processing order."""

import pytest
import torch

from clipship.merge import engine, merge
from clipship.merge.methods.dare import BLOCK, dropped, random_drop, uniform
from clipship.merge.registry import TensorInputs

from .conftest import FIXTURE, TASKS, load_weights


def test_drop_rate_and_exact_rescale_on_a_large_tensor():
    tau = torch.randn(3 * BLOCK + 12345, generator=torch.Generator().manual_seed(0))
    for p in (0.1, 0.5, 0.9):
        draws = uniform(0, "task", "layer.weight", tau.numel(), 0, tau.numel())
        out = random_drop(tau, p, True, draws)
        kept = out != 0
        assert abs((1 - kept.float().mean().item()) - p) < 0.01
        assert torch.equal(out[kept], tau[kept] / (1 - p))
        assert torch.equal(random_drop(tau, p, False, draws)[kept], tau[kept])


def test_draws_for_a_piece_equal_that_slice_of_the_whole_tensor():
    n = 2 * BLOCK + 999
    whole = uniform(3, "svhn", "w", n, 0, n)
    for start, count in [(0, 10), (BLOCK - 5, 10), (BLOCK + 1, BLOCK), (n - 7, 7)]:
        assert torch.equal(uniform(3, "svhn", "w", n, start, count), whole[start : start + count])
    assert not torch.equal(uniform(4, "svhn", "w", n, 0, n), whole)
    assert not torch.equal(uniform(3, "mnist", "w", n, 0, n), whole)
    assert not torch.equal(uniform(3, "svhn", "v", n, 0, n), whole)


def test_a_tasks_mask_does_not_depend_on_its_place_in_the_pool():
    g = torch.Generator().manual_seed(0)
    pre, a, b = (
        torch.randn(500, generator=g),
        torch.randn(500, generator=g),
        torch.randn(500, generator=g),
    )
    one = dropped(
        TensorInputs("w", pre, torch.stack([a, b]), ["a", "b"], 7, 0, (500,)), 0.5, True, False
    )
    two = dropped(
        TensorInputs("w", pre, torch.stack([b, a]), ["b", "a"], 7, 0, (500,)), 0.5, True, False
    )
    assert torch.equal(one.task_vectors[0], two.task_vectors[1])
    assert torch.equal(one.task_vectors[1], two.task_vectors[0])


def run(tmp_path, name, params, seed=0, models=None):
    pool = {t: str(FIXTURE / t) for t in (models or TASKS)}
    merge(
        str(FIXTURE / "pretrained"),
        pool,
        "dare",
        tmp_path / name,
        params,
        seed=seed,
        vision_only=True,
    )
    return (tmp_path / name / "model.safetensors").read_bytes()


@pytest.mark.parametrize("base", ["task_arithmetic", "ties", "simple_average"])
def test_seeded_and_independent_of_piece_size(tmp_path, monkeypatch, base):
    params = {"base": base, "sparsity_ratio": 0.5}
    first = run(tmp_path, "a", params, seed=1)
    assert run(tmp_path, "b", params, seed=1) == first
    assert run(tmp_path, "c", params, seed=2) != first
    monkeypatch.setattr(engine, "CHUNK", 1000)
    assert run(tmp_path, "d", params, seed=1) == first


@pytest.mark.parametrize("base", ["task_arithmetic", "ties"])
def test_with_nothing_dropped_it_is_the_base_method(tmp_path, base):
    dare = run(tmp_path, "dare", {"base": base, "sparsity_ratio": 0.0})
    merge(
        str(FIXTURE / "pretrained"),
        {t: str(FIXTURE / t) for t in TASKS},
        base,
        tmp_path / "base",
        vision_only=True,
    )
    assert dare == (tmp_path / "base/model.safetensors").read_bytes()


def test_drop_rate_end_to_end(tmp_path):
    run(
        tmp_path,
        "one",
        {"base": "task_arithmetic", "sparsity_ratio": 0.3, "scaling_factor": 1.0},
        models=["task_a"],
    )
    out, pre = load_weights(tmp_path / "one"), load_weights(FIXTURE / "pretrained")
    task = load_weights(FIXTURE / "task_a")
    same = changed = 0
    for name, value in out.items():
        moved = task[name] != pre[name]
        same += int(((value == pre[name]) & moved).sum())
        changed += int(moved.sum())
    assert abs(same / changed - 0.3) < 0.01


def test_only_linear_weights_leaves_other_tensors_undropped(tmp_path):
    params = {"base": "task_arithmetic", "sparsity_ratio": 0.9, "only_on_linear_weights": True}
    run(tmp_path, "lin", params)
    merge(
        str(FIXTURE / "pretrained"),
        {t: str(FIXTURE / t) for t in TASKS},
        "task_arithmetic",
        tmp_path / "ta",
        vision_only=True,
    )
    lin, ta = load_weights(tmp_path / "lin"), load_weights(tmp_path / "ta")
    for name in lin:
        linear = lin[name].dim() == 2 and ".embeddings." not in name
        assert torch.equal(lin[name], ta[name]) != linear, name
