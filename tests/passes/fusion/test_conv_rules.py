"""Rules of ``graphopt/passes/fusion/conv.py``: structure, numerics, and the near misses.

Every rule gets a small model written in ONNX text with real random weights, run through
the registered ``fuse`` pass (``fuse(rules=[...])`` built by the default registry, with a
``PassContext`` naming the target). Structural tests assert the op sequence and the
attributes; numeric tests compare the original and the fused model on ONNX Runtime CPU with
graph optimizations off on both sides, under the ``fusion`` tolerance class
(:func:`graphopt.verify.verify_model`). Negative tests cover shared weights, a Conv with
two consumers, constants that are not per-channel, weights that are graph inputs,
``tensorrt`` (no contrib ops) and the ``explain`` reasons.

The helpers at the top are shared with ``test_generic_rules.py``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import pytest
from onnx import numpy_helper

from graphopt.errors import UsageError
from graphopt.infra import PassContext
from graphopt.infra.registry import PassRegistry, default_registry
from graphopt.testing.builders import op_types
from graphopt.verify import FUSION, verify_model

# --------------------------------------------------------------------------- helpers

HEADER = '<ir_version: 8, opset_import: ["" : {opset}]>'


def weights(*shape: int, seed: int = 0, scale: float = 0.5) -> np.ndarray:
    """Real random float32 weights (seeded)."""
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def positive(*shape: int, seed: int = 0) -> np.ndarray:
    """Random float32 values in [0.5, 1.5) (variances, scales that must stay positive)."""
    return np.random.default_rng(seed).uniform(0.5, 1.5, shape).astype(np.float32)


def make_model(body: str, opset: int = 17, **initializers: np.ndarray) -> onnx.ModelProto:
    """Parses ``<header> body`` (ONNX text) and adds ``initializers``; checks the result."""
    proto = onnx.parser.parse_model(HEADER.format(opset=opset) + "\n" + body)
    for name, array in initializers.items():
        proto.graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))
    onnx.checker.check_model(proto, full_check=True)
    return proto


@functools.lru_cache(maxsize=1)
def registry() -> PassRegistry:
    """The built-in registry (no third-party plugins: hermetic)."""
    return default_registry(plugins=False)


@dataclass
class Fused:
    """A fused model and what the pass said."""

    model: ir.Model
    proto: onnx.ModelProto
    stats: dict[str, Any]

    @property
    def ops(self) -> list[str]:
        return op_types(self.model)

    @property
    def counts(self) -> dict[str, int]:
        return dict(self.stats.get("fuse.rules", {}))

    @property
    def explain(self) -> dict[str, str]:
        return dict(self.stats.get("fuse.explain", {}))

    def nodes(self, op_type: str) -> list[ir.Node]:
        return [n for n in self.model.graph if n.op_type == op_type]

    def node(self, op_type: str) -> ir.Node:
        found = self.nodes(op_type)
        assert len(found) == 1, f"expected one {op_type}, found {len(found)} in {self.ops}"
        return found[0]

    def initializer(self, name: str) -> np.ndarray:
        return self.model.graph.initializers[name].const_value.numpy()


def fuse(
    proto: onnx.ModelProto,
    rules: tuple[str, ...] | list[str] = (),
    *,
    target: str = "ort",
    explain: bool = False,
    prepare: bool = True,
) -> Fused:
    """Runs ``fuse(rules=[...])`` on a copy of ``proto`` through the pipeline machinery."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    model = ir.serde.deserialize_model(copy)
    options = []
    if rules:
        options.append("rules=[" + ",".join(rules) + "]")
    if explain:
        options.append("explain=true")
    if not prepare:
        options.append("prepare=false")
    text = f"fuse({','.join(options)})" if options else "fuse"
    result = registry().build(text).execute(model, PassContext(target=target))
    after = ir.serde.serialize_model(model)
    onnx.checker.check_model(after, full_check=True)
    return Fused(model, after, dict(result.stats))


