"""Properties of the per-tensor data-free methods (TSV-M, Iso-C, Iso-CTS, WUDI, Model Stock,
SLERP, magnitude pruning) on the parity fixture; parity itself is in test_parity.py."""

import json

import pytest
import torch

from clipship.errors import ClipshipError, MethodError
from clipship.merge import merge
from clipship.merge.methods.iso_cts import iso_cts_matrix, subspace_sizes
from clipship.merge.methods.task_singular_vector import tsv_matrix
from clipship.merge.methods.wudi import interference_terms

from .conftest import FIXTURE, load_weights, write_model

pytestmark = pytest.mark.numerics  # run again under other threads/ISA (Makefile)

PRE = FIXTURE / "pretrained"
POS = "vision_model.embeddings.position_embedding.weight"
FC1 = "vision_model.encoder.layers.0.mlp.fc1.weight"
NORM = "vision_model.encoder.layers.0.layer_norm1.weight"


def run(tmp_path, method, tasks, params=None, name="out", **kwargs):
    models = {t: str(FIXTURE / t) for t in tasks}
    merge(str(PRE), models, method, tmp_path / name, params, vision_only=True, **kwargs)
    return load_weights(tmp_path / name)


def weights(task):
    return load_weights(FIXTURE / task)


@pytest.mark.parametrize("t, endpoint", [(0.0, "task_a"), (1.0, "task_b")])
def test_slerp_endpoints_are_the_two_models_exactly(tmp_path, t, endpoint):
    out = run(tmp_path, "slerp", ["task_a", "task_b"], {"t": t})
    expected = weights(endpoint)
    assert all(torch.equal(out[k], expected[k]) for k in expected)


def test_slerp_of_collinear_tensors_falls_back_to_linear(tmp_path):
    a = weights("task_a")
    scaled = write_model(tmp_path / "scaled", {k: 2 * v for k, v in a.items()}, FIXTURE / "task_a")
    merge(
        str(PRE),
        {"a": str(FIXTURE / "task_a"), "b": str(scaled)},
        "slerp",
        tmp_path / "o",
        {"t": 0.25},
        vision_only=True,
    )
    out = load_weights(tmp_path / "o")
    assert all(torch.equal(out[k], 0.75 * a[k] + 0.25 * (2 * a[k])) for k in a)


