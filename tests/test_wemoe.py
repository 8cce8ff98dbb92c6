"""WEMoE and E-WEMoE against FusionBench 0.2.33's own runs (tests/data/mixing), fed its recorded
initial routers and data order: the adapted mixture under FusionBench's names, and logits with
per-sample and batch-averaged routing."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from clipship.errors import MethodError
from clipship.merge.dataaware import endless_data, one_pass_data, pixel_batches
from clipship.merge.dataaware.common import zero_shot
from clipship.merge.dataaware.wemoe import (
    MixtureSettings,
    Pruned,
    build_mixture,
    fusionbench_state_dict,
    magnitude_prune,
    prune_sparse,
    prune_threshold,
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
                assert isinstance(value, Pruned)  # held sparse while adapting
                densities.setdefault(name, []).append(value.values.numel() / value.dense().numel())
    # FusionBench's measured densities at 0.9 (shared/mixing/README.md)
    expected = {"fc1.weight": 0.1001, "fc1.bias": 0.1016, "fc2.weight": 0.1001, "fc2.bias": 0.1094}
    for name, value in expected.items():
        assert max(abs(d - value) for d in densities[name]) < 6e-4, (name, densities[name])
    assert len({id(m.router) for m in mixture.mlps}) == 1  # one shared router


@pytest.mark.parametrize("n", [1, 2, 1000, 4097, 2_359_296])
def test_the_prune_threshold_is_torch_quantile_from_two_order_statistics(n):
    magnitude = torch.randn(n, generator=torch.Generator().manual_seed(n)).abs()
    for ratio in (0.0, 0.1, 0.5, 0.73, 0.9, 0.999):
        assert torch.equal(prune_threshold(magnitude, ratio), magnitude.quantile(ratio)), ratio
    vector = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    assert int((magnitude_prune(vector, 0.73) != 0).sum()) == 270
    big = torch.arange(2**24 + 2, dtype=torch.float32)  # float32 rounds 1.0 · (n − 1) up to n
    assert float(prune_threshold(big, 1.0)) == float(big[-1])
    sparse = prune_sparse(vector.reshape(10, 100), 0.73)
    assert torch.equal(sparse.dense(), magnitude_prune(vector, 0.73).reshape(10, 100))
    assert sparse.indices.dtype == torch.int32 and sparse.values.numel() == 270


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


# --- the mixture folder --------------------------------------------------------------------------


def merge_args(algo: str, out, order, *extra: str) -> list[str]:
    config = info(algo)["config"]
    method = "weight_ensembling_moe" if algo == "wemoe" else "sparse_weight_ensembling_moe"
    models = [a for t in NAMES for a in ("--model", f"{t}={FIXTURE / t}")]
    return [
        "merge", "--pretrained", str(PRETRAINED), *models, "--method", method,
        "--param", f"max_steps={config['max_steps']}",
        "--param", f"router_init={REFERENCE / algo / 'gate_init.safetensors'}",
        "--data-order", str(order), "--data-dir", str(FIXTURE / "data"), "--out", str(out),
        "--quiet", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Each reference run merged through the command line into a mixture folder."""
    from .conftest import run_cli

    root = tmp_path_factory.mktemp("mixtures")
    out = {}
    for algo in ALGOS:
        order = root / f"{algo}_order.json"
        rows = info(algo)["data_order"]
        order.write_text(json.dumps({t: rows[f"test/{t}/call0"] for t in NAMES}))
        result = run_cli(
            *merge_args(algo, root / algo, order), env={"CLIPSHIP_CACHE": str(root / "c")}
        )
        assert result.returncode == 0, result.stderr
        out[algo] = root / algo
    return out


@pytest.mark.parametrize("algo", ALGOS)
def test_the_folder_loads_with_automodel_and_holds_fusionbenchs_mixture(folders, algo):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folders[algo], trust_remote_code=True)
    assert type(model).__name__ == "CLIPWEMoEModel"
    reference = load_file(str(REFERENCE / algo / "final_state_dict.safetensors"))
    state = model.state_dict()
    for name, value in reference.items():
        if ".task_vectors." in name and algo == "sparse_wemoe":  # stored as mask + values
            layer, rest = name.split(".layers.")[1].split(".mlp.task_vectors.")
            expert, param = rest.split(".", 1)
            vector = model.vision_model.encoder.layers[int(layer)].mlp.task_vectors[int(expert)]
            ours = vector.dense(param)
        else:
            ours = state[name]
        # our zero-shot heads differ from that run's by up to 1.7e-7 (see tests/data/mixing)
        assert float((ours - value).abs().max()) <= 1e-5, name