def assert_equivalent(
    before: onnx.ModelProto,
    after: onnx.ModelProto | Fused,
    tmp_path: Path,
    feeds: list[dict[str, np.ndarray]] | None = None,
) -> None:
    """Original and fused agree on ORT CPU (optimizations off) under ``fusion``."""
    if isinstance(after, Fused):
        after = after.proto
    a, b = tmp_path / "before.onnx", tmp_path / "after.onnx"
    onnx.save(before, a)
    onnx.save(after, b)
    agreement = verify_model(a, b, FUSION, feeds, seed=1)
    assert agreement.passed, agreement.summary()


def attr(node: ir.Node, name: str) -> Any:
    """An attribute's Python value (None when absent; lists for repeated values)."""
    a = node.attributes.get(name)
    if a is None:
        return None
    return list(a.value) if isinstance(a.value, (tuple, list)) else a.value


def contrib_nodes(model: ir.Model) -> list[str]:
    """``domain::op`` of every node outside the default ONNX domain."""
    return [
        f"{n.domain}::{n.op_type}"
        for n in ir.traversal.RecursiveGraphIterator(model.graph)
        if n.domain not in ("", "ai.onnx")
    ]


# --------------------------------------------------------------------------- conv-scale-bias

CONV_MUL_ADD = """
g (float[2,3,8,8] x) => (float[2,4,8,8] y) {
  c = Conv <pads=[1,1,1,1]> (x, w, b)
  m = Mul(c, s)
  y = Add(m, t)
}
"""


def _conv_mul_add(**over: np.ndarray) -> onnx.ModelProto:
    init = {
        "w": weights(4, 3, 3, 3), "b": weights(4, seed=1), "s": positive(1, 4, 1, 1, seed=2),
        "t": weights(4, 1, 1, seed=3),
    }
    init.update(over)
    return make_model(CONV_MUL_ADD, **init)


def test_conv_mul_add_fold_into_conv(tmp_path: Path) -> None:
    before = _conv_mul_add()
    fused = fuse(before, ["conv-scale-bias-folding"])
    assert fused.ops == ["Conv"]
    assert fused.counts["conv-scale-bias-folding"] == 2
    conv = fused.node("Conv")
    assert attr(conv, "pads") == [1, 1, 1, 1]
    w = fused.initializer(conv.inputs[1].name)
    s = positive(1, 4, 1, 1, seed=2).reshape(4, 1, 1, 1)
    np.testing.assert_allclose(w, weights(4, 3, 3, 3) * s, rtol=1e-6)
    assert_equivalent(before, fused, tmp_path)


def test_conv_mul_add_fold_commuted_scalar_and_no_bias(tmp_path: Path) -> None:
    before = make_model(
        """
        g (float[1,2,6] x) => (float[1,5,4] y) {
          c = Conv (x, w)
          m = Mul(s, c)
          y = Add(t, m)
        }
        """,
        w=weights(5, 2, 3), s=np.array(0.75, np.float32), t=weights(1, 5, 1, seed=4),
    )
    fused = fuse(before, ["conv-scale-bias-folding"])
    assert fused.ops == ["Conv"]
    assert len(fused.node("Conv").inputs) == 3  # the Add became the bias
    assert_equivalent(before, fused, tmp_path)


def test_conv_fold_grouped_conv(tmp_path: Path) -> None:
    before = make_model(
        """
        g (float[1,4,5,5] x) => (float[1,6,3,3] y) {
          c = Conv <group=2> (x, w, b)
          y = Mul(c, s)
        }
        """,
        w=weights(6, 2, 3, 3), b=weights(6, seed=1), s=positive(6, 1, 1, seed=2),
    )
    fused = fuse(before, ["conv-scale-bias-folding"])
    assert fused.ops == ["Conv"] and attr(fused.node("Conv"), "group") == 2
    assert_equivalent(before, fused, tmp_path)


