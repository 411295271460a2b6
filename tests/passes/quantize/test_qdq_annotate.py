"""Quantizer policies (annotate) on small graphs: what gets which spec, what is skipped."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from _qdq_support import F, context, convnet, make_model, mlp, node

from graphopt.analysis import ActivationStatsAnalysis
from graphopt.backends import ort_quant
from graphopt.backends.ort_quant import OrtQuantizer, u8s8_saturates
from graphopt.backends.tensorrt_quant import TensorRTQuantizer
from graphopt.infra.analysis import AnalysisManager
from graphopt.passes.quantize.plan import QuantConfig, QuantPlan, finalize_plan
from graphopt.quant.dtypes import QuantDType
from graphopt.quant.spec import ACT_S8_SYM, ACT_U8_ASYM


def _units(plan: QuantPlan) -> dict[str, object]:
    return {u.node.name: u for u in plan.units if u.live}


def _finalize(model, plan: QuantPlan, feeds, config: QuantConfig | None = None) -> None:  # type: ignore[no-untyped-def]
    config = config or QuantConfig()
    stats = AnalysisManager(context(feeds)).get(
        ActivationStatsAnalysis(tuple(plan.activation_values())), model
    )
    finalize_plan(plan, stats, config)


def test_mlp_weights_per_channel_on_matmul_columns() -> None:
    model = mlp()
    plan = OrtQuantizer().annotate(model, QuantConfig())
    units = _units(plan)
    assert set(units) == {"mm1", "mm2"}
    w = units["mm1"].weight  # type: ignore[attr-defined]
    assert w.value.name == "W1"
    assert w.spec.dtype == QuantDType.S8 and w.spec.symmetric and w.spec.narrow
    assert w.spec.per_channel and w.spec.axis == 1  # [K, N]: N output channels
    # 7-bit weights exactly where this CPU's u8 x s8 kernel saturates (no VNNI).
    assert w.spec.reduce_range == u8s8_saturates()
    (x,) = units["mm1"].activations  # type: ignore[attr-defined]
    assert x.value.name == "x" and x.spec == ACT_U8_ASYM
    # The constant of the Add after the MatMul is its bias (int32 lets ORT fold
    # MatMul + Add into QGemm).
    bias = units["mm1"].bias  # type: ignore[attr-defined]
    assert bias.node.name == "add1" and bias.value.name == "b1"
    assert bias.spec.dtype == QuantDType.S32 and bias.spec.per_channel


@pytest.mark.parametrize("saturates", [True, False])
def test_reduce_range_follows_the_saturation_probe(
    saturates: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ort_quant, "u8s8_saturates", lambda: saturates)
    w = _units(OrtQuantizer().annotate(mlp(), QuantConfig()))["mm1"].weight  # type: ignore[attr-defined]
    assert w.spec.reduce_range == saturates
    # The user's choice wins; TensorRT never reduces.
    w = _units(OrtQuantizer().annotate(mlp(), QuantConfig(reduce_range=not saturates)))["mm1"].weight  # type: ignore[attr-defined]
    assert w.spec.reduce_range == (not saturates)
    w = _units(TensorRTQuantizer().annotate(mlp(), QuantConfig()))["mm1"].weight  # type: ignore[attr-defined]
    assert not w.spec.reduce_range


def test_saturation_probe_matches_the_cpu() -> None:
    """The probe's answer is what ORT computes for 255 x 127 products on this CPU."""
    assert isinstance(u8s8_saturates(), bool)


def test_per_tensor_and_full_range_options() -> None:
    plan = OrtQuantizer().annotate(mlp(), QuantConfig(per_channel=False, reduce_range=False))
    w = _units(plan)["mm1"].weight  # type: ignore[attr-defined]
    assert not w.spec.per_channel and w.spec.axis is None and not w.spec.reduce_range


def test_conv_and_gemm_axes_and_biases() -> None:
    plan = OrtQuantizer().annotate(convnet(), QuantConfig())
    units = _units(plan)
    assert set(units) == {"conv1", "conv2", "fc"}
    assert units["conv1"].weight.spec.axis == 0  # type: ignore[attr-defined]
    assert units["fc"].weight.spec.axis == 0  # type: ignore[attr-defined]  # transB=1: [N, K]
    for name in units:
        bias = units[name].bias  # type: ignore[attr-defined]
        assert bias is not None and bias.spec.dtype == QuantDType.S32 and bias.spec.per_channel


