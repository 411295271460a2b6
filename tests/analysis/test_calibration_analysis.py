"""ActivationStatsAnalysis: results, caching and invalidation, streaming, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import pytest

from graphopt.analysis import ActivationStats, ActivationStatsAnalysis
from graphopt.calibration_data import CalibrationDataset
from graphopt.errors import CalibrationError, UsageError
from graphopt.infra.analysis import AnalysisManager, Aspect, PreservedAnalyses
from graphopt.infra.context import PassContext

F = onnx.TensorProto.FLOAT


def _model() -> ir.Model:
    """x[b, s] -> h = Mul(x, 2) -> r = Sqrt(h) -> y = Add(r, c); symbolic b and s."""
    graph = oh.make_graph(
        [
            oh.make_node("Mul", ["x", "two"], ["h"], name="mul"),
            oh.make_node("Sqrt", ["h"], ["r"], name="sqrt"),
            oh.make_node("Add", ["r", "c"], ["y"], name="add"),
        ],
        "g",
        [oh.make_tensor_value_info("x", F, ["b", "s"])],
        [oh.make_tensor_value_info("y", F, ["b", "s"])],
        [
            onnx.numpy_helper.from_array(np.array(2.0, np.float32), "two"),
            onnx.numpy_helper.from_array(np.array([0.5], np.float32), "c"),
        ],
    )
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    proto.ir_version = 8
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))


def _feeds(shapes: list[tuple[int, int]], seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.random(s).astype(np.float32) * 3} for s in shapes]


def _ctx(feeds: list[dict[str, np.ndarray]]) -> PassContext:
    return PassContext(calibration=lambda: iter(feeds))


def test_minmax_ranges_are_exact_over_varying_shapes() -> None:
    feeds = _feeds([(1, 3), (4, 7), (2, 130)])
    model = _model()
    am = AnalysisManager(_ctx(feeds))
    stats = am.get(ActivationStatsAnalysis(("x", "h", "r", "y", "two")), model)
    assert isinstance(stats, ActivationStats)
    assert stats.samples == 3
    allx = np.concatenate([f["x"].ravel() for f in feeds])
    expect = {"x": allx, "h": allx * 2, "r": np.sqrt(allx * 2), "y": np.sqrt(allx * 2) + 0.5}
    for name, values in expect.items():
        lo, hi = stats.range(name)
        assert float(lo) == pytest.approx(values.min(), rel=1e-6), name
        assert float(hi) == pytest.approx(values.max(), rel=1e-6), name
        assert stats.extremes(name) == pytest.approx((values.min(), values.max()), rel=1e-6)
    assert stats.range("two") == (2.0, 2.0)
    assert stats.shapes["h"] == {(1, 3), (4, 7), (2, 130)}


def test_calib_folder_with_varying_shapes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--calib`` folder layout: one feed per file, each its own batch and length."""
    feeds = _feeds([(1, 5), (3, 17), (2, 2)], seed=3)
    for i, feed in enumerate(feeds):
        np.savez(tmp_path / f"{i:03d}.npz", **feed)
    model = _model()
    ctx = PassContext(calibration=CalibrationDataset(tmp_path, model))
    stats = AnalysisManager(ctx).get(
        ActivationStatsAnalysis(("r",), progress_after_s=0.0), model
    )
    allx = np.concatenate([f["x"].ravel() for f in feeds])
    assert float(stats.range("r")[1]) == pytest.approx(np.sqrt(2 * allx.max()), rel=1e-6)
    assert stats.samples == 3
    assert "3/3" in capsys.readouterr().err  # the folder's size is known up front


def test_model_is_not_changed() -> None:
    model = _model()
    before = ir.serde.serialize_model(model).SerializeToString()
    AnalysisManager(_ctx(_feeds([(2, 3)]))).get(ActivationStatsAnalysis(("h", "r")), model)
    assert ir.serde.serialize_model(model).SerializeToString() == before
    assert [o.name for o in model.graph.outputs] == ["y"]


