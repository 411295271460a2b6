"""The ``awq`` pass: exact scale folding into each producer kind, and lower error than ``wq``."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.errors import UsageError
from graphopt.infra.analysis import AnalysisManager
from graphopt.infra.context import PassContext
from graphopt.passes.weight_only.awq_pass import (
    AWQOptions,
    QuantizeWeightsAwqPass,
    ScaleEditor,
    plan_scale_fold,
    scalable_groups,
    scale_weight,
)
from graphopt.passes.weight_only.base import WeightOnlyOptions
from graphopt.passes.weight_only.rtn import QuantizeWeightsRtnPass
from graphopt.passes.weight_only.selection import select_sites

K, F = 64, 96


def block_model(seed: int = 0, affine: bool = False) -> ir.Model:
    """A pre-norm gated MLP block plus a post-LayerNorm projection with a residual::

        n = Mul(gamma, x);  q = MatMul(n, Wq);  k = MatMul(n, Wk)           (fold: gamma)
        g = MatMul(n, Wg);  u = MatMul(n, Wu);  a = Mul(Sigmoid(g), u)
        d = MatMul(a, Wd)                                                   (fold: Wu columns)
        l = LayerNormalization(d, scale, bias);  r = Add(l, MatMul(l, Wr))  (l feeds Add: Mul)
        o = MatMul(Gelu-free Relu(q), Wo)                                   (Relu: Mul)
    """
    rng = np.random.default_rng(seed)

    def w(shape: tuple[int, int], name: str) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.1).astype(np.float32), name)

    first = (
        [helper.make_node("Mul", ["x", "gamma"], ["xg"]), helper.make_node("Add", ["xg", "beta"], ["n"])]
        if affine
        else [helper.make_node("Mul", ["gamma", "x"], ["n"])]
    )
    nodes = [
        *first,
        helper.make_node("MatMul", ["n", "wq"], ["q"]),
        helper.make_node("MatMul", ["n", "wk"], ["k"]),
        helper.make_node("MatMul", ["n", "wg"], ["g"]),
        helper.make_node("MatMul", ["n", "wu"], ["u"]),
        helper.make_node("Sigmoid", ["g"], ["sg"]),
        helper.make_node("Mul", ["sg", "u"], ["a"]),
        helper.make_node("MatMul", ["a", "wd"], ["d"]),
        helper.make_node("LayerNormalization", ["d", "ln_scale", "ln_bias"], ["l"], axis=-1),
        helper.make_node("MatMul", ["l", "wr"], ["rr"]),
        helper.make_node("Add", ["l", "rr"], ["r"]),
        helper.make_node("Relu", ["q"], ["qr"]),
        helper.make_node("MatMul", ["qr", "wo"], ["o"]),
    ]
    inits = [
        numpy_helper.from_array((1.0 + 0.5 * rng.standard_normal(K)).astype(np.float32), "gamma"),
        *([numpy_helper.from_array((0.2 * rng.standard_normal(K)).astype(np.float32), "beta")] if affine else []),
        w((K, K), "wq"), w((K, K), "wk"), w((K, F), "wg"), w((K, F), "wu"), w((F, K), "wd"),
        numpy_helper.from_array((1.0 + 0.3 * rng.standard_normal(K)).astype(np.float32), "ln_scale"),
        numpy_helper.from_array((0.1 * rng.standard_normal(K)).astype(np.float32), "ln_bias"),
        w((K, K), "wr"), w((K, K), "wo"),
    ]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", "s", K]) for n in ("k", "r", "o")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", K])], outs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    proto.ir_version = 10
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))


def feeds(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    mag = np.ones(K, np.float32)
    mag[[3, 17, 40]] = 25.0  # outlier channels
    return [{"x": (rng.standard_normal((2, 8, K)) * mag).astype(np.float32)} for _ in range(count)]


def run(model: ir.Model, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    data = ir.serde.serialize_model(model).SerializeToString()
    session = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feed), strict=True))


@pytest.mark.parametrize("affine", [False, True])
def test_every_fold_kind_is_exact_in_float(affine: bool) -> None:
    model = block_model(affine=affine)
    sites, _ = select_sites(model, WeightOnlyOptions(min_dim=8))
    groups, rest, _ = scalable_groups(sites)
    assert not rest and set(groups) == {"n", "a", "l", "qr"}
    editor = ScaleEditor(model.graph)
    rng = np.random.default_rng(3)
    kinds = {}
    for act, group in groups.items():
        activation = group[0].activation
        assert activation is not None
        plan = plan_scale_fold(editor, activation, [s.node for s in group], K if act != "a" else F, True)
        assert not isinstance(plan, str), plan
        kinds[act] = plan.kind
        s = np.exp(rng.uniform(-1.5, 1.5, K if act != "a" else F)).astype(np.float32)
        plan.apply(s)
        for site in {x.name: x for x in group}.values():
            scale_weight(editor, site, s)
    first = "norm" if affine else "mul-const"
    assert kinds == {"n": first, "a": "matmul", "l": "insert-mul", "qr": "insert-mul"}
    assert editor.inserted == 2
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    ref = block_model(affine=affine)
    for feed in feeds(2, 5):
        want, got = run(ref, feed), run(model, feed)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4)


def test_no_insert_mul_skips_with_reason() -> None:
    model = block_model()
    sites, _ = select_sites(model, WeightOnlyOptions(min_dim=8))
    groups, _, _ = scalable_groups(sites)
    editor = ScaleEditor(model.graph)
    group = groups["l"]
    plan = plan_scale_fold(editor, group[0].activation, [s.node for s in group], K, False)  # type: ignore[arg-type]
    assert isinstance(plan, str) and "Add" in plan and "insert_mul=false" in plan


def _quantize(pass_cls: Any, opts: Any, calib: list[dict[str, np.ndarray]] | None) -> tuple[ir.Model, Any]:
    model = block_model()
    ctx = PassContext(target="ort", calibration=(lambda: iter(calib)) if calib is not None else None)
    result = pass_cls(opts).run_with(model, ctx, AnalysisManager(ctx))
    return model, result


@pytest.mark.parametrize("options", [{"bits": 4, "group": 32}, {"bits": 3, "group": 32, "sym": False}])
def test_awq_beats_rtn_on_outlier_activations(options: dict[str, Any]) -> None:
    calib, test = feeds(6, 1), feeds(3, 2)
    awq_model, result = _quantize(QuantizeWeightsAwqPass, AWQOptions(min_dim=8, grid=10, **options), calib)
    rtn_model, _ = _quantize(QuantizeWeightsRtnPass, WeightOnlyOptions(min_dim=8, **options), None)
    assert result.stats["awq_groups"].get("mul-const") == 1
    assert "MatMulNBits" in {n.op_type for n in awq_model.graph}
    ref = block_model()
    e_awq = e_rtn = 0.0
    for feed in test:
        want = run(ref, feed)
        got_awq, got_rtn = run(awq_model, feed), run(rtn_model, feed)
        e_awq += sum(float(np.sum((got_awq[k] - want[k]) ** 2)) for k in want)
        e_rtn += sum(float(np.sum((got_rtn[k] - want[k]) ** 2)) for k in want)
    assert e_awq < 0.8 * e_rtn, (e_awq, e_rtn)


def test_awq_requires_calibration() -> None:
    with pytest.raises(UsageError, match="--calib"):
        _quantize(QuantizeWeightsAwqPass, AWQOptions(min_dim=8), None)
