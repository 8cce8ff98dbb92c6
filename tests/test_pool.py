"""Model pools: FusionBench YAML files, hub ids through the Hugging Face cache, key layouts."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clipship.errors import PoolMismatchError, SourceNotFoundError
from clipship.pool import open_pool, read_pool_yaml

from .conftest import FIXTURE, TASKS, load_weights, write_model


def fake_hub_repo(cache: Path, repo_id: str, source: Path, commit: str, refs=("main",)) -> str:
    """Lay ``source`` out as huggingface_hub caches a downloaded repo: blobs, refs, snapshots."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for item in source.iterdir():
        data = item.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / item.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return commit


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "clipship.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.slow
def test_hub_ids_resolve_through_snapshot_download_offline(tmp_path):
    home = tmp_path / "hf"
    cache = home / "hub"
    fake_hub_repo(cache, "openai-test/tiny-clip", FIXTURE / "pretrained", "a" * 40)
    for i, task in enumerate(TASKS):
        fake_hub_repo(
            cache, f"tanganke-test/tiny_{task}", FIXTURE / task, f"{i}" * 40, refs=("main", "v1")
        )
    env = {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    models = [a for t in TASKS for a in ("--model", f"{t}=tanganke-test/tiny_{t}@v1")]
    out = tmp_path / "merged"
    result = run_cli(
        "merge",
        "--pretrained",
        "openai-test/tiny-clip",
        *models,
        "--method",
        "ties",
        "--out",
        out,
        "--quiet",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    recipe = json.loads((out / "clipship_recipe.json").read_text())
    assert recipe["pretrained"]["repo_id"] == "openai-test/tiny-clip"
    assert recipe["pretrained"]["revision"] == "a" * 40
    assert [m["revision"] for m in recipe["models"]] == [f"{i}" * 40 for i in range(4)]
    digest = hashlib.sha256((FIXTURE / "task_b/model.safetensors").read_bytes()).hexdigest()
    assert recipe["models"][1]["files"] == {"model.safetensors": digest}
    # Same bytes as merging the local folders, and the recipe replays with pinned revisions.
    local = [a for t in TASKS for a in ("--model", f"{t}={FIXTURE / t}")]
    assert (
        run_cli(
            "merge",
            "--pretrained",
            FIXTURE / "pretrained",
            *local,
            "--method",
            "ties",
            "--out",
            tmp_path / "local",
            "--quiet",
        ).returncode
        == 0
    )
    assert (out / "model.safetensors").read_bytes() == (
        tmp_path / "local/model.safetensors"
    ).read_bytes()
    again = run_cli(
        "merge",
        "--recipe",
        out / "clipship_recipe.json",
        "--out",
        tmp_path / "again",
        "--quiet",
        env=env,
    )
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again/model.safetensors").read_bytes() == (
        out / "model.safetensors"
    ).read_bytes()
    missing = hub_merge(tmp_path / "none", env, "x=nobody/absent")
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        "error: nobody/absent: no such folder, and not in the local Hub cache; the Hub is offline: "
        "HF_HUB_OFFLINE is set"
    ]


def hub_merge(out, env, model, *more):
    """`clipship merge` of one hub-id task model over the fake hub's tiny CLIP."""
    return run_cli(
        "merge", "--pretrained", "openai-test/tiny-clip", "--model", model, "--method", "ties",
        "--out", out, *more, env=env,
    )  # fmt: skip


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_an_unreachable_hub_is_asked_once_and_said_once(tmp_path, fixture_pool):
    """No network and no HF_HUB_OFFLINE: cached hub ids still resolve, and a missing model or
    dataset is one error line naming the endpoint that did not answer, without the clients'
    retry lines."""
    home = tmp_path / "hf"
    fake_hub_repo(home / "hub", "openai-test/tiny-clip", FIXTURE / "pretrained", "a" * 40)
    fake_hub_repo(home / "hub", "tanganke-test/tiny_task_a", FIXTURE / "task_a", "1" * 40)
    endpoint = f"http://127.0.0.1:{closed_port()}"
    env = {"HF_HOME": str(home), "HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_TELEMETRY": "1"}
    env["HF_HUB_OFFLINE"] = ""
    cached = hub_merge(tmp_path / "merged", env, "task_a=tanganke-test/tiny_task_a", "--quiet")
    assert cached.returncode == 0, cached.stderr
    absent = hub_merge(tmp_path / "none", env, "x=nobody/absent")
    assert absent.returncode == 1
    assert absent.stderr.strip().splitlines() == [
        "error: nobody/absent: no such folder, and not in the local Hub cache; the Hub is "
        f"unreachable: {endpoint} did not answer"
    ]
    # the fixture's text tower cannot take mnist's prompts, so its data is opened directly
    opened = "from clipship.runtime.data import ImageSource; from clipship.runtime.tasks import "
    opened += "get_tasks; ImageSource(get_tasks('mnist')[0])"
    data = subprocess.run(
        [sys.executable, "-c", opened],
        capture_output=True,
        text=True,
        env={**os.environ, **env, "HF_DATASETS_CACHE": str(tmp_path / "datasets")},
    )
    assert data.returncode == 1
    assert data.stderr.strip().splitlines()[-1] == (
        "clipship.errors.DataError: task mnist: ylecun/mnist is not in the local cache (give a "
        f"local copy with `data_dir`); the Hub is unreachable: {endpoint} did not answer"
    )
    assert "Retrying" not in data.stderr


