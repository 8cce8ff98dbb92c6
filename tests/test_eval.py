"""Zero-shot evaluation against FusionBench's own numbers (tests/data/evalref) and on real digits."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from clipship.eval import build_heads, evaluate, get_tasks
from clipship.runtime.data import Preprocess
from clipship.runtime.heads import config_sha256, head_key, text_tower_sha256, tokenizer_sha256
from clipship.runtime.model import load_zero_shot
from clipship.runtime.tasks import builtin_tasks, read_taskpool_yaml, standard_tasks

from .conftest import DATA

pytestmark = pytest.mark.numerics  # run again under other threads/ISA (Makefile)

EVALREF = DATA / "evalref"
PRETRAINED = EVALREF / "fixture/pretrained"
MNIST = EVALREF / "fixture/mnist"
REF = load_file(str(EVALREF / "reference/mnist_logits.safetensors"))
METRICS = json.loads((EVALREF / "reference/metrics.json").read_text())["metrics"]


def digits_formats(root):
    """The 64 reference digit images as parquet, a save_to_disk folder and an ImageFolder tree."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features
    from datasets import Image as ImageFeature

    images = [Image.fromarray(u8) for u8 in REF["images"].numpy()]
    labels = REF["labels"].tolist()
    features = Features({"image": ImageFeature(), "label": ClassLabel(num_classes=10)})
    ds = Dataset.from_dict({"image": images, "label": labels}, features=features)
    (root / "parquet/data").mkdir(parents=True)
    ds.to_parquet(str(root / "parquet/data/test-00000-of-00001.parquet"))
    DatasetDict({"test": ds}).save_to_disk(str(root / "disk"))
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / "folder" / f"{label}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:03d}.png")
    return {"parquet": root / "parquet", "disk": root / "disk", "folder": root / "folder"}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return digits_formats(tmp_path_factory.mktemp("digits"))


def mnist_task(path):
    return replace(get_tasks("mnist")[0], data=str(path))


def test_task_registry_is_fusionbench_data():
    reference = json.loads((DATA / "fusionbench_tasks.json").read_text())["tasks"]
    ours = builtin_tasks()
    assert set(reference) <= set(ours)  # the 13 tasks ../shared/reference lists; all 25 below
    for name in reference:
        task = ours[name]
        assert list(task.classnames) == reference[name]["classnames"]
        assert list(task.templates) == reference[name]["templates"]
    assert standard_tasks() == [
        "sun397",
        "stanford-cars",
        "resisc45",
        "eurosat",
        "svhn",
        "gtsrb",
        "mnist",
        "dtd",
    ]
    sizes = {t: ours[t].dataset["size"] for t in standard_tasks()}
    assert sizes == {
        "sun397": 19850,
        "stanford-cars": 8041,
        "resisc45": 6300,
        "eurosat": 2700,
        "svhn": 26032,
        "gtsrb": 12630,
        "mnist": 10000,
        "dtd": 1880,
    }
    assert (
        ours["svhn"].dataset["name"] == "cropped_digits"
        and ours["mnist"].dataset["path"] == "ylecun/mnist"
    )


def test_heads_match_fusionbench():
    heads, meta = build_heads(PRETRAINED, get_tasks("all"))
    reference = load_file(str(EVALREF / "reference/heads.safetensors"))
    for name, head in reference.items():
        assert heads[name].shape == head.shape
        # Unit vectors made on FusionBench's machine: another CPU's float32 kernels move an
        # entry by a few ulps of 1 (~1e-7) through the 2-layer text tower; 1e-6 leaves room.
        assert float((heads[name] - head).abs().max()) <= 1e-6
    assert meta["logit_scale"] == pytest.approx(np.log(100), abs=1e-6)
    again, _ = build_heads(PRETRAINED, get_tasks("all"))  # from the cache, same bits
    assert all(torch.equal(again[k], heads[k]) for k in heads)