def test_gemm_without_transb_uses_axis_1() -> None:
    rng = np.random.default_rng(0)
    model = make_model(
        [oh.make_node("Gemm", ["x", "W", "C"], ["y"], name="g")],
        [oh.make_tensor_value_info("x", F, [2, 4])],
        [oh.make_tensor_value_info("y", F, [2, 3])],
        {"W": rng.standard_normal((4, 3)).astype(np.float32), "C": np.zeros(3, np.float32)},
    )
    unit = _units(OrtQuantizer().annotate(model, QuantConfig()))["g"]
    assert unit.weight.spec.axis == 1 and unit.bias is not None  # type: ignore[attr-defined]


def test_pass_through_ops_share_one_group() -> None:
    """conv2's input comes through MaxPool: MaxPool's input and output share parameters,
    so Conv1 -> Relu -> Q -> DQ -> MaxPool -> Q -> DQ -> Conv2 runs on integers."""
    model = convnet()
    plan = OrtQuantizer().annotate(model, QuantConfig())
    conv2 = _units(plan)["conv2"]
    group = plan.groups[conv2.activations[0].group]  # type: ignore[attr-defined]
    assert set(group.value_names()) == {"p1", "r1"}
    fc = _units(plan)["fc"]
    assert set(plan.groups[fc.activations[0].group].value_names()) == {"f", "r2"}  # type: ignore[attr-defined]
    # Relu is not pass-through: r1's group does not reach c1.
    assert "c1" not in plan.activation_values()


def test_no_sharing_through_an_op_with_a_float_consumer() -> None:
    """A Reshape whose output also feeds a float op is not crossed."""
    rng = np.random.default_rng(0)
    model = make_model(
        [
            oh.make_node("Reshape", ["x", "shape"], ["r"], name="reshape"),
            oh.make_node("MatMul", ["r", "W"], ["y"], name="mm"),
            oh.make_node("Softmax", ["r"], ["s"], name="softmax"),
        ],
        [oh.make_tensor_value_info("x", F, [2, 2, 4])],
        [oh.make_tensor_value_info("y", F, [4, 3]), oh.make_tensor_value_info("s", F, [4, 4])],
        {"W": rng.standard_normal((4, 3)).astype(np.float32), "shape": np.array([4, 4])},
    )
    plan = OrtQuantizer().annotate(model, QuantConfig())
    assert plan.activation_values() == ["r"]


def test_concat_inputs_share_the_output_group() -> None:
    rng = np.random.default_rng(0)
    model = make_model(
        [
            oh.make_node("Relu", ["x"], ["a"], name="ra"),
            oh.make_node("Sigmoid", ["x"], ["b"], name="sb"),
            oh.make_node("Concat", ["a", "b"], ["c"], name="cat", axis=1),
            oh.make_node("MatMul", ["c", "W"], ["y"], name="mm"),
        ],
        [oh.make_tensor_value_info("x", F, [2, 4])],
        [oh.make_tensor_value_info("y", F, [2, 3])],
        {"W": rng.standard_normal((8, 3)).astype(np.float32)},
    )
    plan = OrtQuantizer().annotate(model, QuantConfig())
    assert len(plan.groups) == 1
    assert set(next(iter(plan.groups.values())).value_names()) == {"a", "b", "c"}


