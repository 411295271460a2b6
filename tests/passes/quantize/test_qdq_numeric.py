"""Quantized small networks against fp32 on ONNX Runtime: SQNR >= 30 dB per output, and
the Q/DQ patterns ONNX Runtime turns into integer kernels."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from _qdq_support import context, convnet, gaussian_feeds, images, mlp, outputs, run_pass

from graphopt.passes.quantize.ptq import PtqOptions, PtqPass
from graphopt.quant.qparams import sqnr_db

MIN_SQNR_DB = 30.0


def _ort_optimized_ops(model: ir.Model, tmp_path: Path) -> Counter[str]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "ort_optimized.onnx")
    ort.InferenceSession(
        ir.serde.serialize_model(model).SerializeToString(), options,
        providers=["CPUExecutionProvider"],
    )
    optimized = onnx.load(str(tmp_path / "ort_optimized.onnx"))
    return Counter(n.op_type for n in optimized.graph.node)


@pytest.mark.parametrize(
    ("calib", "min_db"),
    # Entropy (KL) calibration clips for classification fidelity, not signal fidelity.
    [("minmax", MIN_SQNR_DB), ("percentile", MIN_SQNR_DB), ("mse", MIN_SQNR_DB), ("entropy", 25.0)],
)
def test_convnet_sqnr(calib: str, min_db: float) -> None:
    model = convnet(seed=1)
    reference = ir.serde.serialize_model(model)
    run_pass(PtqPass(PtqOptions(calib=calib)), model, context(images(8, seed=0)))
    for feed in images(3, batch=16, seed=99):  # held apart from calibration
        ref = outputs(reference, feed)[0]
        for optimize in (False, True):
            got = outputs(model, feed, optimize=optimize)[0]
            assert sqnr_db(ref, got) >= min_db, (calib, optimize, sqnr_db(ref, got))


def test_convnet_runs_on_integer_kernels(tmp_path: Path) -> None:
    model = convnet(seed=1)
    run_pass(PtqPass(), model, context(images(4)))
    hist = _ort_optimized_ops(model, tmp_path)
    assert hist["QLinearConv"] == 2, hist
    assert hist["Conv"] == 0 and hist["MaxPool"] + hist["QLinearMaxPool"] >= 0
    assert hist["QGemm"] == 1 or hist["Gemm"] == 0, hist


def test_rank3_matmul_runs_as_matmul_integer_to_float(tmp_path: Path) -> None:
    """Transformer projections ([batch, seq, d] x [d, n]) become MatMulIntegerToFloat."""
    import onnx.helper as oh
    from _qdq_support import F, make_model

    rng = np.random.default_rng(0)
    model = make_model(
        [oh.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
         oh.make_node("Add", ["m", "b"], ["y"], name="bias")],
        [oh.make_tensor_value_info("x", F, ["batch", "seq", 16])],
        [oh.make_tensor_value_info("y", F, ["batch", "seq", 8])],
        {"W": rng.standard_normal((16, 8)).astype(np.float32),
         "b": rng.standard_normal(8).astype(np.float32)},
    )
    reference = ir.serde.serialize_model(model)
    run_pass(PtqPass(), model, context(gaussian_feeds("x", (2, 5, 16), 4)))
    hist = _ort_optimized_ops(model, tmp_path)
    assert hist["MatMulIntegerToFloat"] == 1 and hist["MatMul"] == 0, hist
    feed = gaussian_feeds("x", (3, 7, 16), 1, seed=3)[0]
    assert sqnr_db(outputs(reference, feed)[0], outputs(model, feed, optimize=True)[0]) >= 30


@pytest.mark.parametrize("per_channel", [True, False])
def test_mlp_sqnr_and_integer_matmul(per_channel: bool, tmp_path: Path) -> None:
    model = mlp(seed=2)
    reference = ir.serde.serialize_model(model)
    run_pass(
        PtqPass(PtqOptions(per_channel=per_channel)), model,
        context(gaussian_feeds("x", (32, 16), 8, seed=0)),
    )
    for feed in gaussian_feeds("x", (64, 16), 3, seed=7):
        ref = outputs(reference, feed)[0]
        for optimize in (False, True):
            got = outputs(model, feed, optimize=optimize)[0]
            assert sqnr_db(ref, got) >= MIN_SQNR_DB, (per_channel, optimize, sqnr_db(ref, got))
    # MatMul + Add(bias) over 2-D inputs: ORT folds them into QGemm thanks to the int32
    # bias (a float bias would leave a float Gemm on dequantized operands).
    hist = _ort_optimized_ops(model, tmp_path)
    assert hist["QGemm"] == 2 and hist["MatMul"] + hist["Gemm"] == 0, hist


def test_tensorrt_policy_numerics() -> None:
    model = convnet(seed=1)
    reference = ir.serde.serialize_model(model)
    run_pass(PtqPass(), model, context(images(8), target="tensorrt"))
    zero_points = [
        v.const_value.numpy() for v in model.graph.initializers.values()
        if v.name.endswith("_zero_point")
    ]
    assert zero_points and all(z.dtype in (np.int8, np.int32) and not z.any() for z in zero_points)
    for feed in images(2, batch=16, seed=5):
        ref = outputs(reference, feed)[0]
        assert sqnr_db(ref, outputs(model, feed)[0]) >= MIN_SQNR_DB
