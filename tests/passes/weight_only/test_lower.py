"""Lowerings of ``wq`` against a numpy reference, and lossless read-back between them."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from _wq_support import (
    K,
    N,
    feeds,
    mlp_model,
    op_counts,
    run_model,
    run_wq,
    tied_model,
    weights,
)

from graphopt.passes.weight_only import WeightOnlyOptions
from graphopt.passes.weight_only.convert import NotLoweredError, read_back
from graphopt.quant.groupwise import GroupQuantized, quantize_rtn

CONFIGS = [
    {"bits": 4, "group": 32, "sym": True},
    {"bits": 4, "group": 32, "sym": False},
    {"bits": 3, "group": 32, "sym": True},
    {"bits": 3, "group": 48, "sym": False},
    {"bits": 2, "group": 16, "sym": False},
    {"bits": 8, "group": -1, "sym": True},
    {"bits": 8, "group": -1, "sym": False},
    {"bits": 4, "group": 128, "sym": True},  # group > K: per-channel
]


def _expected(cfg: dict[str, object]) -> tuple[GroupQuantized, GroupQuantized]:
    w = weights()
    o = WeightOnlyOptions.parse({k: str(v) for k, v in cfg.items()})
    return (
        quantize_rtn(w["w_kn"].T, o.bits, o.group, o.sym),
        quantize_rtn(w["w_nk"], o.bits, o.group, o.sym),
    )


def _same(a: GroupQuantized, b: GroupQuantized) -> None:
    assert (a.bits, a.group_size) == (b.bits, b.group_size)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.scales, b.scales)
    if a.zero_points is None or b.zero_points is None:
        assert a.zero_points is None and b.zero_points is None
    else:
        np.testing.assert_array_equal(a.zero_points, b.zero_points)


def _lowered(model: ir.Model) -> list[ir.Node]:
    ops = {"MatMulNBits", "GatherBlockQuantized", "DequantizeLinear", "MatMulLowBit"}
    return [n for n in model.graph if n.op_type in ops]


@pytest.mark.parametrize("target", ["ort", "portable"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_lowering_matches_numpy_reference(target: str, cfg: dict[str, object]) -> None:
    model, x = mlp_model(), feeds()
    qa, qb = _expected(cfg)
    run_wq(model, target, accuracy_level="0", **{k: str(v) for k, v in cfg.items()})
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    got = run_model(model, x)
    h = x["x"] @ qa.dequantize_matmul_weight()
    g = x["x2"] @ qb.dequantize_matmul_weight() + weights()["bias"]
    np.testing.assert_allclose(got["h"], h, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["g"], g, rtol=1e-5, atol=1e-5)
    lowered = _lowered(model)
    assert len(lowered) == 2
    expected_op = "MatMulNBits" if target == "ort" else "DequantizeLinear"
    assert {n.op_type for n in lowered} == {expected_op}
    # the lowered nodes hold exactly the representation: reading it back is lossless
    by_k = sorted(lowered, key=lambda n: n.name)
    backs = [read_back(n) for n in by_k]
    for back in backs:
        assert (back.n, back.k) == (N, K)
    matches = [any(_try_same(b, q) for b in backs) for q in (qa, qb)]
    assert all(matches)


def _try_same(a: GroupQuantized, b: GroupQuantized) -> bool:
    try:
        _same(a, b)
    except AssertionError:
        return False
    return True


@pytest.mark.parametrize("cfg", CONFIGS[:5], ids=str)
def test_lowerings_interconvert_losslessly(cfg: dict[str, object]) -> None:
    """nbits -> read back == dq -> read back == the GroupQuantized both were built from."""
    text = {k: str(v) for k, v in cfg.items()}
    a, b = mlp_model(), mlp_model()
    run_wq(a, "ort", **text)
    run_wq(b, "portable", **text)
    for na, nb in zip(_lowered(a), _lowered(b), strict=True):
        _same(read_back(na), read_back(nb))


def test_tied_table_quantized_once_for_gather_and_head() -> None:
    w = weights()["table"]
    q = quantize_rtn(w, 4, 32, True)
    d = q.dequantize()
    x = feeds()
    for target in ("ort", "portable"):
        model = tied_model()
        result = run_wq(model, target, group="32", accuracy_level="0")
        assert result.stats["weights_quantized"] == 1
        assert result.stats["uses_quantized"] == {"gather": 1, "matmul": 1}
        assert "table" not in model.graph.initializers
        got = run_model(model, x)
        np.testing.assert_array_equal(got["e"], d[x["ids"]])
        np.testing.assert_allclose(got["logits"], d[x["ids"]] @ d.T, rtol=1e-5, atol=1e-4)
        for node in _lowered(model):
            _same(read_back(node), q)
    # portable: one DequantizeLinear feeds both the Gather and the head's Transpose
    model = tied_model()
    run_wq(model, "portable", group="32")
    assert op_counts(model)["DequantizeLinear"] == 1


def test_ort_accuracy_level_4_close_to_reference() -> None:
    model, x = mlp_model(), feeds()
    qa, _ = _expected({"bits": 4, "group": 32})
    run_wq(model, "ort", group="32")  # default accuracy level (int8 activations)
    levels = {
        n.attributes["accuracy_level"].value for n in model.graph if n.op_type == "MatMulNBits"
    }
    assert levels == {4}
    got = run_model(model, x)["h"]
    ref = x["x"] @ qa.dequantize_matmul_weight()
    sqnr = 10 * np.log10(np.sum(ref**2) / np.sum((got - ref) ** 2))
    assert sqnr > 35.0  # int8 activation rounding only; a packing error gives < 0 dB


def test_gemm_with_2d_bias_and_transb0() -> None:
    from onnx import TensorProto, helper, numpy_helper

    w = weights()
    bias2d = np.random.default_rng(5).standard_normal((5, N)).astype(np.float32)
    node = helper.make_node("Gemm", ["x2", "w_kn", "c"], ["y"], name="g0")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x2", TensorProto.FLOAT, [5, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, N])],
        [numpy_helper.from_array(w["w_kn"], "w_kn"), numpy_helper.from_array(bias2d, "c")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    q = quantize_rtn(w["w_kn"].T, 4, 32, True)
    x = feeds()["x2"]
    for target in ("ort", "portable"):
        model = ir.serde.deserialize_model(proto)
        run_wq(model, target, group="32", accuracy_level="0")
        got = run_model(model, {"x2": x})["y"]
        np.testing.assert_allclose(
            got, x @ q.dequantize_matmul_weight() + bias2d, rtol=1e-5, atol=1e-5
        )
    assert "Add" in op_counts(model) or "Gemm" in op_counts(model)


def test_nbits_falls_back_for_groups_without_power_of_two_block() -> None:
    model = mlp_model()
    result = run_wq(model, "ort", group="40")  # 40 = 8 * 5: no power-of-two block >= 16
    assert op_counts(model).get("DequantizeLinear") == 2
    assert len(result.stats["fallbacks"]) == 2
    assert model.opset_imports[""] == 21


def test_portable_raises_old_opsets() -> None:
    model = mlp_model()
    assert model.opset_imports[""] == 20
    result = run_wq(model, "portable")
    assert model.opset_imports[""] == 21 and model.ir_version >= 10
    assert result.stats["opset_upgraded"] == "20 -> 21"


def test_read_back_rejects_other_nodes() -> None:
    model = mlp_model()
    with pytest.raises(NotLoweredError, match="not a weight-only lowering"):
        read_back(model.graph.node(0))


def test_excluded_use_of_a_shared_weight_keeps_reading_float() -> None:
    w = weights()["table"]
    d = quantize_rtn(w, 4, 32, True).dequantize()
    x = feeds()
    for target in ("ort", "portable"):
        model = tied_model()
        run_wq(model, target, group="32", embeddings="false", accuracy_level="0")
        assert "table" in model.graph.initializers  # still read by the Gather
        got = run_model(model, x)
        np.testing.assert_array_equal(got["e"], w[x["ids"]])
        np.testing.assert_allclose(got["logits"], w[x["ids"]] @ d.T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    ("source", "dest"), [("ort", "dq"), ("portable", "nbits"), ("ort", "ext"), ("ext", "dq")]
)
@pytest.mark.parametrize("builder", [mlp_model, tied_model], ids=["mlp", "tied"])
def test_relower_is_lossless(source: str, dest: str, builder: object) -> None:
    """A lowered model re-lowered for another target equals lowering for it directly."""
    from graphopt.passes.weight_only.convert import relower

    if "ext" in (source, dest):
        pytest.importorskip("graphopt.backends.ext.format")
    direct_target = {"dq": "portable", "nbits": "ort", "ext": "ext"}[dest]
    text = {"bits": "3", "group": "32", "sym": "false", "accuracy_level": "0"}
    converted, direct = builder(), builder()  # type: ignore[operator]
    run_wq(converted, source, **text)
    stats = relower(converted, dest, accuracy_level=0)
    run_wq(direct, direct_target, **text)
    lowered_ops = [n.op_type for n in _lowered(converted)]
    assert lowered_ops == [n.op_type for n in _lowered(direct)], stats
    for a, b in zip(_lowered(converted), _lowered(direct), strict=True):
        _same(read_back(a), read_back(b))
    if "ext" not in (source, dest):
        x = feeds()
        got, want = run_model(converted, x), run_model(direct, x)
        for name in want:  # a Gemm comes back as MatMul + Add: same values up to rounding
            np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-6)
