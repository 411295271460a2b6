"""Tiny transformer blocks built with onnx.helper for the pruning tests.

``block_model`` builds ``x -> attention (+residual) -> FFN (+residual) -> y`` with explicit
head-count constants in its Reshape/Expand targets (so pruning must rewrite them),
optional grouped KV heads (Unsqueeze -> Expand -> Reshape, as exporters emit) and a GELU
or SwiGLU FFN. Weights are multiples of 1/8 so products and sums are exact in float32.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import onnx_ir as ir
import onnxruntime as ort


def _w(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return (rng.integers(-4, 5, size=shape) / 8.0).astype(np.float32)


def block_model(
    *,
    hidden: int = 16,
    heads: int = 4,
    kv_heads: int | None = None,
    head_dim: int = 8,
    inter: int = 24,
    gated: bool = False,
    layers: int = 1,
    seed: int = 0,
    zero_heads: Mapping[int, list[int]] | None = None,
    zero_neurons: Mapping[int, list[int]] | None = None,
) -> ir.Model:
    """A model of ``layers`` transformer blocks over ``x: float[batch, 5, hidden]``.

    Args:
        zero_heads: Per layer, query heads whose output-projection rows are zero (with
            their query columns zero too), so removing them is exact.
        zero_neurons: Per layer, FFN neurons whose down rows and up/gate columns are zero.
    """
    rng = np.random.default_rng(seed)
    kv = kv_heads or heads
    group = heads // kv
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, arr: np.ndarray) -> str:
        inits.append(onh.from_array(arr, name))
        return name

    x = "x"
    for layer in range(layers):
        p = f"l{layer}_"
        wq, wk, wv, wo = (_w(rng, hidden, heads * head_dim), _w(rng, hidden, kv * head_dim),
                          _w(rng, hidden, kv * head_dim), _w(rng, heads * head_dim, hidden))
        bq, bk, bv, bo = (_w(rng, heads * head_dim), _w(rng, kv * head_dim),
                          _w(rng, kv * head_dim), _w(rng, hidden))
        for h in (zero_heads or {}).get(layer, []):
            cols = slice(h * head_dim, (h + 1) * head_dim)
            wo[cols, :] = 0
            wq[:, cols] = 0
            bq[cols] = 0
        proj = {}
        for name, w, b in (("q", wq, bq), ("k", wk, bk), ("v", wv, bv)):
            nodes.append(oh.make_node("MatMul", [x, const(p + "W" + name, w)], [p + name + "_mm"]))
            nodes.append(oh.make_node("Add", [p + name + "_mm", const(p + "b" + name, b)], [p + name]))
            proj[name] = p + name
        n_q, n_kv = heads, kv
        nodes.append(oh.make_node("Reshape", [proj["q"], const(p + "shape_q", np.array([0, 0, n_q, head_dim]))], [p + "q4"]))
        nodes.append(oh.make_node("Transpose", [p + "q4"], [p + "qt"], perm=[0, 2, 1, 3]))
        shape_kv = const(p + "shape_kv", np.array([0, 0, n_kv, head_dim]))
        for name in ("k", "v"):
            nodes.append(oh.make_node("Reshape", [proj[name], shape_kv], [p + name + "4"]))
            nodes.append(oh.make_node("Transpose", [p + name + "4"], [p + name + "t"], perm=[0, 2, 1, 3]))
            src = p + name + "t"
            if group > 1:
                nodes.append(oh.make_node("Unsqueeze", [src, const(p + name + "_ax", np.array([2]))], [p + name + "u"]))
                nodes.append(oh.make_node("Expand", [p + name + "u", const(p + name + "_exp", np.array([1, n_kv, group, 1, 1]))], [p + name + "e"]))
                nodes.append(oh.make_node("Reshape", [p + name + "e", const(p + name + "_rs", np.array([0, n_q, -1, head_dim]))], [p + name + "g"]))
                src = p + name + "g"
            nodes.append(oh.make_node("Identity", [src], [p + name + "h"]))
        nodes.append(oh.make_node("Transpose", [p + "kh"], [p + "kT"], perm=[0, 1, 3, 2]))
        nodes.append(oh.make_node("MatMul", [p + "qt", p + "kT"], [p + "s"]))
        nodes.append(oh.make_node("Mul", [p + "s", const(p + "scale", np.array(0.5, np.float32))], [p + "ss"]))
        nodes.append(oh.make_node("Softmax", [p + "ss"], [p + "pr"], axis=-1))
        nodes.append(oh.make_node("MatMul", [p + "pr", p + "vh"], [p + "c"]))
        nodes.append(oh.make_node("Transpose", [p + "c"], [p + "ct"], perm=[0, 2, 1, 3]))
        nodes.append(oh.make_node("Reshape", [p + "ct", const(p + "shape_o", np.array([0, 0, n_q * head_dim]))], [p + "c3"]))
        nodes.append(oh.make_node("MatMul", [p + "c3", const(p + "Wo", wo)], [p + "o_mm"]))
        nodes.append(oh.make_node("Add", [p + "o_mm", const(p + "bo", bo)], [p + "o"]))
        nodes.append(oh.make_node("Add", [x, p + "o"], [p + "h1"]))
        # FFN
        wu, wd, bu, bd = _w(rng, hidden, inter), _w(rng, inter, hidden), _w(rng, inter), _w(rng, hidden)
        wg = _w(rng, hidden, inter)
        for j in (zero_neurons or {}).get(layer, []):
            wd[j, :] = 0
            wu[:, j] = 0
            wg[:, j] = 0
            bu[j] = 0
        nodes.append(oh.make_node("MatMul", [p + "h1", const(p + "Wu", wu)], [p + "u_mm"]))
        nodes.append(oh.make_node("Add", [p + "u_mm", const(p + "bu", bu)], [p + "u"]))
        if gated:
            nodes.append(oh.make_node("MatMul", [p + "h1", const(p + "Wg", wg)], [p + "g"]))
            nodes.append(oh.make_node("Sigmoid", [p + "g"], [p + "gs"]))
            nodes.append(oh.make_node("Mul", [p + "g", p + "gs"], [p + "silu"]))
            nodes.append(oh.make_node("Mul", [p + "silu", p + "u"], [p + "act"]))
        else:
            nodes.append(oh.make_node("Gelu", [p + "u"], [p + "act"]))
        nodes.append(oh.make_node("MatMul", [p + "act", const(p + "Wd", wd)], [p + "d_mm"]))
        nodes.append(oh.make_node("Add", [p + "d_mm", const(p + "bd", bd)], [p + "d"]))
        out = "y" if layer == layers - 1 else p + "out"
        nodes.append(oh.make_node("Add", [p + "h1", p + "d"], [out]))
        x = out
    graph = oh.make_graph(
        nodes, "blocks",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 5, hidden])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 5, hidden])],
        inits,
    )
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 20)], ir_version=10)
    proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    onnx.checker.check_model(proto, full_check=True)
    return ir.serde.deserialize_model(proto)


def run(model: ir.Model, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
    """The model's first output on ONNX Runtime CPU, graph optimizations off."""
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, dict(feeds))[0]


def inputs(hidden: int = 16, batch: int = 2, seed: int = 1) -> dict[str, np.ndarray]:
    """Random activations that are multiples of 1/4 (exact arithmetic)."""
    rng = np.random.default_rng(seed)
    return {"x": (rng.integers(-8, 9, size=(batch, 5, hidden)) / 4.0).astype(np.float32)}


def copy(model: ir.Model) -> ir.Model:
    """A deep copy through serialization."""
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))
