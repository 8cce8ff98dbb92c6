"""Bounded resources on hostile images and preprocessing values.

A few hundred bytes of PNG can claim a 3,000,000×1 image, which a resize to a shortest edge
multiplies into billions of pixels; ``clipship.imaging`` refuses it from the header, before any
pixel is decoded or resized. Every preprocessing value read from a file (``export.json``, a
model's ``preprocessor_config.json``) is checked, each refusal one ``error:`` line naming the
key. The command-line cases measure the peak memory of ``clipship predict`` / ``clipship eval``
in a subprocess against the same command on a normal image.
"""

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from clipship.cli import app
from clipship.errors import DataError
from clipship.imaging import (
    MAX_IMAGE_PIXELS,
    MAX_IMAGE_SIDE,
    MAX_PREPROCESS_SIDE,
    ImagePreprocess,
    center_crop,
    check_image_size,
    open_image,
)
from clipship.runtime.data import ImageSource, Preprocess, TaskImages
from clipship.runtime.tasks import Task

from .conftest import run_cli
from .test_eval import MNIST, PRETRAINED, REF

# The most a refused image may add to a command's peak memory (a decoded refused image would
# add gigabytes: 2.1 GB for 200000×1 before the limits).
HEADROOM_KB = 150 * 1024

HOSTILE = [(200_000, 1), (3_000_000, 1), (1, 200_000)]

# Runs clipship in this interpreter and writes its peak RSS (KiB) to argv[1] as it exits. The
# kernel's VmHWM, not ru_maxrss: a forked child's ru_maxrss starts at its parent's (pytest's) size.
PEAK = """
import atexit, re, runpy, sys
out = sys.argv.pop(1)
def peak():
    status = open("/proc/self/status").read()
    with open(out, "w") as f:
        f.write(re.search(r"VmHWM:\\s+(\\d+) kB", status)[1])
atexit.register(peak)
sys.argv[0] = "clipship"
runpy.run_module("clipship", run_name="__main__", alter_sys=True)
"""
needs_proc = pytest.mark.skipif(
    not Path("/proc/self/status").is_file(), reason="peak memory is read from /proc (Linux)"
)