@pytest.mark.parametrize(
    ("shape", "reason"),
    [
        ((1, 1, 8, 1), "not per-channel"),  # varies along a spatial axis
        ((1, 1, 4, 1, 1), "broadcasting would change"),  # rank 5 against a rank-4 output
        ((2, 4, 1, 1), "not per-channel"),  # varies along the batch axis
    ],
)
def test_conv_fold_refuses_non_channel_constants(
    shape: tuple[int, ...], reason: str, tmp_path: Path
) -> None:
    body = CONV_MUL_ADD.replace("y = Add(m, t)", "y = Identity(m)")
    out = "float[2,4,8,8] y" if len(shape) == 4 else "float[1,2,4,8,8] y"
    body = body.replace("float[2,4,8,8] y", out)
    before = make_model(body, w=weights(4, 3, 3, 3), b=weights(4), s=positive(*shape))
    fused = fuse(before, ["conv-scale-bias-folding"], explain=True)
    assert fused.counts["conv-scale-bias-folding"] == 0
    assert "Mul" in fused.ops
    assert reason in fused.explain["conv-scale-bias-folding"]
    assert_equivalent(before, fused, tmp_path)


def test_conv_fold_refuses_graph_input_weight() -> None:
    # The weight is an initializer *and* a graph input: a caller may feed another value.
    body = CONV_MUL_ADD.replace(
        "g (float[2,3,8,8] x)", "g (float[2,3,8,8] x, float[4,3,3,3] w)"
    )
    before = make_model(body, w=weights(4, 3, 3, 3), b=weights(4), s=positive(1, 4, 1, 1),
                        t=weights(4, 1, 1))
    fused = fuse(before, ["conv-scale-bias-folding"], explain=True)
    assert fused.ops == ["Conv", "Mul", "Add"]
    assert "graph input" in fused.explain["conv-scale-bias-folding"]


def test_conv_fold_keeps_a_shared_weight_intact(tmp_path: Path) -> None:
    before = make_model(
        """
        g (float[1,3,6,6] x) => (float[1,4,6,6] y, float[1,4,6,6] z) {
          c1 = Conv <pads=[1,1,1,1]> (x, w, b)
          y = Mul(c1, s)
          z = Conv <pads=[1,1,1,1]> (x, w, b)
        }
        """,
        w=weights(4, 3, 3, 3), b=weights(4, seed=1), s=positive(1, 4, 1, 1, seed=2),
    )
    fused = fuse(before, ["conv-scale-bias-folding"])
    assert fused.ops == ["Conv", "Conv"]
    convs = fused.nodes("Conv")
    untouched = next(c for c in convs if c.outputs[0].name == "z")
    folded = next(c for c in convs if c.outputs[0].name == "y")
    np.testing.assert_array_equal(fused.initializer(untouched.inputs[1].name), weights(4, 3, 3, 3))
    np.testing.assert_array_equal(fused.initializer(untouched.inputs[2].name), weights(4, seed=1))
    assert folded.inputs[1] is not untouched.inputs[1]
    assert_equivalent(before, fused, tmp_path)


def test_conv_fold_when_both_users_of_a_shared_weight_fold(tmp_path: Path) -> None:
    before = make_model(
        """
        g (float[1,3,6,6] x) => (float[1,4,4,4] y, float[1,4,4,4] z) {
          c1 = Conv (x, w, b)
          y = Mul(c1, s1)
          c2 = Conv (x, w, b)
          z = Mul(c2, s2)
        }
        """,
        w=weights(4, 3, 3, 3), b=weights(4, seed=1), s1=positive(4, 1, 1, seed=2),
        s2=positive(4, 1, 1, seed=3),
    )
    fused = fuse(before, ["conv-scale-bias-folding"])
    assert fused.ops == ["Conv", "Conv"]
    w1, w2 = (c.inputs[1].name for c in fused.nodes("Conv"))
    assert w1 != w2
    assert_equivalent(before, fused, tmp_path)


