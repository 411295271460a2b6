"""Builders and references shared by the runtime_ext tests."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from graphopt.backends.ext import library_path
from graphopt.backends.ext.format import DOMAIN, OP_TYPE, ExtWeights
from graphopt.quant.groupwise import GroupQuantized, num_groups


def random_quantized(
    rng: np.random.Generator, n: int, k: int, bits: int, group_size: int, asymmetric: bool
) -> GroupQuantized:
    """Random codes, positive scales and (optionally) zero points."""
    groups = num_groups(k, group_size)
    codes = rng.integers(0, 1 << bits, size=(n, k), dtype=np.uint8)
    scales = (rng.random((n, groups)) * 0.1 + 0.01).astype(np.float32)
    zps = rng.integers(0, 1 << bits, size=(n, groups), dtype=np.uint8) if asymmetric else None
    return GroupQuantized(codes, scales, zps, bits, group_size)


def lowbit_model(
    ext: ExtWeights,
    a_shape: Sequence[int | str],
    bias: np.ndarray | None = None,
    attributes: dict[str, int] | None = None,
    packed: np.ndarray | None = None,
    scales: np.ndarray | None = None,
    zero_points: np.ndarray | None = None,
) -> bytes:
    """A one-node ``MatMulLowBit`` model; keyword overrides build broken variants."""
    packed = ext.packed if packed is None else packed
    scales = ext.scales if scales is None else scales
    zero_points = ext.zero_points if zero_points is None else zero_points
    initializers = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "S")]
    inputs = ["A", "B", "S", "", ""]
    if zero_points is not None:
        initializers.append(numpy_helper.from_array(zero_points, "Z"))
        inputs[3] = "Z"
    if bias is not None:
        initializers.append(numpy_helper.from_array(bias, "bias"))
        inputs[4] = "bias"
    while inputs[-1] == "":
        inputs.pop()
    attrs = dict(ext.attributes if attributes is None else attributes)
    node = helper.make_node(OP_TYPE, inputs, ["Y"], domain=DOMAIN, name="lowbit", **attrs)
    graph = helper.make_graph(
        [node],
        "lowbit",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, list(a_shape))],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)]
    )
    return model.SerializeToString()


def ext_session(model: bytes | str, threads: int = 1) -> ort.InferenceSession:
    """A CPU session with the runtime_ext library registered."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 4
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.register_custom_ops_library(str(library_path()))
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def reference(a: np.ndarray, q: GroupQuantized, bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(expected ``Y`` in float64, a per-element magnitude for the tolerance).

    The magnitude bounds the float32 rounding of any summation order, including the
    kernels' ``sum(code * a) - zp * sum(a)`` split: ``|a| @ ((code + zp) * scale)``.
    """
    w = q.dequantize().astype(np.float64)  # [N, K]
    a64 = a.astype(np.float64)
    y = a64 @ w.T
    group_index = np.arange(q.k) // q.group_size
    zp = q.zero_point_matrix().astype(np.float64)[:, group_index]
    scale = q.scales.astype(np.float64)[:, group_index]
    magnitude = np.abs(a64) @ ((q.codes + zp) * scale).T
    if bias is not None:
        y = y + bias
        magnitude = magnitude + np.abs(bias)
    return y, magnitude


def reference_int8(a: np.ndarray, q: GroupQuantized, bias: np.ndarray | None) -> np.ndarray:
    """``accuracy_level=4`` semantics in numpy: float32 ``[M, N]``.

    Per row of ``a`` and group: ``q_a = clip(rint(a * (127 / amax)), -127, 127)`` (float32,
    ties to even), an exact integer dot with ``code - zp``, then
    ``sum_g float32(dot) * (scale * amax / 127)`` accumulated in float32 group by group.
    """
    m, k = a.shape
    zp = q.zero_point_matrix().astype(np.int64)
    out = np.zeros((m, q.n), np.float32)
    for i in range(m):
        total = np.zeros(q.n, np.float32)
        for g in range(q.groups):
            cols = slice(g * q.group_size, min((g + 1) * q.group_size, k))
            x = a[i, cols]
            amax = np.float32(np.abs(x).max())
            inverse = np.float32(127) / amax if amax > 0 else np.float32(0)
            qa = np.clip(np.rint(x * inverse), -127, 127).astype(np.int64)
            dot = q.codes[:, cols].astype(np.int64) @ qa - zp[:, g] * qa.sum()
            total = total + dot.astype(np.float32) * (q.scales[:, g] * (amax / np.float32(127)))
        out[i] = total if bias is None else total + bias
    return out


#: Error allowed per unit of magnitude: float32 rounding of a K <= 4096 term sum in any
#: order stays far below this (measured worst ratios are ~2e-8).
RTOL = 1e-6


def error_ratio(y: np.ndarray, expected: np.ndarray, magnitude: np.ndarray) -> float:
    """``max |y - expected| / magnitude`` (0 for empty outputs)."""
    assert y.shape == expected.shape, (y.shape, expected.shape)
    if y.size == 0:
        return 0.0
    err = np.abs(y.astype(np.float64) - expected)
    return float(np.max(err / (magnitude + 1e-30)))


def assert_close(y: np.ndarray, expected: np.ndarray, magnitude: np.ndarray) -> None:
    """``|y - expected| <= RTOL * magnitude`` elementwise."""
    ratio = error_ratio(y, expected, magnitude)
    assert ratio <= RTOL, f"max error / magnitude = {ratio:.3g} > {RTOL}"


def model_proto(model: bytes) -> onnx.ModelProto:
    return onnx.load_from_string(model)