def test_magnitude_prune_rules(tmp_path):
    pre, ft = load_weights(PRE), weights("task_d")
    out = run(tmp_path, "magnitude_prune", ["task_d"], {"rescale": "null"})
    delta = out[FC1] - pre[FC1]
    # exactly half of each row's entries pruned: the smaller-|τ| half
    cols = delta.shape[1]
    assert ((delta == 0).sum(dim=1) == cols // 2).all()
    tau = (ft[FC1] - pre[FC1]).abs()
    kept = delta != 0
    assert (
        tau[kept].reshape(-1, cols // 2).min(1).values
        >= tau[~kept].reshape(-1, cols // 2).max(1).values
    ).all()
    assert torch.equal(out[NORM], pre[NORM]) and torch.equal(out[POS], pre[POS])
    # FusionBench's packaged default rescale=false multiplies the deltas by 0
    default = run(tmp_path, "magnitude_prune", ["task_d"], name="default")
    assert all(torch.equal(default[k], pre[k]) for k in default)
    doubled = run(tmp_path, "magnitude_prune", ["task_d"], {"rescale": True}, name="doubled")
    assert torch.allclose(doubled[FC1] - pre[FC1], 2 * delta, atol=1e-6)


def test_model_stock_of_identical_models_is_that_model(tmp_path):
    copy = tmp_path / "copy"
    write_model(copy, weights("task_a"), FIXTURE / "task_a")
    merge(
        str(PRE),
        {"a": str(FIXTURE / "task_a"), "b": str(copy)},
        "model_stock",
        tmp_path / "ms",
        vision_only=True,
    )
    out = load_weights(tmp_path / "ms")
    a = weights("task_a")
    assert max((out[k] - a[k]).abs().max().item() for k in a) < 1e-6


def test_tsv_of_one_task_is_that_task_vector():
    tau = torch.randn(48, 32, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(tsv_matrix([tau]), tau, atol=1e-5)


def test_tsv_keeps_each_tasks_top_share_of_the_rank():
    # r = 8 over 3 tasks: k = int(8 · 1/3) = 2 directions each, so the merge has rank 6
    g = torch.Generator().manual_seed(0)
    taus = [torch.randn(30, 8, generator=g) for _ in range(3)]
    merged = tsv_matrix(taus)
    assert merged.shape == (30, 8) and torch.linalg.matrix_rank(merged) == 6


def test_exclude_keys_average_the_named_matrix(tmp_path):
    pre = load_weights(PRE)
    out = run(
        tmp_path,
        "task_singular_vector",
        ["task_a", "task_b"],
        {"exclude_keys": POS.removeprefix("vision_model.")},
    )
    a, b = weights("task_a")[POS] - pre[POS], weights("task_b")[POS] - pre[POS]
    assert torch.equal(out[POS], a + (b - a) / 2 + pre[POS])
    plain = run(tmp_path, "task_singular_vector", ["task_a", "task_b"], name="plain")
    assert not torch.equal(plain[POS], out[POS])


def test_iso_cts_subspace_sizes_and_too_small_common_space():
    assert subspace_sizes(64, 4, 0.8) == (52, 3)
    common, per_task = subspace_sizes(17, 4, 0.8)
    assert common + 4 * per_task == 17  # the task spaces divide evenly, the rest is common
    taus = [torch.randn(64, 64, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    with pytest.raises(MethodError, match="common_space_fraction"):
        iso_cts_matrix(taus, 0.0, "w")  # round(64/5)·5 = 65 > 64


def test_wudi_gradient_equals_autograd_of_fusionbench_loss():
    g = torch.Generator().manual_seed(0)
    taus = [torch.randn(24, 40, generator=g, dtype=torch.float64) for _ in range(3)]
    delta = torch.randn(24, 40, generator=g, dtype=torch.float64, requires_grad=True)
    tvs = torch.stack(taus)
    norms = torch.square(torch.norm(tvs.reshape(3, -1), p=2, dim=-1))
    product = torch.matmul(delta.unsqueeze(0) - tvs, tvs.transpose(1, 2))
    torch.sum(torch.square(product) / norms[:, None, None]).backward()
    gram, cross = interference_terms(tvs)
    assert torch.allclose(2 * (delta.detach() @ gram - cross), delta.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["wudi", "iso_cts", "model_stock"])
def test_same_inputs_same_bytes_and_key_order_does_not_matter(tmp_path, method):
    params = {"iter_num": 20} if method == "wudi" else None
    first = run(tmp_path, method, ["task_a", "task_b", "task_c"], params, name="one")
    again = run(tmp_path, method, ["task_a", "task_b", "task_c"], params, name="two")
    assert all(torch.equal(first[k], again[k]) for k in first)
    a = weights("task_a")
    shuffled = write_model(tmp_path / "rev", dict(reversed(list(a.items()))), FIXTURE / "task_a")
    models = {
        "task_a": str(shuffled),
        "task_b": str(FIXTURE / "task_b"),
        "task_c": str(FIXTURE / "task_c"),
    }
    merge(str(PRE), models, method, tmp_path / "three", params, vision_only=True)
    third = load_weights(tmp_path / "three")
    assert all(torch.equal(first[k], third[k]) for k in first)


@pytest.mark.parametrize(
    "method, tasks, params, message",
    [
        ("slerp", ["task_a", "task_b", "task_c"], None, "exactly 2 fine-tuned"),
        ("magnitude_prune", ["task_a", "task_b"], None, "exactly 1 fine-tuned"),
        ("model_stock", ["task_a"], None, "at least 2"),
        ("task_singular_vector", ["task_a", "task_b"], {"alpha": [1, 2, 3]}, "3 alphas"),
        ("magnitude_prune", ["task_a"], {"extract_names": ".*layer_norm1.weight"}, "1-D"),
        ("iso_cts", ["task_a"], {"common_space_fraction": 2}, "must be in"),
        ("magnitude_prune", ["task_a"], {"rescale": "maybe"}, "rescale"),
    ],
)
def test_bad_parameters_and_pools_are_one_clear_error(tmp_path, method, tasks, params, message):
    with pytest.raises(MethodError, match=message):
        run(tmp_path, method, tasks, params)
    assert not (tmp_path / "out").exists()


def test_device_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ClipshipError, match="no CUDA GPU"):
        run(tmp_path, "wudi", ["task_a"], device="cuda")


def test_an_svd_that_fails_to_converge_is_redone_transposed_then_in_float64(monkeypatch):
    from clipship.merge import matrices

    real = torch.linalg.svd

    tau = torch.randn(20, 12, generator=torch.Generator().manual_seed(0))
    for failing in ({tau.shape}, {tau.shape, tau.T.shape}):  # as LAPACK's sgesdd can, on
        # near-repeated singular values: the transpose is tried, then float64

        def flaky(matrix, full_matrices=True, failing=failing):
            if matrix.dtype == torch.float32 and matrix.shape in failing:
                raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
            return real(matrix, full_matrices=full_matrices)

        monkeypatch.setattr(torch.linalg, "svd", flaky)
        u, s, vh = matrices.svd(tau)
        assert u.shape == (20, 12) and vh.shape == (12, 12)
        assert u.dtype == s.dtype == vh.dtype == torch.float32
        assert torch.allclose(u @ torch.diag(s) @ vh, tau, atol=1e-5)


def test_iso_c_flattens_the_spectrum_of_the_summed_task_matrices():
    from clipship.merge.methods.iso_c import iso_c_matrix

    total = torch.randn(40, 24, generator=torch.Generator().manual_seed(1))
    s = torch.linalg.svdvals(iso_c_matrix(total))
    assert torch.allclose(s, torch.full_like(s, torch.linalg.svdvals(total).mean()), rtol=1e-4)


def test_wudi_without_steps_is_the_sum_for_matrices_and_the_mean_elsewhere(tmp_path):
    pre = load_weights(PRE)
    out = run(tmp_path, "wudi", ["task_a", "task_b"], {"iter_num": 0})
    a, b = weights("task_a"), weights("task_b")
    assert torch.allclose(out[FC1], pre[FC1] + (a[FC1] - pre[FC1]) + (b[FC1] - pre[FC1]), atol=1e-6)
    mean = ((a[NORM] - pre[NORM]) + (b[NORM] - pre[NORM])) / 2
    assert torch.allclose(out[NORM], pre[NORM] + mean, atol=1e-6)


def test_cli_list_parameters_and_recipe_replay_are_byte_identical(tmp_path):
    from typer.testing import CliRunner

    from clipship.cli import app

    pool = [a for t in ("task_a", "task_b") for a in ("--model", f"{t}={FIXTURE / t}")]
    runner = CliRunner()
    first = runner.invoke(
        app,
        [
            "merge",
            "--pretrained",
            str(PRE),
            *pool,
            "--method",
            "wudi",
            "--out",
            str(tmp_path / "a"),
            "--param",
            "iter_num=30",
            "--param",
            f"exclude_keys={POS},{FC1}",
            "--quiet",
        ],
    )
    assert first.exit_code == 0, first.output
    recipe = tmp_path / "a" / "clipship_recipe.json"
    assert json.loads(recipe.read_text())["parameters"]["exclude_keys"] == [POS, FC1]
    again = runner.invoke(
        app,
        [
            "merge",
            "--recipe",
            str(recipe),
            "--pretrained",
            str(PRE),
            *pool,
            "--out",
            str(tmp_path / "b"),
            "--quiet",
        ],
    )
    assert again.exit_code == 0, again.output
    assert (tmp_path / "a/model.safetensors").read_bytes() == (
        tmp_path / "b/model.safetensors"
    ).read_bytes()


def test_wudi_adam_is_torch_adams_single_tensor_step_bit_for_bit():
    from clipship.merge.methods.wudi import adam_on_quadratic

    g = torch.Generator().manual_seed(3)
    taus = torch.randn(3, 16, 24, generator=g) * 0.01
    gram, cross = interference_terms(taus)
    start = torch.sum(taus, dim=0)
    ours = adam_on_quadratic(start.clone(), gram, cross, 25, 1e-3)
    delta = torch.nn.Parameter(start.clone())
    optimizer = torch.optim.Adam([delta], lr=1e-3, weight_decay=0, foreach=False)
    for _ in range(25):
        delta.grad = torch.addmm(cross, delta.detach(), gram, beta=-2, alpha=2)
        optimizer.step()
    assert torch.equal(ours, delta.detach())
