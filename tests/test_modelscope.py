"""ModelScope sources (``modelscope:owner/name``, a pool's ``platform: modelscope``), tested
offline at the client's download boundary: ModelScope's own ``HubApi.get_valid_revision`` and
``snapshot_download`` are replaced by a stand-in serving the parity fixture, so everything
clipship does around them (pinning, sha256, recipes, replay, errors) runs for real."""

import json
import shutil
import sys

import pytest

from clipship.errors import ClipshipError
from clipship.merge import merge, merge_from_recipe
from clipship.pool import read_pool_yaml, resolve_folder

from .conftest import FIXTURE, load_weights, max_abs_diff

SERVED = {"clip/pretrained": "pretrained", "clip/task_a": "task_a", "clip/task_b": "task_b"}


@pytest.fixture
def modelscope(tmp_path, monkeypatch):
    """The stand-in service: repo id → fixture folder, with branches ``master`` and ``v1``.
    Returns the list of download calls."""
    pytest.importorskip("modelscope")  # the `modelscope` extra (a dev dependency)
    import importlib

    api = importlib.import_module("modelscope.hub.api")
    snapshot_download = importlib.import_module("modelscope.hub.snapshot_download")

    calls, root = [], tmp_path / "modelscope_cache"

    def get_valid_revision(self, model_id, revision=None, **_):
        if model_id not in SERVED:
            raise ValueError(f"The model: {model_id} does not exist")
        revision = revision or "master"
        if revision not in ("master", "v1"):
            raise ValueError(f"The model: {model_id} has no revision: {revision}")
        return revision

    def download(model_id, revision=None, allow_patterns=None, local_files_only=False, **_):
        calls.append((model_id, revision, tuple(allow_patterns or ()), local_files_only))
        folder = root / model_id / revision
        if not folder.exists():
            shutil.copytree(FIXTURE / SERVED[model_id], folder)
        return str(folder)

    monkeypatch.setattr(api.HubApi, "get_valid_revision", get_valid_revision)
    monkeypatch.setattr(snapshot_download, "snapshot_download", download)
    return calls


def test_a_modelscope_source_merges_pinned_and_replays(modelscope, tmp_path):
    out = tmp_path / "merged"
    models = {"task_a": "modelscope:clip/task_a@v1", "task_b": "modelscope:clip/task_b"}
    merge("modelscope:clip/pretrained", models, "task_arithmetic", out)
    local = tmp_path / "local"
    merge(
        str(FIXTURE / "pretrained"), {t: str(FIXTURE / t) for t in models}, "task_arithmetic", local
    )
    assert max_abs_diff(load_weights(out), load_weights(local)) == 0

    recipe = json.loads((out / "clipship_recipe.json").read_text())
    entries = {m["name"]: m for m in recipe["models"]}
    assert entries["task_a"]["repo_id"] == "modelscope:clip/task_a"
    assert entries["task_a"]["revision"] == "v1"
    assert entries["task_b"]["revision"] == "master"  # resolved and recorded
    assert recipe["pretrained"]["repo_id"] == "modelscope:clip/pretrained"
    assert set(entries["task_a"]["files"]) == {"model.safetensors"}
    assert ("clip/task_a", "v1") in [c[:2] for c in modelscope]
    assert all("model.safetensors" in c[2] and not c[3] for c in modelscope)

    replay = tmp_path / "replay"
    merge_from_recipe(out / "clipship_recipe.json", replay)
    assert (replay / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    # the service now serves other bytes under that revision: the replay refuses them
    cached = tmp_path / "modelscope_cache" / "clip/task_a" / "v1" / "model.safetensors"
    shutil.copy(FIXTURE / "task_c" / "model.safetensors", cached)
    with pytest.raises(ClipshipError, match="sha256 differs"):
        merge_from_recipe(out / "clipship_recipe.json", tmp_path / "replay2")


def test_a_pool_with_platform_modelscope_reads_its_ids_there(modelscope, tmp_path):
    path = tmp_path / "pool.yaml"
    path.write_text(
        "_target_: fusion_bench.modelpool.CLIPVisionModelPool\n"
        "platform: modelscope\n"
        "models:\n"
        "  _pretrained_: clip/pretrained\n"
        "  task_a: clip/task_a\n"
        f"  task_b: {FIXTURE / 'task_b'}\n"  # a local folder stays local
    )
    pretrained, models = read_pool_yaml(path)
    assert pretrained == "modelscope:clip/pretrained"
    assert models == {"task_a": "modelscope:clip/task_a", "task_b": str(FIXTURE / "task_b")}
    folder, repo_id, revision = resolve_folder(models["task_a"])
    assert (folder / "model.safetensors").is_file()
    assert (repo_id, revision) == ("modelscope:clip/task_a", "master")


@pytest.mark.parametrize(
    "source, message",
    [
        ("modelscope:clip/nothing", "ModelScope says: The model: clip/nothing does not exist"),
        ("modelscope:clip/task_a@v9", "has no revision: v9"),
        ("modelscope:justaname", "not a ModelScope model id"),
    ],
)
def test_a_bad_modelscope_source_is_one_line(modelscope, source, message):
    with pytest.raises(ClipshipError, match=message) as caught:
        resolve_folder(source)
    assert "\n" not in str(caught.value)


def test_a_modelscope_source_without_the_extra_is_one_line(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from clipship.cli import app

    monkeypatch.setitem(sys.modules, "modelscope", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "modelscope.hub", None)
    monkeypatch.setitem(sys.modules, "modelscope.hub.api", None)
    result = CliRunner().invoke(
        app,
        ["merge", "--pretrained", "modelscope:clip/pretrained", "--model",
         f"task_a={FIXTURE / 'task_a'}", "--method", "task_arithmetic",
         "--out", str(tmp_path / "out")],
    )  # fmt: skip
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install -e '.[modelscope]'" in lines[0]
    assert not (tmp_path / "out").exists()