def test_conv_fold_inside_an_if_branch(tmp_path: Path) -> None:
    before = make_model(
        """
        g (float[1,3,6,6] x, bool cond) => (float[1,4,4,4] y) {
          y = If (cond) <
            then_branch = t () => (float[1,4,4,4] yt) { c = Conv(x, w, b)  yt = Mul(c, s) },
            else_branch = e () => (float[1,4,4,4] ye) { ye = Conv(x, w, b) }
          >
        }
        """,
        w=weights(4, 3, 3, 3), b=weights(4, seed=1), s=positive(4, 1, 1, seed=2),
    )
    fused = fuse(before, ["conv-scale-bias-folding"])
    assert fused.counts["conv-scale-bias-folding"] == 1
    then_branch = fused.node("If").attributes["then_branch"].value
    assert op_types(then_branch) == ["Conv"]
    for cond in (True, False):
        feed = {"x": weights(1, 3, 6, 6, seed=5), "cond": np.array(cond)}
        assert_equivalent(before, fused, tmp_path, [feed])


def test_matmul_fold_with_a_constant_node_weight(tmp_path: Path) -> None:
    before = make_model(
        """
        g (float[3,2] x) => (float[3,2] y) {
          w = Constant <value = float[2,2] {0.5, -1.25, 2.0, 0.75}> ()
          m = MatMul(x, w)
          y = Mul(m, s)
        }
        """,
        s=positive(2, seed=1),
    )
    fused = fuse(before, ["matmul-scale-folding"], prepare=False)
    assert fused.ops == ["MatMul"]
    assert_equivalent(before, fused, tmp_path)


# --------------------------------------------------------------------------- gemm-scale-bias


def test_gemm_mul_add_fold(tmp_path: Path) -> None:
    before = make_model(
        """
        g (float[3,5] a) => (float[3,4] y) {
          g1 = Gemm <transB=1, alpha=0.5, beta=2.0> (a, B, C)
          m = Mul(g1, s)
          y = Add(m, t)
        }
        """,
        B=weights(4, 5), C=weights(4, seed=1), s=positive(4, seed=2), t=weights(1, 4, seed=3),
    )
    fused = fuse(before, ["gemm-scale-bias-folding"])
    assert fused.ops == ["Gemm"]
    gemm = fused.node("Gemm")
    assert attr(gemm, "transB") == 1 and attr(gemm, "alpha") == 0.5
    assert attr(gemm, "beta") in (None, 1.0)  # beta folded into C by the Add
    assert_equivalent(before, fused, tmp_path)


def test_gemm_add_fold_without_bias_and_prescale(tmp_path: Path) -> None:
    before = make_model(
        """
        g (float[3,5] a) => (float[3,4] y) {
          p = Mul(a, k)
          g1 = Gemm (p, B)
          y = Add(g1, t)
        }
        """,
        B=weights(5, 4), k=positive(5, seed=1), t=weights(4, seed=2),
    )
    fused = fuse(before, ["gemm-scale-bias-folding"])
    assert fused.ops == ["Gemm"]
    assert len(fused.node("Gemm").inputs) == 3
    assert_equivalent(before, fused, tmp_path)


def test_gemm_prescale_refuses_transposed_a() -> None:
    before = make_model(
        """
        g (float[5,3] a) => (float[3,4] y) {
          p = Mul(a, k)
          y = Gemm <transA=1> (p, B)
        }
        """,
        B=weights(5, 4), k=positive(3, seed=1),
    )
    fused = fuse(before, ["gemm-scale-bias-folding"], explain=True)
    assert fused.ops == ["Mul", "Gemm"]
    assert "transA" in fused.explain["gemm-scale-bias-folding"]


# --------------------------------------------------------------------------- matmul-scale


def test_matmul_mul_fold_3d(tmp_path: Path) -> None:
    before = make_model(
        """
        g (float[2,7,5] x) => (float[2,7,4] y) {
          m = MatMul(x, w)
          y = Mul(m, s)
        }
        """,
        w=weights(5, 4), s=positive(1, 1, 4, seed=1),
    )
    fused = fuse(before, ["matmul-scale-folding"])
    assert fused.ops == ["MatMul"]
    assert_equivalent(before, fused, tmp_path)


