"""Normalization and activation rules of the fusion catalog: structure and numerics.

Every rule of the ``normalization`` and ``activation`` groups that the catalog wraps
(layer-norm, rms-norm, rms-norm-onnx, skip-layer-norm, skip-rms-norm, gelu-erf, gelu,
bias-gelu, and bert.py's bert-skip-norm-bias and gelu-onnx) gets small decomposed graphs in
ONNX text with seeded random weights. Each case goes through the registered ``fuse`` pass
(``fuse(rules=[...])``, default registry without plugins, a ``PassContext`` naming the
target) and is checked twice:

- structure: the fused graph's op sequence is exactly the expected fused op;
- numerics: original and fused agree on ONNX Runtime CPU, graph optimizations off on both
  sides (:func:`graphopt.verify.verify_model`), element-wise within rtol 1e-5 and atol 1e-6
  (:data:`PLAIN`: the ``fusion`` class without its rms-scaled term, which none of these
  needs), on three feeds, one of them scaled by 30. Observed worst errors: 0 (rms-norm,
  bias-gelu on Gelu), 1-3e-7 (GELU forms), 4-7e-7 (LayerNorm and skip norms: the fused
  kernel reduces in another order).

Negative cases check that rules refuse what they must and that ``explain`` says why.

The helpers at the top are shared with ``test_bert_rules.py``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
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
from graphopt.verify import FUSION, Tolerance, verify_model

# --------------------------------------------------------------------------- helpers

HEADER = '<ir_version: {ir_version}, opset_import: ["" : {opset}{extra}]>'


def weights(*shape: int, seed: int = 0, scale: float = 0.5) -> np.ndarray:
    """Seeded random float32 weights."""
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def f32(*values: float) -> np.ndarray:
    """A float32 tensor; one value gives a scalar."""
    array = np.array(values, np.float32)
    return array.reshape(()) if len(values) == 1 else array


def i64(*values: int) -> np.ndarray:
    """A 1-D int64 tensor."""
    return np.array(values, np.int64)


def make_model(
    body: str, opset: int = 17, *, contrib: bool = False, **initializers: np.ndarray
) -> onnx.ModelProto:
    """Parses ``<header> body`` (ONNX text), adds ``initializers`` and checks the model."""
    extra = ', "com.microsoft" : 1' if contrib else ""
    ir_version = 10 if opset >= 21 else 8
    header = HEADER.format(ir_version=ir_version, opset=opset, extra=extra)
    proto = onnx.parser.parse_model(header + "\n" + body)
    for name, array in initializers.items():
        proto.graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))
    onnx.checker.check_model(proto, full_check=not contrib)
    return proto


@functools.lru_cache(maxsize=1)
def registry() -> PassRegistry:
    """The built-in registry (no third-party plugins: hermetic)."""
    return default_registry(plugins=False)


@dataclass
class Fused:
    """A fused model and what the pass reported."""

    model: ir.Model
    proto: onnx.ModelProto
    stats: dict[str, Any] = field(default_factory=dict)

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


def fuse(
    proto: onnx.ModelProto,
    rules: tuple[str, ...] | list[str] = (),
    *,
    target: str = "ort",
    explain: bool = False,
) -> Fused:
    """Runs ``fuse(rules=[...])`` on a copy of ``proto`` through the pass registry."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    model = ir.serde.deserialize_model(copy)
    options = []
    if rules:
        options.append("rules=[" + ",".join(rules) + "]")
    if explain:
        options.append("explain=true")
    text = f"fuse({','.join(options)})" if options else "fuse"
    result = registry().build(text).execute(model, PassContext(target=target))
    after = ir.serde.serialize_model(model)
    if not any(n.op_type in ORT_OPS_IN_ONNX_DOMAIN for n in after.graph.node):
        onnx.checker.check_model(after)
    return Fused(model, after, dict(result.stats))


#: ORT contrib ops that live in the default domain: the ONNX checker does not know them.
ORT_OPS_IN_ONNX_DOMAIN = frozenset({"SimplifiedLayerNormalization"})


