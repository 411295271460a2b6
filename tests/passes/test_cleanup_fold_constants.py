"""fold-constants: structure, exactness against ORT, and the reliability rules."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from _cleanup_support import (
    assert_bit_exact,
    assert_valid,
    check_pass,
    header,
    ort_outputs,
    run_pass,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper, numpy_helper

from graphopt.passes.cleanup.fold_constants import FoldConstantsOptions, FoldConstantsPass
from graphopt.testing.builders import assert_same_structure, model_from_text, op_types, to_proto

H = header()


def fold(**options: object) -> FoldConstantsPass:
    return FoldConstantsPass(FoldConstantsOptions.parse(dict(options)) if options else None)


def test_chain_of_constants_becomes_one_initializer() -> None:
    text = f"""{H}
    g (float[2,3] x) => (float[3,2] y) {{
        a = Constant<value = int64[1] {{3}}>()
        b = Constant<value = int64[1] {{2}}>()
        s = Concat<axis=0>(a, b)
        y = Reshape(x, s)
    }}"""
    model, result = check_pass(fold, text)
    expected = model_from_text(f"""{H}
    g (float[2,3] x) => (float[3,2] y) <int64[2] s = {{3, 2}}> {{
        a = Constant<value = int64[1] {{3}}>()
        b = Constant<value = int64[1] {{2}}>()
        y = Reshape(x, s)
    }}""")
    assert_same_structure(model, expected)
    assert result.stats["nodes_folded"] == 1
    assert result.stats["bytes_added"] == 16
    assert model.graph.initializers["s"].const_value.numpy().tolist() == [3, 2]


def test_folding_cascades_in_one_run() -> None:
    text = f"""{H}
    g (float[4] x) => (float[4] y) <float[4] c = {{1.0, 2.0, 3.0, 4.0}}> {{
        d = Add(c, c)
        e = Mul(d, c)
        f = Neg(e)
        y = Add(x, f)
    }}"""
    model, result = check_pass(fold, text)
    assert op_types(model) == ["Add"]
    assert result.stats["nodes_folded"] == 3
    assert model.graph.initializers["f"].const_value.numpy().tolist() == [-2.0, -8.0, -18.0, -32.0]


def test_initializer_that_is_graph_input_is_not_folded() -> None:
    text = f"""{H}
    g (float[2] x, float[2] w) => (float[2] y) <float[2] w = {{1.0, 2.0}}, float[2] c = {{3.0, 4.0}}> {{
        t = Add(w, c)
        y = Mul(x, t)
    }}"""
    model, result = check_pass(fold, text)
    assert op_types(model) == ["Add", "Mul"]
    assert not result.modified
    # Overriding w at run time still works after the pass.
    proto = to_proto(model)
    feeds = {"x": np.ones(2, np.float32), "w": np.array([10, 20], np.float32)}
    assert ort_outputs(proto, feeds)[0].tolist() == [13.0, 24.0]


def test_random_ops_are_not_folded() -> None:
    text = f"""{H}
    g (float[2] x) => (float[2] y, float[2] z) <float[2] c = {{1.0, 2.0}}> {{
        r = RandomUniform<shape = [2], seed = 1.0>()
        y = Add(r, c)
        n = RandomNormalLike<seed = 2.0>(c)
        b = Bernoulli<seed = 3.0>(c)
        bf = Cast<to = 1>(b)
        z = Add(n, bf)
    }}"""
    model, result = check_pass(fold, text, numeric=False)
    assert not result.modified
    assert op_types(model) == [
        "RandomUniform",
        "Add",
        "RandomNormalLike",
        "Bernoulli",
        "Cast",
        "Add",
    ]


def test_large_expand_and_tile_are_not_folded_small_ones_are() -> None:
    text = f"""{H}
    g (float[1000,100] x, float[2,3] u) => (float[1000,100] y, float[2,3] v) <float[1] c = {{1.5}}, int64[2] big = {{1000, 100}}, int64[2] small = {{2, 3}}> {{
        e = Expand(c, big)
        y = Add(x, e)
        s = Expand(c, small)
        v = Add(u, s)
    }}"""
    model, result = check_pass(fold, text)
    assert op_types(model) == ["Expand", "Add", "Add"]
    assert result.stats["skipped_size"] == 1
    tile = f"""{H}
    g (float[2,300] x) => (float[2,300] y) <float[1,3] c = {{1.0, 2.0, 3.0}}, int64[2] r = {{2, 100}}> {{
        t = Tile(c, r)
        y = Add(x, t)
    }}"""
    model, result = check_pass(fold, tile)
    assert op_types(model) == ["Tile", "Add"]
    # Allowing growth folds it; max_output_mb=0 forbids any fold above the small floor.
    model, result = check_pass(lambda: fold(max_growth="1000"), tile)
    assert op_types(model) == ["Add"]
    model, result = check_pass(lambda: fold(max_output_mb="0"), tile)
    assert op_types(model) == ["Tile", "Add"]


def test_widening_cast_of_weights_is_not_folded() -> None:
    weights = ", ".join(str(i % 7 - 3) for i in range(2048))
    text = f"""{H}
    g (float[2048] x) => (float[2048] y) <int8[2048] q = {{{weights}}}> {{
        w = Cast<to = 1>(q)
        y = Mul(x, w)
    }}"""
    model, _ = check_pass(fold, text)
    assert op_types(model) == ["Cast", "Mul"]  # keeps the int8 weights int8


def test_float_math_is_not_folded_by_default() -> None:
    text = f"""{H}
    g (float[3] x) => (float[3] y) <float[3] c = {{0.1, 0.7, 2.3}}> {{
        e = Exp(c)
        t = Tanh(e)
        s = Sqrt(t)
        y = Add(x, s)
    }}"""
    model, result = check_pass(fold, text)
    assert op_types(model) == ["Exp", "Tanh", "Sqrt", "Add"]
    assert result.stats["skipped_inexact"] == 1
    assert FoldConstantsPass().info.tolerance == "exact"


def test_float_math_folds_when_enabled_with_fusion_tolerance() -> None:
    text = f"""{H}
    g (float[3] x) => (float[3] y) <float[3] c = {{0.1, 0.7, 2.3}}> {{
        e = Exp(c)
        t = Tanh(e)
        y = Add(x, t)
    }}"""
    before = to_proto(model_from_text(text))
    model = model_from_text(text)
    pass_ = fold(fold_float_math="true")
    assert pass_.info.tolerance == "fusion"
    assert pass_.to_text() == "fold-constants(fold_float_math=true)"
    run_pass(pass_, model)
    after = to_proto(model)
    assert_valid(after)
    assert op_types(model) == ["Add"]
    feeds = {"x": np.array([1, 2, 3], np.float32)}
    np.testing.assert_allclose(
        ort_outputs(after, feeds)[0], ort_outputs(before, feeds)[0], rtol=1e-5, atol=1e-6
    )


def test_quantization_ops_are_never_folded() -> None:
    text = f"""{H}
    g (float[4] x) => (float[4] y) <int8[4] q = {{1, 2, 3, 4}}, float s = {{0.5}}, int8 z = {{0}}> {{
        w = DequantizeLinear(q, s, z)
        y = Add(x, w)
    }}"""
    model, _ = check_pass(lambda: fold(fold_float_math="true"), text)
    assert op_types(model) == ["DequantizeLinear", "Add"]


def test_graph_output_keeps_name_and_dim_params() -> None:
    text = f"""{H}
    g (float[2] x) => (float[2] y, int64[N] s) <int64[3] c = {{1, 2, 3}}> {{
        y = Relu(x)
        s = Add(c, c)
    }}"""
    model, _ = check_pass(fold, text)
    assert op_types(model) == ["Relu"]
    out = model.graph.outputs[1]
    assert out.name == "s" and out.is_initializer()
    assert str(out.shape) == "[N]"


def test_custom_domain_node_is_left_alone(caplog: pytest.LogCaptureFixture) -> None:
    text = f"""{header(extra='"com.acme" : 1')}
    g (float[2] x) => (float[2] y) <float[2] c = {{1.0, 2.0}}> {{
        t = com.acme.Twice(c)
        y = Add(x, t)
    }}"""
    model = model_from_text(text)
    with caplog.at_level("WARNING"):
        result = run_pass(fold(), model)
    assert not result.modified
    assert op_types(model) == ["com.acme::Twice", "Add"]
    assert "custom-domain" in caplog.text and "Twice" in caplog.text


def test_if_bodies_are_folded_with_constant_nodes() -> None:
    text = f"""{H}
    g (bool b, float[2] x) => (float[2] y) <float[2] c = {{1.0, 2.0}}> {{
        y = If(b) <then_branch = t () => (float[2] a) {{
            k = Constant<value = float[2] {{3.0, 4.0}}>()
            k2 = Add(k, c)
            a = Add(x, k2)
        }}, else_branch = e () => (float[2] o) {{
            o = Sub(x, c)
        }}>
    }}"""
    for cond in (True, False):
        feeds = {"b": np.array(cond), "x": np.array([1, 2], np.float32)}
        model, result = check_pass(fold, text, feeds)
    then = model.graph.node(0).attributes["then_branch"].as_graph()
    assert [n.op_type for n in then] == ["Constant", "Constant", "Add"]
    assert then.node(1).outputs[0].name == "k2"
    assert not then.initializers  # no initializers are added inside subgraphs
    assert result.stats["nodes_folded"] == 1


def test_ir3_model_gets_constant_nodes() -> None:
    # IR < 4 requires every initializer to be a graph input, so none can be added.
    text = f"""{header(opset=9, ir_version=3)}
    g (float[2] x) => (float[2] y) {{
        c = Constant<value = float[2] {{1.0, 2.0}}>()
        d = Add(c, c)
        y = Mul(x, d)
    }}"""
    model, _ = check_pass(fold, text)
    assert op_types(model) == ["Constant", "Constant", "Mul"]
    assert not model.graph.initializers


def test_multi_output_split_is_folded() -> None:
    text = f"""{H}
    g (float[2] x) => (float[2] y) <float[4] c = {{1.0, 2.0, 3.0, 4.0}}> {{
        p, q = Split<axis = 0>(c)
        s = Add(p, q)
        y = Mul(x, s)
    }}"""
    model, result = check_pass(fold, text)
    assert op_types(model) == ["Mul"]
    assert result.stats["nodes_folded"] == 2


def test_dead_nodes_are_left_for_dead_code_elimination() -> None:
    text = f"""{H}
    g (float[2] x) => (float[2] y) <float[2] c = {{1.0, 2.0}}> {{
        unused = Add(c, c)
        y = Relu(x)
    }}"""
    model, result = check_pass(fold, text)
    assert not result.modified
    assert op_types(model) == ["Add", "Relu"]


def test_model_local_function_is_untouched() -> None:
    text = f"""{header(extra='"local" : 1')}
    g (float[2] x) => (float[2] y) {{
        y = local.f(x)
    }}
    <domain: "local", opset_import: ["" : 17]>
    f (p) => (q) {{
        c = Constant<value = float[2] {{1.0, 2.0}}>()
        d = Add(c, c)
        q = Add(p, d)
    }}"""
    before = to_proto(model_from_text(text))
    model, _ = check_pass(fold, text)
    after = to_proto(model)
    assert after.functions == before.functions
    assert after.opset_import == before.opset_import


@pytest.mark.parametrize(
    ("body", "inits"),
    [
        # integer division truncates toward zero like ORT; Mod follows the divisor's sign
        ("r = Div(a, b)", "int32[4] a = {7, -7, 7, -7}, int32[4] b = {2, 2, -2, -2}"),
        ("r = Mod(a, b)", "int64[4] a = {7, -7, 7, -7}, int64[4] b = {3, 3, -3, -3}"),
        ("r = Div(a, b)", "float[3] a = {1.0, -2.0, 0.1}, float[3] b = {3.0, 7.0, 0.3}"),
        ("r = Mul(a, b)", "double[2] a = {0.1, 1e300}, double[2] b = {0.2, 1e10}"),
        ("r = Max(a, b)", "float[3] a = {1.0, -1.5, 3.0}, float[3] b = {2.0, 7.0, -3.0}"),
        ("r = Sign(a)", "float[4] a = {-0.0, 0.0, -2.0, 3.0}"),
        ("r = Floor(a)", "float[3] a = {-0.5, 0.5, -1.5}"),
        ("r = Ceil(a)", "float[3] a = {-0.5, 0.5, -1.5}"),
        ("r = Abs(a)", "float[3] a = {-0.0, -1.5, 2.0}"),
        (
            "r = Mod<fmod = 1>(a, b)",
            "float[3] a = {-0.0, -7.5, 7.5}, float[3] b = {2.0, 2.0, -2.0}",
        ),
        ("r = Sub(a, b)", "float[3] a = {0.0, -0.0, 1e-45}, float[3] b = {0.0, 0.0, 1e-45}"),
        ("r = Cast<to = 10>(a)", "float[4] a = {0.1, 65519.0, 1e-8, -2.5}"),
        ("r = Cast<to = 5>(a)", "float[4] a = {-32768.9, 32767.9, 0.5, -0.5}"),
        ("r = Cast<to = 1>(a)", "int64[3] a = {16777217, -3, 9007199254740993}"),
        ("r = Cast<to = 9>(a)", "float[3] a = {0.0, -0.0, 0.5}"),
        (
            "r = Slice(a, s, e, ax, st)",
            (
                "int64[5] a = {1, 2, 3, 4, 5}, int64[1] s = {-1},"
                " int64[1] e = {-9223372036854775807}, int64[1] ax = {0}, int64[1] st = {-2}"
            ),
        ),
        ("r = Gather<axis = 0>(a, i)", "float[3] a = {1.0, 2.0, 3.0}, int64[2] i = {-1, 0}"),
        ('r = Pad<mode = "reflect">(a, p)', "float[3] a = {1.0, 2.0, 3.0}, int64[2] p = {2, 1}"),
        ("r = Range(a, b, c)", "int64 a = {10}, int64 b = {-3}, int64 c = {-4}"),
        ("r = Where(c, a, b)", "bool[2] c = {1, 0}, float[2] a = {1.0, 2.0}, float[1] b = {-1.0}"),
        ("r = NonZero(a)", "int32[2,2] a = {0, 3, 4, 0}"),
        ("r = ConstantOfShape<value = int64[1] {7}>(a)", "int64[2] a = {2, 3}"),
        ("r = Equal(a, b)", "int64[3] a = {1, 2, 3}, int64[1] b = {2}"),
        ("r = Round(a)", "float[4] a = {0.5, 1.5, -2.5, 2.4}"),
        ("r = Transpose<perm = [1, 0]>(a)", "int8[2,3] a = {1, 2, 3, 4, 5, 6}"),
    ],
)
def test_exact_folds_match_ort_bit_for_bit(body: str, inits: str) -> None:
    text = f"""{H}
    g (float x) => (float y, r) <{inits}> {{
        {body}
        y = Identity(x)
    }}"""
    # The output type is left to shape inference; declare it by running inference once.
    proto = onnx.shape_inference.infer_shapes(onnx.parser.parse_model(text))
    model = ir.serde.deserialize_model(proto)
    result = run_pass(fold(), model)
    assert result.stats["nodes_folded"] == 1, body
    after = to_proto(model)
    assert_valid(after)
    assert_bit_exact(proto, after, {"x": np.array(1.0, np.float32)})


@pytest.mark.parametrize(
    ("body", "inits"),
    [
        ("r = Div(a, b)", "int32[2] a = {1, 2}, int32[2] b = {1, 0}"),
        ("r = Cast<to = 6>(a)", "float[2] a = {1.0, 3e9}"),
        ("r = Cast<to = 7>(a)", "float[2] a = {1.0, 1.0 / 0.0}"),
        ("r = Cast<to = 10>(a)", "double[1] a = {0.1}"),
        ("r = Cast<to = 16>(a)", "float[1] a = {0.1}"),
        ("r = Min(a, b)", "float[2] a = {1.0, 2.0}, float[2] b = {0.0 / 0.0, 1.0}"),
        ("r = Max(a, b)", "float[2] a = {-0.0, 2.0}, float[2] b = {0.0, 1.0}"),
        ("r = ReduceSum(a)", "float[3] a = {0.1, 0.2, 0.3}"),
        ("r = MatMul(a, a)", "float[2,2] a = {1.0, 2.0, 3.0, 4.0}"),
    ],
)
def test_inexact_or_unsafe_folds_are_skipped(body: str, inits: str) -> None:
    text = f"""{H}
    g (float x) => (float y, r) <{inits}> {{
        {body}
        y = Identity(x)
    }}"""
    proto = onnx.parser.parse_model(text.replace("1.0 / 0.0", "inf").replace("0.0 / 0.0", "nan"))
    model = ir.serde.deserialize_model(proto)
    result = run_pass(fold(), model)
    assert result.stats["nodes_folded"] == 0, body


def test_float16_arithmetic_is_not_folded() -> None:
    a = np.array([0.1, 0.2], np.float16)
    model = ir.serde.deserialize_model(_binary_model("Add", a, a))
    assert not run_pass(fold(), model).modified


def _binary_model(op: str, a: np.ndarray, b: np.ndarray) -> onnx.ModelProto:
    dtype = helper.np_dtype_to_tensor_dtype(a.dtype)
    graph = helper.make_graph(
        [helper.make_node(op, ["a", "b"], ["r"])],
        "g",
        [],
        [helper.make_tensor_value_info("r", dtype, list(a.shape))],
        initializer=[numpy_helper.from_array(a, "a"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


_floats = hnp.arrays(
    np.float32,
    st.just((6,)),
    elements=st.floats(width=32, allow_nan=False, allow_subnormal=True),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(a=_floats, b=_floats, op=st.sampled_from(["Add", "Sub", "Mul", "Div", "Max"]))
def test_float32_arithmetic_folds_are_bit_exact(a: np.ndarray, b: np.ndarray, op: str) -> None:
    proto = _binary_model(op, a, b)
    model = ir.serde.deserialize_model(proto)
    skipped = op == "Max" and ((a == 0).any() or (b == 0).any())
    assert run_pass(fold(), model).modified != skipped
    assert_bit_exact(proto, to_proto(model), {})


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(a=_floats)
def test_float32_to_float16_cast_folds_are_bit_exact(a: np.ndarray) -> None:
    graph = helper.make_graph(
        [helper.make_node("Cast", ["a"], ["r"], to=TensorProto.FLOAT16)],
        "g",
        [],
        [helper.make_tensor_value_info("r", TensorProto.FLOAT16, [6])],
        initializer=[numpy_helper.from_array(a, "a")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    model = ir.serde.deserialize_model(proto)
    assert run_pass(fold(), model).modified
    assert_bit_exact(proto, to_proto(model), {})


def test_options_are_validated() -> None:
    from graphopt.errors import UsageError

    with pytest.raises(UsageError):
        FoldConstantsOptions.parse({"max_output_mb": "-1"})
    with pytest.raises(UsageError):
        FoldConstantsOptions.parse({"nonsense": "1"})
