"""eliminate-common-subexpressions: merges, non-merges and output naming."""

from __future__ import annotations

import numpy as np
from _cleanup_support import check_pass, header, run_pass

from graphopt.passes.cleanup.cse import (
    EliminateCommonSubexpressionsOptions,
    EliminateCommonSubexpressionsPass,
)
from graphopt.testing.builders import assert_same_structure, model_from_text, op_types

H = header()
CSE = EliminateCommonSubexpressionsPass


def test_identical_nodes_merge_transitively() -> None:
    text = f"""{H}
    g (float[2] x) => (float[2] y) {{
        a = Relu(x)
        b = Relu(x)
        c = Neg(a)
        d = Neg(b)
        y = Add(c, d)
    }}"""
    model, result = check_pass(CSE, text)
    expected = model_from_text(f"""{H}
    g (float[2] x) => (float[2] y) {{
        a = Relu(x)
        c = Neg(a)
        y = Add(c, c)
    }}""")
    assert_same_structure(model, expected)
    assert result.stats["nodes_merged"] == 2


def test_different_attributes_or_inputs_do_not_merge() -> None:
    text = f"""{H}
    g (float[2,2] x) => (float[2,2] y) {{
        a = LeakyRelu<alpha = 0.1>(x)
        b = LeakyRelu<alpha = 0.2>(x)
        c = Transpose<perm = [1, 0]>(a)
        d = Transpose<perm = [1, 0]>(b)
        y = Add(c, d)
    }}"""
    _, result = check_pass(CSE, text)
    assert not result.modified


def test_random_and_dropout_nodes_are_never_merged() -> None:
    text = f"""{H}
    g (float[2] x) => (float[2] y, float[2] z) <bool t = {{1}}, float r = {{0.5}}> {{
        a = RandomNormalLike<seed = 1.0>(x)
        b = RandomNormalLike<seed = 1.0>(x)
        y = Add(a, b)
        p = Dropout(x, r, t)
        q = Dropout(x, r, t)
        z = Add(p, q)
    }}"""
    model, result = check_pass(CSE, text, numeric=False)
    assert not result.modified
    assert op_types(model).count("RandomNormalLike") == 2


def test_constants_compare_bit_for_bit() -> None:
    text = f"""{H}
    g (float[2] x) => (float[2] y) {{
        p = Constant<value_float = 0.0>()
        n = Constant<value_float = -0.0>()
        p2 = Constant<value_float = 0.0>()
        a = Mul(x, p)
        b = Mul(x, n)
        c = Mul(x, p2)
        s = Add(a, b)
        y = Sub(s, c)
    }}"""
    model, result = check_pass(CSE, text, {"x": np.array([-1.0, 1.0], np.float32)})
    # 0.0 and 0.0 merge (and then the two Muls); -0.0 stays: x * -0.0 differs in sign.
    assert result.stats["nodes_merged"] == 2
    assert op_types(model) == ["Constant", "Constant", "Mul", "Mul", "Add", "Sub"]


def test_duplicate_small_initializers_are_merged() -> None:
    text = f"""{H}
    g (float[2] x, float[2] gi) => (float[2] y) <float[2] a = {{1.0, 2.0}}, float[2] b = {{1.0, 2.0}},
        float[2] gi = {{1.0, 2.0}}, double[2] d = {{1.0, 2.0}}> {{
        s = Add(x, a)
        t = Add(x, b)
        u = Add(s, t)
        v = Add(u, gi)
        dd = Cast<to = 1>(d)
        y = Add(v, dd)
    }}"""
    model, result = check_pass(CSE, text)
    assert result.stats["initializers_merged"] == 1
    assert sorted(model.graph.initializers) == ["a", "d", "gi"]  # graph input and dtype kept
    assert result.stats["nodes_merged"] == 1  # the two Adds now read the same value


def test_large_initializers_are_not_compared() -> None:
    values = ", ".join("1.0" for _ in range(64))
    text = f"""{H}
    g (float[64] x) => (float[64] y) <float[64] a = {{{values}}}, float[64] b = {{{values}}}> {{
        s = Add(x, a)
        y = Add(s, b)
    }}"""
    _, result = check_pass(
        lambda: CSE(EliminateCommonSubexpressionsOptions(max_constant_bytes=128)), text
    )
    assert not result.modified
    _, result = check_pass(CSE, text)
    assert result.stats["initializers_merged"] == 1


def test_duplicate_outputs_keep_their_names() -> None:
    text = f"""{H}
    g (float[2] x) => (float[2] y1, float[2] y2, float[2] y3) {{
        y1 = Relu(x)
        y2 = Relu(x)
        t = Neg(x)
        y3 = Neg(x)
        u = Abs(t)
    }}"""
    model, result = check_pass(CSE, text)
    assert [v.name for v in model.graph.outputs] == ["y1", "y2", "y3"]
    # y2 becomes Identity(y1); t (internal) is merged into the output y3's node.
    assert op_types(model) == ["Relu", "Identity", "Neg", "Abs"]
    assert result.stats["nodes_merged"] == 2


def test_custom_domain_nodes_are_not_merged() -> None:
    text = f"""{header(extra='"com.acme" : 1')}
    g (float[2] x) => (float[2] y) {{
        a = com.acme.Sample(x)
        b = com.acme.Sample(x)
        y = Add(a, b)
    }}"""
    model = model_from_text(text)
    assert not run_pass(CSE(), model).modified


def test_if_bodies_are_deduplicated_separately() -> None:
    text = f"""{H}
    g (bool b, float[2] x) => (float[2] y) {{
        y = If(b) <then_branch = t () => (float[2] a) {{
            p = Relu(x)
            q = Relu(x)
            a = Add(p, q)
        }}, else_branch = e () => (float[2] o) {{
            o = Relu(x)
        }}>
    }}"""
    for cond in (True, False):
        model, _ = check_pass(CSE, text, {"b": np.array(cond), "x": np.array([1, -2], np.float32)})
    then = model.graph.node(0).attributes["then_branch"].as_graph()
    assert [n.op_type for n in then] == ["Relu", "Add"]
