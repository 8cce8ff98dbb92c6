"""The int8 file is exact on every CPU: checked on the file, and with a model of the saturating
kernel (x86-64 without VNNI) on real images; whatever CPU runs these tests."""

import json

import numpy as np
import onnx
import pytest
import torch

from clipship.exporter.quantize import (
    SATURATING,
    SCHEMES,
    check_integer_products,
    pair_sum_matmul,
    quantize_int8,
    saturation_effects,
)

from .test_eval import MNIST, PRETRAINED, REF

pytestmark = pytest.mark.numerics  # run again under other threads/ISA (Makefile)


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """The tiny fixture (mnist encoder + its head) as fp32 ONNX, then quantized in each scheme
    and in the full-range int8 scheme clipship shipped before (``s8``)."""
    from clipship.eval import build_heads, get_tasks
    from clipship.exporter.onnx_export import DeployModel, _onnx_export, _quiet
    from clipship.runtime.model import load_zero_shot

    root = tmp_path_factory.mktemp("quantize")
    zero_shot, folder, _ = load_zero_shot(str(MNIST), str(PRETRAINED), "cpu")
    heads, _ = build_heads(folder, get_tasks("mnist"), use_cache=False)
    deploy = DeployModel(zero_shot, heads).eval()
    names = ["image_embeds", "logits", "logits_mnist"]
    _onnx_export(deploy, REF["pixel_values"][:2], root / "fp32.onnx", names)
    paths = {}
    for scheme in [*SCHEMES.values(), SATURATING]:
        paths[scheme.name] = root / f"{scheme.name}.onnx"
        with _quiet():
            quantize_int8(root / "fp32.onnx", paths[scheme.name], scheme)
    return paths


def test_the_pair_sum_model_is_the_product_and_saturates_where_the_kernel_does():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (40, 37), dtype=np.uint8)  # odd K: the kernel pads with a zero
    b = rng.integers(-127, 128, (37, 9), dtype=np.int8)
    exact = a.astype(np.int64) @ b.astype(np.int64)
    assert np.array_equal(pair_sum_matmul(a, b, saturate=False), exact)
    assert not np.array_equal(pair_sum_matmul(a, b), exact)
    # The bound: 255·64 + 255·64 = 32640 fits an int16, 255·65·2 = 33150 does not.
    full = np.full((1, 2), 255, np.uint8)
    assert pair_sum_matmul(full, np.full((2, 1), 64, np.int8))[0, 0] == 32640
    assert pair_sum_matmul(full, np.full((2, 1), -64, np.int8))[0, 0] == -32640
    assert pair_sum_matmul(full, np.full((2, 1), 65, np.int8))[0, 0] == 32767
    # Any activations with weights in [-64, 64]: never saturates.
    safe = rng.integers(-64, 65, (37, 9), dtype=np.int8)
    assert np.array_equal(pair_sum_matmul(a, safe), a.astype(np.int64) @ safe.astype(np.int64))


def test_the_file_check_refuses_full_range_int8_and_passes_both_schemes(graphs):
    old = check_integer_products(onnx.load(str(graphs["s8"])))
    assert old and "int8 weight reaches 127" in old[0]
    for name in SCHEMES:
        model = onnx.load(str(graphs[name]))
        assert check_integer_products(model) == []
        products = [n for n in model.graph.node if n.op_type == "MatMulInteger"]
        assert len(products) == 25  # 4 layers × (q, k, v, out, fc1, fc2) + the patch embedding


def test_the_file_check_refuses_weights_it_cannot_see():
    from onnx import TensorProto, helper

    node = helper.make_node("MatMulInteger", ["a", "w"], ["y"], name="product")
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info("a", TensorProto.UINT8, [2, 2]),
            helper.make_tensor_value_info("w", TensorProto.INT8, [2, 2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [2, 2])],
    )
    problems = check_integer_products(helper.make_model(graph))
    assert problems == [
        "product: activation is not a DynamicQuantizeLinear (uint8)",
        "product: weight 'w' is not a constant",
    ]


def test_the_file_check_fails_closed_on_ops_it_does_not_know_and_in_subgraphs():
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.full((2, 2), 127, np.int8), "w")
    scale = numpy_helper.from_array(np.ones(1, np.float32), "s")
    zero = numpy_helper.from_array(np.zeros(1, np.int8), "z")
    qlinear = helper.make_node(
        "QLinearMatMul", ["a", "s", "z", "w", "s", "z", "s", "z"], ["y"], name="qlinear"
    )
    graph = helper.make_graph(
        [qlinear],
        "g",
        [helper.make_tensor_value_info("a", TensorProto.INT8, [2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.INT8, [2, 2])],
        [weight, scale, zero],
    )
    assert check_integer_products(helper.make_model(graph)) == [
        "qlinear: QLinearMatMul takes 8-bit constants ('z'), which clipship cannot check"
    ]
    # A full-range MatMulInteger hidden in an If branch is found too.
    inner = helper.make_graph(
        [
            helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "qs", "qz"], name="dq"),
            helper.make_node("MatMulInteger", ["q", "w"], ["y"], name="hidden"),
        ],
        "branch",
        [],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [2, 2])],
    )
    branch = helper.make_node("If", ["c"], ["y"], name="if", then_branch=inner, else_branch=inner)
    outer = helper.make_graph(
        [branch],
        "outer",
        [
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [2, 2])],
        [weight],
    )
    problems = check_integer_products(helper.make_model(outer))
    assert len(problems) == 2 and all(
        p.startswith("hidden: int8 weight reaches 127") for p in problems
    )


