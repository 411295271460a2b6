"""The ``wq`` pass: registry and pipeline text, options, targets, idempotence, ext."""

from __future__ import annotations

import sys

import numpy as np
import onnx_ir as ir
import pytest
from _wq_support import feeds, mlp_model, op_counts, run_model, run_wq, tied_model

from graphopt.errors import LoweringError, UsageError
from graphopt.infra.registry import PassRegistry
from graphopt.passes import weight_only
from graphopt.passes.weight_only import QuantizeWeightsRtnPass, WeightOnlyOptions


def _registry() -> PassRegistry:
    registry = PassRegistry()
    weight_only.register(registry)
    return registry


def test_pipeline_text_round_trips() -> None:
    registry = _registry()
    pm = registry.build("wq(bits=4,group=128,sym=true)")
    assert pm.to_text() == "wq"  # all defaults
    text = "wq(bits=3,group=-1,sym=false,clip=true,exclude=[lm_*,Gemm])"
    assert registry.build(text).to_text() == text
    (p,) = pm.passes
    assert isinstance(p, QuantizeWeightsRtnPass) and p.info.tolerance == "weight-only"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"bits": "5"}, "bits must be"),
        ({"group": "1"}, "group must be"),
        ({"ternary": "true"}, "ternary"),
        ({"lowering": "gguf"}, "not one of"),
        ({"accuracy_level": "7"}, "accuracy_level"),
    ],
)
def test_bad_options_name_the_option(options: dict[str, str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        WeightOnlyOptions.parse(options, owner="wq")


def test_unknown_target_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="no weight-only lowering for target 'gguf'"):
        run_wq(mlp_model(), "gguf")


def test_second_run_changes_nothing() -> None:
    for target in ("ort", "portable"):
        model = tied_model()
        assert run_wq(model, target).modified
        before = op_counts(model)
        again = run_wq(model, target)
        assert not again.modified and op_counts(model) == before


def test_model_without_candidates_is_unmodified() -> None:
    model = mlp_model()
    result = run_wq(model, "ort", exclude=["mm", "gemm"])
    assert not result.modified
    assert len(result.stats["skip_reasons"]) == 3


def test_stats_report_sizes_and_worst_sqnr() -> None:
    result = run_wq(mlp_model(), "portable", bits="4", group="32")
    s = result.stats
    assert s["weights_quantized"] == 2 and s["lowering"] == "dq"
    assert s["weight_packed_bytes"] < s["weight_float_bytes"] / 6
    assert 10 < s["worst_weight_sqnr_db"] < 30


def test_lowering_option_overrides_target() -> None:
    model = mlp_model()
    run_wq(model, "ort", lowering="dq")
    assert op_counts(model).get("DequantizeLinear") == 2


def test_ternary_weights_take_three_values() -> None:
    model = mlp_model()
    run_wq(model, "portable", bits="2", ternary="true", group="32")
    from graphopt.passes.weight_only.convert import read_back

    for node in model.graph:
        if node.op_type == "DequantizeLinear":
            assert set(np.unique(read_back(node).codes)) <= {1, 2, 3}


def test_ext_without_format_module_is_a_lowering_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "graphopt.backends.ext.format", None)
    with pytest.raises(LoweringError, match="backend 'ext'.*format module is unavailable"):
        run_wq(mlp_model(), "ext")


def test_ext_lowering_reads_back_losslessly() -> None:
    pytest.importorskip("graphopt.backends.ext.format")
    from _wq_support import weights

    from graphopt.passes.weight_only.convert import read_back
    from graphopt.quant.groupwise import quantize_rtn

    model = mlp_model()
    run_wq(model, "ext", group="32")
    nodes = [n for n in model.graph if n.op_type == "MatMulLowBit"]
    assert len(nodes) == 2 and all(n.domain == "graphopt" for n in nodes)
    assert model.opset_imports["graphopt"] == 1
    expected = quantize_rtn(weights()["w_kn"].T, 4, 32, True)
    back = read_back(nodes[0])
    np.testing.assert_array_equal(back.codes, expected.codes)
    np.testing.assert_array_equal(back.scales, expected.scales)


def test_pass_via_onnx_ir_pass_interface() -> None:
    """A graphopt pass also runs as a plain onnx-ir pass (default context: target ort)."""
    model = mlp_model()
    x = feeds()
    ref = run_model(model, x)
    result = QuantizeWeightsRtnPass(WeightOnlyOptions(bits=8, group=-1))(model)
    assert result.modified
    got = run_model(result.model, x)
    for name in ("h", "g"):
        sqnr = 10 * np.log10(np.sum(ref[name] ** 2) / np.sum((ref[name] - got[name]) ** 2))
        assert sqnr > 35


def test_optimize_api_verifies_and_keeps_the_input(tmp_path: object) -> None:
    from pathlib import Path

    from graphopt.api import OptimizeConfig, optimize

    tmp = Path(str(tmp_path))
    src, dst = tmp / "in.onnx", tmp / "out.onnx"
    ir.save(mlp_model(), src)
    before = src.read_bytes()
    report = optimize(
        src,
        dst,
        OptimizeConfig(passes="wq(bits=4,group=32)", target="ort", latency=False, plugins=False),
    )
    assert src.read_bytes() == before and dst.exists()
    assert report is not None
    out = ir.load(dst)
    assert op_counts(out).get("MatMulNBits") == 2


@pytest.mark.parametrize(("bits", "sym"), [(4, True), (3, False), (2, True), (8, False)])
def test_ext_lowering_runs_on_runtime_ext(bits: int, sym: bool) -> None:
    """MatMulLowBit computes x @ dequantized W (needs the built runtime_ext library)."""
    pytest.importorskip("graphopt.backends.ext.format")
    from graphopt.backends.ext import library

    try:
        library.library_path()
    except UsageError as e:
        pytest.skip(str(e))
    import onnxruntime as ort
    from _wq_support import weights

    from graphopt.quant.groupwise import quantize_rtn

    model, x = mlp_model(), feeds()
    run_wq(model, "ext", bits=str(bits), sym=str(sym).lower(), group="32")
    proto = ir.serde.serialize_model(model)
    options = library.session_options()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    (h,) = session.run(["h"], {"x": x["x"], "x2": x["x2"]})
    q = quantize_rtn(weights()["w_kn"].T, bits, 32, sym)
    np.testing.assert_allclose(h, x["x"] @ q.dequantize_matmul_weight(), rtol=1e-4, atol=1e-4)


def test_tensorrt_gets_positive_scales() -> None:
    from graphopt.passes.weight_only.convert import read_back

    model = mlp_model()
    run_wq(model, "tensorrt", group="32")
    dqs = [n for n in model.graph if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 2 and all(np.all(read_back(n).scales > 0) for n in dqs)
    signed = mlp_model()
    run_wq(signed, "portable", group="32")
    assert any(
        np.any(read_back(n).scales < 0) for n in signed.graph if n.op_type == "DequantizeLinear"
    )
    with pytest.raises(LoweringError, match="backend 'tensorrt'.*negative quantization scales"):
        run_wq(mlp_model(), "tensorrt", group="32", signed_scale="true")
