"""WEMoE and E-WEMoE against FusionBench 0.2.33's own runs (tests/data/mixing), fed its recorded
initial routers and data order: the adapted mixture under FusionBench's names, and logits with
per-sample and batch-averaged routing."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from clipship.errors import MethodError
from clipship.merge.dataaware import endless_data, one_pass_data, pixel_batches
from clipship.merge.dataaware.common import zero_shot
from clipship.merge.dataaware.wemoe import (
    MixtureSettings,
    build_mixture,
    fusionbench_state_dict,
    magnitude_prune,
    weight_ensembling_moe,
)
from clipship.pool import open_pool
from clipship.runtime.data import Preprocess
from clipship.runtime.tasks import get_tasks

from .conftest import DATA

FIXTURE = DATA / "dataaware" / "fixture"
PRETRAINED = DATA / "evalref" / "fixture" / "pretrained"
REFERENCE = DATA / "mixing" / "reference"
NAMES = ["mnist", "svhn", "eurosat"]
ALGOS = ["wemoe", "sparse_wemoe"]


def info(algo: str) -> dict:
    return json.loads((REFERENCE / algo / "info.json").read_text())


def settings_of(algo: str, **changes) -> MixtureSettings:
    config = info(algo)["config"]
    sparse = algo == "sparse_wemoe"
    settings = MixtureSettings(
        router_hidden_layers=config["router_hidden_layers"],
        init_lambda=config["init_lambda"],
        tv_prune_ratio=config["tv_prune_ratio"] if sparse else None,
        shared_gate=sparse and config["shared_gate"],
        router_init=load_file(str(REFERENCE / algo / "gate_init.safetensors")),
    )
    return replace(settings, **changes)


@pytest.fixture(scope="module")
def pool():
    pool = open_pool(str(PRETRAINED), {t: str(FIXTURE / t) for t in NAMES})
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def tasks():
    return [replace(t, data=str(FIXTURE / "data" / t.name)) for t in get_tasks(NAMES)]


@pytest.fixture(scope="module")
def preprocess():
    return Preprocess.from_pretrained(PRETRAINED)


def heads_of(algo: str) -> dict[str, torch.Tensor]:
    heads = load_file(str(REFERENCE / algo / "heads.safetensors"))
    return {t: heads[f"head/{t}"] for t in NAMES}


@pytest.fixture(scope="module")
def results(pool, tasks, preprocess):
    out = {}
    for algo in ALGOS:
        config, order = info(algo)["config"], info(algo)["data_order"]
        steps, batch = config["max_steps"], config["batch_size"]
        data = [
            endless_data(t, "test", steps, batch, rows=order[f"test/{t.name}/call0"]) for t in tasks
        ]
        out[algo] = weight_ensembling_moe(
            pool, data, preprocess, heads_of(algo), settings=settings_of(algo),
            batch_reduce=config["batch_reduce"], lr=config["lr"], max_steps=steps,
            use_grad_accumulate=config["use_grad_accumulate"],
        )  # fmt: skip
    return out


@pytest.mark.parametrize("algo", ALGOS)
def test_the_adapted_mixture_matches_fusionbench(results, algo):
    ours = fusionbench_state_dict(results[algo].mixture)
    reference = load_file(str(REFERENCE / algo / "final_state_dict.safetensors"))
    assert set(ours) == set(reference) and len(ours) == 135
    for name, value in reference.items():
        diff = float((ours[name] - value).abs().max())
        assert diff <= 1e-5, (name, diff)  # the routers moved by up to 2e-3 in 20 steps
    initial = load_file(str(REFERENCE / algo / "gate_init.safetensors"))
    moved = max(float((ours[k] - v).abs().max()) for k, v in initial.items())
    assert moved > 1e-4  # adaptation happened (and is what matched)


@pytest.mark.parametrize("algo", ALGOS)
def test_logits_per_sample_and_batch_averaged_match_fusionbench(
    pool, results, tasks, preprocess, algo
):
    mixture = results[algo].mixture
    heads = heads_of(algo)
    reference = load_file(str(REFERENCE / algo / "logits.safetensors"))
    scorer = zero_shot(pool.pretrained, mixture.vision)
    with torch.no_grad():
        for task in tasks:
            data = one_pass_data(task, "test", 64, 64, shuffle=False)
            pixels = torch.cat(list(pixel_batches(data, preprocess)))
            mixture.set_batch_reduce(False)
            per_sample = scorer.logits(scorer.embed(pixels), heads[task.name])
            one_by_one = torch.cat(
                [scorer.logits(scorer.embed(pixels[i : i + 1]), heads[task.name]) for i in (0, 9)]
            )
            mixture.set_batch_reduce(True)
            by_16 = torch.cat(
                [
                    scorer.logits(scorer.embed(pixels[i : i + 16]), heads[task.name])
                    for i in range(0, 64, 16)
                ]
            )
            mixture.set_batch_reduce(False)
            assert float((per_sample - reference[f"per_sample/{task.name}"]).abs().max()) <= 1e-4
            assert float((by_16 - reference[f"as_returned_bs16/{task.name}"]).abs().max()) <= 1e-4
            # A sample's logits do not depend on its batch (to float rounding of the GEMMs).
            assert float((one_by_one - per_sample[[0, 9]]).abs().max()) <= 1e-4


def test_sparse_task_vectors_keep_the_top_tenth_of_each_tensor(pool):
    mixture = build_mixture(pool, settings_of("sparse_wemoe"))
    densities = {}
    for mlp in mixture.mlps:
        for vector in mlp.task_vectors:
            for name, value in vector.items():
                densities.setdefault(name, []).append(float((value != 0).float().mean()))
    # FusionBench's measured densities at 0.9 (shared/mixing/README.md)
    expected = {"fc1.weight": 0.1001, "fc1.bias": 0.1016, "fc2.weight": 0.1001, "fc2.bias": 0.1094}
    for name, value in expected.items():
        assert max(abs(d - value) for d in densities[name]) < 6e-4, (name, densities[name])
    assert len({id(m.router) for m in mixture.mlps}) == 1  # one shared router


def test_magnitude_prune_beyond_the_quantile_limit_is_the_same_rule():
    from clipship.merge.dataaware import wemoe

    vector = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    exact = magnitude_prune(vector, 0.73)
    limit, wemoe.QUANTILE_LIMIT = wemoe.QUANTILE_LIMIT, 10  # take the sorting path
    try:
        assert torch.equal(magnitude_prune(vector, 0.73), exact)
    finally:
        wemoe.QUANTILE_LIMIT = limit
    assert int((exact != 0).sum()) == 270


def test_seeded_routers_are_reproducible_and_depths_have_fusionbench_names(pool):
    for depth, names in ((0, {"weight"}), (1, {"fc.weight", "fc.bias"}), (2, {"fc1.weight"})):
        mixture = build_mixture(pool, MixtureSettings(router_hidden_layers=depth), seed=3)
        again = build_mixture(pool, MixtureSettings(router_hidden_layers=depth), seed=3)
        first = fusionbench_state_dict(mixture)
        second = fusionbench_state_dict(again)
        gates = [k for k in first if ".mlp.gate." in k]
        assert names <= {k.split(".mlp.gate.")[1] for k in gates}
        assert all(torch.equal(first[k], second[k]) for k in gates)
    other = fusionbench_state_dict(build_mixture(pool, MixtureSettings(), seed=4))
    assert not torch.equal(other[gates[0]], first[gates[0]])


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda g: {k: v for k, v in g.items() if "layers.1." not in k},
            "lacks vision_model.encoder.layers.1",
        ),
        (
            lambda g: {**g, "vision_model.encoder.layers.0.mlp.gate.fc3.weight": torch.zeros(1)},
            "extra tensor",
        ),
        (
            lambda g: {k: (v[:-1] if k.endswith("fc2.bias") else v) for k, v in g.items()},
            "is [2], the mixture's is [3]",
        ),
        (lambda g: {k: v * float("nan") for k, v in g.items()}, "NaN"),
    ],
)
def test_a_bad_router_file_is_one_clear_error(pool, change, message):
    given = change(load_file(str(REFERENCE / "wemoe" / "gate_init.safetensors")))
    with pytest.raises(MethodError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build_mixture(pool, settings_of("wemoe", router_init=given))