def test_cached_until_structure_or_weights_change() -> None:
    model = _model()
    am = AnalysisManager(_ctx(_feeds([(2, 3)])))
    analysis = ActivationStatsAnalysis(("h",), "minmax")
    first = am.get(analysis, model)
    assert am.get(ActivationStatsAnalysis(("h",), "minmax"), model) is first
    assert am.hits == 1 and am.misses == 1
    # Another configuration is another entry.
    assert am.get(ActivationStatsAnalysis(("h",), "percentile", percentile=99.0), model) is not first
    assert am.misses == 2
    # A pass that kept structure and weights (changed only shapes/metadata) keeps it.
    am.invalidate(PreservedAnalyses.only(Aspect.STRUCTURE, Aspect.WEIGHTS))
    assert am.cached(analysis, model) is first
    # A pass that changed weights (GPTQ) or structure drops it.
    am.invalidate(PreservedAnalyses.only(Aspect.STRUCTURE, Aspect.SHAPES))
    assert am.cached(analysis, model) is None
    assert am.get(analysis, model) is not first


def test_observer_kwargs_reach_the_observers() -> None:
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.random((8, 64)).astype(np.float32)} for _ in range(4)]
    feeds[2]["x"][0, 0] = 50.0  # one outlier
    stats = AnalysisManager(_ctx(feeds)).get(
        ActivationStatsAnalysis(("x",), "percentile", percentile=99.0), _model()
    )
    _lo, hi = stats.range("x")
    assert float(hi) < 2.0  # the outlier is clipped by the percentile ...
    assert stats.extremes("x")[1] == 50.0  # ... but the exact extreme is kept


def test_nan_raises_calibration_error_naming_value_and_sample() -> None:
    feeds = _feeds([(2, 3), (2, 3)])
    feeds[1]["x"][0, 1] = -1.0  # sqrt(-2) = NaN in 'r', sample 1
    am = AnalysisManager(_ctx(feeds))
    with pytest.raises(CalibrationError, match=r"'r' sample 1.*NaN"):
        am.get(ActivationStatsAnalysis(("h", "r")), _model())


def test_zero_samples_and_missing_source() -> None:
    with pytest.raises(CalibrationError, match="zero samples"):
        AnalysisManager(_ctx([])).get(ActivationStatsAnalysis(("h",)), _model())
    with pytest.raises(CalibrationError, match="--calib"):
        AnalysisManager(PassContext()).get(ActivationStatsAnalysis(("h",)), _model())


def test_unknown_value_and_observer() -> None:
    with pytest.raises(UsageError, match="no value named 'nope'"):
        AnalysisManager(_ctx(_feeds([(1, 1)]))).get(ActivationStatsAnalysis(("nope",)), _model())
    with pytest.raises(UsageError, match="unknown observer"):
        ActivationStatsAnalysis(("h",), "minmaxx")


def test_progress_bar_on_stderr_when_slow(capsys: pytest.CaptureFixture[str]) -> None:
    feeds = _feeds([(2, 3)] * 3)
    am = AnalysisManager(_ctx(feeds))
    am.get(ActivationStatsAnalysis(("h",), progress_after_s=0.0), _model())
    err = capsys.readouterr().err
    assert "calibrating" in err and "3/" in err
    # Fast runs print nothing.
    AnalysisManager(_ctx(feeds)).get(ActivationStatsAnalysis(("r",)), _model())
    assert capsys.readouterr().err == ""


def test_feeds_are_streamed_one_at_a_time() -> None:
    """The source is consumed lazily: at most one feed is alive during the run."""
    alive: list[int] = []

    class Tracked(dict):  # type: ignore[type-arg]
        count = 0

        def __init__(self, *a: object) -> None:
            super().__init__(*a)
            Tracked.count += 1
            alive.append(Tracked.count)

        def __del__(self) -> None:
            Tracked.count -= 1

    rng = np.random.default_rng(0)

    def source():  # type: ignore[no-untyped-def]
        for _ in range(6):
            yield Tracked({"x": rng.random((2, 5)).astype(np.float32)})

    ctx = PassContext(calibration=source)
    stats = AnalysisManager(ctx).get(ActivationStatsAnalysis(("h",)), _model())
    assert stats.samples == 6
    assert max(alive) <= 2
