"""The ``smoothquant`` pass: float-equivalent, flattens outlier channels, helps int8 ``ptq``."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.errors import UsageError
from graphopt.infra.analysis import AnalysisManager
from graphopt.infra.context import PassContext
from graphopt.infra.registry import default_registry
from graphopt.passes.weight_only.smoothquant_pass import SmoothActivationsPass, SmoothQuantOptions

K, F = 64, 128
OUTLIERS = [5, 33]


def model() -> ir.Model:
    """``l = LayerNormalization(x)``; ``h = Relu(MatMul(l, W1))``; ``y = MatMul(h, W2) + l``."""
    rng = np.random.default_rng(0)
    scale = (1.0 + 0.2 * rng.standard_normal(K)).astype(np.float32)
    scale[OUTLIERS] = 40.0  # LayerNorm gamma outliers, as in BERT-like models
    inits = [
        numpy_helper.from_array(scale, "ln_scale"),
        numpy_helper.from_array((0.1 * rng.standard_normal(K)).astype(np.float32), "ln_bias"),
        numpy_helper.from_array((rng.standard_normal((K, F)) * 0.1).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal((F, K)) * 0.1).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "ln_scale", "ln_bias"], ["l"], axis=-1),
        helper.make_node("MatMul", ["l", "w1"], ["m"]),
        helper.make_node("Relu", ["m"], ["h"]),
        helper.make_node("MatMul", ["h", "w2"], ["y0"]),
        helper.make_node("Add", ["y0", "x"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", K])],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    proto.ir_version = 10
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))


def feeds(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((2, 16, K)).astype(np.float32)} for _ in range(count)]


def run(m: ir.Model, feed: dict[str, np.ndarray], names: list[str] | None = None) -> dict[str, np.ndarray]:
    proto = ir.serde.serialize_model(m)
    for n in names or []:
        proto.graph.output.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feed), strict=True))


def test_smoothing_is_float_equivalent_and_flattens_outliers() -> None:
    calib = feeds(4, 1)
    smoothed = model()
    ctx = PassContext(calibration=lambda: iter(calib))
    result = SmoothActivationsPass(SmoothQuantOptions()).run_with(smoothed, ctx, AnalysisManager(ctx))
    assert result.modified
    assert result.stats["groups_smoothed"] == {"norm": 1, "insert-mul": 1}
    onnx.checker.check_model(ir.serde.serialize_model(smoothed), full_check=True)
    ref = model()
    for feed in feeds(2, 2):
        np.testing.assert_allclose(run(smoothed, feed)["y"], run(ref, feed)["y"], rtol=1e-5, atol=2e-5)
    # The LayerNorm output (MatMul input) no longer has outlier channels.
    before = np.abs(run(ref, calib[0], ["l"])["l"]).reshape(-1, K).max(axis=0)
    after = np.abs(run(smoothed, calib[0], ["l"])["l"]).reshape(-1, K).max(axis=0)
    assert before.max() / np.median(before) > 10
    assert after.max() / np.median(after) < 0.5 * before.max() / np.median(before)


def _sqnr(m: ir.Model, test: list[dict[str, np.ndarray]]) -> float:
    ref = model()
    sig = err = 0.0
    for feed in test:
        want, got = run(ref, feed)["y"], run(m, feed)["y"]
        sig += float(np.sum(want.astype(np.float64) ** 2))
        err += float(np.sum((got - want).astype(np.float64) ** 2))
    return 10 * np.log10(sig / err)


def test_smoothquant_then_ptq_beats_ptq_alone() -> None:
    calib, test = feeds(8, 1), feeds(4, 3)
    registry = default_registry()
    results = {}
    for text in ("ptq", "smoothquant,ptq"):
        m = model()
        ctx = PassContext(calibration=lambda: iter(calib))
        pm = registry.build(text)
        pm.run_with(m, ctx, AnalysisManager(ctx))
        assert "QuantizeLinear" in {n.op_type for n in m.graph}
        results[text] = _sqnr(m, test)
    assert results["smoothquant,ptq"] > results["ptq"] + 1.0, results


def test_requires_calibration_and_checks_alpha() -> None:
    with pytest.raises(UsageError, match="--calib"):
        SmoothActivationsPass().run_with(model(), PassContext(), AnalysisManager(PassContext()))
    with pytest.raises(UsageError):
        SmoothActivationsPass.from_options({"alpha": "2"})
