"""verify_model on tiny models, and latency measurement."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from verify_builders import two_head_model

from graphopt.errors import CalibrationError, InvalidModelError
from graphopt.verify.compare import EXACT, FUSION
from graphopt.verify.inputs import make_feeds
from graphopt.verify.latency import measure_latency, ratio
from graphopt.verify.runner import make_session
from graphopt.verify.verify import verify_model


def test_identical_models_pass_bit_exact(
    model_path: Path, weights: tuple[np.ndarray, np.ndarray], save: Callable[..., Path]
) -> None:
    copy = save(two_head_model(*weights), "copy.onnx", external=True)
    assert (copy.parent / "copy.onnx.data").exists()
    agreement = verify_model(model_path, copy, EXACT, dims={"batch": 4})
    assert agreement.passed, agreement.summary()
    assert [o.name for o in agreement.outputs] == ["y1", "y2", "idx"]
    assert all(o.mismatched == 0 and o.shape[0] == 4 for o in agreement.outputs)


def test_perturbed_weight_fails_naming_the_output(
    model_path: Path, weights: tuple[np.ndarray, np.ndarray], save: Callable[..., Path]
) -> None:
    w1, w2 = weights
    w2 = w2.copy()
    w2[2, 1] += 1e-3
    candidate = save(two_head_model(w1, w2), "perturbed.onnx")
    feeds = [make_feeds(model_path, dims={"batch": 3}, seed=s) for s in range(2)]
    agreement = verify_model(model_path, candidate, FUSION, feeds)
    assert not agreement.passed and agreement.samples == 2
    by_name = {o.name: o for o in agreement.outputs}
    assert by_name["y1"].passed
    assert not by_name["y2"].passed and "rtol=1e-05" in by_name["y2"].reason
    assert "'y2'" in agreement.summary() or "'idx'" in agreement.summary()
    assert "'y1'" not in agreement.summary()


def test_candidate_that_does_not_load_fails_cleanly(model_path: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07garbage")
    agreement = verify_model(model_path, broken, EXACT)
    assert not agreement.passed
    assert agreement.error is not None and agreement.error.startswith("candidate does not load")


def test_changed_input_signature_fails(
    model_path: Path, weights: tuple[np.ndarray, np.ndarray], save: Callable[..., Path]
) -> None:
    model = two_head_model(*weights)
    model.graph.input[0].name = "renamed"
    for node in model.graph.node:
        node.input[:] = ["renamed" if i == "x" else i for i in node.input]
    agreement = verify_model(model_path, save(model, "renamed.onnx"), EXACT)
    assert not agreement.passed and "'x' was removed or renamed" in (agreement.error or "")


def test_original_errors_raise(model_path: Path, tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="zero samples"):
        verify_model(model_path, model_path, EXACT, feeds=[])
    with pytest.raises(InvalidModelError, match="'x'"):
        verify_model(model_path, model_path, EXACT, feeds=[{"y": np.ones(1)}])


def test_session_options(model_path: Path) -> None:
    session = make_session(model_path, threads=1)
    options = session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    import onnxruntime as ort

    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    optimized = make_session(model_path, optimize=True).get_session_options()
    assert optimized.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def test_latency_interleaved(
    model_path: Path, weights: tuple[np.ndarray, np.ndarray], save: Callable[..., Path]
) -> None:
    other = save(two_head_model(weights[0] * 2, weights[1]), "other.onnx")
    feed = make_feeds(model_path, dims={"batch": 2})
    stats = measure_latency({"before": model_path, "after": other}, feed, repeats=5, warmup=1)
    assert list(stats) == ["before", "after"]
    for s in stats.values():
        assert s.repeats == 5 and s.optimized
        assert 0 < s.min_ms <= s.median_ms <= s.p90_ms <= s.max_ms
    assert ratio(stats, "after", "before") == pytest.approx(
        stats["after"].median_ms / stats["before"].median_ms
    )
    assert ratio(stats, "after", "before") > 0