def test_the_sparse_folder_is_smaller_and_its_config_describes_the_mixture(folders):
    from safetensors import safe_open

    def vector_bytes(folder):
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            names = [k for k in f.keys() if ".task_vectors." in k]
            return sum(f.get_tensor(k).nbytes for k in names)

    config = json.loads((folders["sparse_wemoe"] / "config.json").read_text())
    assert config["wemoe"]["experts"] == NAMES and config["wemoe"]["storage"] == "bitmask"
    assert config["wemoe"]["shared_gate"] and config["wemoe"]["routing"] == "per_sample"
    # 10 % of the entries kept as float32 plus one bit per entry: 13.1 % of the dense bytes
    dense, sparse = vector_bytes(folders["wemoe"]), vector_bytes(folders["sparse_wemoe"])
    assert 0.12 * dense < sparse < 0.14 * dense, (sparse, dense)
    sizes = {a: (folders[a] / "model.safetensors").stat().st_size for a in ALGOS}
    assert sizes["wemoe"] - sizes["sparse_wemoe"] >= 0.85 * (dense - sparse), sizes


def test_eval_reads_the_folder_and_says_its_routing(folders):
    from .conftest import run_cli

    result = run_cli(
        "eval", folders["wemoe"], "--tasks", ",".join(NAMES), "--data-dir", FIXTURE / "data",
        "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["model_info"]["routing"] == "per_sample"
    expected = info("wemoe")["accuracy_test_split"]["per_sample"]
    assert {t: report[t]["accuracy"] for t in NAMES} == pytest.approx(
        {t: expected[t] for t in NAMES}, abs=1 / 64
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--param", "tv_prune_ratio=1"], "tv_prune_ratio=1.0 must be in [0, 1)"),
        (["--param", "router_hidden_layers=3"], "must be 0, 1 or 2"),
        (["--vision-only"], "drop --vision-only"),
        (["--param", "router_init=/nonexistent/gate.safetensors"], "no such file"),
    ],
)
def test_bad_mixture_requests_are_one_line(tmp_path, extra, message):
    from .conftest import run_cli

    order = tmp_path / "order.json"
    order.write_text(json.dumps({t: list(range(64)) * 5 for t in NAMES}))
    args = merge_args("sparse_wemoe", tmp_path / "m", order, *extra)
    result = run_cli(*args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "m").exists()


def task_pixels(tasks, preprocess) -> dict[str, torch.Tensor]:
    """Each task's 64 test images, preprocessed, in order."""
    return {
        t.name: torch.cat(
            list(pixel_batches(one_pass_data(t, "test", 64, 64, shuffle=False), preprocess))
        )
        for t in tasks
    }


@pytest.mark.parametrize("algo", ALGOS)
def test_the_loaded_folder_routes_per_sample_or_by_batch_like_fusionbench(
    folders, tasks, preprocess, algo
):
    from clipship.runtime.model import load_zero_shot, set_routing

    model, _, info = load_zero_shot(str(folders[algo]), None, "cpu")
    assert info["routing"] == "per_sample" and info["experts"] == NAMES
    reference = load_file(str(REFERENCE / algo / "logits.safetensors"))
    heads = heads_of(algo)
    with torch.no_grad():
        for task, pixels in task_pixels(tasks, preprocess).items():
            ours = model.logits(model.embed(pixels), heads[task])
            assert float((ours - reference[f"per_sample/{task}"]).abs().max()) <= 1e-4
        set_routing(model, info, "batch")
        assert info["routing"] == "batch"
        for task, pixels in task_pixels(tasks, preprocess).items():
            by_16 = [model.logits(model.embed(pixels[i : i + 16]), heads[task]) for i in (0, 16)]
            expected = reference[f"as_returned_bs16/{task}"][:32]
            assert float((torch.cat(by_16) - expected).abs().max()) <= 1e-4