def test_fusionbench_yaml_is_read_as_it_is(tmp_path):
    (tmp_path / "models").mkdir()
    for task in TASKS:
        shutil.copytree(FIXTURE / task, tmp_path / "models" / task)
    pool = tmp_path / "pool.yaml"
    pool.write_text(
        "defaults:\n  - _self_\n_target_: fusion_bench.modelpool.CLIPVisionModelPool\n_recursive_: false\n"
        "processor: openai/clip-vit-base-patch32\n"
        "models:\n"
        "  _pretrained_: openai/clip-vit-base-patch32\n"
        "  task_b:\n    _target_: transformers.CLIPVisionModel.from_pretrained\n"
        "    pretrained_model_name_or_path: models/task_b\n"
        "  task_a: models/task_a\n"
        "  sun397:\n    pretrained_model_name_or_path: tanganke/clip-vit-base-patch32_sun397\n    revision: v2\n"
    )
    pretrained, models = read_pool_yaml(pool)
    assert pretrained == "openai/clip-vit-base-patch32"
    assert list(models) == ["task_b", "task_a", "sun397"]  # pool order is file order
    assert models["task_b"] == str(tmp_path / "models/task_b")  # relative to the YAML file
    assert models["sun397"] == "tanganke/clip-vit-base-patch32_sun397@v2"


@pytest.mark.parametrize(
    "text, message",
    [
        ("models: [a, b]\n", "models: expected a mapping"),
        ("models:\n  a: x\n", "has no '_pretrained_' model"),
        ("models:\n  _pretrained_: x\n  a: ${oc.env:MODEL_DIR}/a\n", "no plain source path"),
        ("models: {\n", "not valid YAML"),
    ],
)
def test_bad_pool_files(tmp_path, text, message):
    (tmp_path / "pool.yaml").write_text(text)
    with pytest.raises(SourceNotFoundError, match=message.replace("(", r"\(").replace("$", r"\$")):
        read_pool_yaml(tmp_path / "pool.yaml")
    with pytest.raises(SourceNotFoundError, match="no such pool file"):
        read_pool_yaml(tmp_path / "absent.yaml")


def test_mixed_key_layouts_read_the_same_tensors(tmp_path, fixture_pool):
    weights = load_weights(FIXTURE / "task_c")
    bare = write_model(
        tmp_path / "bare",
        {k.removeprefix("vision_model."): v for k, v in weights.items()},
        FIXTURE / "task_c",
    )
    pool = open_pool(fixture_pool[0], {"prefixed": str(FIXTURE / "task_c"), "bare": str(bare)})
    name = "vision_model.encoder.layers.1.mlp.fc1.weight"
    assert torch.equal(pool.models[0].read(name), pool.models[1].read(name))
    assert pool.tensor_names == sorted(k for k in weights)
    pool.close()


def test_non_float_tensors_must_agree(tmp_path, fixture_pool):
    from clipship.merge import merge

    ids = torch.arange(17).unsqueeze(0)
    pre = write_model(
        tmp_path / "pre",
        {**load_weights(FIXTURE / "pretrained"), "vision_model.embeddings.position_ids": ids},
        FIXTURE / "pretrained",
    )
    a = write_model(
        tmp_path / "a",
        {**load_weights(FIXTURE / "task_a"), "vision_model.embeddings.position_ids": ids},
        FIXTURE / "task_a",
    )
    b = write_model(
        tmp_path / "b",
        {**load_weights(FIXTURE / "task_b"), "vision_model.embeddings.position_ids": ids + 1},
        FIXTURE / "task_b",
    )
    merge(str(pre), {"a": str(a)}, "task_arithmetic", tmp_path / "ok")
    assert torch.equal(load_weights(tmp_path / "ok")["vision_model.embeddings.position_ids"], ids)
    with pytest.raises(
        PoolMismatchError, match="non-float tensor vision_model.embeddings.position_ids differs"
    ):
        merge(str(pre), {"a": str(a), "b": str(b)}, "task_arithmetic", tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_vision_only_pretrained_needs_vision_only_output(tmp_path):
    from clipship.merge import merge

    with pytest.raises(PoolMismatchError, match="pass `vision_only`"):
        merge(
            str(FIXTURE / "task_a"),
            {"b": str(FIXTURE / "task_b")},
            "task_arithmetic",
            tmp_path / "x",
        )
    merge(
        str(FIXTURE / "task_a"),
        {"b": str(FIXTURE / "task_b")},
        "task_arithmetic",
        tmp_path / "y",
        vision_only=True,
    )
    assert (tmp_path / "y/model.safetensors").exists()


def test_duplicate_names_are_refused():
    from clipship.pool import parse_model_args

    with pytest.raises(PoolMismatchError, match="appears twice"):
        parse_model_args(["a=x", "a=y"])


def test_the_offline_switch_overlaps_and_comes_back():
    """Blocks that overlap (threads) or nest leave the flags as the first one found them."""
    import datasets.config
    from huggingface_hub import constants

    from clipship.runtime.state import hub_offline

    before = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    first, second = hub_offline(), hub_offline()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)  # ends before the second: the switch stays on for it
    assert constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE
    with hub_offline():
        assert constants.HF_HUB_OFFLINE
    second.__exit__(None, None, None)
    assert (constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE) == before


def test_any_http_answer_is_a_reachable_hub(monkeypatch):
    """The probe counts an error status as an answer, a closed port as none."""
    import functools
    import http.server
    import threading

    from huggingface_hub import constants

    from clipship.runtime import state

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(http.server.SimpleHTTPRequestHandler, directory="/")
    )
    server.RequestHandlerClass.log_message = lambda *a: None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        assert state.hub_reachable()  # a 404 for /api/whoami-v2
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
        assert not state.hub_reachable()
    finally:
        server.shutdown()