def test_cache_key_covers_everything_the_head_depends_on(tmp_path):
    import shutil

    task = get_tasks("mnist")[0]
    text, tok = text_tower_sha256(PRETRAINED), tokenizer_sha256(PRETRAINED)
    config = json.loads((PRETRAINED / "config.json").read_text())
    conf = config_sha256(config)
    base = head_key(text, tok, conf, task, torch.float32)
    changed = tmp_path / "changed"
    shutil.copytree(PRETRAINED, changed)
    weights = load_file(str(changed / "model.safetensors"))
    weights["text_projection.weight"][0, 0] += 1e-3
    from safetensors.torch import save_file

    save_file(weights, str(changed / "model.safetensors"), metadata={"format": "pt"})
    (changed / "merges.txt").write_text((changed / "merges.txt").read_text() + "\n")
    keys = {
        "weights": head_key(text_tower_sha256(changed), tok, conf, task, torch.float32),
        "tokenizer": head_key(text, tokenizer_sha256(changed), conf, task, torch.float32),
        "config": head_key(
            text, tok, config_sha256({**config, "projection_dim": 7}), task, torch.float32
        ),
        "class names": head_key(
            text, tok, conf, replace(task, classnames=task.classnames[::-1]), torch.float32
        ),
        "templates": head_key(
            text, tok, conf, replace(task, templates=(*task.templates, "a {c}.")), torch.float32
        ),
        "dtype": head_key(text, tok, conf, task, torch.float16),
    }
    assert len({base, *keys.values()}) == 7, keys


def test_preprocessing_is_the_clip_processor_bit_for_bit():
    from transformers import CLIPImageProcessor

    pre = Preprocess.from_pretrained(PRETRAINED)
    table = pre.lookup_table()
    batch = torch.stack(
        [torch.from_numpy(pre.to_uint8(Image.fromarray(u8))) for u8 in REF["images"].numpy()]
    )
    assert torch.equal(pre.normalize(batch, table), REF["pixel_values"])
    processor = CLIPImageProcessor(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}
    )
    big = Preprocess.from_config(processor.to_dict())
    rng = np.random.default_rng(0)
    for h, w in [(5, 9), (224, 224), (300, 180), (97, 512), (640, 480)]:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        expected = processor(images=[image], return_tensors="pt")["pixel_values"]
        assert torch.equal(
            big.normalize(torch.from_numpy(big.to_uint8(image))[None], big.lookup_table()), expected
        )


@pytest.mark.parametrize("name, folder", [("pretrained", PRETRAINED), ("mnist", MNIST)])
def test_logits_match_fusionbench(name, folder):
    heads = load_file(str(EVALREF / "reference/heads.safetensors"))
    model, _, _ = load_zero_shot(str(folder), str(PRETRAINED), "cpu")
    with torch.no_grad():
        embeds = model.embed(REF["pixel_values"])
        logits = model.logits(embeds, heads["mnist"])
    # Unit vectors again (see the heads), and logits = 100 × their cosines: 100 × 1e-6. The
    # reference's smallest top-1/top-2 margin is 0.058 (pretrained), far above that, so the
    # predicted classes (and the accuracies below) are exact on any CPU.
    assert float((embeds - REF[f"image_embeds_{name}"]).abs().max()) <= 1e-6
    assert float((logits - REF[f"logits_{name}"]).abs().max()) <= 1e-4
    assert torch.equal(logits.argmax(1), REF[f"logits_{name}"].argmax(1))


@pytest.mark.parametrize("batch_size", [128, 24])
@pytest.mark.parametrize("name, folder", [("pretrained", PRETRAINED), ("mnist", MNIST)])
def test_accuracy_and_both_losses_match_fusionbench(digits, batch_size, name, folder):
    report = evaluate(
        str(folder),
        [mnist_task(digits["parquet"])],
        pretrained=str(PRETRAINED),
        batch_size=batch_size,
    ).to_json()
    expected = METRICS[f"batch_size_{batch_size}"][name]
    # Accuracy exact (margins ≫ rounding, see above); a mean cross-entropy of ~2 from logits
    # within 1e-4 of FusionBench's moves by less than 1e-5.
    assert report["mnist"]["accuracy"] == expected["accuracy"]
    assert report["mnist"]["loss_batch_mean"] == pytest.approx(expected["loss"], abs=1e-5)
    assert report["mnist"]["loss"] == pytest.approx(
        METRICS["batch_size_128"][name]["mean_ce_per_sample"], abs=1e-5
    )
    assert report["mnist"]["samples"] == 64
    assert report["average"]["accuracy"] == expected["accuracy"]
    assert report["model_info"]["all_params"] == 147584


