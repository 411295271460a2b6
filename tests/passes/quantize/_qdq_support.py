"""Small models and helpers for the quantization pass tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import onnxruntime as ort

from graphopt.infra.analysis import AnalysisManager
from graphopt.infra.context import PassContext

F = onnx.TensorProto.FLOAT


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array(np.asarray(array), name)


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    inits: Mapping[str, np.ndarray] = {},
    opset: int = 17,
    ir_version: int = 8,
) -> ir.Model:
    graph = oh.make_graph(
        list(nodes), "g", list(inputs), list(outputs), [_init(k, v) for k, v in inits.items()]
    )
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])
    proto.ir_version = ir_version
    onnx.checker.check_model(proto)
    proto = onnx.shape_inference.infer_shapes(proto)
    return ir.serde.deserialize_model(proto)


def mlp(seed: int = 0, d_in: int = 16, hidden: int = 32, d_out: int = 8) -> ir.Model:
    """x[batch, d_in] -> MatMul+Add -> Relu -> MatMul+Add -> y (symbolic batch)."""
    rng = np.random.default_rng(seed)
    inits = {
        "W1": (rng.standard_normal((d_in, hidden)) / np.sqrt(d_in)).astype(np.float32),
        "b1": (0.1 * rng.standard_normal(hidden)).astype(np.float32),
        "W2": (rng.standard_normal((hidden, d_out)) / np.sqrt(hidden)).astype(np.float32),
        "b2": (0.1 * rng.standard_normal(d_out)).astype(np.float32),
    }
    nodes = [
        oh.make_node("MatMul", ["x", "W1"], ["m1"], name="mm1"),
        oh.make_node("Add", ["m1", "b1"], ["a1"], name="add1"),
        oh.make_node("Relu", ["a1"], ["r1"], name="relu1"),
        oh.make_node("MatMul", ["r1", "W2"], ["m2"], name="mm2"),
        oh.make_node("Add", ["m2", "b2"], ["y"], name="add2"),
    ]
    return make_model(
        nodes,
        [oh.make_tensor_value_info("x", F, ["batch", d_in])],
        [oh.make_tensor_value_info("y", F, ["batch", d_out])],
        inits,
    )


def convnet(seed: int = 0, opset: int = 17) -> ir.Model:
    """image[b,1,8,8] -> Conv(8)+Relu -> MaxPool -> Conv(16)+Relu -> Flatten -> Gemm(10)."""
    rng = np.random.default_rng(seed)
    inits = {
        "W1": (rng.standard_normal((8, 1, 3, 3)) / 3).astype(np.float32),
        "B1": (0.1 * rng.standard_normal(8)).astype(np.float32),
        "W2": (rng.standard_normal((16, 8, 3, 3)) / np.sqrt(72)).astype(np.float32),
        "B2": (0.1 * rng.standard_normal(16)).astype(np.float32),
        "W3": (rng.standard_normal((10, 16 * 4 * 4)) / 16).astype(np.float32),
        "B3": (0.1 * rng.standard_normal(10)).astype(np.float32),
    }
    nodes = [
        oh.make_node("Conv", ["image", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        oh.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        oh.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        oh.make_node("Conv", ["p1", "W2", "B2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        oh.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        oh.make_node("Flatten", ["r2"], ["f"], name="flatten"),
        oh.make_node("Gemm", ["f", "W3", "B3"], ["logits"], name="fc", transB=1),
    ]
    return make_model(
        nodes,
        [oh.make_tensor_value_info("image", F, ["batch", 1, 8, 8])],
        [oh.make_tensor_value_info("logits", F, ["batch", 10])],
        inits,
        opset=opset,
    )


def images(n: int, batch: int = 4, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Smooth non-negative 8x8 images (blurred noise in [0, 1]), like the digits data."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(n):
        raw = rng.random((batch, 1, 10, 10)).astype(np.float32)
        blurred = (raw[..., :-2, :-2] + raw[..., 1:-1, 1:-1] + raw[..., 2:, 2:]) / 3
        feeds.append({"image": np.clip(blurred * 1.5 - 0.25, 0, 1).astype(np.float32)})
    return feeds


def gaussian_feeds(name: str, shape: Sequence[int], n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{name: rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def context(feeds: Sequence[Mapping[str, np.ndarray]], target: str = "ort") -> PassContext:
    items = list(feeds)
    return PassContext(target=target, calibration=lambda: iter(items))


def run_pass(pass_: Any, model: ir.Model, ctx: PassContext) -> Any:
    return pass_.run_with(model, ctx, AnalysisManager(ctx))


def session(model: ir.Model | onnx.ModelProto, optimize: bool = False) -> ort.InferenceSession:
    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.intra_op_num_threads = 1
    return ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def outputs(model: ir.Model | onnx.ModelProto, feed: Mapping[str, np.ndarray], optimize: bool = False) -> list[np.ndarray]:
    return session(model, optimize).run(None, dict(feed))


def ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def node(model: ir.Model, name: str) -> ir.Node:
    for n in model.graph:
        if n.name == name:
            return n
    raise KeyError(name)


def producer_op(value: ir.Value | None) -> str | None:
    p = value.producer() if value is not None else None
    return p.op_type if p is not None else None


def save(model: ir.Model, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ir.save(model, path)
    return path