def _attention_like(fill: float = float(np.finfo(np.float32).min)) -> onnx.ModelProto:
    """Scores with an additive mask from Where(keep, 0, fill); a MatMul reads the masked
    scores; the attention MatMuls are activation x activation."""
    rng = np.random.default_rng(0)
    return make_model(
        [
            oh.make_node("MatMul", ["x", "Wq"], ["q"], name="q_proj"),
            oh.make_node("MatMul", ["x", "Wk"], ["k"], name="k_proj"),
            oh.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[1, 0]),
            oh.make_node("MatMul", ["q", "kt"], ["scores"], name="qk"),
            oh.make_node("Where", ["keep", "zero", "fill"], ["mask"], name="mask"),
            oh.make_node("Add", ["scores", "mask"], ["masked"], name="add_mask"),
            oh.make_node("Softmax", ["masked"], ["p"], name="softmax"),
            oh.make_node("MatMul", ["p", "x"], ["ctx"], name="pv"),
            oh.make_node("MatMul", ["masked", "Wm"], ["side"], name="reads_mask"),
        ],
        [
            oh.make_tensor_value_info("x", F, [4, 8]),
            oh.make_tensor_value_info("keep", onnx.TensorProto.BOOL, [4]),
        ],
        [oh.make_tensor_value_info("ctx", F, [4, 8]), oh.make_tensor_value_info("side", F, [4, 2])],
        {
            "Wq": rng.standard_normal((8, 8)).astype(np.float32),
            "Wk": rng.standard_normal((8, 8)).astype(np.float32),
            "Wm": rng.standard_normal((4, 2)).astype(np.float32),
            "zero": np.array(0.0, np.float32),
            "fill": np.array(fill, np.float32),
        },
    )


def _attention_feeds(n: int = 3):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(1)
    return [
        {"x": rng.standard_normal((4, 8)).astype(np.float32),
         "keep": np.array([True, True, True, False])}
        for _ in range(n)
    ]


def test_act_x_act_matmuls_stay_float_by_default() -> None:
    model = _attention_like()
    plan = OrtQuantizer().annotate(model, QuantConfig())
    assert set(_units(plan)) == {"q_proj", "k_proj", "reads_mask"}
    skipped = {s.what: s for s in plan.skipped}
    assert skipped["qk"].category == "act-x-act" and skipped["pv"].category == "act-x-act"
    plan = OrtQuantizer().annotate(model, QuantConfig(act_matmul=True))
    assert {"qk", "pv"} <= set(_units(plan))


def test_mask_path_is_never_quantized() -> None:
    model = _attention_like()
    plan = OrtQuantizer().annotate(model, QuantConfig())
    _finalize(model, plan, _attention_feeds())
    assert set(_units(plan)) == {"q_proj", "k_proj"}
    reasons = [s.reason for s in plan.skipped if s.category == "mask-path"]
    assert reasons and "masked" in reasons[0] and "-3.4e+38" in reasons[0]
    dropped = [s for s in plan.skipped if s.what == "reads_mask"]
    assert dropped and "mask path" in dropped[0].reason
    assert "masked" not in plan.activation_values()


def test_huge_but_finite_range_is_skipped_too() -> None:
    """A -1e9 fill is 1e4 x beyond the typical magnitude: skipped as a huge range."""
    model = _attention_like(fill=-1e9)
    plan = OrtQuantizer().annotate(model, QuantConfig())
    _finalize(model, plan, _attention_feeds())
    assert "reads_mask" not in _units(plan)
    assert any(s.category == "huge-range" for s in plan.skipped)


def _residual_model(op: str) -> object:
    """x -> op(W1) -> h; res = h + x; y = op(res, W2): a skip connection."""
    rng = np.random.default_rng(0)
    if op == "Conv":
        shape, w_shape = [1, 4, 5, 5], (4, 4, 1, 1)
    else:
        shape, w_shape = [2, 4], (4, 4)
    return make_model(
        [
            oh.make_node(op, ["x", "W1"], ["h"], name="layer1"),
            oh.make_node("Add", ["h", "x"], ["res"], name="residual"),
            oh.make_node(op, ["res", "W2"], ["y"], name="layer2"),
        ],
        [oh.make_tensor_value_info("x", F, shape)],
        [oh.make_tensor_value_info("y", F, shape)],
        {"W1": rng.standard_normal(w_shape).astype(np.float32),
         "W2": rng.standard_normal(w_shape).astype(np.float32)},
    )


def test_tensorrt_policy_symmetric_and_residual_adds() -> None:
    model = _residual_model("Conv")
    plan = TensorRTQuantizer().annotate(model, QuantConfig())
    units = _units(plan)
    assert set(units) == {"layer1", "layer2", "residual"}
    assert units["layer1"].activations[0].spec == ACT_S8_SYM  # type: ignore[attr-defined]
    assert not units["layer1"].weight.spec.reduce_range  # type: ignore[attr-defined]
    add = units["residual"]
    assert add.activations[0].group == add.activations[1].group  # type: ignore[attr-defined]
    # The ort policy leaves the Add alone.
    assert "residual" not in _units(OrtQuantizer().annotate(model, QuantConfig()))


