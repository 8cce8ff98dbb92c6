"""`clipship heads` and `clipship eval` from the command line, and their one-line errors."""

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from clipship.cli import app

from .conftest import FIXTURE, load_weights, write_model
from .test_eval import MNIST, PRETRAINED, REF, digits_formats

pytestmark = pytest.mark.numerics  # run again under other threads/ISA (Makefile)

runner = CliRunner()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    formats = digits_formats(root / "mnist_formats")
    (root / "dir").mkdir()
    (root / "dir/mnist").symlink_to(formats["disk"])
    return {"formats": formats, "data_dir": root / "dir", "root": root}


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(result, message):
    assert result.exit_code != 0, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert message in result.stderr, result.stderr


def test_eval_json_report_and_file(data, tmp_path):
    out = tmp_path / "report.json"
    result = cli(
        "eval",
        MNIST,
        "--pretrained",
        PRETRAINED,
        "--tasks",
        "mnist",
        "--data-dir",
        data["data_dir"],
        "--batch-size",
        "24",
        "--out",
        out,
        "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report == json.loads(out.read_text())
    assert set(report) == {"mnist", "average", "model_info"}
    assert report["mnist"]["accuracy"] == 0.0625 and report["mnist"]["samples"] == 64
    assert (
        cli(
            "eval",
            MNIST,
            "--pretrained",
            PRETRAINED,
            "--tasks",
            "mnist",
            "--data-dir",
            data["data_dir"],
            "--out",
            out,
        ).exit_code
        == 1
    )  # exists without --force


def test_heads_command_and_eval_with_saved_heads(data, tmp_path):
    result = cli(
        "heads", PRETRAINED, "--tasks", "mnist,svhn", "--out", tmp_path / "heads", "--json"
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["heads"] == {"mnist": [10, 32], "svhn": [10, 32]}
    meta = json.loads((tmp_path / "heads/text_heads.json").read_text())
    assert meta["tasks"]["mnist"]["templates"] == ['a photo of the number: "{c}".']
    assert len(meta["text_tower_sha256"]) == 64 and meta["logit_scale"] > 4.6
    with_heads = cli(
        "eval",
        MNIST,
        "--pretrained",
        PRETRAINED,
        "--tasks",
        "mnist",
        "--data-dir",
        data["data_dir"],
        "--heads",
        tmp_path / "heads",
        "--json",
    )
    built = cli(
        "eval",
        MNIST,
        "--pretrained",
        PRETRAINED,
        "--tasks",
        "mnist",
        "--data-dir",
        data["data_dir"],
        "--json",
    )
    assert (
        json.loads(with_heads.stdout)["mnist"]["loss"] == json.loads(built.stdout)["mnist"]["loss"]
    )


def test_pool_evaluation_is_a_model_by_task_matrix(data, tmp_path):
    pool = tmp_path / "pool.yaml"
    pool.write_text(f"models:\n  _pretrained_: {PRETRAINED}\n  mnist: {MNIST}\n")
    result = cli(
        "eval", "--pool", pool, "--tasks", "mnist", "--data-dir", data["data_dir"], "--json"
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert list(report) == ["_pretrained_", "mnist"]
    table = cli("eval", "--pool", pool, "--tasks", "mnist", "--data-dir", data["data_dir"])
    assert "zero-shot accuracy" in table.stdout and "_pretrained_" in table.stdout


def test_custom_imagefolder_task(data, tmp_path):
    folder = tmp_path / "shapes"
    for i, name in enumerate(["big_circle", "square"]):
        (folder / name).mkdir(parents=True)
        for j in range(3):
            Image.new("RGB", (20 + j, 30), (40 * i, 80, 120)).save(folder / name / f"{j}.png")
    result = cli("eval", MNIST, "--pretrained", PRETRAINED, "--task", f"shapes={folder}", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["shapes"]["samples"] == 6
    names = tmp_path / "names.txt"
    names.write_text("circle\nsquare\n")
    templates = tmp_path / "templates.txt"
    templates.write_text("a {c}.\nthe {c}\n")
    assert (
        cli("heads", PRETRAINED, "--task", f"shapes={folder}", "--out", tmp_path / "h").exit_code
        == 0
    )
    meta = json.loads((tmp_path / "h/text_heads.json").read_text())
    assert list(meta["tasks"]) == ["shapes"]  # a custom task alone, as eval takes it
    assert meta["tasks"]["shapes"] == {
        "classnames": ["big circle", "square"],
        "templates": ["a photo of a {c}."],
    }
    # export takes the same task options: the custom task's own images validate its graph
    exported = cli(
        "export", MNIST, "--pretrained", PRETRAINED, "--heads", tmp_path / "h",
        "--task", f"shapes={folder}", "--out", tmp_path / "export", "--json",
    )  # fmt: skip
    assert exported.exit_code == 0, exported.output
    record = json.loads((tmp_path / "export/export.json").read_text())
    assert record["tasks"] == ["shapes"] and record["classnames"]["shapes"] == [
        "big circle",
        "square",
    ]
    report = json.loads(exported.stdout)
    assert report["validation_images"] == 6
    assert (
        cli(
            "heads",
            PRETRAINED,
            "--task",
            f"shapes={folder}",
            "--classnames",
            names,
            "--templates",
            templates,
            "--out",
            tmp_path / "h2",
        ).exit_code
        == 0
    )
    meta = json.loads((tmp_path / "h2/text_heads.json").read_text())
    assert meta["tasks"]["shapes"] == {
        "classnames": ["circle", "square"],
        "templates": ["a {c}.", "the {c}"],
    }


def bad_parquet(path, columns):
    from datasets import Dataset

    Dataset.from_dict(columns).to_parquet(str(path))
    return path


@pytest.mark.slow
def test_bad_inputs_are_one_line(data, tmp_path):
    base = ["eval", MNIST, "--pretrained", PRETRAINED]
    one_error_line(cli(*base, "--tasks", "imagenet-r"), "unknown task 'imagenet-r'")
    # a known task without a hub test set in FusionBench's configs needs its data
    one_error_line(cli(*base, "--tasks", "imagenet"), "task imagenet: no dataset source")
    wrong = bad_parquet(tmp_path / "wrong.parquet", {"img": [b"x"], "target": [1]})
    one_error_line(
        cli(*base, "--task", f"mnist2={wrong}", "--classnames", names_file(tmp_path)),
        "has no 'image' column",
    )
    png = REF["images"][0].numpy()
    import io

    buffer = io.BytesIO()
    Image.fromarray(png).save(buffer, format="PNG")
    out_of_range = bad_parquet(
        tmp_path / "labels.parquet",
        {"image": [{"bytes": buffer.getvalue(), "path": None}], "label": [12]},
    )
    one_error_line(
        cli(*base, "--task", f"d={out_of_range}", "--classnames", names_file(tmp_path)),
        "label 12 is outside the 10 classes",
    )
    one_error_line(
        cli("eval", FIXTURE / "pretrained", "--tasks", "mnist", "--data-dir", data["data_dir"]),
        "has 24 tokens, the text tower takes 16",
    )
    text_only = {
        k: v for k, v in load_weights(PRETRAINED).items() if not k.startswith("vision_model.")
    }
    write_model(tmp_path / "textonly", text_only, PRETRAINED)
    one_error_line(
        cli("eval", tmp_path / "textonly", "--pretrained", PRETRAINED, "--tasks", "mnist"),
        "no CLIP vision tower tensors found",
    )
    one_error_line(cli("eval", MNIST, "--tasks", "mnist"), "vision-only model: pass --pretrained")
    one_error_line(
        cli(*base, "--tasks", "mnist", "--precision", "fp8"), "choose fp32, fp16 or bf16"
    )


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_one_line():
    one_error_line(
        cli("eval", MNIST, "--pretrained", PRETRAINED, "--tasks", "mnist", "--device", "cuda"),
        "no CUDA GPU is available",
    )


def test_heads_for_another_model_are_refused(data, tmp_path):
    other = tmp_path / "other"
    weights = load_weights(PRETRAINED)
    weights["text_projection.weight"] = weights["text_projection.weight"] * 2
    write_model(other, weights, PRETRAINED)
    assert cli("heads", other, "--tasks", "mnist", "--out", tmp_path / "heads").exit_code == 0
    one_error_line(
        cli(
            "eval",
            MNIST,
            "--pretrained",
            PRETRAINED,
            "--tasks",
            "mnist",
            "--data-dir",
            data["data_dir"],
            "--heads",
            tmp_path / "heads",
        ),
        "heads were built for another model",
    )


def test_corrupt_images_are_reported_or_skipped(data, tmp_path):
    folder = tmp_path / "digits"
    for label in range(10):
        (folder / str(label)).mkdir(parents=True)
        Image.fromarray(REF["images"][label].numpy()).save(folder / str(label) / "a.png")
    (folder / "3" / "b.png").write_bytes(b"not a png")
    args = [
        "eval",
        MNIST,
        "--pretrained",
        PRETRAINED,
        "--task",
        f"d={folder}",
        "--classnames",
        names_file(tmp_path),
    ]
    one_error_line(cli(*args), "task d: image 4 cannot be read")
    result = cli(*args, "--skip-bad-images", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["d"]
    assert report["skipped"] == [4] and report["samples"] == 10


def names_file(tmp_path):
    path = tmp_path / "digit_names.txt"
    path.write_text("".join(f"{i}\n" for i in range(10)))
    return path


@pytest.mark.slow
def test_two_processes_under_torchrun_give_the_one_process_report(data, tmp_path):
    import os
    import subprocess
    import sys

    base = [
        "eval",
        MNIST,
        "--pretrained",
        PRETRAINED,
        "--tasks",
        "mnist",
        "--data-dir",
        data["data_dir"],
        "--batch-size",
        "24",
        "--device",
        "cpu",
        "--workers",
        "0",
        "--quiet",
    ]
    single = cli(*base, "--json")
    assert single.exit_code == 0, single.output
    env = {**os.environ, "CLIPSHIP_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "clipship.cli",
            *map(str, base),
            "--out",
            str(tmp_path / "report.json"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    ours = json.loads((tmp_path / "report.json").read_text())["mnist"]
    theirs = json.loads(single.stdout)["mnist"]
    assert ours["samples"] == theirs["samples"] == 64 and ours["accuracy"] == theirs["accuracy"]
    for key in ("loss", "loss_batch_mean"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-6)


def test_quiet_eval_without_out_still_prints_its_table(data, tmp_path):
    args = ["eval", MNIST, "--pretrained", PRETRAINED, "--tasks", "mnist", "--data-dir",
            data["data_dir"], "--limit", "8", "--workers", "0", "--quiet"]  # fmt: skip
    shown = cli(*args)
    assert shown.exit_code == 0, shown.output
    assert "mnist" in shown.stdout and "average" in shown.stdout
    silent = cli(*args, "--out", tmp_path / "report.json")  # the report goes to the file
    assert silent.exit_code == 0 and silent.stdout == ""
    assert json.loads((tmp_path / "report.json").read_text())["mnist"]["samples"] == 8