def clipship(*args, cache: Path, peak: Path) -> tuple[subprocess.CompletedProcess, int]:
    """(the finished ``clipship *args``, its peak RSS in KiB)."""
    env = {**os.environ, "CLIPSHIP_CACHE": str(cache)}
    peak.unlink(missing_ok=True)  # never an earlier run's figure
    result = subprocess.run(
        [sys.executable, "-c", PEAK, str(peak), *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return result, int(peak.read_text())


def one_error_line(stderr: str, *fragments: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Heads, an export of the MNIST fixture, its 64 digits as an ImageFolder, hostile PNGs."""
    root = tmp_path_factory.mktemp("bounds")
    folder = root / "folder"
    for i, (u8, label) in enumerate(zip(REF["images"].numpy(), REF["labels"].tolist())):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(u8).save(folder / str(label) / f"{i:02d}.png")

    def run(*args):
        result = run_cli(*args, env={"CLIPSHIP_CACHE": str(root / "cache")})
        assert result.returncode == 0, result.stderr[-3000:]

    run("heads", PRETRAINED, "--tasks", "mnist", "--out", root / "heads")
    run(
        "export", MNIST, "--pretrained", PRETRAINED, "--heads", root / "heads",
        "--out", root / "export", "--validation-data", folder, "--validation-size", "16",
    )  # fmt: skip
    hostile = root / "hostile"
    hostile.mkdir()
    for w, h in [*HOSTILE, (60_000, 1)]:
        Image.new("RGB", (w, h)).save(hostile / f"{w}x{h}.png")
    return root


# --- the limits, from the header, before decoding or resizing ----------------------------------


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` × ``height`` 8-bit grey pixels and holds none: all that
    ``Image.open`` reads."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_decoded_size_is_refused_from_the_header(tmp_path, monkeypatch):
    """Too many pixels or too long a side: one DataError naming the file and its size, and no
    pixel decoded (``load`` would fail the test); Pillow's warning range is refused too, with
    no warning, whatever Pillow's own limit was set to."""
    from PIL import ImageFile

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    cases = {(*HOSTILE[0],): "200000×1", (10_000, 10_000): "100,000,000 pixels"}
    cases[(MAX_IMAGE_SIDE + 1, 1)] = f"{MAX_IMAGE_SIDE + 1}×1"
    cases[(30_000, 30_000)] = "900,000,000 pixels"  # beyond 2× Pillow's limit: its own error
    paths = {}
    for (w, h), size in cases.items():
        paths[tmp_path / f"{w}x{h}.png"] = size
        (tmp_path / f"{w}x{h}.png").write_bytes(png_header(w, h))

    def load(self):
        raise AssertionError("decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    for path, size in paths.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(DataError, match="cannot read the image") as error:
                open_image(path)
        assert str(path) in str(error.value) and size in str(error.value), error.value
        assert f"{MAX_IMAGE_PIXELS:,} pixels" in str(error.value)


def test_limits_are_exact_at_their_bounds():
    side = math.isqrt(MAX_IMAGE_PIXELS)
    check_image_size((side, side), "x.png")
    check_image_size((MAX_IMAGE_SIDE, 1), "x.png")
    for size in [(side + 1, side + 1), (MAX_IMAGE_SIDE + 1, 1), (0, 5)]:
        with pytest.raises(DataError, match=rf"x.png: cannot read the image \({size[0]}×"):
            check_image_size(size, "x.png")


def test_resized_size_is_refused_before_resizing(monkeypatch):
    """A 32-pixel shortest edge: 2047×1 resizes to 65504×32, within the side bound; 2048×1
    would be 65536×32, refused before Pillow's ``resize`` runs (it would fail the test)."""
    pre = Preprocess.from_pretrained(PRETRAINED)
    assert pre.shortest_edge == 32
    assert pre.to_uint8(Image.new("RGB", (2047, 1)), "ok.png").shape == (3, 32, 32)
    assert pre.to_uint8(Image.new("RGB", (1, 2047)), "ok.png").shape == (3, 32, 32)

    def resize(self, *args, **kwargs):
        raise AssertionError("resized")

    monkeypatch.setattr(Image.Image, "resize", resize)
    for size, resized in [((2048, 1), "65536×32"), ((1, 2048), "32×65536"), ((60_000, 2), "")]:
        with pytest.raises(DataError, match="wide.png: cannot preprocess the") as error:
            pre.to_uint8(Image.new("RGB", size), "wide.png")
        assert resized in str(error.value)
    tall = ImagePreprocess(1024, None, (1024, 1024), 1 / 255, (0.0,) * 3, (1.0,) * 3)
    with pytest.raises(DataError, match="16,777,216 pixels"):  # 1024 × 16400: the area bound
        tall.to_uint8(Image.new("RGB", (1000, 16_016)), "tall.png")


def test_center_crop_pads_as_transformers_does():
    """Where the crop is larger than the image, the image sits ceil((crop - side) / 2) in."""
    from transformers.image_transforms import center_crop as reference
    from transformers.image_utils import ChannelDimension

    rng = np.random.default_rng(0)
    last = ChannelDimension.LAST
    for h, w, ch, cw in [(3, 4, 6, 7), (5, 9, 8, 4), (10, 2, 3, 5), (7, 7, 7, 7), (4, 6, 9, 9)]:
        array = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        expected = reference(array, (ch, cw), data_format=last, input_data_format=last)
        assert np.array_equal(center_crop(array, ch, cw), expected), (h, w, ch, cw)


def test_padding_crop_is_the_clip_processor_bit_for_bit():
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"height": 21, "width": 30}, crop_size=32)
    pre = Preprocess.from_config(processor.to_dict())
    assert (pre.size_hw, pre.crop_hw) == ((21, 30), (32, 32))
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (50, 40, 3), dtype=np.uint8))
    expected = processor(images=[image], return_tensors="pt")["pixel_values"]
    pixels = pre.normalize(torch.from_numpy(pre.to_uint8(image))[None], pre.lookup_table())
    assert pixels.equal(expected)


