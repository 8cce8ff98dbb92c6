"""`clipship export` and `clipship predict` on the tiny fixture and real digit images."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from clipship.cli import app
from clipship.errors import ClipshipError
from clipship.exporter.onnx_export import Gates

from .test_eval import MNIST, PRETRAINED, REF

pytestmark = pytest.mark.numerics  # run again under other threads/ISA (Makefile)

runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Heads for three tasks, 64 real digit images as PNG files, and a merged (TA) model."""
    import os

    root = tmp_path_factory.mktemp("export")
    os.environ["CLIPSHIP_CACHE"] = str(root / "cache")
    images = root / "digits"
    images.mkdir()
    for i, u8 in enumerate(REF["images"].numpy()):
        Image.fromarray(u8).save(images / f"{i:02d}.png")
    assert (
        runner.invoke(
            app,
            [
                "heads",
                str(PRETRAINED),
                "--tasks",
                "mnist,svhn,eurosat",
                "--out",
                str(root / "heads"),
            ],
        ).exit_code
        == 0
    )
    merged = runner.invoke(
        app,
        [
            "merge",
            "--pretrained",
            str(PRETRAINED),
            "--model",
            f"mnist={MNIST}",
            "--method",
            "task_arithmetic",
            "--lambda",
            "1",
            "--out",
            str(root / "merged"),
            "--quiet",
        ],
    )
    assert merged.exit_code == 0, merged.output
    yield root
    os.environ.pop("CLIPSHIP_CACHE", None)


def heads_and_images(root):
    """A heads folder for mnist and the 64 reference digits as PNG files, under ``root``."""
    from clipship.eval import build_heads, get_tasks
    from clipship.runtime.heads import save_heads

    heads, meta = build_heads(PRETRAINED, get_tasks("mnist"), use_cache=False)
    save_heads(root / "heads", heads, meta, force=False)
    (root / "images").mkdir()
    for i, u8 in enumerate(REF["images"].numpy()):
        Image.fromarray(u8).save(root / "images" / f"{i:02d}.png")
    return root / "heads", root / "images"


def export_args(root, out, *extra):
    return [
        "export",
        str(root / "merged"),
        "--heads",
        str(root / "heads"),
        "--out",
        str(out),
        "--validation-data",
        str(root / "digits"),
        *extra,
    ]


