"""Rewrites of the exported graph for the CPU int8 variant, applied before quantization.

Two patterns of the exporter's output cost the int8 graph a third of its time on a CPU, and
onnxruntime's own optimizer rewrites neither:

- **Attention.** The exporter spells each attention as head-split Reshape/Transposes, a scaled
  ``MatMul``, ``Softmax``, a second ``MatMul`` and a head-merge Transpose/Reshape; the Transposes
  alone were 14 % of int8 time at batch 32. :func:`fuse_attention` replaces each with one
  ``com.microsoft.MultiHeadAttention`` over the [batch, tokens, width] projections (an onnxruntime
  contrib op: the int8 variant is for onnxruntime's CPU provider anyway).
- **Patch embedding.** A Conv with kernel = stride over the image is a matrix product over
  patches. As ``Conv`` it stays fp32 (onnxruntime's ``ConvInteger`` is slower than its fp32 Conv):
  11 % of int8 time. :func:`patch_embedding_as_matmul` writes it as patchify + ``MatMul``, which
  dynamic quantization then turns into an int8 product like every other.

Each rewrite checks the operators, permutations and shapes of what it replaces, leaves anything
else alone, and returns how many places it rewrote; the export's validation against PyTorch
checks the result.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

CONTRIB = "com.microsoft"


class _Graph:
    """Producer/consumer maps, constants and inferred shapes of one ONNX graph."""

    def __init__(self, model: Any):
        self.graph = model.graph
        self.outputs = {out.name for out in self.graph.output}
        self.producer = {out: node for node in self.graph.node for out in node.output}
        self.consumers: dict[str, list[Any]] = {}
        for node in self.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.tensors = {t.name: t for t in self.graph.initializer}
        for node in self.graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.tensors[node.output[0]] = node.attribute[0].t
        self.shapes = _inferred_shapes(model)

    def constant(self, name: str) -> np.ndarray | None:
        from onnx import numpy_helper

        tensor = self.tensors.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def only_consumer(self, name: str) -> Any | None:
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in self.outputs else None

    def made_by(self, name: str, op_type: str) -> Any | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    def scalar(self, name: str) -> float | None:
        tensor = self.tensors.get(name)
        if tensor is None or math.prod(tensor.dims) != 1:
            return None
        return float(self.constant(name).reshape(-1)[0])


def _inferred_shapes(model: Any) -> dict[str, list[int | str | None]]:
    """Every value's shape (ints, symbolic names, None where unknown), inferred on a copy of the
    graph whose large initializers are bare inputs: shape inference copies the model, and only
    small constants (shapes, axes) matter to it."""
    import onnx
    from onnx import helper

    graph = onnx.GraphProto()
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    for tensor in model.graph.initializer:
        if math.prod(tensor.dims) <= 64:
            graph.initializer.append(tensor)
        else:
            graph.input.append(
                helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
            )
    light = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    inferred = onnx.shape_inference.infer_shapes(light, data_prop=True).graph
    shapes = {}
    for info in [*inferred.value_info, *inferred.input, *inferred.output]:
        dims = info.type.tensor_type.shape.dim
        shapes[info.name] = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims
        ]
    return shapes


def _attr(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _scaled(g: _Graph, name: str) -> tuple[str, float]:
    """Strip a multiplication by a scalar constant (either operand order)."""
    node = g.made_by(name, "Mul")
    if node is not None:
        for i in (0, 1):
            factor = g.scalar(node.input[1 - i])
            if factor is not None:
                return node.input[i], factor
    return name, 1.0


def _known(*dims: Any) -> bool:
    return all(isinstance(d, int) for d in dims)


def _head_split(g: _Graph, name: str) -> tuple[str, int, int, int, Any] | None:
    """``name`` = Transpose(0,2,1,3)(Reshape([b, s, heads, d])(x)) with x [b, s, heads·d]:
    return (x, heads, d, s, b)."""
    transpose = g.made_by(name, "Transpose")
    if transpose is None or list(_attr(transpose, "perm", [])) != [0, 2, 1, 3]:
        return None
    return _split_heads(g, transpose.input[0])


def _split_heads(g: _Graph, name: str) -> tuple[str, int, int, int, Any] | None:
    """``name`` = Reshape([b, s, heads, d])(x) with x [b, s, heads·d]: (x, heads, d, s, b).
    Tokens and width must match exactly, so that (with the element count) the batch axis is the
    same too: a reshape that folds tokens into the batch (local attention windows) is not a head
    split."""
    reshape = g.made_by(name, "Reshape")
    if reshape is None:
        return None
    source, split = g.shapes.get(reshape.input[0]), g.shapes.get(reshape.output[0])
    if not source or not split or len(source) != 3 or len(split) != 4:
        return None
    tokens, heads, width = split[1:]
    if not _known(tokens, heads, width) or source[1:] != [tokens, heads * width]:
        return None
    return reshape.input[0], heads, width, tokens, source[0]


def _key_split(g: _Graph, name: str) -> tuple[str, int, int, int, Any] | None:
    """``name`` = the head-split key [b, heads, s, d] with its last two axes swapped, spelled as
    one Transpose(0,2,3,1) of the split (eager attention), as Transpose(0,1,3,2) of the
    head-split key, or as Reshape to [b·heads, s, d], Transpose(0,2,1), Reshape back to
    [b, heads, d, s] (the exporter's SDPA): what :func:`_head_split` returns for the key."""
    node = g.made_by(name, "Transpose")
    if node is not None and list(_attr(node, "perm", [])) == [0, 2, 3, 1]:
        return _split_heads(g, node.input[0])
    if node is not None and list(_attr(node, "perm", [])) == [0, 1, 3, 2]:
        return _head_split(g, node.input[0])
    back = g.made_by(name, "Reshape")
    flip = back is not None and g.made_by(back.input[0], "Transpose")
    if not flip or list(_attr(flip, "perm", [])) != [0, 2, 1]:
        return None
    flat = g.made_by(flip.input[0], "Reshape")
    if flat is None:
        return None
    four, three = g.shapes.get(flat.input[0]), g.shapes.get(flat.output[0])
    swapped = g.shapes.get(back.output[0])
    if not four or not three or not swapped or len(four) != 4 or len(three) != 3:
        return None
    heads, tokens, width = four[1:]
    if not _known(heads, tokens, width) or three[1:] != [tokens, width]:
        return None
    if swapped[1:] != [heads, width, tokens]:
        return None
    return _head_split(g, flat.input[0])


def _head_merge(g: _Graph, name: str, tokens: int, width: int) -> tuple[list[Any], str] | None:
    """``name`` [b, heads, s, d] → Transpose(0,2,1,3) → Reshape to [b, s, width]: the two nodes
    and the merged name."""
    transpose = g.only_consumer(name)
    if transpose is None or transpose.op_type != "Transpose":
        return None
    if list(_attr(transpose, "perm", [])) != [0, 2, 1, 3]:
        return None
    reshape = g.only_consumer(transpose.output[0])
    if reshape is None or reshape.op_type != "Reshape":
        return None
    merged = g.shapes.get(reshape.output[0])
    if not merged or len(merged) != 3 or merged[1:] != [tokens, width]:
        return None
    return [transpose, reshape], reshape.output[0]


def fuse_attention(model: Any) -> int:
    """Replace every softmax(q·kᵀ·scale)·v with split and merged heads by one
    ``com.microsoft.MultiHeadAttention``; returns how many were fused. The scale may be applied
    to q and k (PyTorch's SDPA) or to the scores (eager attention). Attention with a mask or a
    bias on the scores is left alone (CLIP's vision tower has neither)."""
    from onnx import helper

    g = _Graph(model)
    fused: dict[int, Any] = {}  # id(node the fused op replaces) → the fused op
    for softmax in list(g.graph.node):
        if softmax.op_type != "Softmax" or _attr(softmax, "axis", -1) not in (-1, 3):
            continue
        scores_name, scale = _scaled(g, softmax.input[0])
        scores = g.made_by(scores_name, "MatMul")
        mix = g.only_consumer(softmax.output[0])
        if scores is None or mix is None or mix.op_type != "MatMul":
            continue
        if mix.input[0] != softmax.output[0]:
            continue
        query, query_scale = _scaled(g, scores.input[0])
        key_t, key_scale = _scaled(g, scores.input[1])
        scale *= query_scale * key_scale
        q, k, v = _head_split(g, query), _key_split(g, key_t), _head_split(g, mix.input[1])
        if not q or not k or not v or not (q[1] == k[1] == v[1]) or q[2] != k[2] or k[3] != v[3]:
            continue
        if q[4] is None or not (q[4] == k[4] == v[4]):  # one batch (no broadcast query)
            continue
        if not scale > 0:  # onnxruntime reads scale 0 as "the default 1/√d"
            continue
        merge = _head_merge(g, mix.output[0], q[3], v[1] * v[2])
        if merge is None:
            continue
        nodes, output = merge
        fused[id(nodes[-1])] = helper.make_node(
            "MultiHeadAttention",
            [q[0], k[0], v[0]],
            [output],
            domain=CONTRIB,
            name=f"{output}/MultiHeadAttention",
            num_heads=q[1],
            scale=scale,
        )
    if fused:
        _replace(model, fused)
    return len(fused)


def patch_embedding_as_matmul(model: Any) -> int:
    """Rewrite Conv(kernel = stride, no padding) over the graph input, flattened and transposed
    to [b, patches, width], as patchify (Reshape, Transpose, Reshape) + MatMul (+ Add for a bias).
    Returns 1 if rewritten, else 0."""
    from onnx import helper, numpy_helper

    g = _Graph(model)
    inputs = {i.name for i in g.graph.input}
    for conv in g.graph.node:
        if conv.op_type != "Conv" or conv.input[0] not in inputs or conv.input[1] not in g.tensors:
            continue
        weight = g.constant(conv.input[1])
        image = g.shapes.get(conv.input[0])
        if weight.ndim != 4 or not image or len(image) != 4:
            continue
        width, channels, kh, kw = weight.shape
        strides = list(_attr(conv, "strides", [1, 1]))
        height_width = image[2:]
        if (
            strides != [kh, kw]
            or any(_attr(conv, "pads", [0, 0, 0, 0]))
            or any(d != 1 for d in _attr(conv, "dilations", [1, 1]))
            or _attr(conv, "group", 1) != 1
            or _attr(conv, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
            or image[1] != channels
            or not _known(*height_width)
            or height_width[0] % kh
            or height_width[1] % kw
        ):
            continue
        flatten = g.only_consumer(conv.output[0])
        if flatten is None or flatten.op_type != "Reshape":
            continue
        transpose = g.only_consumer(flatten.output[0])
        if transpose is None or transpose.op_type != "Transpose":
            continue
        gh, gw = height_width[0] // kh, height_width[1] // kw
        out = g.shapes.get(transpose.output[0])
        if (
            list(_attr(transpose, "perm", [])) != [0, 2, 1]
            or not out
            or out[1:] != [gh * gw, width]
        ):
            continue
        stem = f"{conv.output[0]}/patchify"
        constants = {
            f"{stem}/grid": np.array([-1, channels, gh, kh, gw, kw], np.int64),
            f"{stem}/rows": np.array([-1, gh * gw, channels * kh * kw], np.int64),
            f"{stem}/weight": np.ascontiguousarray(weight.reshape(width, -1).T),
        }
        product = f"{stem}/product" if len(conv.input) > 2 else transpose.output[0]
        nodes = [
            helper.make_node(
                "Reshape",
                [conv.input[0], f"{stem}/grid"],
                [f"{stem}/grid_out"],
                name=f"{stem}/grid",
            ),
            helper.make_node(
                "Transpose",
                [f"{stem}/grid_out"],
                [f"{stem}/patches"],
                name=f"{stem}/patches",
                perm=[0, 2, 4, 1, 3, 5],
            ),
            helper.make_node(
                "Reshape",
                [f"{stem}/patches", f"{stem}/rows"],
                [f"{stem}/rows_out"],
                name=f"{stem}/rows",
            ),
            helper.make_node(
                "MatMul", [f"{stem}/rows_out", f"{stem}/weight"], [product], name=f"{stem}/MatMul"
            ),
        ]
        if len(conv.input) > 2:
            nodes.append(
                helper.make_node(
                    "Add", [product, conv.input[2]], [transpose.output[0]], name=f"{stem}/bias"
                )
            )
        model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in constants.items())
        _replace(model, {id(transpose): nodes})
        return 1
    return 0


def _replace(model: Any, replacements: dict[int, Any]) -> None:
    """Put each replacement where its node was, drop the nodes, initializers and value infos
    nothing uses any more, and import the contrib domain when a contrib op is in."""
    from onnx import helper

    graph = model.graph
    nodes = []
    for node in graph.node:
        new = replacements.get(id(node), node)
        nodes.extend(new if isinstance(new, list) else [new])
    needed = {out.name for out in graph.output}
    kept = []
    for node in reversed(nodes):
        if any(out in needed for out in node.output):
            kept.append(node)
            needed.update(node.input)
    kept.reverse()
    del graph.node[:]
    graph.node.extend(kept)
    initializers = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    value_info = [v for v in graph.value_info if v.name in needed]
    del graph.value_info[:]
    graph.value_info.extend(value_info)
    if any(n.domain == CONTRIB for n in kept) and all(
        o.domain != CONTRIB for o in model.opset_import
    ):
        model.opset_import.append(helper.make_opsetid(CONTRIB, 1))