# --- dataset rows: opened by clipship, not decoded by datasets ---------------------------------


@pytest.mark.parametrize("form", ["parquet", "disk"])
def test_dataset_rows_are_checked_before_decoding(tmp_path, form):
    from datasets import ClassLabel, Dataset, DatasetDict, Features
    from datasets import Image as ImageFeature

    images = [Image.fromarray(REF["images"].numpy()[0]), Image.new("RGB", HOSTILE[0])]
    features = Features({"image": ImageFeature(), "label": ClassLabel(num_classes=2)})
    rows = Dataset.from_dict({"image": images, "label": [0, 1]}, features=features)
    if form == "parquet":
        rows.to_parquet(str(tmp_path / "test.parquet"))
        path = tmp_path / "test.parquet"
    else:
        DatasetDict({"test": rows}).save_to_disk(str(tmp_path / "disk"))
        path = tmp_path / "disk"
    source = ImageSource(Task("t", ("a", "b"), ("{c}",), None, str(path)))
    assert source.load(0)[0].size == images[0].size
    with pytest.raises(DataError, match=r"row 1: cannot read the image \(200000×1 pixels"):
        source.load(1)
    pre = Preprocess.from_pretrained(PRETRAINED)
    loaded = TaskImages(source, pre)
    assert loaded[0][0].shape == (3, 32, 32)
    message, label, index = loaded[1]
    assert "DataError" in message and "row 1" in message and (label, index) == (-1, 1)


# --- preprocessing values ----------------------------------------------------------------------

GOOD = {
    "size": {"shortest_edge": 32},
    "crop_size": {"height": 32, "width": 32},
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "rescale_factor": 1 / 255,
}


def test_valid_values_are_read_and_round_trip():
    pre = ImagePreprocess.from_config({**GOOD, "resample": 2, "size": 224, "crop_size": 224})
    assert (pre.shortest_edge, pre.crop_hw, pre.resample) == (224, (224, 224), 2)
    assert ImagePreprocess.from_record(pre.record()) == pre
    bicubic = ImagePreprocess.from_config(GOOD)
    assert bicubic.record()["resample"] == "bicubic"
    assert ImagePreprocess.from_record(bicubic.record()) == bicubic
    off = ImagePreprocess.from_config({"do_resize": False, "crop_size": 32, "do_normalize": False})
    assert (off.shortest_edge, off.crop_hw, off.mean, off.std) == (
        None,
        (32, 32),
        (0,) * 3,
        (1,) * 3,
    )
    assert off.rescale_factor == 1 / 255  # transformers' default, which older configs omit


