"""eliminate-dead-code: what goes, what always stays."""

from __future__ import annotations

import numpy as np
from _cleanup_support import check_pass, header, run_pass

from graphopt.infra import Aspect
from graphopt.passes.cleanup.dead_code import EliminateDeadCodePass
from graphopt.testing.builders import assert_same_structure, model_from_text, op_types, to_proto

H = header()


def test_unused_chain_and_initializer_are_removed() -> None:
    text = f"""{H}
    g (float[2] x) => (float[2] y) <float[2] w = {{1.0, 2.0}}, float[2] unused = {{0.0, 0.0}}> {{
        a = Relu(x)
        b = Mul(a, w)
        c = Neg(b)
        y = Abs(a)
    }}"""
    model, result = check_pass(EliminateDeadCodePass, text)
    expected = model_from_text(f"""{H}
    g (float[2] x) => (float[2] y) {{
        a = Relu(x)
        y = Abs(a)
    }}""")
    assert_same_structure(model, expected)
    assert result.stats == {"nodes_removed": 2, "initializers_removed": 2}
    assert result.preserved.preserves(Aspect.WEIGHTS)
    assert not result.preserved.preserves(Aspect.STRUCTURE)


def test_graph_inputs_and_outputs_always_stay() -> None:
    text = f"""{H}
    g (float[2] x, float[2] unused_in, float[2] w) => (float[2] y, float[2] x2, float[2] k)
      <float[2] w = {{1.0, 2.0}}, float[2] k = {{3.0, 4.0}}> {{
        y = Relu(x)
        x2 = Identity(x)
    }}"""
    model, result = check_pass(EliminateDeadCodePass, text)
    assert not result.modified
    assert [v.name for v in model.graph.inputs] == ["x", "unused_in", "w"]
    assert sorted(model.graph.initializers) == ["k", "w"]


def test_dead_if_goes_with_what_only_its_body_used() -> None:
    text = f"""{H}
    g (bool b, float[2] x) => (float[2] y) <float[2] c = {{1.0, 2.0}}> {{
        p = Neg(x)
        q = Add(x, c)
        unused = If(b) <then_branch = t () => (float[2] a) {{
            a = Add(p, c)
        }}, else_branch = e () => (float[2] o) {{
            o = Sub(q, c)
        }}>
        y = Relu(x)
    }}"""
    # One run removes the If, then everything its bodies captured: idempotent in one go.
    model, result = check_pass(EliminateDeadCodePass, text)
    assert op_types(model) == ["Relu"]
    assert not model.graph.initializers
    assert result.stats["nodes_removed"] == 3


def test_dead_nodes_inside_live_bodies_are_removed() -> None:
    text = f"""{H}
    g (bool b, float[2] x) => (float[2] y) <float[2] c = {{1.0, 2.0}}> {{
        p = Neg(x)
        y = If(b) <then_branch = t () => (float[2] a) {{
            junk = Mul(p, c)
            a = Add(x, c)
        }}, else_branch = e () => (float[2] o) {{
            o = Sub(x, c)
        }}>
    }}"""
    feeds = {"b": np.array(True), "x": np.array([1, 2], np.float32)}
    model, result = check_pass(EliminateDeadCodePass, text, feeds)
    assert op_types(model) == ["If"]
    then = model.graph.node(0).attributes["then_branch"].as_graph()
    assert [n.op_type for n in then] == ["Add"]
    assert result.stats["nodes_removed"] == 2


def test_custom_nodes_functions_and_opsets_are_kept() -> None:
    text = f"""{header(extra='"com.acme" : 1, "local" : 1, "ai.onnx.ml" : 3')}
    g (float[2] x) => (float[2] y) {{
        side = com.acme.Log(x)
        called = local.f(x)
        y = Relu(x)
    }}
    <domain: "local", opset_import: ["" : 17]>
    f (p) => (q) {{
        dead = Neg(p)
        q = Relu(p)
    }}
    <domain: "local", opset_import: ["" : 17]>
    never_called (p) => (q) {{
        q = Abs(p)
    }}"""
    before = to_proto(model_from_text(text))
    model = model_from_text(text)
    result = run_pass(EliminateDeadCodePass(), model)
    assert not result.modified
    after = to_proto(model)
    assert after.functions == before.functions
    assert after.opset_import == before.opset_import
    assert op_types(model) == ["com.acme::Log", "local::f", "Relu"]


def test_duplicate_and_empty_node_names_are_fine() -> None:
    text = f"""{H}
    g (float[2] x) => (float[2] y) {{
        a = Relu(x)
        b = Neg(x)
        y = Abs(a)
    }}"""
    model = model_from_text(text)
    for node in model.graph:
        node.name = "same"
    model.graph.node(0).name = ""
    run_pass(EliminateDeadCodePass(), model)
    assert op_types(model) == ["Relu", "Abs"]


def test_long_chain_has_no_recursion_problem() -> None:
    lines = ["v0 = Relu(x)"] + [f"v{i} = Neg(v{i - 1})" for i in range(1, 3000)]
    text = f"""{H}
    g (float[2] x) => (float[2] y) {{
        {chr(10).join(lines)}
        y = Relu(x)
    }}"""
    model = model_from_text(text)
    result = run_pass(EliminateDeadCodePass(), model)
    assert result.stats["nodes_removed"] == 3000
    assert op_types(model) == ["Relu"]