def test_tensorrt_keeps_a_transformer_residual_stream_float() -> None:
    plan = TensorRTQuantizer().annotate(_residual_model("MatMul"), QuantConfig())
    assert set(_units(plan)) == {"layer1", "layer2"}


def test_exclude_by_name_and_op_type() -> None:
    plan = OrtQuantizer().annotate(convnet(), QuantConfig(exclude=("conv2", "Gemm")))
    assert set(_units(plan)) == {"conv1"}
    assert {s.what for s in plan.skipped if s.category == "excluded"} == {"conv2", "fc"}


def test_initializer_that_is_a_graph_input_is_not_a_constant_weight() -> None:
    rng = np.random.default_rng(0)
    model = make_model(
        [oh.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        [oh.make_tensor_value_info("x", F, [2, 4]), oh.make_tensor_value_info("W", F, [4, 3])],
        [oh.make_tensor_value_info("y", F, [2, 3])],
        {"W": rng.standard_normal((4, 3)).astype(np.float32)},
    )
    plan = OrtQuantizer().annotate(model, QuantConfig())
    unit = _units(plan)["mm"]
    assert unit.weight is None  # type: ignore[attr-defined]
    # Calibrated like an activation, symmetric per tensor.
    w_edge = unit.activations[1]  # type: ignore[attr-defined]
    assert w_edge.value.name == "W" and w_edge.spec.symmetric and not w_edge.spec.per_channel


def test_constant_node_weights_are_weights() -> None:
    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "Wc")
    model = make_model(
        [
            oh.make_node("Constant", [], ["Wc"], name="const", value=w),
            oh.make_node("MatMul", ["x", "Wc"], ["y"], name="mm"),
        ],
        [oh.make_tensor_value_info("x", F, [2, 4])],
        [oh.make_tensor_value_info("y", F, [2, 3])],
    )
    unit = _units(OrtQuantizer().annotate(model, QuantConfig()))["mm"]
    assert unit.weight is not None and unit.weight.spec.axis == 1  # type: ignore[attr-defined]


def test_already_quantized_nodes_are_left_alone() -> None:
    from _qdq_support import images, run_pass

    from graphopt.passes.quantize.ptq import PtqPass

    model = convnet()
    ctx = context(images(2))
    run_pass(PtqPass(), model, ctx)
    plan = OrtQuantizer().annotate(model, QuantConfig())
    assert not plan.units
    assert {s.category for s in plan.skipped} == {"already-quantized"}
    assert node(model, "conv1").op_type == "Conv"


@pytest.mark.parametrize("quantizer", [OrtQuantizer(), TensorRTQuantizer()])
def test_integer_and_non_compute_values_untouched(quantizer) -> None:  # type: ignore[no-untyped-def]
    plan = quantizer.annotate(_attention_like(), QuantConfig())
    values = set(plan.activation_values())
    assert "keep" not in values and "p" not in values and "mask" not in values


def test_control_flow_bodies_are_listed_not_quantized() -> None:
    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "Wb")
    branch = oh.make_graph(
        [oh.make_node("Constant", [], ["Wb"], value=w), oh.make_node("MatMul", ["x", "Wb"], ["b_out"])],
        "branch", [], [oh.make_tensor_value_info("b_out", F, [2, 4])],
    )
    model = make_model(
        [
            oh.make_node("MatMul", ["x", "W"], ["h"], name="outer"),
            oh.make_node("If", ["cond"], ["y"], name="branchy", then_branch=branch, else_branch=branch),
        ],
        [oh.make_tensor_value_info("x", F, [2, 4]),
         oh.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])],
        [oh.make_tensor_value_info("h", F, [2, 4]), oh.make_tensor_value_info("y", F, [2, 4])],
        {"W": rng.standard_normal((4, 4)).astype(np.float32)},
    )
    plan = OrtQuantizer().annotate(model, QuantConfig())
    assert set(_units(plan)) == {"outer"}
    (skip,) = [s for s in plan.skipped if s.category == "subgraph"]
    assert skip.what == "branchy" and "stay in float" in skip.reason
