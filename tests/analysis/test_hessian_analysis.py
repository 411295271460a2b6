"""InputHessianAnalysis: Grams vs numpy, caching, limits, errors."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import pytest

from graphopt.analysis.hessian import InputHessianAnalysis, InputHessians
from graphopt.errors import CalibrationError, UsageError
from graphopt.infra.analysis import AnalysisManager, Aspect, PreservedAnalyses
from graphopt.infra.context import PassContext

F = onnx.TensorProto.FLOAT
K, N = 6, 4


def _model(seed: int = 0) -> ir.Model:
    """x[b, s, K] -> h = MatMul(x, W) -> y = Relu(h); symbolic b, s."""
    w = np.random.default_rng(seed).standard_normal((K, N)).astype(np.float32)
    graph = oh.make_graph(
        [
            oh.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
            oh.make_node("Relu", ["h"], ["y"], name="relu"),
        ],
        "g",
        [oh.make_tensor_value_info("x", F, ["b", "s", K])],
        [oh.make_tensor_value_info("y", F, ["b", "s", N])],
        [onnx.numpy_helper.from_array(w, "w")],
    )
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    proto.ir_version = 8
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))


def _feeds(shapes: list[tuple[int, int]], seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((K, K)).astype(np.float32)  # correlated channels
    return [{"x": (rng.standard_normal((*s, K)).astype(np.float32) @ mix)} for s in shapes]


def _ctx(feeds: list[dict[str, np.ndarray]]) -> PassContext:
    return PassContext(calibration=lambda: iter(feeds))


def test_hessians_match_numpy_over_varying_shapes() -> None:
    feeds = _feeds([(1, 3), (2, 5), (3, 1)])
    model = _model()
    w = model.graph.initializers["w"].const_value.numpy()  # type: ignore[union-attr]
    hs = AnalysisManager(_ctx(feeds)).get(InputHessianAnalysis(["x", "h"]), model)
    assert isinstance(hs, InputHessians)
    assert hs.samples == 3
    x = np.concatenate([f["x"].reshape(-1, K) for f in feeds]).astype(np.float64)
    h = x @ w.astype(np.float64)
    for name, rows in (("x", x), ("h", h)):
        expect = rows.T @ rows / rows.shape[0]
        assert hs.rows(name) == rows.shape[0] == 1 * 3 + 2 * 5 + 3 * 1
        np.testing.assert_allclose(hs.hessian(name), expect, rtol=1e-5, atol=1e-5)
        assert hs.hessian(name).dtype == np.float64
        np.testing.assert_allclose(hs.channel_rms(name), np.sqrt(np.mean(rows**2, axis=0)), rtol=1e-5)
        np.testing.assert_allclose(hs.channel_mean_abs(name), np.mean(np.abs(rows), axis=0), rtol=1e-5)
        np.testing.assert_allclose(hs.channel_max_abs(name), np.max(np.abs(rows), axis=0), rtol=1e-5)


def test_max_samples_limits_feeds() -> None:
    feeds = _feeds([(1, 4)] * 5)
    hs = AnalysisManager(_ctx(feeds)).get(InputHessianAnalysis(["x"], max_samples=2), _model())
    assert hs.samples == 2
    x = np.concatenate([f["x"].reshape(-1, K) for f in feeds[:2]]).astype(np.float64)
    np.testing.assert_allclose(hs.hessian("x"), x.T @ x / 8, rtol=1e-5, atol=1e-6)


def test_cached_and_invalidated_by_weight_changes() -> None:
    feeds = _feeds([(1, 2)])
    model = _model()
    am = AnalysisManager(_ctx(feeds))
    analysis = InputHessianAnalysis(["h"])
    first = am.get(analysis, model)
    assert am.get(InputHessianAnalysis(["h"], progress_after_s=99), model) is first
    assert am.hits == 1
    am.invalidate(PreservedAnalyses.only(Aspect.STRUCTURE, Aspect.SHAPES))
    assert am.cached(analysis, model) is None


def test_nan_names_value_and_sample() -> None:
    feeds = _feeds([(1, 2), (1, 2)])
    feeds[1]["x"][0, 1, 2] = np.nan
    with pytest.raises(CalibrationError, match=r"sample 1.*'h'"):
        AnalysisManager(_ctx(feeds)).get(InputHessianAnalysis(["h"]), _model())


def test_errors_unknown_value_zero_samples_no_data() -> None:
    with pytest.raises(UsageError, match="nope"):
        AnalysisManager(_ctx(_feeds([(1, 1)]))).get(InputHessianAnalysis(["nope"]), _model())
    with pytest.raises(CalibrationError, match="zero samples"):
        AnalysisManager(_ctx([])).get(InputHessianAnalysis(["h"]), _model())
    with pytest.raises(CalibrationError, match="--calib"):
        AnalysisManager(PassContext()).get(InputHessianAnalysis(["h"]), _model())
    with pytest.raises(TypeError):
        InputHessianAnalysis("h")
