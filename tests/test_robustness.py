"""Robustness: the seven corruptions against their definitions, seeded; eval --corruption on
local data (generated) and on FusionBench's hub tasks (their corrupted splits, read at the
datasets boundary); the report's table and heatmap; one error line for bad settings."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from clipship.runtime.corruptions import (
    CONTRAST,
    CORRUPTIONS,
    GAUSSIAN_NOISE,
    IMPULSE_NOISE,
    PIXELATE,
    Corruption,
    corrupt,
)

from .conftest import run_cli
from .test_eval import MNIST, PRETRAINED, REF


def photo(width=48, height=40, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64) / 255


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_a_corruption_is_the_same_bytes_for_the_same_seed(name):
    image = photo()
    first = Corruption(name, 3, seed=7, task="mnist")(image, 5)
    again = Corruption(name, 3, seed=7, task="mnist")(image.copy(), 5)
    assert first.size == image.size and first.mode == "RGB"
    assert first.tobytes() == again.tobytes()
    assert first.tobytes() != image.tobytes()
    if name in ("gaussian_noise", "impulse_noise", "spatter"):  # random in every pixel
        others = [Corruption(name, 3, seed=8, task="mnist")(image, 5),
                  Corruption(name, 3, seed=7, task="svhn")(image, 5),
                  Corruption(name, 3, seed=7, task="mnist")(image, 6)]  # fmt: skip
        assert all(o.tobytes() != first.tobytes() for o in others)


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_the_deterministic_corruptions_follow_their_definitions(severity):
    image, rng = photo(), np.random.default_rng(0)
    x = pixels(image)
    means = x.mean(axis=(0, 1), keepdims=True)
    expected = np.clip((x - means) * CONTRAST[severity - 1] + means, 0, 1) * 255
    got = np.asarray(corrupt(image, "contrast", severity, rng), dtype=np.float64)
    assert np.abs(got - np.floor(expected)).max() <= 1  # truncated to 8 bits, as the reference
    factor = PIXELATE[severity - 1]
    small = image.resize((int(48 * factor), int(40 * factor)), Image.BOX)
    assert (
        corrupt(image, "pixelate", severity, rng).tobytes()
        == small.resize((48, 40), Image.BOX).tobytes()
    )  # at the image's own size (FusionBench's script always makes 32×32)
    grey = Image.new("RGB", (40, 30), (120, 90, 60))
    blurred = corrupt(grey, "motion_blur", severity, rng)  # a blur keeps a flat image flat
    assert np.abs(np.asarray(blurred, dtype=int) - np.asarray(grey, dtype=int)).max() <= 1


def test_the_random_corruptions_have_their_strength():
    grey = Image.new("RGB", (200, 200), (128, 128, 128))
    for severity in (1, 5):
        noisy = pixels(corrupt(grey, "gaussian_noise", severity, np.random.default_rng(1)))
        assert abs(noisy.std() - GAUSSIAN_NOISE[severity - 1]) < 0.01
        salted = pixels(corrupt(grey, "impulse_noise", severity, np.random.default_rng(1)))
        hit = np.isin(salted, (0.0, 1.0)).mean()
        assert abs(hit - IMPULSE_NOISE[severity - 1]) < 0.005
    mud = np.asarray(corrupt(grey, "spatter", 5, np.random.default_rng(1)), dtype=int)
    changed = np.abs(mud - 128).sum(axis=2) > 0
    assert 0 < changed.mean() < 0.9 and mud[changed].mean() < 128  # brown drops, not a wash


def digits_folder(root):
    for i, u8 in enumerate(REF["images"].numpy()[:20]):
        label = int(REF["labels"][i]) if "labels" in REF else i % 10
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(u8).save(root / str(label) / f"{i:02d}.png")
    return root


def test_eval_reports_every_task_under_every_corruption(tmp_path):
    data = tmp_path / "data"
    digits_folder(data / "mnist")
    args = ["eval", MNIST, "--pretrained", PRETRAINED, "--tasks", "mnist", "--data-dir", data,
            "--corruption", "contrast,pixelate,gaussian_noise", "--severity", "4"]  # fmt: skip
    outputs = []
    for run in ("a", "b"):
        result = run_cli(*args, "--out", tmp_path / f"{run}.json", "--quiet")
        assert result.returncode == 0, result.stderr
        outputs.append(json.loads((tmp_path / f"{run}.json").read_text()))
    report = outputs[0]
    section = report["robustness"]
    assert section["severity"] == 4
    assert list(section["corruptions"]) == ["contrast", "pixelate", "gaussian_noise"]
    for rows in section["corruptions"].values():
        assert rows["mnist"]["samples"] == report["mnist"]["samples"] == 20
        assert rows["mnist"]["source"] == "severity 4"
        assert rows["average"]["accuracy"] == rows["mnist"]["accuracy"]
    assert outputs[0]["robustness"] == outputs[1]["robustness"]  # seeded: the same figures
    png = Image.open(io.BytesIO((tmp_path / "a.robustness.png").read_bytes()))
    assert png.size[0] > 200
    table = run_cli(*args, "--limit", "4")
    assert table.returncode == 0 and "under corruption" in table.stdout
    assert "pixelate" in table.stdout and "clean" in table.stdout


def test_fusionbenchs_robustness_tasks_read_the_hubs_corrupted_splits(monkeypatch):
    """eurosat's hub test set (tanganke/eurosat) ships one split per corruption: eval reads
    that split (as FusionBench's robustness taskpool) instead of corrupting images itself."""
    import datasets

    from clipship.eval.evaluate import evaluate
    from clipship.runtime.tasks import get_tasks

    asked = []
    images = [Image.fromarray(u8).convert("RGB") for u8 in REF["images"].numpy()[:10]]

    def load_dataset(path, name=None, split=None, **_):
        asked.append((path, split))
        return datasets.Dataset.from_dict(
            {"image": images, "label": list(range(10))},
            features=datasets.Features(
                {"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)}
            ),
        )

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    report = evaluate(
        str(MNIST), get_tasks("eurosat"), pretrained=str(PRETRAINED), device="cpu",
        corruptions=["spatter"], workers=0,
    )  # fmt: skip
    assert asked == [("tanganke/eurosat", "test"), ("tanganke/eurosat", "spatter")]
    row = report.robustness["corruptions"]["spatter"]["eurosat"]
    assert row["source"] == "hub split" and row["dataset"] == "tanganke/eurosat"
    assert row["accuracy"] == report.tasks["eurosat"].accuracy  # the same images, unchanged


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--corruption", "fog"], "unknown corruption 'fog'"),
        (["--corruption", "contrast", "--severity", "6"], "--severity 6: must be 1 to 5"),
        (["--corruption", "contrast", "--severity", "0"], "--severity 0: must be 1 to 5"),
        (["--severity", "2"], "--severity needs --corruption"),
    ],
)
def test_bad_corruption_settings_are_one_line(tmp_path, extra, message):
    result = run_cli("eval", MNIST, "--pretrained", PRETRAINED, "--tasks", "mnist", *extra,
                     "--out", tmp_path / "r.json")  # fmt: skip
    assert result.returncode != 0 and result.stderr.startswith("error: ")
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r.json").exists()