def test_matmul_add_mul_fold(tmp_path: Path) -> None:
    before = make_model(
        """
        g (float[2,7,5] x) => (float[2,7,4] y) {
          m = MatMul(x, w)
          a = Add(b, m)
          y = Mul(a, s)
        }
        """,
        w=weights(5, 4), b=weights(4, seed=1), s=np.array(0.125, np.float32),
    )
    fused = fuse(before, ["matmul-scale-folding"])
    assert fused.ops == ["MatMul", "Add"]
    assert_equivalent(before, fused, tmp_path)


def test_mul_before_matmul_scales_rows(tmp_path: Path) -> None:
    before = make_model(
        """
        g (float[2,7,5] x) => (float[2,7,4] y) {
          p = Mul(k, x)
          y = MatMul(p, w)
        }
        """,
        w=weights(5, 4), k=positive(5, seed=1),
    )
    fused = fuse(before, ["matmul-scale-folding"])
    assert fused.ops == ["MatMul"]
    w_new = fused.initializer(fused.node("MatMul").inputs[1].name)
    np.testing.assert_allclose(w_new, weights(5, 4) * positive(5, seed=1)[:, None], rtol=1e-6)
    assert_equivalent(before, fused, tmp_path)


def test_matmul_fold_refuses_row_varying_constant_and_graph_input_weight() -> None:
    before = make_model(
        """
        g (float[2,7,5] x, float[5,4] v) => (float[2,7,4] y, float[2,7,4] z) {
          m = MatMul(x, w)
          y = Mul(m, s)
          n = MatMul(x, v)
          z = Mul(n, u)
        }
        """,
        w=weights(5, 4), s=positive(7, 1, seed=1), u=positive(4, seed=2),
    )
    fused = fuse(before, ["matmul-scale-folding"], explain=True)
    assert fused.ops.count("Mul") == 2
    assert fused.counts["matmul-scale-folding"] == 0


def test_matmul_fold_keeps_tied_weight(tmp_path: Path) -> None:
    before = make_model(
        """
        g (float[3,5] x) => (float[3,4] y, float[3,4] z) {
          m = MatMul(x, w)
          y = Mul(m, s)
          z = MatMul(x, w)
        }
        """,
        w=weights(5, 4), s=positive(4, seed=1),
    )
    fused = fuse(before, ["matmul-scale-folding"])
    assert fused.ops == ["MatMul", "MatMul"]
    plain = next(n for n in fused.nodes("MatMul") if n.outputs[0].name == "z")
    np.testing.assert_array_equal(fused.initializer(plain.inputs[1].name), weights(5, 4))
    assert_equivalent(before, fused, tmp_path)


# --------------------------------------------------------------------------- matmul-batchnorm

BN_INIT = {
    "gamma": positive(4, seed=11), "beta": weights(4, seed=12), "mean": weights(4, seed=13),
    "var": positive(4, seed=14),
}


def test_matmul_batchnorm_2d(tmp_path: Path) -> None:
    before = make_model(
        """
        g (float[6,5] x) => (float[6,4] y) {
          m = MatMul(x, w)
          y = BatchNormalization <epsilon=0.001> (m, gamma, beta, mean, var)
        }
        """,
        w=weights(5, 4), **BN_INIT,
    )
    fused = fuse(before, ["matmul-batchnorm-folding"])
    assert fused.ops == ["MatMul", "Add"]
    assert_equivalent(before, fused, tmp_path)
    # with the whole catalog, the MatMul + Add then becomes a Gemm
    assert fuse(before, target="tensorrt").ops == ["Gemm"]