@pytest.fixture(scope="module")
def exported(folders, tmp_path_factory):
    """Both mixtures exported (WEMoE fp32; E-WEMoE fp32 and int8) with heads for the 3 tasks."""
    from .conftest import run_cli

    root = tmp_path_factory.mktemp("mixture_exports")
    env = {"CLIPSHIP_CACHE": str(root / "c")}
    heads = root / "heads"
    result = run_cli("heads", PRETRAINED, "--tasks", ",".join(NAMES), "--out", heads, env=env)
    assert result.returncode == 0, result.stderr
    out = {}
    for algo, precision in (("wemoe", "fp32"), ("sparse_wemoe", "fp32,int8")):
        out[algo] = root / algo
        # The fixture sits near chance: its logit margins are too small for int8's 0.98 gate,
        # and which images flip depends on the CPU's float kernels (checked below instead).
        result = run_cli(
            "export", folders[algo], "--heads", heads, "--out", out[algo], "--precision",
            precision, "--data-dir", FIXTURE / "data", "--min-agreement-int8", "0", env=env,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize("algo", ALGOS)
def test_the_exported_graph_routes_per_sample_like_fusionbench(exported, tasks, preprocess, algo):
    import onnxruntime as ort

    record = json.loads((exported[algo] / "export.json").read_text())
    report = json.loads((exported[algo] / "export_report.json").read_text())
    assert record["model_info"]["routing"] == "per_sample"
    session = ort.InferenceSession(str(exported[algo] / "model.onnx"))
    reference = load_file(str(REFERENCE / algo / "logits.safetensors"))
    for task, pixels in task_pixels(tasks, preprocess).items():
        (logits,) = session.run([f"logits_{task}"], {"pixel_values": pixels.numpy()})
        diff = float((torch.from_numpy(logits) - reference[f"per_sample/{task}"]).abs().max())
        assert diff <= 1e-4, (task, diff)
        # one image at a time gives the same rows: no batch neighbour changes a prediction
        (first,) = session.run([f"logits_{task}"], {"pixel_values": pixels[:1].numpy()})
        assert float(abs(first - logits[:1]).max()) <= 1e-4
    assert report["variants"]["fp32"]["batch_1_7_vs_32_max_diff"] <= 1e-4
    if algo == "sparse_wemoe":  # the portable int8 scheme: every integer product exact
        assert record["int8"]["integer_ops"]
        int8 = report["variants"]["int8"]
        assert all(int8[t]["top1_agreement"] >= 0.75 for t in NAMES), int8
        import onnx

        from clipship.exporter.quantize import synthesis_products

        graph = onnx.load(str(exported[algo] / "model_int8.onnx"))
        # the weight synthesis stays float: 4 products per layer, none quantized
        assert len(synthesis_products(graph)) == 16


def test_eval_maps_the_routing_and_reproduces_fusionbenchs_batch_evaluation(folders, tmp_path):
    from .conftest import run_cli

    common = ["--tasks", ",".join(NAMES), "--data-dir", FIXTURE / "data", "--quiet"]
    out = tmp_path / "report.json"
    result = run_cli("eval", folders["sparse_wemoe"], *common, "--routing", "batch", "--out", out)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["model_info"]["routing"] == "batch"
    grid = report["mnist"]["routing_weights"]
    assert len(grid) == 4 and all(len(row) == 3 for row in grid)
    assert (tmp_path / "report.routing.png").read_bytes().startswith(b"\x89PNG")
    # a plain encoder has no router to average
    result = run_cli("eval", FIXTURE / "mnist", "--pretrained", PRETRAINED, *common,
                     "--routing", "batch")  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and "applies to mixtures" in lines[0]


def test_a_mixture_folder_of_another_format_is_refused_in_one_line(folders, tmp_path):
    import shutil

    from .conftest import run_cli

    old = tmp_path / "old"
    shutil.copytree(folders["wemoe"], old)
    config = json.loads((old / "config.json").read_text())
    config["wemoe"]["format"] = "clipship-wemoe/0"
    (old / "config.json").write_text(json.dumps(config))
    for command in (
        ["eval", old, "--tasks", "mnist", "--data-dir", FIXTURE / "data"],
        ["info", old],
        ["export", old, "--heads", old, "--out", tmp_path / "x"],
    ):
        result = run_cli(*command)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1, result.stderr
        assert "mixture format 'clipship-wemoe/0'" in lines[0]
    assert not (tmp_path / "x").exists()


def test_zero_steps_ship_the_given_routers_unchanged(tmp_path):
    """max_steps=0: another tool's trained routers (here FusionBench's final gates) shipped as
    they are, the folder's routers bit-identical to the file."""
    from .conftest import run_cli

    final = load_file(str(REFERENCE / "sparse_wemoe" / "final_state_dict.safetensors"))
    gates = tmp_path / "gates.safetensors"
    save_file({k: v for k, v in final.items() if ".mlp.gate." in k}, str(gates))
    args = merge_args("sparse_wemoe", tmp_path / "out", tmp_path / "none")
    args = [a for a in args if a not in ("--data-order", str(tmp_path / "none"))]
    args[args.index("max_steps=20")] = "max_steps=0"
    args[args.index(f"router_init={REFERENCE / 'sparse_wemoe' / 'gate_init.safetensors'}")] = (
        f"router_init={gates}"
    )
    result = run_cli(*args, env={"CLIPSHIP_CACHE": str(tmp_path / "c")})
    assert result.returncode == 0, result.stderr
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    for key, value in final.items():
        if ".mlp.gate." in key or ".task_vectors." not in key and ".mlp." not in key:
            assert torch.equal(written[key], value), key
    args[args.index("max_steps=0")] = "max_steps=-1"
    args[args.index(str(tmp_path / "out"))] = str(tmp_path / "bad")
    bad = run_cli(*args)
    assert bad.returncode != 0 and "max_steps" in bad.stderr and "0 or more" in bad.stderr


def test_info_describes_the_mixture(folders):
    from .conftest import run_cli

    result = run_cli("info", folders["wemoe"], folders["sparse_wemoe"], "--json")
    assert result.returncode == 0, result.stderr
    dense, sparse = (row["mixture"] for row in json.loads(result.stdout))
    assert dense["experts"] == NAMES and dense["router_hidden_layers"] == 2
    assert dense["density"] == 1.0 and dense["storage"] == "dense"
    # E-WEMoE keeps the top 10 % of each tensor (a few ties aside) and shares one router
    assert 0.099 <= sparse["density"] <= 0.101 and sparse["shared_gate"]
    assert dense["router_params"] == 4 * sparse["router_params"]
    rows = json.loads(result.stdout)
    assert rows[0]["model_info"]["trainable_params"] == dense["router_params"]


def test_the_recipe_replays_a_mixture_byte_for_byte(folders, tmp_path):
    from .conftest import run_cli

    folder = folders["sparse_wemoe"]
    recipe = json.loads((folder / "clipship_recipe.json").read_text())
    # the given routers travel with the folder, named by the recipe with their sha256
    assert recipe["parameters"]["router_init"] == "router_init.safetensors"
    assert (folder / "router_init.safetensors").read_bytes() == (
        REFERENCE / "sparse_wemoe" / "gate_init.safetensors"
    ).read_bytes()
    assert str(REFERENCE) not in (folder / "clipship_recipe.json").read_text()
    models = [a for t in NAMES for a in ("--model", f"{t}={FIXTURE / t}")]
    again = tmp_path / "again"
    result = run_cli(
        "merge", "--recipe", folder / "clipship_recipe.json", "--pretrained", PRETRAINED,
        *models, "--data-dir", FIXTURE / "data", "--out", again, "--quiet",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for name in ("model.safetensors", "config.json", "clipship_recipe.json"):
        assert (again / name).read_bytes() == (folder / name).read_bytes(), name
    (tmp_path / "bad").mkdir()
    recipe_copy = tmp_path / "bad" / "clipship_recipe.json"
    recipe_copy.write_text(json.dumps(recipe))
    (tmp_path / "bad" / "router_init.safetensors").write_bytes(b"changed")
    result = run_cli(
        "merge", "--recipe", recipe_copy, "--pretrained", PRETRAINED, *models,
        "--data-dir", FIXTURE / "data", "--out", tmp_path / "x",
    )  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and "router_init_sha256" in lines[0]


def test_a_pushed_mixture_loads_from_the_hub_with_automodel_like_clipships_loader(
    folders, hub, hub_env, tmp_path
):
    import shutil
    import subprocess
    import sys

    from huggingface_hub import HfApi, snapshot_download
    from transformers import AutoModel

    from clipship.runtime.model import load_zero_shot

    from .conftest import HUB_TOKENS, run_cli

    run = tmp_path / "run"
    shutil.copytree(folders["sparse_wemoe"], run)
    common = ["--tasks", ",".join(NAMES), "--data-dir", FIXTURE / "data", "--quiet"]
    assert run_cli("eval", run, *common, "--out", run / "eval_report.json").returncode == 0
    result = run_cli(
        "card", run, "--license", "mit", "--base-model", "openai/clip-vit-base-patch32"
    )
    assert result.returncode == 0, result.stderr
    card = (run / "README.md").read_text()
    assert "## Mixture" in card and "routing `per_sample`" in card and "(routing.png)" in card
    assert "trust_remote_code=True" in card
    push = [sys.executable, "-m", "clipship", "push", str(run), "--repo-id", "alice/ewemoe"]
    pushed = subprocess.run(push, env=hub_env, capture_output=True, text=True, timeout=120)
    assert pushed.returncode == 0, pushed.stderr
    token = list(HUB_TOKENS)[0]
    folder = snapshot_download(
        "alice/ewemoe", endpoint=hub.url, token=token, cache_dir=tmp_path / "dl"
    )
    assert (
        HfApi(endpoint=hub.url, token=token).model_info("alice/ewemoe").card_data.license == "mit"
    )
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    ours, _, _ = load_zero_shot(str(run), None, "cpu")
    pixels = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixels)
        features = getattr(features, "pooler_output", features)  # transformers 5: an output
        features = features / features.norm(dim=-1, keepdim=True)
        assert float((features - ours.embed(pixels)).abs().max()) <= 1e-6


def test_a_pool_whose_mlp_shapes_differ_is_one_line(tmp_path):
    import shutil

    from safetensors.torch import save_file

    from .conftest import run_cli

    odd = tmp_path / "odd"
    shutil.copytree(FIXTURE / "mnist", odd)
    tensors = load_file(str(odd / "model.safetensors"))
    for name in tensors:  # an MLP of 96 hidden units instead of 128
        if ".mlp.fc1." in name:
            tensors[name] = tensors[name][:96].contiguous()
        elif name.endswith(".mlp.fc2.weight"):
            tensors[name] = tensors[name][:, :96].contiguous()
    save_file(tensors, str(odd / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((odd / "config.json").read_text())
    config.get("vision_config", config)["intermediate_size"] = 96
    (odd / "config.json").write_text(json.dumps(config))
    result = run_cli(
        "merge", "--pretrained", PRETRAINED, "--model", f"mnist={odd}", "--model",
        f"svhn={FIXTURE / 'svhn'}", "--method", "weight_ensembling_moe", "--param", "max_steps=1",
        "--data-dir", FIXTURE / "data", "--out", tmp_path / "m",
    )  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and "intermediate_size=96" in lines[0]
    assert not (tmp_path / "m").exists()


def test_a_graph_past_the_size_limit_keeps_its_weights_in_one_data_file(
    folders, tmp_path, monkeypatch
):
    """Exports above EXTERNAL_DATA_BYTES (a mixture of 8 ViT-B/32 experts: 2.2 GB, past
    protobuf's 2 GiB) write ``<graph>.data`` beside each graph; predict checks and reads it."""
    from clipship.exporter import onnx_export

    from .conftest import run_cli

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    env = {"CLIPSHIP_CACHE": str(tmp_path / "c")}
    heads, out = tmp_path / "heads", tmp_path / "export"
    assert run_cli("heads", PRETRAINED, "--tasks", "mnist", "--out", heads, env=env).returncode == 0
    result = run_cli(
        "export", folders["wemoe"], "--heads", heads, "--out", out, "--precision", "fp16,int8",
        "--data-dir", FIXTURE / "data", env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "export.json").read_text())
    names = {p.name for p in out.iterdir()}
    assert names == {
        "export.json", "export_report.json", "model_fp16.onnx", "model_fp16.onnx.data",
        "model_int8.onnx", "model_int8.onnx.data",
    }  # fmt: skip
    assert set(record["sha256"]) == names - {"export.json", "export_report.json"}
    # the weights are elsewhere (tensors under 1 KiB, shapes among them, stay in the graph)
    size = {n: (out / n).stat().st_size for n in names}
    assert size["model_fp16.onnx.data"] > size["model_fp16.onnx"]
    from PIL import Image

    Image.new("RGB", (40, 40), (200, 30, 30)).save(tmp_path / "red.png")
    args = ["predict", out, tmp_path / "red.png", "--task", "mnist", "--variant", "fp16"]
    assert run_cli(*args).returncode == 0
    (out / "model_fp16.onnx.data").write_bytes(b"changed")
    result = run_cli(*args)
    assert result.returncode == 1 and "model_fp16.onnx.data: changed" in result.stderr