def random_feeds(proto: onnx.ModelProto, seed: int = 0, **fixed: np.ndarray) -> dict[str, Any]:
    """Seeded normal float inputs for every graph input not given in ``fixed``."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = dict(fixed)
    initializers = {t.name for t in proto.graph.initializer}
    for value in proto.graph.input:
        if value.name in feeds or value.name in initializers:
            continue
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
        feeds[value.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def assert_equivalent(
    before: onnx.ModelProto,
    after: onnx.ModelProto | Fused,
    tmp_path: Path,
    feeds: list[dict[str, np.ndarray]],
    tolerance: Tolerance = FUSION,
) -> float:
    """Original and fused agree on ORT CPU (optimizations off on both sides).

    Returns the worst max-abs error over the outputs.
    """
    if isinstance(after, Fused):
        after = after.proto
    a, b = tmp_path / "before.onnx", tmp_path / "after.onnx"
    onnx.save(before, a)
    onnx.save(after, b)
    agreement = verify_model(a, b, tolerance, feeds)
    assert agreement.passed, agreement.summary()
    return max(o.max_abs for o in agreement.outputs)


#: rtol 1e-5, atol 1e-6 element-wise: the ``fusion`` class without its rms-scaled term.
PLAIN = Tolerance("plain", rtol=1e-5, atol=1e-6, min_sqnr_db=None, allow_new_nonfinite=False)

SQRT2 = math.sqrt(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
D = 16  # hidden size of every case


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One decomposed graph and what a rule must make of it.

    Attributes:
        rules: The rules to apply (the one under test last).
        body: ONNX text of the graph (header added by :func:`make_model`).
        init: Initializers by name.
        expected: The fused graph's op sequence (``domain::op`` outside ONNX).
        opset: Default-domain opset.
        target: Backend name for the pass context.
        contrib: Whether the input already holds com.microsoft ops.
    """

    rules: tuple[str, ...]
    body: str
    init: dict[str, np.ndarray]
    expected: list[str]
    opset: int = 17
    target: str = "ort"
    contrib: bool = False

    def model(self) -> onnx.ModelProto:
        return make_model(self.body, self.opset, contrib=self.contrib, **self.init)


LN_INIT = {'axes': i64(-1), 'two': f32(2.0), 'eps': f32(1e-5), 'gamma': weights(D, seed=1) + 1.0,
               'beta': weights(D, seed=2)}
LN_DIV = f"""g (float[2,5,{D}] x) => (float[2,5,{D}] y) {{
  mean = ReduceMean <keepdims=1> (x, axes)
  d = Sub(x, mean)
  dd = Pow(d, two)
  var = ReduceMean <keepdims=1> (dd, axes)
  ve = Add(var, eps)
  sd = Sqrt(ve)
  n = Div(d, sd)
  s = Mul(n, gamma)
  y = Add(s, beta)
}}"""
LN_RECIPROCAL_NO_BIAS = f"""g (float[B,S,{D}] x) => (float[B,S,{D}] y) {{
  mean = ReduceMean <keepdims=1> (x, axes)
  d = Sub(x, mean)
  dd = Mul(d, d)
  var = ReduceMean <keepdims=1> (dd, axes)
  ve = Add(var, eps)
  sd = Sqrt(ve)
  inv = Reciprocal(sd)
  n = Mul(d, inv)
  y = Mul(n, gamma)
}}"""
RMS_INIT = {'axes': i64(-1), 'two': f32(2.0), 'eps': f32(1e-6), 'gamma': weights(D, seed=3) + 1.0}
RMS = f"""g (float[2,5,{D}] x) => (float[2,5,{D}] y) {{
  sq = Pow(x, two)
  ms = ReduceMean <keepdims=1, noop_with_empty_axes=0> (sq, axes)
  e = Add(ms, eps)
  r = Sqrt(e)
  inv = Reciprocal(r)
  n = Mul(x, inv)
  y = Mul(gamma, n)
}}"""
SKIP_INIT = {'gamma': weights(D, seed=1) + 1.0, 'beta': weights(D, seed=2),
                 'bias': weights(D, seed=4)}