def test_matmul_batchnorm_weight_first_3d(tmp_path: Path) -> None:
    before = make_model(
        """
        g (float[2,5,7] x) => (float[2,4,7] y) {
          m = MatMul(w, x)
          y = BatchNormalization (m, gamma, beta, mean, var)
        }
        """,
        w=weights(4, 5), **BN_INIT,
    )
    fused = fuse(before, ["matmul-batchnorm-folding"])
    assert fused.ops == ["MatMul", "Add"]
    assert_equivalent(before, fused, tmp_path)


def test_matmul_transpose_batchnorm_3d(tmp_path: Path) -> None:
    before = make_model(
        """
        g (float[2,7,5] x) => (float[2,4,7] y) {
          m = MatMul(x, w)
          t = Transpose <perm=[0,2,1]> (m)
          y = BatchNormalization (t, gamma, beta, mean, var)
        }
        """,
        w=weights(5, 4), **BN_INIT,
    )
    fused = fuse(before, ["matmul-batchnorm-folding"])
    assert fused.ops == ["MatMul", "Add", "Transpose"]
    assert_equivalent(before, fused, tmp_path)


def test_matmul_batchnorm_refuses_sequence_axis() -> None:
    # [B, S, K] @ [K, N] -> BN normalizes axis 1 = S, which is not the weight's axis.
    before = make_model(
        """
        g (float[2,4,5] x) => (float[2,4,3] y) {
          m = MatMul(x, w)
          y = BatchNormalization (m, gamma, beta, mean, var)
        }
        """,
        w=weights(5, 3), **BN_INIT,
    )
    fused = fuse(before, ["matmul-batchnorm-folding"], explain=True)
    assert fused.ops == ["MatMul", "BatchNormalization"]
    assert "rank is 3" in fused.explain["matmul-batchnorm-folding"]


# --------------------------------------------------------------------------- conv-activation

CONV_ACT = """
g (float[1,3,7,7] x) => (float[1,4,7,7] y) {{
  c = Conv <pads=[1,1,1,1], strides=[1,1]> (x, w, b)
  y = {act}
}}
"""

