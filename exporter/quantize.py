"""The int8 variant: dynamic quantization whose integer products are exact on every CPU.

onnxruntime's dynamic quantization turns each matrix product into ``DynamicQuantizeLinear`` (the
activations as uint8, 0…255, scale and zero point per call) and ``MatMulInteger`` with constant
quantized weights. How a CPU computes that integer product depends on its instructions:

- x86-64 with VNNI (AVX512-VNNI, AVX-VNNI, AMX) and ARM accumulate u8·s8 products in int32:
  exact.
- x86-64 without VNNI (AVX2, AVX-512 without VNNI: AMD Zen 1–3, Intel CPUs before Cascade Lake
  servers and Ice Lake clients) use ``VPMADDUBSW`` for uint8 × int8 in onnxruntime's CPU
  kernels (MLAS), which adds the products of two neighbouring ``k`` into an int16 and
  **saturates** at ±32767. With int8 weights in [-127, 127] a pair reaches
  255·127·2 = 64770: the same file gives wrong logits there (measured: top-1 agreement with
  PyTorch fell from 98.8 % to 81 % on the mini-benchmark).

So the weights must keep every pair in range whatever the activations are. Two schemes do
(:data:`SCHEMES`): ``u8u8`` (uint8 weights with a zero point; MLAS's uint8 × uint8 kernels
widen to 16 bits first, or use exact dot-product instructions, everywhere) and
``reduce_range`` (int8 weights in [-64, 64], 7 bits: 255·64·2 = 32640 < 32767, the bound
onnxruntime's own weight transformer uses). :func:`check_integer_products` proves it on the
file, independently of the CPU that runs the check; :func:`pair_sum_matmul` is a model of the
saturating kernel, for tests and benchmarks. (The float parts around the integer products
still use each CPU's own kernels: agreement with PyTorch can move by an image or two.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Products whose second input is a quantized constant weight.
INTEGER_PRODUCTS = {"MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
INT16_MAX = 32767
SAFE_INT8 = 64  # |w| ≤ 64: 255·64·2 = 32640 fits an int16 pair sum


@dataclass(frozen=True)
class Scheme:
    """How weights are quantized (onnxruntime ``quantize_dynamic`` settings)."""

    name: str
    weight_type: str  # "uint8" or "int8"
    reduce_range: bool
    per_channel: bool = True
    activation_type: str = "uint8"  # DynamicQuantizeLinear's output

    def record(self) -> dict[str, Any]:
        return asdict(self)

    def settings(self) -> dict[str, Any]:
        """This scheme as ``onnxruntime.quantization.quantize_dynamic`` arguments."""
        from onnxruntime.quantization import QuantType

        weight_type = QuantType.QUInt8 if self.weight_type == "uint8" else QuantType.QInt8
        return dict(
            per_channel=self.per_channel, reduce_range=self.reduce_range, weight_type=weight_type
        )


SCHEMES = {
    "u8u8": Scheme("u8u8", "uint8", reduce_range=False),
    "reduce_range": Scheme("reduce_range", "int8", reduce_range=True),
}
# ``auto``: the first of these whose file passes the export's agreement gates. reduce_range runs
# faster wherever measured (``benchmarks/export_speed.py``: ViT-B/32 at batch 32, 3.64× eager
# against 1.70× on Zen 4 with AVX-512 VNNI, 2.44× against 2.15× on Zen 3 with AVX2); u8u8 keeps
# 8-bit weights, so it agrees with PyTorch a little more often.
AUTO = "auto"
AUTO_ORDER = ("reduce_range", "u8u8")
DEFAULT_SCHEME = AUTO
# Only for measuring what the schemes above avoid: full-range int8 weights saturate without VNNI.
SATURATING = Scheme("s8", "int8", reduce_range=False)


def quantize_int8(
    source: Path, target: Path, scheme: Scheme, external: bool = False
) -> dict[str, int]:
    """Dynamic per-channel quantization of the encoder's matrix products into ``target``, after
    the CPU rewrites of :mod:`clipship.exporter.cpu_graph` (fused attention; the patch embedding
    as a MatMul, so it is quantized too). The projection (a Gemm: one row per image, no time to
    save) and the heads (their weight is MatMul's first input) stay fp32. Returns what was
    rewritten, for ``export.json``."""
    import onnx
    from onnxruntime.quantization import quantize_dynamic

    from clipship.exporter.cpu_graph import fuse_attention, patch_embedding_as_matmul

    model = onnx.load(str(source))
    rewrites = {
        "fused_attention": fuse_attention(model),
        "patch_embedding_matmul": patch_embedding_as_matmul(model),
    }
    quantize_dynamic(
        model,
        str(target),
        **scheme.settings(),
        op_types_to_quantize=["MatMul"],
        # onnxruntime turns each Gemm into a MatMul named "<gemm>_MatMul" and quantizes it.
        nodes_to_exclude=[f"{n.name}_MatMul" for n in model.graph.node if n.op_type == "Gemm"]
        + synthesis_products(model),
        use_external_data_format=external,  # weights in "<target>.data"
    )
    return rewrites


def synthesis_products(model: Any) -> list[str]:
    """A mixture's weight-synthesis products (routing × its stacked task vectors, the buffers
    named ``tau_*`` in :mod:`clipship.exporter.mixture`): they make each image's MLP weights,
    which int8 rounding would move for every product downstream, so they stay float."""
    return [
        node.name
        for node in model.graph.node
        if node.op_type == "MatMul"
        and any(i.rsplit(".", 1)[-1].startswith("tau_") for i in node.input)
    ]


def check_integer_products(model: Any) -> list[str]:
    """Problems that would let an integer product of ``model`` (an ``onnx.ModelProto``)
    saturate: a weight that is not a constant, or int8 outside [-64, 64]; an activation that is
    not a ``DynamicQuantizeLinear`` output; any other operator fed 8-bit constants (QLinearMatMul,
    QGemm, QAttention, …: not checked, so refused), in subgraphs too. Empty when every product
    is exact on every CPU. Reads the file, not the CPU."""
    from onnx import TensorProto, numpy_helper

    eight_bit = (TensorProto.INT8, TensorProto.UINT8)
    problems: list[str] = []

    def check(graph: Any, constants: dict[str, Any]) -> None:
        constants = dict(constants)
        constants.update({t.name: t for t in graph.initializer})
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                constants[node.output[0]] = node.attribute[0].t
        producers = {out: node for node in graph.node for out in node.output}
        for node in graph.node:
            for attribute in node.attribute:  # If / Loop / Scan bodies
                for sub in [attribute.g, *attribute.graphs]:
                    if sub.node:
                        check(sub, constants)
            if node.op_type not in INTEGER_PRODUCTS:
                fed = [
                    i for i in node.input if i in constants and constants[i].data_type in eight_bit
                ]
                if fed:
                    problems.append(
                        f"{node.name}: {node.op_type} takes 8-bit constants ({fed[0]!r}), which "
                        "clipship cannot check"
                    )
                continue
            activation = producers.get(node.input[0])
            if node.op_type != "DynamicQuantizeMatMul" and (
                activation is None or activation.op_type != "DynamicQuantizeLinear"
            ):
                problems.append(f"{node.name}: activation is not a DynamicQuantizeLinear (uint8)")
            weight = constants.get(node.input[1])
            if weight is None:
                problems.append(f"{node.name}: weight {node.input[1]!r} is not a constant")
            elif weight.data_type == TensorProto.INT8:
                values = numpy_helper.to_array(weight)
                worst = int(np.abs(values.astype(np.int16)).max(initial=0))
                if worst > SAFE_INT8:
                    problems.append(
                        f"{node.name}: int8 weight reaches {worst} (> {SAFE_INT8}: pairs of "
                        "products saturate int16 on x86-64 CPUs without VNNI)"
                    )
            elif weight.data_type != TensorProto.UINT8:
                problems.append(f"{node.name}: weight is neither uint8 nor int8")

    check(model.graph, {})
    return problems


def integer_ops(model: Any) -> dict[str, int]:
    """How many of each integer product the graph holds (for ``export.json``)."""
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in INTEGER_PRODUCTS:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def pair_sum_matmul(a: np.ndarray, b: np.ndarray, saturate: bool = True) -> np.ndarray:
    """``a @ b`` for uint8 ``a`` [M, K] and int8 ``b`` [K, N] the way ``VPMADDUBSW``-based
    kernels compute it: products of neighbouring k (0-1, 2-3, …) summed into int16 (clamped to
    ±32767 when ``saturate``), then those pair sums added in int32. Without saturation this is
    the exact product."""
    a = a.astype(np.int32)
    b = b.astype(np.int32)
    if a.shape[1] % 2:
        a = np.pad(a, ((0, 0), (0, 1)))
        b = np.pad(b, ((0, 1), (0, 0)))
    b = b.reshape(-1, 2, b.shape[1])
    out = np.empty((len(a), b.shape[2]), np.int32)
    rows = max(1, 2**24 // (b.shape[0] * b.shape[2]))  # ≤ 64 MiB of pair sums at a time
    for start in range(0, len(a), rows):
        chunk = a[start : start + rows].reshape(-1, b.shape[0], 2)
        # pairs[m, j, n] = a[m, 2j]·b[2j, n] + a[m, 2j+1]·b[2j+1, n]
        pairs = np.einsum("mjp,jpn->mjn", chunk, b)
        if saturate:
            np.clip(pairs, -INT16_MAX - 1, INT16_MAX, out=pairs)
        out[start : start + rows] = pairs.sum(axis=1)
    return out


def saturation_effects(path: Path, pixels: np.ndarray) -> dict[str, float]:
    """For each integer product of the graph at ``path`` with int8 weights: the fraction of its
    outputs on ``pixels`` (float32 [N, 3, H, W]) that the saturating kernel
    (:func:`pair_sum_matmul`) computes differently from the exact product. The quantized
    activations are read from the graph as onnxruntime computes them. uint8 weights are left
    out: their kernels are exact."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    weights = {t.name: t for t in model.graph.initializer}
    products = [
        node
        for node in model.graph.node
        if node.op_type == "MatMulInteger"
        and node.input[1] in weights
        and weights[node.input[1]].data_type == TensorProto.INT8
    ]
    wanted = sorted({node.input[0] for node in products})
    model.graph.output.extend(
        helper.make_tensor_value_info(name, TensorProto.UINT8, None) for name in wanted
    )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])
    activations = dict(zip(wanted, session.run(wanted, {"pixel_values": pixels})))
    effects = {}
    for node in products:
        a = activations[node.input[0]]
        a = a.reshape(-1, a.shape[-1])
        b = numpy_helper.to_array(weights[node.input[1]])
        exact = pair_sum_matmul(a, b, saturate=False)
        effects[node.name] = float((pair_sum_matmul(a, b) != exact).mean())
    return effects
