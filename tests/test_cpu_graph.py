"""The int8 variant's graph rewrites: fused attention and the patch embedding as a MatMul."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from clipship.exporter.cpu_graph import fuse_attention, patch_embedding_as_matmul
from clipship.exporter.onnx_export import DeployModel, _onnx_export
from clipship.runtime.model import load_zero_shot

from .test_eval import PRETRAINED, REF

pytestmark = pytest.mark.numerics  # run again under other threads/ISA (Makefile)


def _run(model: onnx.ModelProto, pixels: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"pixel_values": pixels})


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def fixture_graph(request, tmp_path_factory):
    """The tiny CLIP fixture (4 layers, 4 heads, 8×8 patches) exported with two tasks' heads,
    with PyTorch's SDPA (scale on q and k) and with eager attention (scale on the scores)."""
    zero_shot, _, _ = load_zero_shot(str(PRETRAINED), None, "cpu")
    zero_shot.vision.set_attn_implementation(request.param)
    torch.manual_seed(0)
    heads = {
        "a": torch.nn.functional.normalize(torch.randn(10, 32), dim=1),
        "b": torch.nn.functional.normalize(torch.randn(7, 32), dim=1),
    }
    path = tmp_path_factory.mktemp("graph") / "model.onnx"
    _onnx_export(
        DeployModel(zero_shot, heads).eval(),
        REF["pixel_values"][:2],
        path,
        ["image_embeds", "logits", "logits_a", "logits_b"],
    )
    return onnx.load(str(path))


def _rewritten(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int, int]:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy, fuse_attention(copy), patch_embedding_as_matmul(copy)


def _export(module: torch.nn.Module, example: torch.Tensor, path) -> onnx.ModelProto:
    _onnx_export(module.eval(), example, path, ["out"])
    return onnx.load(str(path))


def _max_diff(a: onnx.ModelProto, b: onnx.ModelProto, pixels: np.ndarray) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(_run(a, pixels), _run(b, pixels)))


def test_rewrites_fuse_every_layer_and_keep_the_outputs(fixture_graph):
    pixels = REF["pixel_values"][:9].numpy()
    model, fused, patches = _rewritten(fixture_graph)
    assert (fused, patches) == (4, 1)  # one attention per layer, one patch embedding
    ops = _ops(model)
    assert ops.count("MultiHeadAttention") == 4
    assert "Softmax" not in ops and "Conv" not in ops
    assert [n.domain for n in model.graph.node if n.op_type == "MultiHeadAttention"] == [
        "com.microsoft"
    ] * 4
    assert any(o.domain == "com.microsoft" for o in model.opset_import)
    # Nothing unused is left behind: every initializer feeds a node.
    used = {i for n in model.graph.node for i in n.input}
    assert all(t.name in used for t in model.graph.initializer)
    # Float32 reassociation only: within 2e-6 of the largest magnitude (logits reach ~25).
    largest = max(float(np.abs(out).max()) for out in _run(fixture_graph, pixels))
    assert _max_diff(fixture_graph, model, pixels) <= 2e-6 * largest


class _Attention(torch.nn.Module):
    """Multi-head self-attention over 16 tokens of width 8 (the image rows as tokens), either
    global or within windows of 4 tokens (the windows folded into the batch)."""

    def __init__(self, heads: int = 2, windows: int = 1, scale: float | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.qkv = torch.nn.Linear(8, 24)
        self.heads, self.windows, self.scale = heads, windows, scale

    def forward(self, pixel_values):
        x = pixel_values[:, 0]  # [b, 16, 8]
        groups, tokens = x.shape[0] * self.windows, 16 // self.windows

        def split(t):
            return t.reshape(groups, tokens, self.heads, 8 // self.heads).transpose(1, 2)

        q, k, v = (split(t) for t in self.qkv(x).chunk(3, -1))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return (y.transpose(1, 2).reshape(x.shape[0], 16, 8),)


class _Patches(torch.nn.Module):
    def __init__(self, kernel: tuple[int, int], bias: bool, padding: int = 0):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 5, kernel, stride=kernel, bias=bias, padding=padding)

    def forward(self, pixel_values):
        return (self.conv(pixel_values).flatten(2).transpose(1, 2),)


@pytest.mark.parametrize(
    "module, shape, fused, patches",
    [
        (_Attention(heads=2), (3, 1, 16, 8), 1, 0),
        (_Attention(heads=1, scale=0.3), (3, 1, 16, 8), 1, 0),
        (_Patches((4, 4), bias=True), (3, 3, 16, 16), 0, 1),
        (_Patches((4, 2), bias=False), (3, 3, 16, 12), 0, 1),
        # Not what they look like: attention within windows is not global attention; scale 0
        # would read as onnxruntime's default; a padded conv is not a patch embedding.
        (_Attention(heads=2, windows=4), (3, 1, 16, 8), 0, 0),
        (_Attention(heads=2, scale=0.0), (3, 1, 16, 8), 0, 0),
        (_Patches((4, 4), bias=True, padding=1), (3, 3, 16, 16), 0, 0),
    ],
)
def test_rewrites_on_small_graphs(module, shape, fused, patches, tmp_path):
    example = torch.randn(*shape)
    model = _export(module, example, tmp_path / "small.onnx")
    rewritten, *counts = _rewritten(model)
    assert counts == [fused, patches]
    if not fused and not patches:
        assert _ops(rewritten) == _ops(model)
    pixels = torch.randn(5, *shape[1:]).numpy()  # another batch size than the export's
    with torch.no_grad():
        assert (
            np.abs(_run(model, pixels)[0] - module(torch.from_numpy(pixels))[0].numpy()).max()
            < 1e-5
        )
    assert _max_diff(model, rewritten, pixels) <= 2e-6


def test_masked_attention_is_left_alone(tmp_path):
    class Masked(_Attention):
        def forward(self, pixel_values):
            x = pixel_values[:, 0]
            q, k, v = (
                t.reshape(x.shape[0], 16, 2, 4).transpose(1, 2) for t in self.qkv(x).chunk(3, -1)
            )
            mask = torch.ones(16, 16, dtype=torch.bool).tril()
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            return (y.transpose(1, 2).reshape(x.shape[0], 16, 8),)

    model = _export(Masked(), torch.randn(2, 1, 16, 8), tmp_path / "masked.onnx")
    assert "Softmax" in _ops(model)
    assert _rewritten(model)[1] == 0
