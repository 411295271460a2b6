"""The ``gptq`` pass: needs calibration, beats ``wq`` on output error, lowers for each target."""

from __future__ import annotations

from typing import Any

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
from graphopt.passes.weight_only.base import WeightOnlyOptions
from graphopt.passes.weight_only.gptq_pass import GPTQOptions, QuantizeWeightsGptqPass
from graphopt.passes.weight_only.rtn import QuantizeWeightsRtnPass

K, H, N = 128, 192, 64


def _mixer(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((K, K)) / np.sqrt(K) + 0.3 * np.eye(K)) * np.exp(
        rng.standard_normal(K)
    )


def mlp(seed: int = 0) -> ir.Model:
    """``x[b, s, K] -> MatMul(W1) -> Relu -> MatMul(W2) -> y``; ``x -> Gemm(W3, transB=1) -> z``."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((K, H)) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((H, N)) * 0.1).astype(np.float32)
    w3 = (rng.standard_normal((N, K)) * 0.1).astype(np.float32)
    b3 = rng.standard_normal(N).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a"], name="up"),
        helper.make_node("Relu", ["a"], ["r"], name="act"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="down"),
        helper.make_node("Reshape", ["x", "shape2d"], ["x2"], name="flat"),
        helper.make_node("Gemm", ["x2", "w3", "b3"], ["z"], name="gemm", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", K])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", N]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["m", N]),
        ],
        [
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(w2, "w2"),
            numpy_helper.from_array(w3, "w3"),
            numpy_helper.from_array(b3, "b3"),
            numpy_helper.from_array(np.array([-1, K], np.int64), "shape2d"),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    proto.ir_version = 10
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))


def feeds(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    mix = _mixer(7)
    return [{"x": (rng.standard_normal((2, 16, K)) @ mix).astype(np.float32)} for _ in range(count)]


def run(model: ir.Model, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    data = ir.serde.serialize_model(model).SerializeToString()
    session = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feed), strict=True))


def quantize(
    pass_cls: Any,
    opts_cls: Any,
    target: str,
    calib: list[dict[str, np.ndarray]] | None,
    **options: Any,
) -> tuple[ir.Model, Any]:
    model = mlp()
    ctx = PassContext(
        target=target, calibration=(lambda: iter(calib)) if calib is not None else None
    )
    opts = opts_cls.parse({k: str(v) for k, v in options.items()}, owner="test")
    result = pass_cls(opts).run_with(model, ctx, AnalysisManager(ctx))
    return model, result


def output_error(model: ir.Model, test: list[dict[str, np.ndarray]]) -> dict[str, float]:
    ref_model = mlp()
    err: dict[str, float] = {"y": 0.0, "z": 0.0}
    for feed in test:
        ref, got = run(ref_model, feed), run(model, feed)
        for k in err:
            err[k] += float(np.sum((ref[k] - got[k]) ** 2))
    return err


@pytest.mark.parametrize(
    ("target", "lowered"), [("ort", "MatMulNBits"), ("tensorrt", "DequantizeLinear")]
)
@pytest.mark.parametrize(
    "options", [{"bits": 4, "group": 32}, {"bits": 3, "group": 64, "sym": "false"}]
)
def test_gptq_beats_rtn_on_held_out_data(
    target: str, lowered: str, options: dict[str, Any]
) -> None:
    calib, test = feeds(8, 1), feeds(4, 2)
    gptq_model, result = quantize(QuantizeWeightsGptqPass, GPTQOptions, target, calib, **options)
    rtn_model, _ = quantize(QuantizeWeightsRtnPass, WeightOnlyOptions, target, None, **options)
    assert result.modified
    assert lowered in {n.op_type for n in gptq_model.graph}
    assert result.stats["gptq_layers"]["gptq"] == 3
    assert result.stats["gptq_error_vs_rtn_median"] < 0.9
    e_gptq, e_rtn = output_error(gptq_model, test), output_error(rtn_model, test)
    for k in e_gptq:
        assert e_gptq[k] < 0.9 * e_rtn[k], (k, e_gptq, e_rtn)
    onnx.checker.check_model(ir.serde.serialize_model(gptq_model), full_check=True)


def test_gptq_requires_calibration() -> None:
    with pytest.raises(UsageError, match="--calib"):
        quantize(QuantizeWeightsGptqPass, GPTQOptions, "ort", None)


def test_options_parse_from_pipeline_text() -> None:
    registry = default_registry()
    cls = registry.passes["gptq"]
    p = cls.from_options({"bits": "3", "group": "64", "act_order": "false", "damp": "0.1"})
    assert p.to_text().startswith("gptq(")
    assert p.options.act_order is False and p.options.damp == 0.1
    with pytest.raises(UsageError):
        cls.from_options({"tied": "maybe"})


def test_guard_keeps_rtn_when_gptq_is_not_better() -> None:
    # All calibration inputs zero except one channel: every layer is decoupled and
    # GPTQ cannot improve on rounding to nearest, so the guard keeps RTN's codes.
    calib = [{"x": np.zeros((1, 4, K), np.float32)} for _ in range(2)]
    for c in calib:
        c["x"][..., 3] = 1.0
    model, result = quantize(QuantizeWeightsGptqPass, GPTQOptions, "ort", calib, bits=4, group=32)
    layers = result.stats["gptq_layers"]
    assert layers["gptq"] + layers["rtn_guard"] + layers["rtn_fallback"] == 3
    assert all(np.isfinite(v).all() for v in run(model, feeds(1, 3)[0]).values())