def test_export_refuses_an_int8_file_that_could_saturate(monkeypatch, tmp_path):
    """No shipped scheme fails the check, so the old one is slipped in to see the refusal."""
    from clipship.errors import ExportValidationError
    from clipship.exporter import onnx_export
    from clipship.exporter.onnx_export import export

    from .test_export import heads_and_images

    heads, images = heads_and_images(tmp_path)
    monkeypatch.setitem(onnx_export.SCHEMES, "s8", SATURATING)
    with pytest.raises(ExportValidationError, match="int8 graph is not portable: .* reaches 127"):
        export(
            str(MNIST),
            heads,
            tmp_path / "out",
            pretrained=str(PRETRAINED),
            precisions=["int8"],
            validation_data=images,
            int8_scheme="s8",
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heads", "images"]


def test_real_images_saturate_the_old_file_and_never_the_new_one(graphs):
    """The integer products of each file on the 64 real digit images, as the saturating kernel
    and as an exact one computes them."""
    pixels = REF["pixel_values"].numpy()
    old = saturation_effects(graphs["s8"], pixels)
    assert len(old) == 25 and max(old.values()) > 0.01  # the old file is wrong without VNNI
    new = saturation_effects(graphs["reduce_range"], pixels)
    assert len(new) == 25 and set(new.values()) == {0.0}
    # u8u8 has no int8 weights: onnxruntime's uint8 × uint8 kernels widen to 16 bits first.
    assert saturation_effects(graphs["u8u8"], pixels) == {}


def test_each_scheme_runs_close_to_fp32(graphs):
    import onnxruntime as ort

    pixels = REF["pixel_values"].numpy()

    def logits(path):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(["logits"], {"pixel_values": pixels})[0]

    reference = logits(graphs["s8"].with_name("fp32.onnx"))
    scale = np.abs(reference).max()
    for name in SCHEMES:
        # One 8-bit rounding per product through 4 layers of a random-weight model: measured
        # 1.8–2.6 % of the largest logit; 5 % would catch a scheme that quantized wrongly.
        assert np.abs(logits(graphs[name]) - reference).max() < 0.05 * scale
    assert torch.tensor(reference).isfinite().all()


def _int8_export(tmp_path, name, heads, images, **options):
    from clipship.exporter.onnx_export import export

    return export(str(MNIST), heads, tmp_path / name, pretrained=str(PRETRAINED),
                  precisions=["int8"], validation_data=images, **options)  # fmt: skip


@pytest.mark.slow
def test_auto_keeps_the_first_scheme_that_passes_and_falls_back(monkeypatch, tmp_path):
    """``auto`` tries the faster scheme first and keeps u8u8 when that one fails the gate. The
    first candidate here is a deliberately coarse one (7-bit, one scale per tensor), so its
    agreement is below u8u8's on any CPU; the gate is set between the two as measured here."""
    from clipship.exporter import onnx_export
    from clipship.exporter.onnx_export import Gates, agreement_bounds
    from clipship.exporter.quantize import Scheme

    from .test_export import heads_and_images

    heads, images = heads_and_images(tmp_path)
    coarse = Scheme("reduce_range", "int8", reduce_range=True, per_channel=False)
    monkeypatch.setitem(onnx_export.SCHEMES, "reduce_range", coarse)
    upper = {}
    for name in ("reduce_range", "u8u8"):
        done = _int8_export(tmp_path, name, heads, images, int8_scheme=name,
                            gates=Gates(min_agreement_int8=0.0))  # fmt: skip
        row = done["report"]["variants"]["int8"]["mnist"]
        upper[name] = agreement_bounds(row["images"] - row["disagreements"], row["images"])[1]
    assert upper["reduce_range"] < upper["u8u8"]
    gates = Gates(min_agreement_int8=(upper["reduce_range"] + upper["u8u8"]) / 2)
    done = _int8_export(tmp_path, "auto", heads, images, int8_scheme="auto", gates=gates)
    record = done["record"]["int8"]
    assert record["name"] == "u8u8" and "reduce_range did not" in record["chosen"]["by"]
    assert [n for n, c in record["chosen"]["candidates"].items() if c["passed"]] == ["u8u8"]
    assert check_integer_products(onnx.load(str(tmp_path / "auto" / "model_int8.onnx"))) == []
    saved = json.loads((tmp_path / "auto" / "export.json").read_text())["int8"]
    assert saved["chosen"] == record["chosen"]
    # with a gate both pass, auto keeps the faster one and validates nothing else
    done = _int8_export(tmp_path, "fast", heads, images, int8_scheme="auto",
                        gates=Gates(min_agreement_int8=0.5))  # fmt: skip
    assert done["record"]["int8"]["name"] == "reduce_range"
    assert list(done["record"]["int8"]["chosen"]["candidates"]) == ["reduce_range"]
    # both fail: one line naming both agreements, nothing written
    monkeypatch.setitem(onnx_export.SCHEMES, "u8u8", coarse)
    from clipship.errors import ExportValidationError

    with pytest.raises(ExportValidationError, match="every portable scheme") as failed:
        _int8_export(tmp_path, "none", heads, images, int8_scheme="auto", gates=gates)
    assert "reduce_range 0." in str(failed.value) and "u8u8 0." in str(failed.value)
    assert "\n" not in str(failed.value) and not (tmp_path / "none").exists()
