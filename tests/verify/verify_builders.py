"""Tiny ONNX model builders for the verification tests (imported by name, so unique)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def two_head_model(w1: np.ndarray, w2: np.ndarray) -> onnx.ModelProto:
    """``y1 = x @ w1``, ``y2 = x @ w2 + 1``, ``idx = argmax(y2)`` with x: float[batch, 4]."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["y1"], name="mm1"),
            helper.make_node("MatMul", ["x", "w2"], ["t"], name="mm2"),
            helper.make_node("Add", ["t", "one"], ["y2"], name="add"),
            helper.make_node("ArgMax", ["y2"], ["idx"], name="argmax", axis=1, keepdims=0),
        ],
        "two_head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [
            helper.make_tensor_value_info("y1", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("idx", TensorProto.INT64, ["batch"]),
        ],
        initializer=[
            numpy_helper.from_array(w1.astype(np.float32), "w1"),
            numpy_helper.from_array(w2.astype(np.float32), "w2"),
            numpy_helper.from_array(np.ones((3,), np.float32), "one"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model
