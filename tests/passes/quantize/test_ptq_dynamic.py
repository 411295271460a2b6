"""``ptq(mode=dynamic)``: int8 weights per channel, activations quantized at run time."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import pytest
from _qdq_support import F, convnet, gaussian_feeds, make_model, mlp, ops, outputs, run_pass

from graphopt.errors import InvalidModelError, UsageError
from graphopt.infra.context import PassContext
from graphopt.passes.quantize.ptq import PtqOptions, PtqPass
from graphopt.quant.qparams import sqnr_db


def _dynamic(model: ir.Model, calib: list[dict[str, np.ndarray]] | None = None, **options: object):  # type: ignore[no-untyped-def]
    items = list(calib or [])
    ctx = PassContext(target="ort", calibration=(lambda: iter(items)) if calib else None)
    return run_pass(PtqPass(PtqOptions(mode="dynamic", **options)), model, ctx)  # type: ignore[arg-type]


def _proto(model: ir.Model) -> onnx.ModelProto:
    return ir.serde.serialize_model(model)


def _sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    return float(sqnr_db(ref.astype(np.float64), got.astype(np.float64)))


def shared_input_model(seed: int = 0) -> ir.Model:
    """x[batch, seq, 32] read by three projections (Q, K, V); V's output is a graph output."""
    rng = np.random.default_rng(seed)
    inits = {f"W{k}": (rng.standard_normal((32, 24)) / 6).astype(np.float32) for k in "qkv"}
    nodes = [
        oh.make_node("MatMul", ["x", "Wq"], ["q"], name="proj_q"),
        oh.make_node("MatMul", ["x", "Wk"], ["k"], name="proj_k"),
        oh.make_node("MatMul", ["x", "Wv"], ["v"], name="proj_v"),
        oh.make_node("Add", ["q", "k"], ["qk"], name="add"),
    ]
    return make_model(
        nodes,
        [oh.make_tensor_value_info("x", F, ["batch", "seq", 32])],
        [oh.make_tensor_value_info("qk", F, ["batch", "seq", 24]),
         oh.make_tensor_value_info("v", F, ["batch", "seq", 24])],
        inits,
        opset=13,
    )


def gemm_model(seed: int = 0, trans_b: int = 1, alpha: float = 0.5, beta: float = 2.0) -> ir.Model:
    rng = np.random.default_rng(seed)
    shape = (12, 20) if trans_b else (20, 12)
    inits = {
        "W": rng.standard_normal(shape).astype(np.float32),
        "C": rng.standard_normal(12).astype(np.float32),
    }
    nodes = [oh.make_node("Gemm", ["x", "W", "C"], ["y"], name="fc", transB=trans_b,
                          alpha=alpha, beta=beta)]
    return make_model(
        nodes,
        [oh.make_tensor_value_info("x", F, ["batch", 20])],
        [oh.make_tensor_value_info("y", F, ["batch", 12])],
        inits,
    )


def test_matmuls_become_integer_products_with_int8_weights() -> None:
    model = mlp(seed=3)
    reference = _proto(mlp(seed=3))
    result = _dynamic(model)
    counts = Counter(ops(model))
    assert counts["DynamicQuantizeLinear"] == 2 and counts["MatMulInteger"] == 2
    assert counts["MatMul"] == 0
    assert result.stats["nodes_by_op"] == {"MatMul": 2} and result.stats["mode"] == "dynamic"
    # Weights are stored int8 with one scale per output column; the float ones are gone.
    int8 = {n: v for n, v in model.graph.initializers.items() if v.dtype == ir.DataType.INT8}
    assert set(int8) == {"W1_quantized", "W2_quantized"}
    assert "W1" not in model.graph.initializers and "W2" not in model.graph.initializers
    scale = model.graph.initializers["mm1_weight_scale"].const_value.numpy()
    assert scale.shape == (32,) and len(set(scale.tolist())) > 1
    # The integer node keeps the float node's name; graph I/O is unchanged.
    assert any(n.name == "mm1" and n.op_type == "MatMulInteger" for n in model.graph)
    assert [o.name for o in model.graph.outputs] == ["y"]
    feed = gaussian_feeds("x", (16, 16), 1, seed=1)[0]
    ref = outputs(reference, feed)[0]
    got = outputs(_proto(model), feed)[0]
    assert _sqnr(ref, got) >= 30.0
    # Tests must be able to fail: a float MatMul on the int8 codes alone is far off.
    codes = model.graph.initializers["W1_quantized"].const_value.numpy().astype(np.float32)
    assert np.abs(codes).max() > 64  # codes, not rescaled values


def test_ort_fuses_the_pattern_into_integer_kernels(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    model = shared_input_model()
    _dynamic(model)
    path = tmp_path / "q.onnx"
    ir.save(model, path)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    fused = Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)
    assert fused["MatMulInteger"] == 0 and fused["Cast"] == 0
    assert fused["MatMulIntegerToFloat"] + fused["DynamicQuantizeMatMul"] == 3, fused