SKIP_LN = f"""g (float[2,5,{D}] x, float[2,5,{D}] skip) => (float[2,5,{D}] y) {{
  s = Add(x, skip)
  y = LayerNormalization <axis=-1, epsilon=1e-5> (s, gamma, beta)
}}"""
SKIP_LN_BIAS_AFTER = f"""g (float[2,5,{D}] x, float[2,5,{D}] skip) => (float[2,5,{D}] y) {{
  s = Add(x, skip)
  sb = Add(s, bias)
  y = LayerNormalization <axis=-1, epsilon=1e-5> (sb, gamma, beta)
}}"""
SKIP_LN_BIAS_BEFORE = f"""g (float[2,5,{D}] x, float[2,5,{D}] skip) => (float[2,5,{D}] y) {{
  xb = Add(x, bias)
  s = Add(skip, xb)
  y = LayerNormalization <axis=-1, epsilon=1e-5> (s, gamma, beta)
}}"""
# The TorchScript exporter's order: the bias first. onnxscript's rule leaves it outside;
# bert-skip-norm-bias moves it into the fused op.
SKIP_LN_BIAS_FIRST = f"""g (float[2,5,{D}] h, float[2,5,{D}] skip) => (float[2,5,{D}] y) {{
  proj = MatMul(h, w)
  xb = Add(bias, proj)
  s = Add(xb, skip)
  y = LayerNormalization <axis=-1, epsilon=1e-12> (s, gamma, beta)
}}"""
SKIP_RMS = f"""g (float[2,5,{D}] a, float[2,5,{D}] skip) => (float[2,5,{D}] y) {{
  x = Add(a, skip)
  sq = Pow(x, two)
  ms = ReduceMean <keepdims=1, noop_with_empty_axes=0> (sq, axes)
  e = Add(ms, eps)
  r = Sqrt(e)
  inv = Reciprocal(r)
  n = Mul(x, inv)
  y = Mul(n, gamma)
}}"""
GELU_INIT = {'sqrt2': f32(SQRT2), 'one': f32(1.0), 'half': f32(0.5)}
# onnxscript's erfgelu patterns: 0.5 * (x * (erf(x/√2) + 1)) and x * (0.5 * (erf(x/√2) + 1))
GELU_ERF_1 = f"""g (float[2,5,{D}] x) => (float[2,5,{D}] y) {{
  t = Div(x, sqrt2)
  e = Erf(t)
  p = Add(e, one)
  m = Mul(x, p)
  y = Mul(half, m)
}}"""
GELU_ERF_2 = f"""g (float[2,5,{D}] x) => (float[2,5,{D}] y) {{
  t = Div(x, sqrt2)
  e = Erf(t)
  p = Add(e, one)
  h = Mul(half, p)
  y = Mul(x, h)
}}"""
# The form torch writes (TorchScript export of nn.GELU): ((x * (erf(x/√2) + 1)) * 0.5)
GELU_ERF_TORCH = f"""g (float[2,5,{D}] x) => (float[2,5,{D}] y) {{
  t = Div(x, sqrt2)
  e = Erf(t)
  p = Add(e, one)
  m = Mul(x, p)
  y = Mul(m, half)
}}"""
TANH_INIT = {'three': f32(3.0), 'c': f32(0.044715), 'k': f32(SQRT_2_OVER_PI), 'one': f32(1.0),
                 'half': f32(0.5)}
GELU_TANH = f"""g (float[2,5,{D}] x) => (float[2,5,{D}] y) {{
  x3 = Pow(x, three)
  t2 = Mul(c, x3)
  t3 = Add(x, t2)
  t4 = Mul(k, t3)
  t5 = Tanh(t4)
  t6 = Add(t5, one)
  t7 = Mul(half, t6)
  y = Mul(x, t7)
}}"""
BIAS_GELU_ONNX = f"""g (float[2,5,{D}] x) => (float[2,5,{D}] y) {{
  a = Add(x, bias)
  y = Gelu(a)
}}"""
BIAS_GELU_ERF = f"""g (float[2,5,8] h) => (float[2,5,{D}] y) {{
  proj = MatMul(h, w)
  x = Add(proj, bias)
  t = Div(x, sqrt2)
  e = Erf(t)
  p = Add(e, one)
  m = Mul(x, p)
  y = Mul(m, half)
}}"""