# (key in the file, its new value or DELETE): every case is refused naming the key.
DELETE = object()
NAN, INF = float("nan"), float("inf")
# fmt: off
CONFIG_CASES = {
    "size 0": ("size", {"shortest_edge": 0}),
    "size a bool": ("size", {"shortest_edge": True}),
    "size above the bound": ("size", {"shortest_edge": MAX_PREPROCESS_SIDE + 1}),
    "size a float": ("size", 32.5),
    "size a text": ("size", "32"),
    "size longest edge": ("size", {"longest_edge": 32}),
    "size height only": ("size", {"height": 32}),
    "crop 0": ("crop_size", {"height": 0, "width": 32}),
    "crop a bool": ("crop_size", True),
    "crop negative": ("crop_size", -32),
    "mean two values": ("image_mean", [0.5, 0.5]),
    "mean NaN": ("image_mean", [NAN, 0.5, 0.5]),
    "mean a bool": ("image_mean", [True, 0.5, 0.5]),
    "mean beyond float32": ("image_mean", [1e39, 0.5, 0.5]),
    "std 0": ("image_std", [0.0, 0.5, 0.5]),
    "std negative": ("image_std", [-0.5, 0.5, 0.5]),
    "std Inf": ("image_std", [INF, 0.5, 0.5]),
    "std a number": ("image_std", 0.5),
    "rescale 0": ("rescale_factor", 0),
    "rescale negative": ("rescale_factor", -1 / 255),
    "rescale NaN": ("rescale_factor", NAN),
    "rescale a bool": ("rescale_factor", True),
    "resample 42": ("resample", 42),
    "resample unknown name": ("resample", "fancy"),
    "resample a bool": ("resample", True),
    "do_resize a text": ("do_resize", "no"),
    "no size": ("size", DELETE),
    "no crop_size": ("crop_size", DELETE),
    "no image_mean": ("image_mean", DELETE),
    "no image_std": ("image_std", DELETE),
}
RECORD_CASES = {
    "crop 0": ("crop", [0, 32]),
    "crop negative": ("crop", [-32, 32]),
    "crop above the bound": ("crop", [4096, 4096]),
    "crop a float": ("crop", [32.5, 32]),
    "crop a bool": ("crop", [True, 32]),
    "crop one side": ("crop", [32]),
    "crop not the graph's": ("crop", [64, 64]),
    "shortest edge 0": ("shortest_edge", 0),
    "shortest edge a bool": ("shortest_edge", True),
    "shortest edge huge": ("shortest_edge", 10**9),
    "shortest edge a text": ("shortest_edge", "32"),
    "size with a shortest edge": ("size", [32, 32]),
    "mean two values": ("mean", [0.5, 0.5]),
    "mean a text": ("mean", ["a", 0.5, 0.5]),
    "mean a bool": ("mean", [True, 0.5, 0.5]),
    "mean beyond float32": ("mean", [1e39, 0.5, 0.5]),
    "std 0": ("std", [0.0, 0.5, 0.5]),
    "std negative": ("std", [-0.5, 0.5, 0.5]),
    "rescale 0": ("rescale_factor", 0),
    "rescale negative": ("rescale_factor", -1),
    "rescale a bool": ("rescale_factor", True),
    "rescale a text": ("rescale_factor", "1/255"),
    "resample unknown name": ("resample", "fancy"),
    "resample 9": ("resample", 9),
    "resample a bool": ("resample", True),
    "no crop": ("crop", DELETE),
    "no mean": ("mean", DELETE),
    "no resample": ("resample", DELETE),
}
# fmt: on


def edited(values: dict, key: str, value) -> dict:
    values = dict(values)
    if value is DELETE:
        del values[key]
    else:
        values[key] = value
    return values


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_values_are_checked(case):
    key, value = CONFIG_CASES[case]
    with pytest.raises(DataError, match=rf"^cfg\.json: (no )?[\w., ]*\b{key}\b"):
        ImagePreprocess.from_config(edited(GOOD, key, value), "cfg.json")


@pytest.mark.parametrize("case", sorted(c for c in RECORD_CASES if "graph" not in c))
def test_record_values_are_checked(case):
    key, value = RECORD_CASES[case]
    record = ImagePreprocess.from_config(GOOD).record()
    with pytest.raises(DataError, match=rf"^export\.json: (no )?[\w., ]*preprocessing\.{key}\b"):
        ImagePreprocess.from_record(edited(record, key, value))


def files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if "cache" not in p.parts)


