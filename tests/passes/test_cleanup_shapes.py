"""simplify-shapes: static shape values fold; Reshape/Expand targets become constants."""

from __future__ import annotations

import numpy as np
from _cleanup_support import check_pass, header, run_pass

from graphopt.passes.cleanup.dead_code import EliminateDeadCodePass
from graphopt.passes.cleanup.shapes import SimplifyShapesOptions, SimplifyShapesPass
from graphopt.testing.builders import assert_same_structure, model_from_text, op_types, to_proto

H = header()


def test_shape_of_static_value_becomes_constant() -> None:
    text = f"""{H}
    g (float[2,3] x) => (float[3,2] y) {{
        s = Shape(x)
        r = Constant<value = int64[1] {{1}}>()
        g = Gather(s, r)
        p = Constant<value = int64[1] {{2}}>()
        t = Concat<axis = 0>(g, p)
        y = Reshape(x, t)
    }}"""
    model, result = check_pass(SimplifyShapesPass, text)
    expected = model_from_text(f"""{H}
    g (float[2,3] x) => (float[3,2] y) <int64[2] t = {{3, 2}}> {{
        s = Shape(x)
        r = Constant<value = int64[1] {{1}}>()
        g = Gather(s, r)
        p = Constant<value = int64[1] {{2}}>()
        y = Reshape(x, t)
    }}""")
    assert_same_structure(model, expected)  # only the chain's end is folded
    assert result.stats["values_folded"] == 1


def test_partial_shape_with_start_end() -> None:
    text = f"""{H}
    g (float[B,4,5] x) => (int64[2] y, int64[1] z) {{
        y = Shape<start = 1>(x)
        z = Shape<start = -3, end = 1>(x)
    }}"""
    model, result = check_pass(SimplifyShapesPass, text, {"x": np.zeros((7, 4, 5), np.float32)})
    assert op_types(model) == ["Shape"]  # the dynamic [B] stays
    assert model.graph.outputs[0].const_value.numpy().tolist() == [4, 5]
    assert result.stats["values_folded"] == 1


def test_transformer_reshape_chain_with_dynamic_batch() -> None:
    text = f"""{H}
    g (float[B,8,12] x) => (float[B,8,3,4] y) {{
        s = Shape(x)
        i0 = Constant<value = int64 {{0}}>()
        i1 = Constant<value = int64 {{1}}>()
        b = Gather(s, i0)
        t = Gather(s, i1)
        ax = Constant<value = int64[1] {{0}}>()
        bu = Unsqueeze(b, ax)
        tu = Unsqueeze(t, ax)
        rest = Constant<value = int64[2] {{3, 4}}>()
        tgt = Concat<axis = 0>(bu, tu, rest)
        y = Reshape(x, tgt)
    }}"""
    model, result = check_pass(SimplifyShapesPass, text, {"x": np.ones((5, 8, 12), np.float32)})
    run_pass(EliminateDeadCodePass(), model)
    expected = model_from_text(f"""{H}
    g (float[B,8,12] x) => (float[B,8,3,4] y) <int64[4] t = {{0, 8, 3, 4}}> {{
        y = Reshape(x, t)
    }}""")
    assert_same_structure(model, expected)
    assert result.stats["targets_rewritten"] == 1


def test_expand_to_own_shape_uses_ones() -> None:
    text = f"""{H}
    g (float[B,1,4] x) => (float[B,3,4] y) {{
        s = Shape(x)
        i0 = Constant<value = int64[1] {{0}}>()
        b = Gather(s, i0)
        k = Constant<value = int64[2] {{3, 4}}>()
        t = Concat<axis = 0>(b, k)
        y = Expand(x, t)
    }}"""
    model, _result = check_pass(SimplifyShapesPass, text, {"x": np.ones((2, 1, 4), np.float32)})
    run_pass(EliminateDeadCodePass(), model)
    assert op_types(model) == ["Expand"]
    target = model.graph.node(0).inputs[1].const_value.numpy().tolist()
    assert target == [1, 3, 4]


def test_slice_and_squeeze_are_tracked() -> None:
    text = f"""{H}
    g (float[B,6,7] x) => (float[B,42] y, int64 n) {{
        s = Shape(x)
        st = Constant<value = int64[1] {{1}}>()
        en = Constant<value = int64[1] {{9223372036854775807}}>()
        tail = Slice(s, st, en)
        n2 = ReduceProd<keepdims = 1>(tail)
        m = Constant<value = int64[1] {{0}}>()
        t = Concat<axis = 0>(m, n2)
        y = Reshape(x, t)
        one = Constant<value = int64[1] {{2}}>()
        last = Slice(s, one, en)
        n = Squeeze(last, m)
    }}"""
    model, result = check_pass(SimplifyShapesPass, text, {"x": np.ones((2, 6, 7), np.float32)})
    assert model.graph.outputs[1].const_value.numpy().tolist() == 7
    assert result.stats["values_folded"] == 2  # tail (read by ReduceProd) and n


def test_size_of_static_value() -> None:
    text = f"""{H}
    g (float[2,3] x) => (int64 n) {{
        n = Size(x)
    }}"""
    model, _ = check_pass(SimplifyShapesPass, text)
    assert not list(model.graph)
    assert model.graph.outputs[0].const_value.numpy().tolist() == 6


def test_dynamic_shapes_are_left_alone() -> None:
    text = f"""{H}
    g (float[B,N] x, float[N,B] z) => (int64[2] s, float[N,B] y) {{
        s = Shape(x)
        y = Reshape(z, s)
    }}"""
    _, result = check_pass(SimplifyShapesPass, text, numeric=False)
    assert not result.modified


def test_reshape_to_own_dynamic_shape_copies_dims() -> None:
    text = f"""{H}
    g (float[B,N] x) => (float[B,N] y) {{
        s = Shape(x)
        y = Reshape(x, s)
    }}"""
    model, _ = check_pass(SimplifyShapesPass, text)
    assert model.graph.node(1).inputs[1].const_value.numpy().tolist() == [0, 0]


def test_missing_shapes_come_from_inference_without_touching_the_model() -> None:
    text = f"""{H}
    g (float[2,3] x) => (float[P,Q] y) {{
        a = Relu(x)
        s = Shape(a)
        y = Reshape(a, s)
    }}"""
    before = to_proto(model_from_text(text))
    model, result = check_pass(SimplifyShapesPass, text)
    assert result.stats["values_folded"] == 1
    assert result.stats["shape_inference_runs"] == 1
    after = to_proto(model)
    # the output keeps its symbolic dims, and no value_info was written for `a`
    assert after.graph.output == before.graph.output
    assert "a" not in {v.name for v in after.graph.value_info}
    _, result = check_pass(
        lambda: SimplifyShapesPass(SimplifyShapesOptions(infer_shapes=False)), text
    )
    assert not result.modified


def test_if_body_shapes_are_folded() -> None:
    text = f"""{H}
    g (bool b, float[2,3] x) => (int64[2] y) {{
        y = If(b) <then_branch = t () => (int64[2] a) {{
            a = Shape(x)
        }}, else_branch = e () => (int64[2] o) {{
            o = Constant<value = int64[2] {{0, 0}}>()
        }}>
    }}"""
    for cond in (True, False):
        model, _ = check_pass(
            SimplifyShapesPass, text, {"b": np.array(cond), "x": np.ones((2, 3), np.float32)}
        )
    then = model.graph.node(0).attributes["then_branch"].as_graph()
    assert [n.op_type for n in then] == ["Constant"]
    assert then.outputs[0].name == "a"
