"""The generic rules of ``graphopt/passes/fusion/generic.py`` (onnxscript's common rules).

For each wrapped rule: a small model in ONNX text with real random weights goes through
``fuse(rules=[<rule>])``; the test asserts the op sequence, that the named rule fired, and
that ONNX Runtime (graph optimizations off on both sides) gives the same outputs under the
``fusion`` tolerance. Negative cases check that the rule refuses what it must (shared
weights, graph-input parameters, non-zero or reflect padding, 3-D MatMul, intermediate
values with other uses) and that ``explain`` says why.

Helpers come from ``test_conv_rules.py`` (same folder).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

try:  # rootdir-relative import (no __init__.py in the test folders)
    from test_conv_rules import assert_equivalent, fuse, make_model, positive, weights
except ImportError:  # pragma: no cover - when the folder becomes a package
    from .test_conv_rules import assert_equivalent, fuse, make_model, positive, weights


def i64(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


def f32(value: float) -> np.ndarray:
    return np.array(value, np.float32)


BN = {
    "gamma": positive(4, seed=11), "beta": weights(4, seed=12), "mean": weights(4, seed=13),
    "var": positive(4, seed=14),
}

#: id -> (rule, graph text, initializers, expected op sequence, fuse keyword arguments)
CASES: dict[str, tuple[str, str, dict[str, np.ndarray], list[str], dict[str, object]]] = {
    # ---------------------------------------------------------------- batchnorm-folding
    "bn-conv": (
        "batchnorm-folding",
        """g (float[1,3,6,6] x) => (float[1,4,4,4] y) {
             c = Conv(x, w, b)
             y = BatchNormalization <epsilon=0.001> (c, gamma, beta, mean, var) }""",
        dict(w=weights(4, 3, 3, 3), b=weights(4, seed=1), **BN), ["Conv"], {},
    ),
    "bn-conv-no-bias": (
        "batchnorm-folding",
        """g (float[1,3,6,6] x) => (float[1,4,4,4] y) {
             c = Conv(x, w)
             y = BatchNormalization(c, gamma, beta, mean, var) }""",
        dict(w=weights(4, 3, 3, 3), **BN), ["Conv"], {},
    ),
    "bn-conv-transpose-grouped": (
        "batchnorm-folding",
        """g (float[1,4,5,5] x) => (float[1,4,7,7] y) {
             c = ConvTranspose <group=2> (x, w, b)
             y = BatchNormalization(c, gamma, beta, mean, var) }""",
        dict(w=weights(4, 2, 3, 3), b=weights(4, seed=1), **BN), ["ConvTranspose"], {},
    ),
    "bn-gemm": (
        "batchnorm-folding",
        """g (float[3,5] x) => (float[3,4] y) {
             c = Gemm <alpha=0.5, beta=2.0> (x, w, b)
             y = BatchNormalization(c, gamma, beta, mean, var) }""",
        dict(w=weights(5, 4), b=weights(4, seed=1), **BN), ["Gemm"], {},
    ),
    "bn-gemm-transB-2d-bias": (
        "batchnorm-folding",
        """g (float[3,5] x) => (float[3,4] y) {
             c = Gemm <transB=1> (x, w, b)
             y = BatchNormalization(c, gamma, beta, mean, var) }""",
        dict(w=weights(4, 5), b=weights(3, 4, seed=1), **BN), ["Gemm"], {},
    ),
    # ---------------------------------------------------------------- pad-into-conv
    "pad-conv": (
        "pad-into-conv",
        """g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
             p = Pad(x, pads)
             y = Conv(p, w) }""",
        {"pads": i64(0, 0, 1, 1, 0, 0, 1, 1), "w": weights(4, 3, 3, 3)}, ["Conv"], {},
    ),
    "pad-conv-with-pads": (
        "pad-into-conv",
        """g (float[1,3,6,6] x) => (float[1,4,8,5] y) {
             p = Pad(x, pads, zero)
             y = Conv <pads=[1,0,1,0]> (p, w, b) }""",
        {"pads": i64(0, 0, 1, 0, 0, 0, 1, 1), "zero": f32(0.0), "w": weights(4, 3, 3, 3),
             "b": weights(4, seed=1)},
        ["Conv"], {},
    ),
    "pad-conv-auto-pad": (
        "pad-into-conv",
        """g (float[1,3,6,6] x) => (float[1,4,8,8] y) {
             p = Pad(x, pads)
             y = Conv <auto_pad="SAME_UPPER"> (p, w) }""",
        {"pads": i64(0, 0, 1, 1, 0, 0, 1, 1), "w": weights(4, 3, 3, 3)}, ["Conv"], {},
    ),
    # ---------------------------------------------------------------- matmul-add-to-gemm
    "matmul-add": (
        "matmul-add-to-gemm",
        """g (float[3,5] x) => (float[3,4] y) {
             a = MatMul(x, w)
             y = Add(a, b) }""",
        {"w": weights(5, 4), "b": weights(4, seed=1)}, ["Gemm"], {},
    ),
    "matmul-add-column-bias": (
        "matmul-add-to-gemm",
        """g (float[3,5] x) => (float[3,4] y) {
             a = MatMul(x, w)
             y = Add(a, b) }""",
        {"w": weights(5, 4), "b": weights(3, 1, seed=1)}, ["Gemm"], {},
    ),
    "transpose-a-matmul-add": (
        "matmul-add-to-gemm",
        """g (float[5,3] x) => (float[3,4] y) {
             t = Transpose <perm=[1,0]> (x)
             a = MatMul(t, w)
             y = Add(a, b) }""",
        {"w": weights(5, 4), "b": weights(4, seed=1)}, ["Gemm"], {},
    ),
    "transpose-b-matmul-add": (
        "matmul-add-to-gemm",
        """g (float[3,5] x, float[4,5] v) => (float[3,4] y) {
             t = Transpose <perm=[1,0]> (v)
             a = MatMul(x, t)
             y = Add(a, b) }""",
        {"b": weights(4, seed=1)}, ["Gemm"], {},
    ),
    # ---------------------------------------------------------------- relu-clip-chains
    "relu-relu": (
        "relu-clip-chains",
        "g (float[2,3] x) => (float[2,3] y) { a = Relu(x)  y = Relu(a) }",
        {}, ["Relu"], {},
    ),
    "clip-clip": (
        "relu-clip-chains",
        "g (float[2,3] x) => (float[2,3] y) { a = Clip(x, l1, h1)  y = Clip(a, l2, h2) }",
        {"l1": f32(-1.0), "h1": f32(2.0), "l2": f32(-0.5), "h2": f32(3.0)}, ["Clip"], {},
    ),
    "relu-clip": (
        "relu-clip-chains",
        "g (float[2,3] x) => (float[2,3] y) { a = Relu(x)  y = Clip(a, l1, h1) }",
        {"l1": f32(-1.0), "h1": f32(0.5)}, ["Clip"], {},
    ),
    "clip-relu": (
        "relu-clip-chains",
        "g (float[2,3] x) => (float[2,3] y) { a = Clip(x, l1, h1)  y = Relu(a) }",
        {"l1": f32(-1.0), "h1": f32(2.0)}, ["Clip"], {},
    ),
    # ---------------------------------------------------------------- hardswish
    "hardsigmoid-mul": (
        "hardswish",
        """g (float[2,3] x) => (float[2,3] y) {
             a = HardSigmoid <alpha=0.16666667, beta=0.5> (x)
             y = Mul(a, x) }""",
        {}, ["HardSwish"], {},
    ),
    "hardswish-decomposed": (
        "hardswish",
        """g (float[2,3] x) => (float[2,3] y) {
             a = Add(x, three)
             c = Clip(a, zero, six)
             m = Mul(c, x)
             y = Div(m, six) }""",
        {"three": f32(3.0), "zero": f32(0.0), "six": f32(6.0)}, ["HardSwish"], {},
    ),
    "hardsigmoid-decomposed": (
        "hardswish",
        """g (float[2,3] x) => (float[2,3] y) {
             a = Add(x, three)
             c = Clip(a, zero, six)
             y = Div(c, six) }""",
        {"three": f32(3.0), "zero": f32(0.0), "six": f32(6.0)}, ["HardSigmoid"], {},
    ),
    # ---------------------------------------------------------------- shape-chain-collapse
    "transpose-chain": (
        "shape-chain-collapse",
        """g (float[2,3,4] x) => (float[3,2,4] y) {
             a = Transpose <perm=[1,0,2]> (x)
             b = Transpose <perm=[0,2,1]> (a)
             y = Transpose <perm=[0,2,1]> (b) }""",
        {}, ["Transpose"], {"prepare": False},
    ),
    "reshape-chain": (
        "shape-chain-collapse",
        "g (float[2,3,4] x) => (float[4,6] y) { a = Reshape(x, s1)  y = Reshape(a, s2) }",
        {"s1": i64(6, 4), "s2": i64(4, 6)}, ["Reshape"], {"prepare": False},
    ),
    "unsqueeze-chain": (
        "shape-chain-collapse",
        "g (float[2,3] x) => (float[1,2,1,3] y) { a = Unsqueeze(x, a1)  y = Unsqueeze(a, a2) }",
        {"a1": i64(0), "a2": i64(2)}, ["Constant", "Unsqueeze"], {"prepare": False},
    ),
    "cast-chain": (
        "shape-chain-collapse",
        "g (double[2,3] x) => (float16[2,3] y) { a = Cast <to=1> (x)  y = Cast <to=10> (a) }",
        {}, ["Cast"], {"prepare": False},
    ),
    "redundant-slice": (
        "shape-chain-collapse",
        """g (float[8,6] x) => (float[8,6] y) {
             a = Slice(x, s0, e0, ax, st)
             y = Relu(a) }""",
        {"s0": i64(0), "e0": i64(2**63 - 1), "ax": i64(0), "st": i64(1)}, ["Relu"],
        {"prepare": False},
    ),
    # ---------------------------------------------------------------- no-op-elimination
    "mul-by-1": (
        "no-op-elimination",
        "g (float[2,3] x) => (float[2,3] y) { a = Mul(x, one)  y = Relu(a) }",
        {"one": f32(1.0)}, ["Relu"], {"prepare": False},
    ),
    "div-by-1": (
        "no-op-elimination",
        "g (float[2,3] x) => (float[2,3] y) { a = Div(x, one)  y = Relu(a) }",
        {"one": f32(1.0)}, ["Relu"], {"prepare": False},
    ),
    "add-0": (
        "no-op-elimination",
        "g (float[2,3] x) => (float[2,3] y) { a = Add(x, z)  y = Relu(a) }",
        {"z": f32(0.0)}, ["Relu"], {},
    ),
    "sub-0": (
        "no-op-elimination",
        "g (float[2,3] x) => (float[2,3] y) { a = Sub(x, z)  y = Relu(a) }",
        {"z": f32(0.0)}, ["Relu"], {"prepare": False},
    ),
    "cast-same-type": (
        "no-op-elimination",
        "g (float[2,3] x) => (float[2,3] y) { a = Cast <to=1> (x)  y = Relu(a) }",
        {}, ["Relu"], {"prepare": False},
    ),
    "expand-same-shape": (
        "no-op-elimination",
        "g (float[2,3] x) => (float[2,3] y) { a = Expand(x, s)  y = Relu(a) }",
        {"s": i64(2, 3)}, ["Relu"], {"prepare": False},
    ),
    "transpose-identity": (
        "no-op-elimination",
        "g (float[2,3] x) => (float[2,3] y) { a = Transpose <perm=[0,1]> (x)  y = Relu(a) }",
        {}, ["Relu"], {"prepare": False},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_generic_rule(case: str, tmp_path: Path) -> None:
    rule, body, init, expected, kwargs = CASES[case]
    before = make_model(body, **init)
    fused = fuse(before, [rule], **kwargs)  # type: ignore[arg-type]
    assert fused.ops == expected
    assert fused.counts[rule] >= 1
    assert_equivalent(before, fused, tmp_path)


def test_generic_rules_are_standard_for_every_target(tmp_path: Path) -> None:
    _, body, init, _, _ = CASES["bn-conv"]
    before = make_model(body, **init)
    for target in ("ort", "tensorrt", "portable", "ext"):
        assert fuse(before, ["batchnorm-folding"], target=target).ops == ["Conv"]


# --------------------------------------------------------------------------- negatives

#: id -> (rule, graph text, initializers, ops left unchanged, words of the explain reason)
REFUSED: dict[str, tuple[str, str, dict[str, np.ndarray], list[str], str]] = {
    "bn-shared-conv-weight": (
        "batchnorm-folding",
        """g (float[1,3,6,6] x) => (float[1,4,4,4] y, float[1,4,4,4] z) {
             c = Conv(x, w, b)
             y = BatchNormalization(c, gamma, beta, mean, var)
             z = Conv(x, w, b) }""",
        dict(w=weights(4, 3, 3, 3), b=weights(4, seed=1), **BN),
        ["Conv", "BatchNormalization", "Conv"], "used by another node",
    ),
    "bn-mean-is-graph-input": (
        "batchnorm-folding",
        """g (float[1,3,6,6] x, float[4] mean) => (float[1,4,4,4] y) {
             c = Conv(x, w, b)
             y = BatchNormalization(c, gamma, beta, mean, var) }""",
        dict(w=weights(4, 3, 3, 3), b=weights(4, seed=1), **BN),
        ["Conv", "BatchNormalization"], "graph input",
    ),
    "bn-conv-output-also-graph-output": (
        "batchnorm-folding",
        """g (float[1,3,6,6] x) => (float[1,4,4,4] y, float[1,4,4,4] c) {
             c = Conv(x, w, b)
             y = BatchNormalization(c, gamma, beta, mean, var) }""",
        dict(w=weights(4, 3, 3, 3), b=weights(4, seed=1), **BN),
        ["Conv", "BatchNormalization"], "other uses",
    ),
    "pad-reflect": (
        "pad-into-conv",
        """g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
             p = Pad <mode="reflect"> (x, pads)
             y = Conv(p, w) }""",
        {"pads": i64(0, 0, 1, 1, 0, 0, 1, 1), "w": weights(4, 3, 3, 3)},
        ["Pad", "Conv"], "mode must be 'constant'",
    ),
    "pad-non-zero-value": (
        "pad-into-conv",
        """g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
             p = Pad(x, pads, one)
             y = Conv(p, w) }""",
        {"pads": i64(0, 0, 1, 1, 0, 0, 1, 1), "one": f32(1.0), "w": weights(4, 3, 3, 3)},
        ["Pad", "Conv"], "equal to 0",
    ),
    "pad-channel-axis": (
        "pad-into-conv",
        """g (float[1,3,6,6] x) => (float[1,4,4,4] y) {
             p = Pad(x, pads)
             y = Conv(p, w) }""",
        {"pads": i64(0, 1, 0, 0, 0, 0, 0, 0), "w": weights(4, 4, 3, 3)},
        ["Pad", "Conv"], "non-spatial",
    ),
    "matmul-add-3d": (
        "matmul-add-to-gemm",
        """g (float[2,3,5] x) => (float[2,3,4] y) {
             a = MatMul(x, w)
             y = Add(a, b) }""",
        {"w": weights(5, 4), "b": weights(4, seed=1)}, ["MatMul", "Add"], "rank 2",
    ),
    "cast-float-to-half-and-back": (
        "shape-chain-collapse",
        "g (float[2,3] x) => (float[2,3] y) { a = Cast <to=10> (x)  y = Cast <to=1> (a) }",
        {}, ["Cast", "Cast"], "not recognized as valid",
    ),
    "hardsigmoid-other-alpha": (
        "hardswish",
        """g (float[2,3] x) => (float[2,3] y) {
             a = HardSigmoid <alpha=0.2, beta=0.5> (x)
             y = Mul(a, x) }""",
        {}, ["HardSigmoid", "Mul"], "alpha must be 1/6",
    ),
    "mul-by-non-scalar-1": (
        "no-op-elimination",
        "g (float x) => (float[1] y) { y = Mul(x, one) }",
        {"one": np.ones(1, np.float32)}, ["Mul"], "not a scalar",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_generic_rule_refuses(case: str, tmp_path: Path) -> None:
    rule, body, init, expected, reason = REFUSED[case]
    before = make_model(body, **init)
    fused = fuse(before, [rule], explain=True, prepare=False)
    assert fused.ops == expected
    assert fused.counts[rule] == 0
    assert reason in fused.explain[rule]
    assert_equivalent(before, fused, tmp_path)


def test_batchnorm_folding_leaves_a_shared_weight_for_its_other_user(tmp_path: Path) -> None:
    # onnxscript names the folded weight like the original: it must refuse when shared.
    rule, body, init, _, _ = REFUSED["bn-shared-conv-weight"]
    before = make_model(body, **init)
    fused = fuse(before, [rule])
    other = next(n for n in fused.model.graph if n.outputs[0].name == "z")
    np.testing.assert_array_equal(other.inputs[1].const_value.numpy(), init["w"])


def test_matmul_add_to_gemm_refuses_a_bias_that_widens_the_output() -> None:
    before = make_model(
        """g (float[1,5] x) => (float[3,4] y) {
             a = MatMul(x, w)
             y = Add(a, b) }""",
        w=weights(5, 4), b=weights(3, 4, seed=1),
    )
    fused = fuse(before, ["matmul-add-to-gemm"])  # graphopt's own rule checks the broadcast
    assert fused.ops == ["MatMul", "Add"]


@pytest.mark.parametrize("case", ["transpose-a-matmul-add", "transpose-b-matmul-add"])
def test_matmul_add_to_gemm_absorbs_transposes(case: str) -> None:
    _, body, init, _, _ = CASES[case]
    assert fuse(make_model(body, **init), ["matmul-add-to-gemm"]).ops == ["Gemm"]


def test_no_op_elimination_keeps_graph_outputs(tmp_path: Path) -> None:
    # y = x * 1 with y a graph output: the output keeps its name (an Identity stays).
    before = make_model("g (float[2,3] x) => (float[2,3] y) { y = Mul(x, one) }", one=f32(1.0))
    fused = fuse(before, ["no-op-elimination"], prepare=False)
    assert [o.name for o in fused.model.graph.outputs] == ["y"]
    assert fused.ops == ["Identity"]
    assert_equivalent(before, fused, tmp_path)


def test_fused_models_keep_their_signature() -> None:
    for case in ("bn-conv", "pad-conv", "matmul-add"):
        _, body, init, _, _ = CASES[case]
        before = make_model(body, **init)
        after = fuse(before).proto
        assert [(v.name, str(v.type)) for v in before.graph.input] == [
            (v.name, str(v.type)) for v in after.graph.input
        ]
        assert [(v.name, str(v.type)) for v in before.graph.output] == [
            (v.name, str(v.type)) for v in after.graph.output
        ]
        assert isinstance(after, onnx.ModelProto)