def test_an_input_shared_by_projections_is_quantized_once() -> None:
    model = shared_input_model()
    reference = _proto(shared_input_model())
    result = _dynamic(model)
    counts = Counter(ops(model))
    assert counts["DynamicQuantizeLinear"] == 1 and counts["MatMulInteger"] == 3
    assert result.stats["activations_quantized"] == 1
    # 'v' is a graph output produced by a replaced node: its name is kept.
    assert [o.name for o in model.graph.outputs] == ["qk", "v"]
    assert model.graph.outputs[1].producer().op_type == "Mul"  # type: ignore[union-attr]
    feed = gaussian_feeds("x", (2, 5, 32), 1, seed=2)[0]
    for ref, got in zip(outputs(reference, feed), outputs(_proto(model), feed), strict=True):
        assert _sqnr(ref, got) >= 30.0


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_folds_alpha_and_beta(trans_b: int) -> None:
    model = gemm_model(trans_b=trans_b)
    reference = _proto(gemm_model(trans_b=trans_b))
    _dynamic(model)
    counts = Counter(ops(model))
    assert counts["Gemm"] == 0 and counts["MatMulInteger"] == 1 and counts["Add"] == 1
    codes = next(v for v in model.graph.initializers.values() if v.dtype == ir.DataType.INT8)
    assert codes.const_value.numpy().shape == (20, 12)  # [K, N] whatever transB was
    feed = gaussian_feeds("x", (6, 20), 1, seed=4)[0]
    assert _sqnr(outputs(reference, feed)[0], outputs(_proto(model), feed)[0]) >= 30.0


def test_convolutions_stay_float_with_a_reason() -> None:
    model = convnet(seed=1)
    result = _dynamic(model)
    assert Counter(ops(model))["Conv"] == 2 and "Gemm" not in ops(model)
    assert result.stats["skipped"] == {"static-only": 2}
    layers = {r["node"]: r for r in result.stats["layers"]}
    assert layers["fc"]["decision"] == "quantized"
    assert layers["conv1"]["decision"] == "float"
    assert "static mode only" in layers["conv1"]["reason"]


@pytest.mark.parametrize("build", [mlp, shared_input_model, gemm_model, convnet])
def test_output_is_valid_and_deterministic(build) -> None:  # type: ignore[no-untyped-def]
    first, second = build(), build()
    _dynamic(first)
    _dynamic(second)
    proto = _proto(first)
    onnx.checker.check_model(proto, full_check=True)
    assert proto.SerializeToString() == _proto(second).SerializeToString()


def test_second_run_changes_nothing() -> None:
    model = shared_input_model()
    _dynamic(model)
    before = _proto(model).SerializeToString()
    result = _dynamic(model)
    assert result.stats["nodes_quantized"] == 0 and not result.modified
    assert _proto(model).SerializeToString() == before


def test_layer_sqnr_uses_calibration_feeds_when_given() -> None:
    feeds = gaussian_feeds("x", (4, 16), 3, seed=5)
    result = _dynamic(mlp(seed=1), calib=feeds)
    sqnr = result.stats["layer_sqnr_db"]
    assert set(sqnr) == {"mm1", "mm2"} and all(v > 25 for v in sqnr.values())
    records = {r["node"]: r for r in result.stats["layers"]}
    assert records["mm1"]["sqnr_db"] == sqnr["mm1"]
    # Without calibration data nothing is measured, but the decisions are listed.
    plain = _dynamic(mlp(seed=1))
    assert "layer_sqnr_db" not in plain.stats
    assert [r["decision"] for r in plain.stats["layers"]] == ["quantized", "quantized"]


def test_max_loss_returns_layers_to_float() -> None:
    feeds = gaussian_feeds("x", (4, 16), 3, seed=6)
    reference = _proto(mlp(seed=2))
    model = mlp(seed=2)
    result = _dynamic(model, calib=feeds, max_loss=0.0)
    assert sorted(result.stats["kept_float_for_max_loss"]) == ["mm1", "mm2"]
    assert "MatMulInteger" not in ops(model)
    np.testing.assert_array_equal(outputs(reference, feeds[0])[0], outputs(_proto(model), feeds[0])[0])
    assert {r["decision"] for r in result.stats["layers"]} == {"float (max_loss)"}
    assert all(r["sqnr_db"] is not None for r in result.stats["layers"])


def test_max_loss_without_calib_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="--calib"):
        _dynamic(mlp(), max_loss=0.01)


def test_low_opset_is_refused_without_upgrade() -> None:
    model = mlp()
    model.opset_imports[""] = 10
    with pytest.raises(InvalidModelError, match="opset >= 11"):
        _dynamic(model)