@pytest.mark.parametrize("case", sorted(RECORD_CASES))
def test_predict_refuses_each_bad_export_value(world, tmp_path, case):
    """Even when the record's own hash vouches for the edited value, it is refused by name."""
    import shutil

    key, value = RECORD_CASES[case]
    export = tmp_path / "export"
    shutil.copytree(world / "export", export)
    record = json.loads((export / "export.json").read_text())
    record["preprocessing"] = edited(record["preprocessing"], key, value)
    if "record_sha256" in record:
        from clipship.schemas import record_sha256

        record["record_sha256"] = record_sha256(record)
    (export / "export.json").write_text(json.dumps(record))
    before = files(tmp_path)
    result = CliRunner().invoke(app, ["predict", str(export), str(world / "folder/3/03.png")])
    assert result.exit_code == 1, result.output
    one_error_line(result.stderr, "export.json", key)
    assert files(tmp_path) == before


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_eval_refuses_each_bad_processor_value(world, tmp_path, case):
    key, value = CONFIG_CASES[case]
    pretrained = tmp_path / "pretrained"
    pretrained.mkdir()
    for item in Path(PRETRAINED).iterdir():
        if item.name not in ("preprocessor_config.json", "processor_config.json"):
            (pretrained / item.name).symlink_to(item)
    config = json.loads((Path(PRETRAINED) / "preprocessor_config.json").read_text())
    (pretrained / "preprocessor_config.json").write_text(json.dumps(edited(config, key, value)))
    before = files(tmp_path)
    result = CliRunner().invoke(
        app, ["eval", str(pretrained), "--task", f"d={world / 'folder'}", "--quiet"]
    )
    assert result.exit_code == 1, result.output
    one_error_line(result.stderr, "preprocessor_config.json", key)
    assert files(tmp_path) == before


# --- the commands, end to end: one line, and no more memory than a normal image ---------------


@pytest.mark.slow
@needs_proc
def test_predict_refuses_hostile_images_within_bounded_memory(world, tmp_path):
    """Before the limits: 2.1 GB peak for the 200000×1 PNG, a MemoryError for 3,000,000×1."""
    export, cache = world / "export", world / "cache"
    ok, baseline = clipship(
        "predict", export, world / "folder/3/03.png", cache=cache, peak=tmp_path / "p"
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    peaks = {"normal": baseline}
    for image in sorted((world / "hostile").iterdir()):
        result, peak = clipship("predict", export, image, cache=cache, peak=tmp_path / "p")
        assert result.returncode == 1, result.stderr[-3000:]
        one_error_line(result.stderr, str(image), image.stem.replace("x", "×"))
        peaks[image.name] = peak
        assert peak <= baseline + HEADROOM_KB, peaks
    print("predict peak RSS (KiB):", peaks)


@pytest.mark.slow
@needs_proc
def test_eval_refuses_or_skips_a_hostile_image_within_bounded_memory(world, tmp_path):
    import shutil

    cache = world / "cache"
    args = ["eval", MNIST, "--pretrained", PRETRAINED, "--quiet", "--json"]
    ok, baseline = clipship(
        *args, "--task", f"d={world / 'folder'}", cache=cache, peak=tmp_path / "p"
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    samples = json.loads(ok.stdout)["d"]["samples"]
    peaks = {"normal": baseline}
    every = tmp_path / "every"  # all three, for --skip-bad-images
    shutil.copytree(world / "folder", every)
    for w, h in HOSTILE:
        shutil.copy(world / "hostile" / f"{w}x{h}.png", every / "3" / f"{w}x{h}.png")
    # Refused: the largest claim alone (every one is refused by the same check before decoding,
    # as the skip run below shows for all three at once).
    for w, h in HOSTILE[1:2]:
        folder = tmp_path / f"folder_{w}x{h}"
        shutil.copytree(world / "folder", folder)
        shutil.copy(world / "hostile" / f"{w}x{h}.png", folder / "3" / f"{w}x{h}.png")
        refused, peak = clipship(*args, "--task", f"d={folder}", cache=cache, peak=tmp_path / "p")
        assert refused.returncode == 1, refused.stderr[-3000:]
        wide = folder / "3" / f"{w}x{h}.png"
        one_error_line(refused.stderr, str(wide), f"{w}×{h}", "--skip-bad-images")
        peaks[f"{w}x{h}"] = peak
        assert peak <= baseline + HEADROOM_KB, peaks
    task = ["--task", f"d={every}", "--skip-bad-images"]
    skipped, peaks["skipped"] = clipship(*args, *task, cache=cache, peak=tmp_path / "p")
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    report = json.loads(skipped.stdout)["d"]
    assert report["samples"] == samples and len(report["skipped"]) == len(HOSTILE), report
    assert peaks["skipped"] <= baseline + HEADROOM_KB, peaks
    print("eval peak RSS (KiB):", peaks)