def test_export_all_variants_validated_and_reloadable(setup):
    import onnx
    import onnxruntime as ort

    out = setup / "out"
    # Random-weight fixture: logit margins are tiny, so fp16/int8 gates are relaxed here; the
    # mini-benchmark's trained models meet the default gates (benchmarks/export_speed.py).
    result = runner.invoke(
        app,
        export_args(
            setup,
            out,
            "--precision",
            "fp32,fp16,int8",
            "--min-agreement-fp16",
            "0.9",
            "--min-agreement-int8",
            "0.8",
            "--json",
        ),
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    fp32 = report["variants"]["fp32"]
    assert all(
        fp32[t]["max_abs_logit_diff"] <= 1e-3 and fp32[t]["top1_agreement"] == 1.0
        for t in ("mnist", "svhn", "eurosat")
    )
    assert fp32["batch_1_7_vs_32_max_diff"] <= 1e-4
    for rows in report["variants"].values():
        for t in ("mnist", "svhn", "eurosat"):
            row = rows[t]
            assert row["images"] == 64  # --validation-data: every image counts for every task
            assert row["disagreements"] == round((1 - row["top1_agreement"]) * row["images"])
            assert row["agreement_lower"] <= row["top1_agreement"] <= row["agreement_upper"]
            assert row["disagreements"] <= row["disagreements_allowed"]
    record = json.loads((out / "export.json").read_text())
    assert record["tasks"] == ["mnist", "svhn", "eurosat"]
    assert record["class_offsets"] == {"mnist": [0, 10], "svhn": [10, 20], "eurosat": [20, 30]}
    assert record["preprocessing"]["crop"] == [32, 32] and record["opset"] == 20
    assert record["variants"] == {
        "fp32": "model.onnx",
        "fp16": "model_fp16.onnx",
        "int8": "model_int8.onnx",
    }
    graph = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(graph, full_check=True)
    assert {p.key for p in graph.metadata_props} >= {"clipship.tasks", "clipship.class_offsets"}
    assert [o.name for o in graph.graph.output] == [
        "image_embeds",
        "logits",
        "logits_mnist",
        "logits_svhn",
        "logits_eurosat",
    ]
    int8_nodes = onnx.load(str(out / "model_int8.onnx")).graph.node
    int8_ops = [n.op_type for n in int8_nodes]
    # The projection (one row per image) stays a float MatMul.
    assert any(n.op_type == "MatMul" and "projection" in " ".join(n.input) for n in int8_nodes)
    assert "DynamicQuantizeLinear" in int8_ops or "DynamicQuantizeMatMul" in int8_ops
    # Attention fused, the patch embedding a (quantized) MatMul: see exporter/cpu_graph.py.
    assert record["int8"]["rewrites"] == {"fused_attention": 4, "patch_embedding_matmul": 1}
    # The default scheme, auto: reduce_range first, kept when it passes the gate; both are exact
    # on every CPU (exporter/quantize.py).
    tried = record["int8"]["chosen"]["candidates"]
    assert list(tried)[0] == "reduce_range"
    assert record["int8"]["name"] == next(n for n, c in tried.items() if c["passed"])
    assert record["int8"]["integer_ops"] == {"MatMulInteger": 25}
    from clipship.exporter.quantize import check_integer_products

    assert check_integer_products(onnx.load(str(out / "model_int8.onnx"))) == []
    assert int8_ops.count("MultiHeadAttention") == 4 and "Conv" not in int8_ops
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        embeds, logits, *parts = session.run(
            None, {"pixel_values": REF["pixel_values"][:batch].numpy()}
        )
        assert logits.shape == (batch, 30) and np.allclose(
            np.linalg.norm(embeds, axis=1), 1, atol=1e-5
        )
        assert np.array_equal(np.concatenate(parts, axis=1), logits)


def test_predict_agrees_with_eval_and_needs_no_torch(setup):
    from clipship.runtime.data import Preprocess
    from clipship.runtime.heads import load_heads
    from clipship.runtime.model import load_zero_shot

    out = setup / "out_fp32"
    assert runner.invoke(app, export_args(setup, out)).exit_code == 0
    files = sorted((setup / "digits").glob("*.png"))
    result = runner.invoke(
        app, ["predict", str(out), *map(str, files), "--task", "svhn", "--top-k", "3", "--json"]
    )
    assert result.exit_code == 0, result.output
    predicted = [row["top"][0]["index"] for row in json.loads(result.stdout)]
    model, folder, _ = load_zero_shot(str(setup / "merged"), None, "cpu")
    pre = Preprocess.from_pretrained(folder)
    batch = torch.stack([torch.from_numpy(pre.to_uint8(Image.open(f))) for f in files])
    with torch.no_grad():
        logits = model.logits(
            model.embed(pre.normalize(batch, pre.lookup_table())),
            load_heads(setup / "heads")[0]["svhn"],
        )
    assert predicted == logits.argmax(1).tolist()
    code = (
        "import sys, runpy; sys.argv = ['clipship', 'predict', sys.argv[1], sys.argv[2], '--json']\n"
        "try:\n    runpy.run_module('clipship.cli', run_name='__main__')\nexcept SystemExit as e:\n    assert not e.code\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(out), str(files[0])], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[]"


def test_a_failed_gate_writes_nothing(setup):
    result = runner.invoke(app, export_args(setup, setup / "strict", "--max-logit-diff", "1e-12"))
    assert result.exit_code == 1 and "fp32 export differs from PyTorch" in result.stderr
    assert not (setup / "strict").exists()
    assert not [p for p in setup.iterdir() if p.name.startswith(".strict")]


def test_gates_fail_on_evidence_not_on_one_image():
    from clipship.errors import ExportValidationError
    from clipship.exporter.onnx_export import Gates, _gate, agreement_bounds

    def row(wrong, images):
        lower, upper = agreement_bounds(images - wrong, images)
        return {
            "max_abs_logit_diff": 0.3,
            "top1_agreement": 1 - wrong / images,
            "disagreements": wrong,
            "images": images,
            "agreement_lower": lower,
            "agreement_upper": upper,
        }

    # 2 of 100 images: 98 % observed, but the sample cannot show that agreement is below 99 %.
    _gate(
        "int8", {"mnist": row(0, 100), "svhn": row(2, 100)}, ["mnist", "svhn"], Gates(0, 1, 1, 0.99)
    )
    # 30 of 100 (what saturation did without VNNI) fails any sensible minimum.
    with pytest.raises(ExportValidationError) as error:
        _gate("int8", {"mnist": row(0, 100), "svhn": row(30, 100)}, ["mnist", "svhn"], Gates())
    assert str(error.value) == (
        "int8 export disagrees with PyTorch on svhn: top-1 agreement 0.7000 (30 of 100 images "
        "disagree; 95 % upper bound 0.7751) < 0.98"
    )
    # The same rate on more images is evidence: 20 of 1000 against 99 %.
    with pytest.raises(ExportValidationError, match="20 of 1000"):
        _gate("int8", {"mnist": row(20, 1000)}, ["mnist"], Gates(min_agreement_int8=0.99))
    # A minimum of 1 allows no disagreement at all.
    with pytest.raises(ExportValidationError, match="1 of 5000"):
        _gate("fp16", {"mnist": row(1, 5000)}, ["mnist"], Gates(min_agreement_fp16=1.0))


def test_agreement_bounds_are_clopper_pearson():
    from scipy.stats import beta

    from clipship.exporter.onnx_export import agreement_bounds

    for agreeing, images in [(98, 100), (100, 100), (0, 10), (5, 10), (3490, 3539), (1, 1)]:
        lower, upper = agreement_bounds(agreeing, images)
        exact_lower = beta.ppf(0.05, agreeing, images - agreeing + 1) if agreeing else 0.0
        exact_upper = beta.ppf(0.95, agreeing + 1, images - agreeing) if agreeing < images else 1.0
        # Bisection to 2^-60 on a sum of exact binomial terms: far inside 1e-9.
        assert lower == pytest.approx(exact_lower, abs=1e-9)
        assert upper == pytest.approx(exact_upper, abs=1e-9)


def test_every_exported_task_is_validated_on_its_own_images(setup, tmp_path):
    from dataclasses import replace

    from clipship.eval import get_tasks
    from clipship.exporter.onnx_export import export

    from .test_eval import digits_formats

    digits_formats(tmp_path)
    mnist = replace(get_tasks("mnist")[0], data=str(tmp_path / "parquet"))
    common = dict(validation_tasks=[mnist], gates=Gates(0.5, 1, 0.5, 0.5))
    with pytest.raises(ClipshipError, match="task svhn: no validation images"):
        export(
            str(setup / "merged"),
            setup / "heads",
            tmp_path / "a",
            tasks=["mnist", "svhn"],
            **common,
        )
    result = export(
        str(setup / "merged"), setup / "heads", tmp_path / "b", tasks=["mnist"], **common
    )
    assert result["report"]["variants"]["fp32"]["mnist"]["images"] == 64
    assert result["report"]["cpu"].startswith("CPU: ")


def test_refusals(setup, tmp_path):
    from .conftest import load_weights, write_model

    def error(*args):
        result = runner.invoke(app, list(map(str, args)))
        assert result.exit_code != 0 and result.stderr.startswith("error: "), result.output
        return result.stderr

    assert "unknown task 'dtd'" in error(*export_args(setup, tmp_path / "a", "--tasks", "dtd"))
    weights = load_weights(PRETRAINED)
    weights["text_projection.weight"] = weights["text_projection.weight"] * 3
    write_model(tmp_path / "other", weights, PRETRAINED)
    assert "heads were built for another model" in error(
        "export",
        tmp_path / "other",
        "--heads",
        setup / "heads",
        "--out",
        tmp_path / "b",
        "--validation-data",
        setup / "digits",
    )
    (tmp_path / "exists").mkdir()
    assert "already exists" in error(*export_args(setup, tmp_path / "exists"))
    for size in ("0", "-3"):
        assert f"--validation-size {size}: must be at least 1" in error(
            *export_args(setup, tmp_path / "d", "--validation-size", size)
        )
    assert "--precision: name at least one" in error(
        *export_args(setup, tmp_path / "e", "--precision", ",")
    )
    assert "--int8-scheme s8: choose among auto, u8u8, reduce_range" in error(
        *export_args(setup, tmp_path / "f", "--precision", "int8", "--int8-scheme", "s8")
    )
    assert not [p for p in tmp_path.iterdir() if p.name in "def" or p.name.startswith(".")]
    assert "not an export folder" in error("predict", tmp_path, setup / "digits" / "00.png")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert "--tensorrt needs the tensorrt package" in error(
            *export_args(setup, tmp_path / "c", "--tensorrt")
        )


def test_predict_refuses_a_graph_changed_since_export(setup, tmp_path):
    import onnx

    out = tmp_path / "export"
    assert runner.invoke(app, export_args(setup, out)).exit_code == 0
    record = json.loads((out / "export.json").read_text())
    assert set(record["sha256"]) == {"model.onnx"}
    graph = onnx.load(str(out / "model.onnx"))
    graph.doc_string = "edited"
    onnx.save(graph, str(out / "model.onnx"))
    result = runner.invoke(app, ["predict", str(out), str(setup / "digits/00.png")])
    assert result.exit_code == 1
    assert result.stderr == "error: model.onnx: changed since it was exported (sha256 differs)\n"
