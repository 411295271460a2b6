"""remove-identity: the no-op rules and the graph I/O naming rules."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from _cleanup_support import check_pass, header, run_pass

from graphopt.passes.cleanup.identity import RemoveIdentityPass
from graphopt.testing.builders import assert_same_structure, model_from_text, op_types

H = header()


def test_identity_chain_is_removed() -> None:
    text = f"""{H}
    g (float[2] x) => (float[2] y) {{
        a = Relu(x)
        b = Identity(a)
        c = Identity(b)
        y = Neg(c)
    }}"""
    model, result = check_pass(RemoveIdentityPass, text)
    expected = model_from_text(f"""{H}
    g (float[2] x) => (float[2] y) {{
        a = Relu(x)
        y = Neg(a)
    }}""")
    assert_same_structure(model, expected)
    assert result.stats["nodes_removed"] == 2
    assert result.stats["removed_Identity"] == 2


def test_identity_feeding_an_output_renames_the_internal_value() -> None:
    text = f"""{H}
    g (float[N,3] x) => (float[batch,3] y) {{
        a = Relu(x)
        y = Identity(a)
    }}"""
    model, _ = check_pass(RemoveIdentityPass, text)
    assert op_types(model) == ["Relu"]
    out = model.graph.outputs[0]
    assert out.name == "y" and out.producer().op_type == "Relu"
    assert str(out.shape) == "[batch,3]"  # the declared output dim_param is kept


def test_graph_input_wired_to_output_stays() -> None:
    text = f"""{H}
    g (float[2] x) => (float[2] y, float[2] z) <float[2] c = {{1.0, 2.0}}> {{
        y = Identity(x)
        z = Identity(c)
    }}"""
    model, result = check_pass(RemoveIdentityPass, text)
    assert not result.modified
    assert op_types(model) == ["Identity", "Identity"]


def test_one_value_as_two_outputs_stays_valid() -> None:
    text = f"""{H}
    g (float[2] x) => (float[2] y1, float[2] y2) {{
        a = Relu(x)
        y1 = Identity(a)
        y2 = Identity(a)
    }}"""
    model, _ = check_pass(RemoveIdentityPass, text)
    assert [v.name for v in model.graph.outputs] == ["y1", "y2"]
    assert op_types(model) == ["Relu", "Identity"]


def test_outer_scope_value_is_not_renamed_into_a_body_output() -> None:
    text = f"""{H}
    g (bool b, float[2] x) => (float[2] y) {{
        p = Neg(x)
        y = If(b) <then_branch = t () => (float[2] a) {{
            a = Identity(p)
        }}, else_branch = e () => (float[2] o) {{
            i = Identity(p)
            o = Relu(i)
        }}>
    }}"""
    for cond in (True, False):
        model, _ = check_pass(
            RemoveIdentityPass, text, {"b": np.array(cond), "x": np.array([1, -2], np.float32)}
        )
    node = model.graph.node(1)
    assert [n.op_type for n in node.attributes["then_branch"].as_graph()] == ["Identity"]
    assert [n.op_type for n in node.attributes["else_branch"].as_graph()] == ["Relu"]


@pytest.mark.parametrize(
    ("opset", "dropout", "removed"),
    [
        (13, "d = Dropout(a)", True),
        (13, "d = Dropout(a, r, f)", True),
        (13, "d = Dropout(a, r, t)", False),
        (13, "d, m = Dropout(a)", True),
        (13, "d = Dropout(a, r, train)", False),
        (10, "d = Dropout<ratio = 0.3>(a)", True),
    ],
)
def test_inference_dropout_is_removed(opset: int, dropout: str, removed: bool) -> None:
    text = f"""{header(opset=opset)}
    g (float[2] x, bool train) => (float[2] y) <float r = {{0.5}}, bool f = {{0}}, bool t = {{1}}> {{
        a = Relu(x)
        {dropout}
        y = Neg(d)
    }}"""
    feeds = {"x": np.array([1, -2], np.float32), "train": np.array(False)}
    model, _ = check_pass(RemoveIdentityPass, text, feeds, numeric=not ("t)" in dropout))
    assert ("Dropout" not in op_types(model)) == removed


def test_dropout_with_used_mask_stays() -> None:
    text = f"""{H}
    g (float[2] x) => (float[2] y, bool[2] m) {{
        y, m = Dropout(x)
    }}"""
    _model, result = check_pass(RemoveIdentityPass, text)
    assert not result.modified


@pytest.mark.parametrize(
    ("cast", "removed"),
    [("Cast<to = 1>(a)", True), ("Cast<to = 11>(a)", False), ("Cast<to = 1>(u)", False)],
)
def test_cast_to_the_same_type(cast: str, removed: bool) -> None:
    text = f"""{H}
    g (float[2] x) => (double[2] y) {{
        a = Relu(x)
        u = Neg(x)
        c = {cast}
        y = Cast<to = 11>(c)
    }}"""
    model = model_from_text(text)
    # give `a` a known type; `u` stays untyped (unknown types are never assumed)
    model.graph.node(0).outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    result = run_pass(RemoveIdentityPass(), model)
    assert result.modified == removed


@pytest.mark.parametrize(
    ("shape", "target", "allowzero", "removed"),
    [
        ("2,3", "2, 3", 0, True),
        ("2,3", "3, 2", 0, False),
        ("N,3", "0, 3", 0, True),
        ("N,3", "-1, 3", 0, True),
        ("N,M", "0, -1", 0, True),
        ("N,M", "-1, -1", 0, False),
        ("N,3", "0, 3", 1, False),
        ("2,3", "6", 0, False),
    ],
)
def test_reshape_to_the_same_shape(shape: str, target: str, allowzero: int, removed: bool) -> None:
    count = len(target.split(","))
    text = f"""{H}
    g (float[{shape}] x) => (float[{shape}] y) <int64[{count}] s = {{{target}}}> {{
        r = Reshape<allowzero = {allowzero}>(x, s)
        y = Neg(r)
    }}"""
    if not removed:  # the negative cases are not all valid models; only check the decision
        assert not run_pass(RemoveIdentityPass(), model_from_text(text)).modified
        return
    _model, result = check_pass(RemoveIdentityPass, text, numeric="M" not in shape)
    assert result.modified


@pytest.mark.parametrize(
    ("perm", "removed"), [("<perm = [0, 1, 2]>", True), ("<perm = [0, 2, 1]>", False)]
)
def test_noop_transpose(perm: str, removed: bool) -> None:
    text = f"""{H}
    g (float[2,3,3] x) => (float[2,3,3] y) {{
        t = Transpose{perm}(x)
        y = Neg(t)
    }}"""
    _model, result = check_pass(RemoveIdentityPass, text)
    assert result.modified == removed


def test_transpose_without_perm_on_vector() -> None:
    text = f"""{H}
    g (float[4] x) => (float[4] y) {{
        t = Transpose(x)
        y = Neg(t)
    }}"""
    model, _result = check_pass(RemoveIdentityPass, text)
    assert op_types(model) == ["Neg"]


def test_custom_identity_is_left_alone() -> None:
    text = f"""{header(extra='"com.acme" : 1')}
    g (float[2] x) => (float[2] y) {{
        a = com.acme.Identity(x)
        y = Neg(a)
    }}"""
    model = model_from_text(text)
    assert not run_pass(RemoveIdentityPass(), model).modified
    assert op_types(model) == ["com.acme::Identity", "Neg"]