CONV_CASES = {
    "Relu": ("Relu(c)", None, {}),
    "Sigmoid": ("Sigmoid(c)", None, {}),
    "Tanh": ("Tanh(c)", None, {}),
    "LeakyRelu": ("LeakyRelu <alpha=0.2> (c)", [0.2], {}),
    "LeakyRelu-default": ("LeakyRelu(c)", [0.01], {}),
    "HardSigmoid": ("HardSigmoid <alpha=0.3, beta=0.4> (c)", [0.3, 0.4], {}),
    "HardSwish": ("HardSwish(c)", None, {}),
    "Clip": ("Clip(c, lo, hi)", [-0.5, 0.75],
             {"lo": np.array(-0.5, np.float32), "hi": np.array(0.75, np.float32)}),
    "Clip-min-only": ("Clip(c, lo)", [0.0, float(np.finfo(np.float32).max)],
                      {"lo": np.array(0.0, np.float32)}),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_activation_to_fused_conv(case: str, tmp_path: Path) -> None:
    act, params, extra = CONV_CASES[case]
    before = make_model(CONV_ACT.format(act=act), w=weights(4, 3, 3, 3), b=weights(4, seed=1),
                        **extra)
    fused = fuse(before, ["conv-activation"])
    assert fused.ops == ["com.microsoft::FusedConv"]
    node = fused.node("FusedConv")
    assert attr(node, "activation") == case.split("-")[0]
    assert attr(node, "pads") == [1, 1, 1, 1] and attr(node, "strides") == [1, 1]
    got = attr(node, "activation_params")
    if params is None:
        assert got is None
    else:
        np.testing.assert_allclose(got, params, rtol=1e-6)
    assert_equivalent(before, fused, tmp_path)


def test_conv_clip_with_attributes_opset10(tmp_path: Path) -> None:
    before = make_model(
        CONV_ACT.format(act="Clip <min=0.0, max=6.0> (c)"), opset=10,
        w=weights(4, 3, 3, 3), b=weights(4, seed=1),
    )
    fused = fuse(before, ["conv-activation"])
    assert fused.ops == ["com.microsoft::FusedConv"]
    assert attr(fused.node("FusedConv"), "activation_params") == [0.0, 6.0]
    assert_equivalent(before, fused, tmp_path)


def test_conv_with_two_consumers_is_not_fused(tmp_path: Path) -> None:
    before = make_model(
        """
        g (float[1,3,7,7] x) => (float[1,4,5,5] y, float[1,4,5,5] z) {
          c = Conv (x, w, b)
          y = Relu(c)
          z = Sigmoid(c)
        }
        """,
        w=weights(4, 3, 3, 3), b=weights(4, seed=1),
    )
    fused = fuse(before, ["conv-activation"], explain=True)
    assert fused.ops == ["Conv", "Relu", "Sigmoid"]
    assert "other uses" in fused.explain["conv-activation"]
    assert_equivalent(before, fused, tmp_path)


def test_conv_activation_needs_float32() -> None:
    before = make_model(
        """
        g (float16[1,3,7,7] x) => (float16[1,4,5,5] y) {
          c = Conv (x, w)
          y = Relu(c)
        }
        """,
        w=weights(4, 3, 3, 3).astype(np.float16),
    )
    fused = fuse(before, ["conv-activation"], explain=True)
    assert fused.ops == ["Conv", "Relu"]
    assert "float32 only" in fused.explain["conv-activation"]


def test_conv_activation_with_dynamic_clip_bound_is_a_near_miss() -> None:
    before = make_model(
        """
        g (float[1,3,7,7] x, float hi) => (float[1,4,5,5] y) {
          c = Conv (x, w)
          y = Clip(c, lo, hi)
        }
        """,
        w=weights(4, 3, 3, 3), lo=np.array(0.0, np.float32),
    )
    fused = fuse(before, ["conv-activation"], explain=True)
    assert fused.ops == ["Conv", "Clip"]
    assert "Clip max 'hi' is a graph input" in fused.explain["conv-activation"]


# --------------------------------------------------------------------------- gemm-activation

GEMM_CASES: dict[str, tuple[str, dict[str, float]]] = {
    "Relu": ("Relu(g1)", {}),
    "Sigmoid": ("Sigmoid(g1)", {}),
    "Tanh": ("Tanh(g1)", {}),
    "LeakyRelu": ("LeakyRelu <alpha=0.2> (g1)", {"activation_alpha": 0.2}),
    "HardSigmoid": ("HardSigmoid <alpha=0.3, beta=0.4> (g1)",
                    {"activation_alpha": 0.3, "activation_beta": 0.4}),
    "Elu": ("Elu <alpha=0.7> (g1)", {"activation_alpha": 0.7}),
    "Selu": ("Selu(g1)", {"activation_alpha": 1.6732632, "activation_gamma": 1.050701}),
    "Softplus": ("Softplus(g1)", {}),
    "Softsign": ("Softsign(g1)", {}),
    "ThresholdedRelu": ("ThresholdedRelu <alpha=0.1> (g1)", {"activation_alpha": 0.1}),
}


@pytest.mark.parametrize("case", list(GEMM_CASES))
def test_gemm_activation_to_fused_gemm(case: str, tmp_path: Path) -> None:
    act, expected = GEMM_CASES[case]
    before = make_model(
        f"""
        g (float[3,5] a) => (float[3,4] y) {{
          g1 = Gemm <transB=1, alpha=0.9> (a, B, C)
          y = {act}
        }}
        """,
        B=weights(4, 5), C=weights(4, seed=1),
    )
    fused = fuse(before, ["gemm-activation"])
    assert fused.ops == ["com.microsoft::FusedGemm"]
    node = fused.node("FusedGemm")
    assert attr(node, "activation") == case
    assert attr(node, "transB") == 1 and attr(node, "alpha") == pytest.approx(0.9)
    for name, value in expected.items():
        assert attr(node, name) == pytest.approx(value, rel=1e-6)
    assert_equivalent(before, fused, tmp_path)


def test_gemm_clip_is_not_fused() -> None:
    # ORT's CPU FusedGemm has no Clip; the rule set has no Clip pattern.
    before = make_model(
        """
        g (float[3,5] a) => (float[3,4] y) {
          g1 = Gemm (a, B)
          y = Clip(g1, lo)
        }
        """,
        B=weights(5, 4), lo=np.array(0.0, np.float32),
    )
    assert fuse(before, ["gemm-activation"]).ops == ["Gemm", "Clip"]


# --------------------------------------------------------------------------- whole catalog

CNN = """
g (float[2,3,8,8] x) => (float[2,5] y) {
  c1 = Conv <pads=[1,1,1,1]> (x, w1, b1)
  n1 = BatchNormalization (c1, gamma, beta, mean, var)
  r1 = Relu(n1)
  c2 = Conv <pads=[1,1,1,1]> (r1, w2)
  m2 = Mul(c2, s2)
  a2 = Add(m2, t2)
  r2 = Clip(a2, lo, hi)
  p = GlobalAveragePool(r2)
  f = Flatten(p)
  h = MatMul(f, w3)
  h2 = Add(h, b3)
  r3 = Relu(h2)
  y = Gemm <transB=1> (r3, w4, b4)
}
"""


def _cnn() -> onnx.ModelProto:
    return make_model(
        CNN, w1=weights(4, 3, 3, 3), b1=weights(4, seed=1), gamma=positive(4, seed=2),
        beta=weights(4, seed=3), mean=weights(4, seed=4), var=positive(4, seed=5),
        w2=weights(6, 4, 3, 3, seed=6), s2=positive(6, 1, 1, seed=7), t2=weights(1, 6, 1, 1, seed=8),
        lo=np.array(0.0, np.float32), hi=np.array(6.0, np.float32),
        w3=weights(6, 7, seed=9), b3=weights(7, seed=10), w4=weights(5, 7, seed=11),
        b4=weights(5, seed=12),
    )


def test_whole_catalog_on_a_small_cnn_for_ort(tmp_path: Path) -> None:
    before = _cnn()
    fused = fuse(before, target="ort")
    assert fused.ops == [
        "com.microsoft::FusedConv",
        "com.microsoft::FusedConv",
        "GlobalAveragePool",
        "Flatten",
        "com.microsoft::FusedGemm",
        "Gemm",
    ]
    assert_equivalent(before, fused, tmp_path)
    again = fuse(fused.proto, target="ort")  # idempotent
    assert again.ops == fused.ops and again.stats["fuse.fusions"] == 0


@pytest.mark.parametrize("target", ["tensorrt", "portable"])
def test_standard_targets_never_get_contrib_ops(target: str, tmp_path: Path) -> None:
    before = _cnn()
    fused = fuse(before, target=target)
    assert contrib_nodes(fused.model) == []
    assert fused.ops == ["Conv", "Relu", "Conv", "Clip", "GlobalAveragePool", "Flatten", "Gemm",
                         "Relu", "Gemm"]
    assert "com.microsoft" not in fused.model.opset_imports
    assert_equivalent(before, fused, tmp_path)


@pytest.mark.parametrize("rule", ["conv-activation", "gemm-activation"])
def test_contrib_rules_are_refused_for_tensorrt(rule: str) -> None:
    with pytest.raises(UsageError, match="cannot run"):
        fuse(_cnn(), [rule], target="tensorrt")


def test_every_conv_rule_has_targets_and_summary() -> None:
    from graphopt.passes.fusion import conv
    from graphopt.rewrite import ORT_TARGETS, STANDARD_TARGETS

    names = [r.name for r in conv.RULES]
    assert len(set(names)) == len(names)
    for rule in conv.RULES:
        assert rule.summary and rule.targets
        contrib = rule.name in ("conv-activation", "gemm-activation")
        assert rule.targets == (ORT_TARGETS if contrib else STANDARD_TARGETS)
