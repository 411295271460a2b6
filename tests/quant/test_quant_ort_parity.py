"""quantize/dequantize are bit-identical to ONNX Runtime's QuantizeLinear/DequantizeLinear."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from graphopt.quant import QParams, QuantDType, QuantSpec, compute_qparams, dequantize, quantize

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper


def _session(op: str, opset: int, x: np.ndarray, qp: QParams, axis: int | None) -> Any:
    in_type = (
        TensorProto.FLOAT if op == "QuantizeLinear" else helper.np_dtype_to_tensor_dtype(x.dtype)
    )
    out_type = (
        helper.np_dtype_to_tensor_dtype(qp.zero_point.dtype)
        if op == "QuantizeLinear"
        else TensorProto.FLOAT
    )
    attrs = {} if axis is None else {"axis": axis}
    node = helper.make_node(op, ["x", "scale", "zp"], ["y"], **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", in_type, list(x.shape))],
        [helper.make_tensor_value_info("y", out_type, list(x.shape))],
        [
            numpy_helper.from_array(qp.scale, "scale"),
            numpy_helper.from_array(qp.zero_point, "zp"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset < 19 else 10
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _data(rng: np.random.Generator, shape: tuple[int, ...], lo: float, hi: float) -> np.ndarray:
    span = hi - lo
    x = rng.uniform(lo - 0.2 * span, hi + 0.2 * span, size=shape).astype(np.float32)
    flat = x.reshape(-1)
    flat[:5] = [0.0, np.inf, -np.inf, 3.4e38, -3.4e38]
    return x


CASES = [(opset, dtype) for opset in (13, 19, 21) for dtype in (QuantDType.U8, QuantDType.S8)] + [
    (21, QuantDType.U16),
    (21, QuantDType.S16),
]


@pytest.mark.parametrize(("opset", "dtype"), CASES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_per_tensor_bit_identical(opset: int, dtype: QuantDType, symmetric: bool) -> None:
    rng = np.random.default_rng(opset * 7 + dtype.bits)
    spec = QuantSpec(dtype, symmetric=symmetric, per_channel=False, axis=None)
    for trial in range(6):
        lo, hi = sorted(rng.standard_normal(2) * 10.0 ** rng.integers(-3, 4))
        qp = compute_qparams(lo, hi, spec)
        x = _data(rng, (64, 257), lo, hi)
        ours = quantize(x, qp, spec)
        theirs = _session("QuantizeLinear", opset, x, qp, None).run(None, {"x": x})[0]
        assert theirs.dtype == ours.dtype
        np.testing.assert_array_equal(ours, theirs, err_msg=f"trial {trial}")
        deq = _session("DequantizeLinear", opset, ours, qp, None).run(None, {"x": ours})[0]
        np.testing.assert_array_equal(dequantize(ours, qp), deq)


@pytest.mark.parametrize("opset", [13, 19, 21])
@pytest.mark.parametrize("dtype", [QuantDType.U8, QuantDType.S8])
@pytest.mark.parametrize("axis", [0, 1])
def test_per_channel_bit_identical(opset: int, dtype: QuantDType, axis: int) -> None:
    rng = np.random.default_rng(opset + axis)
    spec = QuantSpec(dtype, symmetric=dtype.signed, per_channel=True, axis=axis)
    shape = (16, 24, 5)
    x = (
        rng.standard_normal(shape)
        * rng.uniform(1e-3, 1e2, size=shape[axis]).reshape(
            [-1 if i == axis else 1 for i in range(3)]
        )
    ).astype(np.float32)
    others = tuple(i for i in range(3) if i != axis)
    lo, hi = x.min(axis=others) * 0.8, x.max(axis=others) * 0.8  # some values saturate
    qp = compute_qparams(lo, hi, spec)
    ours = quantize(x, qp, spec)
    theirs = _session("QuantizeLinear", opset, x, qp, axis).run(None, {"x": x})[0]
    np.testing.assert_array_equal(ours, theirs)
    deq = _session("DequantizeLinear", opset, ours, qp, axis).run(None, {"x": ours})[0]
    np.testing.assert_array_equal(dequantize(ours, qp, axis=axis), deq)


@pytest.mark.parametrize("dtype", [QuantDType.U8, QuantDType.S8])
def test_ties_round_half_to_even_like_ort(dtype: QuantDType) -> None:
    # A power-of-two scale makes x / scale exact, so every .5 is a true tie.
    spec = QuantSpec(dtype, symmetric=False, per_channel=False, axis=None)
    zp = np.array(3 if dtype is QuantDType.U8 else -3, dtype=dtype.numpy_dtype)
    qp = QParams(scale=np.array(0.25, dtype=np.float32), zero_point=zp)
    x = ((np.arange(-300, 300) + 0.5) * 0.25).astype(np.float32)
    ours = quantize(x, qp, spec)
    theirs = _session("QuantizeLinear", 13, x, qp, None).run(None, {"x": x})[0]
    np.testing.assert_array_equal(ours, theirs)
    assert int(quantize(np.float32(0.125), qp, spec)) == int(zp)  # 0.5 rounds to 0
    assert int(quantize(np.float32(0.375), qp, spec)) == int(zp) + 2  # 1.5 rounds to 2
