"""`clipship finetune`: learns from real digits, resumes exactly, and its output merges."""

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import clipship.eval.finetune as finetune_module
from clipship.cli import app
from clipship.eval import evaluate, get_tasks
from clipship.eval.finetune import finetune

from .test_eval import PRETRAINED

pytestmark = pytest.mark.numerics  # run again under other threads/ISA (Makefile)

runner = CliRunner()


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """scikit-learn's real 8×8 digits: 400 to train on, 297 held out, as parquet splits."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.rint(data.images * 255 / 16).astype(np.uint8)
    order = np.random.default_rng(0).permutation(len(images))
    root = tmp_path_factory.mktemp("digits") / "mnist"
    root.mkdir()
    features = Features({"image": ImageFeature(), "label": ClassLabel(num_classes=10)})
    for split, index in (("train", order[:400]), ("test", order[1500:])):
        rows = {
            "image": [Image.fromarray(images[i]) for i in index],
            "label": data.target[index].tolist(),
        }
        Dataset.from_dict(rows, features=features).to_parquet(
            str(root / f"{split}-00000-of-00001.parquet")
        )
    return root


def test_finetuning_raises_accuracy_and_the_result_merges(digits, tmp_path):
    task = replace(get_tasks("mnist")[0], data=str(digits))
    before = evaluate(str(PRETRAINED), [task]).tasks["mnist"].accuracy
    result = runner.invoke(
        app,
        [
            "finetune",
            str(PRETRAINED),
            "--tasks",
            "mnist",
            "--data-dir",
            str(digits.parent),
            "--steps",
            "150",
            "--lr",
            "1e-3",
            "--out",
            str(tmp_path / "mnist"),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    tuned = evaluate(str(tmp_path / "mnist"), [task], pretrained=str(PRETRAINED))
    after = tuned.tasks["mnist"].accuracy
    assert before < 0.2 and after > before + 0.5, (before, after)
    merged = runner.invoke(
        app,
        [
            "merge",
            "--pretrained",
            str(PRETRAINED),
            "--model",
            f"mnist={tmp_path / 'mnist'}",
            "--method",
            "task_arithmetic",
            "--lambda",
            "1",
            "--out",
            str(tmp_path / "merged"),
            "--quiet",
        ],
    )
    assert merged.exit_code == 0, merged.output
    again = evaluate(str(tmp_path / "merged"), [task]).tasks["mnist"].accuracy
    assert again == pytest.approx(after, abs=0.01)


def test_resume_ends_with_the_same_weights(digits, tmp_path, monkeypatch):
    task = replace(get_tasks("mnist")[0], data=str(digits))
    options = dict(steps=6, batch_size=16, lr=1e-3, checkpoint_every=3)
    finetune(str(PRETRAINED), task, tmp_path / "straight", **options)
    assert not (tmp_path / "straight.checkpoints").exists()

    real_save = finetune_module._save_checkpoint

    def save_then_stop(*args):
        real_save(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune_module, "_save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        finetune(str(PRETRAINED), task, tmp_path / "resumed", **options)
    assert (
        not (tmp_path / "resumed").exists() and (tmp_path / "resumed.checkpoints/step-3").is_dir()
    )
    monkeypatch.setattr(finetune_module, "_save_checkpoint", real_save)
    result = finetune(str(PRETRAINED), task, tmp_path / "resumed", resume=True, **options)
    assert result["resumed_from"] == 3
    assert (tmp_path / "resumed/model.safetensors").read_bytes() == (
        tmp_path / "straight/model.safetensors"
    ).read_bytes()


def test_finetune_needs_exactly_one_task(tmp_path):
    result = runner.invoke(
        app, ["finetune", str(PRETRAINED), "--tasks", "mnist,svhn", "--out", str(tmp_path / "x")]
    )
    assert result.exit_code == 1 and "one task at a time" in result.stderr


def test_training_that_diverges_stops_and_writes_nothing(digits, tmp_path):
    from clipship.errors import DataError

    task = replace(get_tasks("mnist")[0], data=str(digits))
    with pytest.raises(DataError, match="the loss is not finite at step|non-finite"):
        finetune(str(PRETRAINED), task, tmp_path / "out", steps=6, batch_size=16, lr=1e30)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # the heads cache only


def test_finetune_reads_a_task_file(digits, tmp_path):
    """`--taskfile` (the mini-benchmark's kind) defines the task: its name, classes and data."""
    import json

    spec = {
        "tasks": {
            "handwritten": {
                "classnames": [str(i) for i in range(10)],
                "templates": ["a photo of the digit {c}."],
                "data": str(digits),
            }
        }
    }
    (tmp_path / "tasks.json").write_text(json.dumps(spec))
    args = ["finetune", str(PRETRAINED), "--taskfile", str(tmp_path / "tasks.json")]
    args += ["--tasks", "handwritten", "--out", str(tmp_path / "out"), "--steps", "2"]
    result = runner.invoke(app, [*args, "--batch-size", "8", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["task"] == "handwritten"
    assert (tmp_path / "out/model.safetensors").is_file()
    unknown = runner.invoke(app, [*args[:4], "--tasks", "svhn", "--out", str(tmp_path / "y")])
    assert unknown.exit_code == 1 and "unknown task 'svhn'" in unknown.stderr
    assert not (tmp_path / "y").exists()
