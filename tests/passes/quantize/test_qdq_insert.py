"""InsertQDQPass (through ``ptq``): where Q/DQ go, stored weights and biases, opsets."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import pytest
from _qdq_support import (
    F,
    context,
    convnet,
    gaussian_feeds,
    images,
    make_model,
    mlp,
    node,
    ops,
    outputs,
    producer_op,
    run_pass,
)

from graphopt.errors import InvalidModelError
from graphopt.infra.analysis import AnalysisManager
from graphopt.infra.context import PassContext
from graphopt.passes.quantize import InsertQDQPass
from graphopt.passes.quantize.ptq import PtqOptions, PtqPass
from graphopt.quant.qparams import QParams, dequantize


def _ptq(model: ir.Model, feeds, **options):  # type: ignore[no-untyped-def]
    return run_pass(PtqPass(PtqOptions(**options)), model, context(feeds))


def _const(value: ir.Value) -> np.ndarray:
    assert value.const_value is not None, value.name
    return value.const_value.numpy()


def test_mlp_qdq_placement_and_stored_weights() -> None:
    model = mlp()
    w1 = _const(model.graph.initializers["W1"]).copy()
    result = _ptq(model, gaussian_feeds("x", (8, 16), 4), calib="minmax", reduce_range=True)
    assert result.modified
    mm1 = node(model, "mm1")
    # Activation: x -> QuantizeLinear -> DequantizeLinear -> MatMul.
    dq_x = mm1.inputs[0].producer()
    assert dq_x.op_type == "DequantizeLinear"
    q_x = dq_x.inputs[0].producer()
    assert q_x.op_type == "QuantizeLinear" and q_x.inputs[0].name == "x"
    assert q_x.inputs[2].const_value.dtype == ir.DataType.UINT8
    # Weight: int8 initializer read through a per-channel DequantizeLinear (axis 1).
    dq_w = mm1.inputs[1].producer()
    assert dq_w.op_type == "DequantizeLinear" and dq_w.attributes["axis"].as_int() == 1
    codes = _const(dq_w.inputs[0])
    scale = _const(dq_w.inputs[1])
    zero = _const(dq_w.inputs[2])
    assert codes.dtype == np.int8 and scale.shape == (32,) and not zero.any()
    assert codes.min() >= -63 and codes.max() <= 63  # reduce_range + narrow
    assert np.abs(codes).max(axis=0).min() == 63  # each column uses its full range
    back = dequantize(codes, QParams(scale, zero), axis=1)
    assert np.all(np.abs(back - w1) <= scale / 2 * (1 + 1e-6))
    # The float weight is gone; graph I/O unchanged; the float Adds still read MatMuls.
    assert "W1" not in model.graph.initializers and "W2" not in model.graph.initializers
    assert [v.name for v in model.graph.inputs] == ["x"]
    assert [v.name for v in model.graph.outputs] == ["y"]
    assert producer_op(node(model, "add1").inputs[0]) == "MatMul"
    assert producer_op(node(model, "mm2").inputs[0]) == "DequantizeLinear"
    assert result.stats["weights_quantized"] == 2 and result.stats["activations_quantized"] == 2
    assert result.stats["biases_int32"] == 2  # the Adds' constants: MatMul + Add -> QGemm
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)


def test_full_range_weights_use_127() -> None:
    model = mlp()
    _ptq(model, gaussian_feeds("x", (8, 16), 2), reduce_range=False)
    codes = _const(node(model, "mm1").inputs[1].producer().inputs[0])
    assert codes.min() >= -127 and codes.max() <= 127 and np.abs(codes).max() == 127


def test_conv_bias_int32_with_input_times_weight_scale() -> None:
    model = convnet()
    b1 = _const(model.graph.initializers["B1"]).copy()
    _ptq(model, images(3), calib="minmax")
    conv1 = node(model, "conv1")
    x_scale = _const(conv1.inputs[0].producer().inputs[1])
    w_scale = _const(conv1.inputs[1].producer().inputs[1])
    dq_b = conv1.inputs[2].producer()
    assert dq_b.op_type == "DequantizeLinear" and dq_b.attributes["axis"].as_int() == 0
    codes, b_scale, b_zero = (_const(v) for v in dq_b.inputs)
    assert codes.dtype == np.int32 and not b_zero.any()
    np.testing.assert_array_equal(b_scale, (x_scale * w_scale).astype(np.float32))
    assert np.all(np.abs(codes * b_scale - b1) <= b_scale / 2 * (1 + 1e-6))
    assert "B1" not in model.graph.initializers


def test_shared_pass_through_parameters_in_the_graph() -> None:
    """relu1 -> Q -> DQ -> MaxPool -> Q -> DQ -> conv2, both pairs with one scale."""
    model = convnet()
    _ptq(model, images(3))
    pool = node(model, "pool1")
    dq_in = pool.inputs[0].producer()
    dq_out = node(model, "conv2").inputs[0].producer()
    assert dq_in.op_type == dq_out.op_type == "DequantizeLinear"
    assert dq_in.inputs[1] is dq_out.inputs[1] and dq_in.inputs[2] is dq_out.inputs[2]
    assert dq_out.inputs[0].producer().inputs[0] is pool.outputs[0]


def test_other_consumers_keep_the_float_value() -> None:
    rng = np.random.default_rng(0)
    model = make_model(
        [
            oh.make_node("Relu", ["x"], ["h"], name="relu"),
            oh.make_node("MatMul", ["h", "W"], ["m"], name="mm"),
            oh.make_node("Add", ["m", "h"], ["y"], name="residual"),
        ],
        [oh.make_tensor_value_info("x", F, [2, 4])],
        [oh.make_tensor_value_info("y", F, [2, 4])],
        {"W": rng.standard_normal((4, 4)).astype(np.float32)},
    )
    _ptq(model, gaussian_feeds("x", (2, 4), 3))
    assert producer_op(node(model, "mm").inputs[0]) == "DequantizeLinear"
    assert node(model, "residual").inputs[1].name == "h"


def test_shared_weight_is_quantized_once() -> None:
    rng = np.random.default_rng(0)
    model = make_model(
        [
            oh.make_node("MatMul", ["x", "W"], ["a"], name="mm_a"),
            oh.make_node("Relu", ["a"], ["r"], name="relu"),
            oh.make_node("MatMul", ["r", "W"], ["y"], name="mm_b"),
        ],
        [oh.make_tensor_value_info("x", F, [2, 4])],
        [oh.make_tensor_value_info("y", F, [2, 4])],
        {"W": rng.standard_normal((4, 4)).astype(np.float32)},
    )
    result = _ptq(model, gaussian_feeds("x", (2, 4), 3))
    assert node(model, "mm_a").inputs[1] is node(model, "mm_b").inputs[1]
    assert result.stats["weights_quantized"] == 1
    int8 = [
        v for v in model.graph.initializers.values()
        if v.const_value.dtype == ir.DataType.INT8 and v.const_value.size == 16
    ]
    assert [v.name for v in int8] == ["W_quantized"]


def _opset12_convnet() -> ir.Model:
    return convnet(opset=12)


def test_opset_below_13_is_refused_with_the_hint() -> None:
    model = _opset12_convnet()
    with pytest.raises(InvalidModelError, match=r"opset is 12.*--upgrade-opset"):
        _ptq(model, images(2))
    assert "QuantizeLinear" not in ops(model)


def test_upgrade_opset_converts_then_quantizes() -> None:
    model = _opset12_convnet()
    feeds = images(2)
    ref = outputs(model, feeds[0])[0]
    result = _ptq(model, feeds, upgrade_opset=True)
    assert model.opset_imports[""] == 13 and result.stats["opset_upgraded"] == "12 -> 13"
    assert ops(model).count("QuantizeLinear") >= 3
    got = outputs(model, feeds[0])[0]
    assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.99


def test_deterministic_and_idempotent() -> None:
    blobs = []
    for _ in range(2):
        model = convnet()
        _ptq(model, images(3))
        blobs.append(ir.serde.serialize_model(model).SerializeToString())
    assert blobs[0] == blobs[1]
    again = _ptq(model, images(3))
    assert not again.modified
    assert ir.serde.serialize_model(model).SerializeToString() == blobs[1]


def test_insert_without_plan_is_an_error() -> None:
    ctx = PassContext()
    with pytest.raises(InvalidModelError, match="no quantization plan"):
        InsertQDQPass().run_with(mlp(), ctx, AnalysisManager(ctx))


def _embedding_model(rows: int = 512, dim: int = 64) -> ir.Model:
    rng = np.random.default_rng(0)
    return make_model(
        [
            oh.make_node("Gather", ["table", "ids"], ["emb"], name="lookup"),
            oh.make_node("MatMul", ["emb", "W"], ["y"], name="proj"),
        ],
        [oh.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["batch", "seq"])],
        [oh.make_tensor_value_info("y", F, ["batch", "seq", 8])],
        {"table": rng.standard_normal((rows, dim)).astype(np.float32),
         "W": rng.standard_normal((dim, 8)).astype(np.float32)},
    )


def test_embedding_table_is_gathered_as_int8() -> None:
    model = _embedding_model()
    table = _const(model.graph.initializers["table"]).copy()
    rng = np.random.default_rng(1)
    feeds = [{"ids": rng.integers(0, 512, (2, 5))} for _ in range(3)]
    reference = ir.serde.serialize_model(model)
    result = _ptq(model, feeds)
    assert result.stats["embedding_tables_quantized"] == 1
    lookup = node(model, "lookup")  # the node keeps its name ...
    assert lookup.inputs[0].const_value.dtype == ir.DataType.INT8
    (dq,) = [u.node for u in lookup.outputs[0].uses()]
    assert dq.op_type == "DequantizeLinear" and dq.attributes["axis"].as_int() == -1
    assert dq.outputs[0].name == "emb"  # ... and its output name
    assert "table" not in model.graph.initializers
    scale = _const(dq.inputs[1])
    assert scale.shape == (64,)  # one scale per column
    feed = {"ids": np.array([[0, 5, 511]])}
    emb = outputs(model, feed)[0]
    ref = outputs(reference, feed)[0]
    assert np.corrcoef(emb.ravel(), ref.ravel())[0, 1] > 0.999
    back = dequantize(_const(lookup.inputs[0]), QParams(scale, _const(dq.inputs[2])), axis=1)
    assert np.all(np.abs(back - table) <= scale / 2 * (1 + 1e-6))
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)


def test_small_tables_and_tensorrt_keep_float_gathers() -> None:
    model = _embedding_model(rows=16, dim=8)
    rng = np.random.default_rng(1)
    feeds = [{"ids": rng.integers(0, 16, (2, 5))}]
    _ptq(model, feeds)
    assert node(model, "lookup").inputs[0].name == "table"
    model = _embedding_model()
    run_pass(PtqPass(), model, context([{"ids": rng.integers(0, 512, (2, 5))}], target="tensorrt"))
    assert node(model, "lookup").inputs[0].name == "table"