CASES: dict[str, Case] = {
    "layer-norm-div": Case(("layer-norm",), LN_DIV, LN_INIT, ["LayerNormalization"], opset=18),
    "layer-norm-reciprocal-no-bias-symbolic": Case(
        ("layer-norm",), LN_RECIPROCAL_NO_BIAS, LN_INIT, ["LayerNormalization"], opset=18
    ),
    "layer-norm-tensorrt": Case(
        ("layer-norm",), LN_DIV, LN_INIT, ["LayerNormalization"], opset=18, target="tensorrt"
    ),
    "rms-norm": Case(
        ("rms-norm",), RMS, RMS_INIT, ["SimplifiedLayerNormalization"], opset=18
    ),
    "rms-norm-onnx": Case(
        ("rms-norm-onnx",), RMS, RMS_INIT, ["RMSNormalization"], opset=23, target="tensorrt"
    ),
    "skip-layer-norm": Case(
        ("skip-layer-norm",), SKIP_LN, SKIP_INIT, ["com.microsoft::SkipLayerNormalization"]
    ),
    "skip-layer-norm-bias-after": Case(
        ("skip-layer-norm",), SKIP_LN_BIAS_AFTER, SKIP_INIT,
        ["com.microsoft::SkipLayerNormalization"],
    ),
    "skip-layer-norm-bias-before": Case(
        ("skip-layer-norm",), SKIP_LN_BIAS_BEFORE, SKIP_INIT,
        ["com.microsoft::SkipLayerNormalization"],
    ),
    "bert-skip-norm-bias": Case(
        ("skip-layer-norm", "bert-skip-norm-bias"), SKIP_LN_BIAS_FIRST,
        dict(SKIP_INIT, w=weights(D, D, seed=5)),
        ["MatMul", "com.microsoft::SkipLayerNormalization"],
    ),
    "skip-rms-norm": Case(
        ("rms-norm", "skip-rms-norm"), SKIP_RMS, RMS_INIT,
        ["com.microsoft::SkipSimplifiedLayerNormalization"], opset=18,
    ),
    "gelu-erf-pattern-1": Case(
        ("gelu-erf",), GELU_ERF_1, GELU_INIT, ["com.microsoft::Gelu"]
    ),
    "gelu-erf-pattern-2": Case(
        ("gelu-erf",), GELU_ERF_2, GELU_INIT, ["com.microsoft::Gelu"]
    ),
    "gelu-erf-torch-form": Case(("gelu",), GELU_ERF_TORCH, GELU_INIT, ["com.microsoft::Gelu"]),
    "gelu-tanh": Case(("gelu",), GELU_TANH, TANH_INIT, ["com.microsoft::FastGelu"]),
    "bias-gelu-onnx-gelu": Case(
        ("bias-gelu",), BIAS_GELU_ONNX, {'bias': weights(D, seed=6)},
        ["com.microsoft::BiasGelu"], opset=20,
    ),
    "bias-gelu-after-erf-gelu": Case(
        ("gelu", "bias-gelu"), BIAS_GELU_ERF,
        dict(GELU_INIT, w=weights(8, D, seed=7), bias=weights(D, seed=6)),
        ["MatMul", "com.microsoft::BiasGelu"],
    ),
    "gelu-onnx-torch-form": Case(
        ("gelu-onnx",), GELU_ERF_TORCH, GELU_INIT, ["Gelu"], opset=20, target="tensorrt"
    ),
    "gelu-onnx-pattern-1": Case(
        ("gelu-onnx",), GELU_ERF_1, GELU_INIT, ["Gelu"], opset=20, target="portable"
    ),
    "gelu-onnx-pattern-2": Case(
        ("gelu-onnx",), GELU_ERF_2, GELU_INIT, ["Gelu"], opset=20, target="tensorrt"
    ),
    "gelu-onnx-tanh": Case(
        ("gelu-onnx",), GELU_TANH, TANH_INIT, ["Gelu"], opset=20, target="tensorrt"
    ),
}

#: What each catalog rule of these groups is covered by (checked against the catalog).
COVERED = {rule for case in CASES.values() for rule in case.rules}


def _feeds(case: Case, proto: onnx.ModelProto) -> list[dict[str, np.ndarray]]:
    # Inputs of several magnitudes: normalizations must not depend on the scale.
    return [random_feeds(proto, seed=s) for s in (0, 1)] + [
        {k: v * 30.0 for k, v in random_feeds(proto, seed=2).items()}
    ]


