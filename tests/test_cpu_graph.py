"""The int8 variant's graph rewrites: fused attention and the patch embedding as a MatMul."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from clipship.eval.evaluate import load_zero_shot
from clipship.exporter.cpu_graph import fuse_attention, patch_embedding_as_matmul
from clipship.exporter.onnx_export import DeployModel, _onnx_export

from .test_eval import PRETRAINED, REF


def _run(model: onnx.ModelProto, pixels: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"pixel_values": pixels})


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


@pytest.fixture(scope="module")
def fixture_graph(tmp_path_factory):
    """The tiny CLIP fixture (4 layers, 4 heads, 8×8 patches) exported with two tasks' heads."""
    zero_shot, _, _ = load_zero_shot(str(PRETRAINED), None, "cpu")
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


def test_rewrites_fuse_every_layer_and_keep_the_outputs(fixture_graph):
    pixels = REF["pixel_values"][:9].numpy()
    reference = _run(fixture_graph, pixels)
    model = onnx.ModelProto()
    model.CopyFrom(fixture_graph)
    assert fuse_attention(model) == 4  # one per layer
    assert patch_embedding_as_matmul(model) == 1
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
    for before, after in zip(reference, _run(model, pixels)):
        # Float32 reassociation only: within 2e-6 of the largest magnitude (logits reach ~25).
        assert np.abs(before - after).max() <= 2e-6 * np.abs(before).max()
    # Applying them again finds nothing more to rewrite.
    assert fuse_attention(model) == 0 and patch_embedding_as_matmul(model) == 0


class _PaddedStem(torch.nn.Module):
    """A conv whose kernel differs from its stride (not a patch embedding) then attention
    with a mask: neither rewrite applies."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, kernel_size=4, stride=4, padding=1)
        self.mask = torch.nn.Parameter(torch.zeros(1, 1, 64, 64), requires_grad=False)

    def forward(self, pixel_values):
        x = self.conv(pixel_values).flatten(2).transpose(1, 2)[:, :64]  # [b, 64, 8]
        q = x.view(x.shape[0], 64, 2, 4).transpose(1, 2)
        y = torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=self.mask)
        return (y.transpose(1, 2).reshape(x.shape[0], 64, 8),)


def test_rewrites_leave_other_patterns_alone(tmp_path):
    path = tmp_path / "other.onnx"
    _onnx_export(_PaddedStem().eval(), torch.randn(2, 3, 32, 32), path, ["out"])
    model = onnx.load(str(path))
    ops = _ops(model)
    assert "Softmax" in ops and "Conv" in ops
    assert fuse_attention(model) == 0 and patch_embedding_as_matmul(model) == 0
    assert _ops(model) == ops