def test_every_local_format_gives_the_same_report(digits):
    reports = {}
    for fmt in ("parquet", "disk", "folder"):
        report = evaluate(
            str(MNIST), [mnist_task(digits[fmt])], pretrained=str(PRETRAINED), batch_size=64
        ).to_json()
        reports[fmt] = {k: v for k, v in report["mnist"].items() if k != "images_per_second"}
    # Same images in the same order along two data paths: bit-equal (tensors that feed products
    # are owned, aligned memory: clipship/memory.py), on this machine and thread count.
    assert reports["parquet"] == reports["disk"]
    # An ImageFolder lists images class by class: same images, another order, so the float
    # sums behind the losses may differ in the last bits.
    assert reports["folder"]["accuracy"] == reports["parquet"]["accuracy"]
    for key in ("loss", "loss_batch_mean"):
        assert reports["folder"][key] == pytest.approx(reports["parquet"][key], abs=1e-6)
    limited = evaluate(
        str(MNIST), [mnist_task(digits["disk"])], pretrained=str(PRETRAINED), limit=10
    ).to_json()
    assert limited["mnist"]["samples"] == 10


def test_taskpool_yaml(tmp_path):
    pool = tmp_path / "clip-vit-classification_TA8.yaml"
    pool.write_text(
        "defaults:\n  - /dataset/image_classification/test@test_datasets:\n"
        + "".join(f"      - {t}\n" for t in standard_tasks())
        + "_target_: fusion_bench.taskpool.CLIPVisionModelTaskPool\n_recursive_: false\n"
        "processor: openai/clip-vit-base-patch32\nclip_model: openai/clip-vit-base-patch32\n"
    )
    assert read_taskpool_yaml(pool) == standard_tasks()


def test_hub_style_sources_go_through_load_dataset(digits):
    """A task's dataset source is read with datasets.load_dataset (here a local repo folder)."""
    task = replace(
        get_tasks("mnist")[0],
        dataset={
            "path": str(digits["parquet"]),
            "split": "test",
            "image_column": "image",
            "label_column": "label",
        },
    )
    report = evaluate(str(MNIST), [task], pretrained=str(PRETRAINED)).to_json()
    assert report["mnist"]["samples"] == 64 and report["mnist"]["accuracy"] == 0.0625


def test_images_open_as_their_owners_see_them(tmp_path):
    """EXIF orientation is applied (a phone photo stands upright) and 16-bit greyscale keeps its
    levels, as transformers' load_image reads them; a decompression bomb is one DataError."""
    from PIL import ImageOps

    from clipship.errors import DataError
    from clipship.imaging import open_image

    pre = Preprocess.from_pretrained(PRETRAINED)
    rng = np.random.default_rng(0)
    upright = Image.fromarray(rng.integers(0, 256, (40, 24, 3), dtype=np.uint8))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # as the camera wrote it
    exif = stored.getexif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to view
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=100)
    phone = open_image(tmp_path / "phone.jpg")
    assert phone.size == (40, 24)  # the stored pixels are still sideways
    expected = ImageOps.exif_transpose(Image.open(tmp_path / "phone.jpg")).convert("RGB")
    assert expected.size == (24, 40)
    assert np.array_equal(pre.to_uint8(phone), pre.to_uint8(expected))

    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    deep = open_image(tmp_path / "deep.png")
    assert deep.mode.startswith("I")
    grey = pre.to_uint8(deep)
    assert len(np.unique(grey)) > 100  # not clipped to two grey levels
    reference = Preprocess.to_uint8(pre, Image.fromarray((ramp >> 8).astype(np.uint8)))
    assert np.array_equal(grey, reference)

    Image.new("L", (30000, 30000)).save(tmp_path / "bomb.png")
    with pytest.raises(DataError, match="bomb.png: cannot read the image"):
        open_image(tmp_path / "bomb.png")


def test_library_calls_leave_process_state_as_they_found_it(digits):
    """evaluate() quiets transformers and datasets and seeds torch for its own work only."""
    import datasets
    from datasets.utils import logging as dlog
    from transformers.utils import logging as tlog

    tlog.set_verbosity_info()
    dlog.set_verbosity_info()
    datasets.enable_progress_bars()
    torch.manual_seed(1234)
    rng = torch.get_rng_state()
    try:
        evaluate(
            str(MNIST),
            [mnist_task(digits["parquet"])],
            pretrained=str(PRETRAINED),
            device="cpu",
            seed=7,
            workers=0,
        ).to_json()
        assert torch.equal(torch.get_rng_state(), rng)
        assert tlog.get_verbosity() == tlog.INFO and dlog.get_verbosity() == dlog.INFO
        assert datasets.is_progress_bar_enabled()
    finally:
        tlog.set_verbosity_warning()
        dlog.set_verbosity_warning()
