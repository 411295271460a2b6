"""``sparsify``: 2:4 and unstructured weight masks (``graphopt.passes.pruning.sparsify``)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from graphopt.errors import UsageError
from graphopt.infra.analysis import AnalysisManager
from graphopt.infra.context import PassContext
from graphopt.infra.registry import default_registry
from graphopt.passes.pruning.sparsify import SparsifyOptions, SparsifyPass, mask_2_4


def model(seed: int = 0, cin: int = 8) -> ir.Model:
    """x[N,cin,4,4] -> Conv(8) -> Relu -> Flatten -> Gemm(transB=1, 12) -> MatMul(8) -> y."""
    rng = np.random.default_rng(seed)
    inits = {
        "cw": rng.normal(size=(8, cin, 3, 3)),
        "gw": rng.normal(size=(12, 128)),
        "mw": rng.normal(size=(12, 8)),
    }
    nodes = [
        helper.make_node("Conv", ["x", "cw"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "gw"], ["g"], name="gemm", transB=1),
        helper.make_node("MatMul", ["g", "mw"], ["y"], name="matmul"),
    ]
    graph = helper.make_graph(
        nodes, "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", cin, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )  # fmt: skip
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))


def sparsify(m: ir.Model, ctx: PassContext | None = None, **options: object):  # type: ignore[no-untyped-def]
    ctx = ctx or PassContext()
    return SparsifyPass(SparsifyOptions.parse(options)).run_with(m, ctx, AnalysisManager(ctx))


def weights(m: ir.Model) -> dict[str, np.ndarray]:
    return {k: v.const_value.numpy() for k, v in m.graph.initializers.items()}  # type: ignore[union-attr]


def run(m: ir.Model, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    blob = ir.serde.serialize_model(m).SerializeToString()
    return ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def groups_along(arr: np.ndarray, axis: int) -> np.ndarray:
    moved = np.moveaxis(arr, axis, -1)
    return moved.reshape(-1, 4)


def test_2_4_pattern_along_k_keeps_the_two_largest() -> None:
    m = model()
    before = weights(m)
    result = sparsify(m, pattern="2:4")
    after = weights(m)
    for name, k_axis in (("cw", 1), ("gw", 1), ("mw", 0)):
        kept, orig = groups_along(after[name], k_axis), groups_along(before[name], k_axis)
        assert ((kept == 0).sum(axis=1) == 2).all(), name
        smallest_kept = np.where(kept != 0, np.abs(orig), np.inf).min(axis=1)
        largest_dropped = np.where(kept == 0, np.abs(orig), -np.inf).max(axis=1)
        assert (smallest_kept >= largest_dropped).all(), name
    assert result.stats["sparsity"] == 0.5
    assert 0 < result.stats["macs_skippable"] <= result.stats["macs_total"] // 2 + 1
    assert set(result.stats["per_layer"]) == {"conv", "gemm", "matmul"}


def test_2_4_skips_k_not_multiple_of_4_and_excluded() -> None:
    m = model(cin=3)
    result = sparsify(m, pattern="2:4", exclude=["matmul"])
    assert "not a multiple of 4" in result.stats["skipped"]["conv"]
    assert result.stats["skipped"]["matmul"] == "excluded"
    assert not (weights(m)["cw"] == 0).any() and not (weights(m)["mw"] == 0).any()


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_unstructured_ratio(scope: str) -> None:
    m = model()
    sparsify(m, pattern="unstructured", ratio=0.7, scope=scope)
    w = weights(m)
    total = sum(a.size for a in w.values())
    zeros = sum(int((a == 0).sum()) for a in w.values())
    assert zeros == round(0.7 * total) if scope == "global" else zeros >= round(0.7 * total) - 3
    if scope == "layer":
        for a in w.values():
            assert (a == 0).sum() == round(0.7 * a.size)


def test_idempotent_and_exact_on_already_sparse_weights() -> None:
    m = model()
    sparsify(m, pattern="2:4")
    x = np.random.default_rng(1).normal(size=(2, 8, 4, 4)).astype(np.float32)
    before_w, before_y = weights(m), run(m, x)
    again = sparsify(m, pattern="2:4")
    assert not again.modified
    for k, v in weights(m).items():
        np.testing.assert_array_equal(v, before_w[k])
    np.testing.assert_array_equal(run(m, x), before_y)


def test_activation_scores_protect_loud_inputs() -> None:
    m = model()
    rng = np.random.default_rng(2)
    feeds = []
    for _ in range(2):
        x = rng.normal(size=(4, 8, 4, 4)).astype(np.float32)
        x[:, 0] *= 1000.0  # input channel 0 dominates every output
        feeds.append({"x": x})
    ctx = PassContext(calibration=lambda: iter(feeds))
    sparsify(m, ctx, pattern="2:4", importance="activation")
    assert (weights(m)["cw"][:, 0] != 0).all()
    plain = model()
    sparsify(plain, pattern="2:4")
    assert (weights(plain)["cw"][:, 0] == 0).any()  # magnitude alone drops some of them


def test_options_checked() -> None:
    with pytest.raises(UsageError, match="ratio must be 0.5"):
        SparsifyOptions.parse({"pattern": "2:4", "ratio": "0.6"})
    with pytest.raises(UsageError, match="calib"):
        sparsify(model(), pattern="2:4", importance="activation")


def test_pipeline_text_round_trips() -> None:
    registry = default_registry(plugins=False)
    pm = registry.build("sparsify(pattern=unstructured,ratio=0.6,scope=global)")
    assert pm.to_text() == "sparsify(pattern=unstructured,ratio=0.6,scope=global)"
    assert registry.build("sparsify").to_text() == "sparsify"


@settings(max_examples=40, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 3), st.sampled_from([4, 8, 12]), st.integers(1, 3)),
    axis=st.sampled_from([1]),
    seed=st.integers(0, 2**16),
)
def test_mask_2_4_property(shape: tuple[int, int, int], axis: int, seed: int) -> None:
    scores = np.abs(np.random.default_rng(seed).normal(size=shape)).round(1)  # ties happen
    keep = mask_2_4(scores, axis)
    blocks = groups_along(keep, axis)
    assert (blocks.sum(axis=1) == 2).all()
    s = groups_along(scores, axis)
    assert (np.where(blocks, s, np.inf).min(axis=1) >= np.where(blocks, -np.inf, s).max(axis=1)).all()