def _concrete(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose symbolic input dims are 2 and 5 (for generated feeds)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for value in copy.graph.input:
        for d, size in zip(value.type.tensor_type.shape.dim, (2, 5)):
            if d.HasField("dim_param"):
                d.dim_value = size
    return copy


# --------------------------------------------------------------------------- tests


def test_every_normalization_and_activation_rule_is_covered() -> None:
    # normalization.py and activation.py (onnxscript's rule sets), and bert.py's rules of
    # these groups; llama.py and conv.py test their own.
    from graphopt.passes.fusion import activation, bert, normalization

    wanted = {r.name for r in (*normalization.RULES, *activation.RULES)}
    wanted |= {r.name for r in bert.RULES if r.group in ("normalization", "activation")}
    assert wanted <= COVERED, f"rules without a case: {sorted(wanted - COVERED)}"


@pytest.mark.parametrize("name", list(CASES))
def test_structure(name: str) -> None:
    case = CASES[name]
    fused = fuse(case.model(), case.rules, target=case.target)
    assert fused.ops == case.expected
    assert fused.counts[case.rules[-1]] >= 1


@pytest.mark.parametrize("name", list(CASES))
def test_numerics(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    before = case.model()
    fused = fuse(before, case.rules, target=case.target)
    concrete = _concrete(before)
    try:
        error = assert_equivalent(
            concrete, _concrete(fused.proto), tmp_path, _feeds(case, concrete), PLAIN
        )
    except Exception as e:
        if "RMSNormalization" in str(e) and "opset" in str(e).lower():  # pragma: no cover
            pytest.skip(f"this ONNX Runtime cannot run RMSNormalization: {e}")
        raise
    assert error <= 1e-6


def test_layer_norm_attributes() -> None:
    fused = fuse(CASES["layer-norm-div"].model(), ["layer-norm"])
    node = fused.node("LayerNormalization")
    assert node.attributes["axis"].value == -1
    assert node.attributes["epsilon"].value == pytest.approx(1e-5)
    assert len(node.inputs) == 3  # the bias Add was absorbed


def test_skip_norm_bias_moves_the_bias_into_the_fused_op() -> None:
    case = CASES["bert-skip-norm-bias"]
    alone = fuse(case.model(), ["skip-layer-norm"])
    assert alone.ops == ["MatMul", "Add", "com.microsoft::SkipLayerNormalization"]
    fused = fuse(case.model(), case.rules)
    node = fused.node("SkipLayerNormalization")
    assert len(node.inputs) == 5
    assert node.inputs[4] is not None and node.inputs[4].name == "bias"
    assert node.attributes["epsilon"].value == pytest.approx(1e-12)


def test_skip_norm_bias_refuses_a_non_constant_addend() -> None:
    body = f"""g (float[2,5,{D}] h, float[2,5,{D}] skip, float[{D}] b) => (float[2,5,{D}] y) {{
      proj = MatMul(h, w)
      xb = Add(b, proj)
      s = Add(xb, skip)
      y = LayerNormalization <axis=-1> (s, gamma, beta)
    }}"""
    model = make_model(body, **dict(SKIP_INIT, w=weights(D, D, seed=5)))
    fused = fuse(model, ["skip-layer-norm", "bert-skip-norm-bias"], explain=True)
    assert fused.counts["bert-skip-norm-bias"] == 0
    assert "not a constant 1-D bias" in fused.explain["bert-skip-norm-bias"]


def test_layer_norm_refuses_a_non_constant_epsilon() -> None:
    body = LN_DIV.replace(f"g (float[2,5,{D}] x)", f"g (float[2,5,{D}] x, float eps)")
    init = {k: v for k, v in LN_INIT.items() if k != "eps"}
    fused = fuse(make_model(body, 18, **init), ["layer-norm"], explain=True)
    assert fused.counts["layer-norm"] == 0
    assert "LayerNormalization" not in fused.ops
    assert "Epsilon" in fused.explain["layer-norm"]


def test_gelu_refuses_a_wrong_constant() -> None:
    # x / 1.5 is not x / √2: not GELU.
    init = dict(GELU_INIT, sqrt2=f32(1.5))
    fused = fuse(make_model(GELU_ERF_TORCH, **init), ["gelu", "gelu-erf"], explain=True)
    assert fused.counts["gelu"] == fused.counts["gelu-erf"] == 0
    assert "Erf" in fused.ops
    assert fused.explain["gelu"] != "no near-match"


def test_skip_layer_norm_refuses_a_non_vector_bias() -> None:
    init = dict(SKIP_INIT, bias=weights(5, D, seed=4))  # [S, D]: not a per-channel bias
    fused = fuse(make_model(SKIP_LN_BIAS_AFTER, **init), ["skip-layer-norm"], explain=True)
    assert fused.counts["skip-layer-norm"] == 0
    assert fused.ops == ["Add", "Add", "LayerNormalization"]
    assert "Shape mismatch" in fused.explain["skip-layer-norm"]


def test_gelu_onnx_needs_opset_20() -> None:
    fused = fuse(make_model(GELU_ERF_TORCH, 17, **GELU_INIT), ["gelu-onnx"], target="tensorrt",
                 explain=True)
    assert fused.counts["gelu-onnx"] == 0
    assert "opset >= 20" in fused.explain["gelu-onnx"]
    assert "Gelu" not in fused.ops


def test_gelu_onnx_is_not_offered_to_ort() -> None:
    with pytest.raises(UsageError):
        fuse(make_model(GELU_ERF_TORCH, 20, **GELU_INIT), ["gelu-onnx"], target="ort")


def test_gelu_onnx_keeps_the_tanh_approximation() -> None:
    fused = fuse(CASES["gelu-onnx-tanh"].model(), ["gelu-onnx"], target="tensorrt")
    assert fused.node("Gelu").attributes["approximate"].value == "tanh"


def test_standard_targets_get_no_contrib_ops_from_the_whole_catalog() -> None:
    for name in ("gelu-onnx-torch-form", "layer-norm-tensorrt"):
        case = CASES[name]
        fused = fuse(case.model(), target="tensorrt")
        assert all("::" not in op for op in fused.ops), fused.ops
