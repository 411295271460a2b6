"""The ``ptq`` pass: options, statistics, usage errors through the CLI, max_loss."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from _qdq_support import context, convnet, images, ops, outputs, run_pass, save

from graphopt.errors import UsageError
from graphopt.infra.registry import default_registry
from graphopt.passes.quantize.ptq import PtqOptions, PtqPass


def _cli(capfd: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str]:
    from graphopt.cli.main import main

    capfd.readouterr()
    code = main([str(a) for a in argv])
    return code, capfd.readouterr().err


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    return save(convnet(seed=1), tmp_path / "in" / "cnn.onnx")


@pytest.fixture
def calib_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "calib"
    folder.mkdir()
    for i, feed in enumerate(images(6, batch=4)):
        np.savez(folder / f"{i:03d}.npz", **feed)
    return folder


def test_registered_with_the_quantized_tolerance() -> None:
    registry = default_registry(plugins=False)
    pm = registry.build("ptq(calib=percentile,exclude=[Gemm,conv2],max_loss=0.01)")
    (p,) = pm.passes
    assert isinstance(p, PtqPass) and p.info.tolerance == "quantized"
    assert p.options.exclude == ("Gemm", "conv2") and p.options.calib == "percentile"
    assert registry.build(pm.to_text()).to_text() == pm.to_text()
    with pytest.raises(UsageError, match="calib"):
        registry.build("ptq(calib=kl)")


def test_without_calib_exits_2_naming_the_flag(
    capfd: pytest.CaptureFixture[str], model_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "q.onnx"
    code, err = _cli(capfd, "optimize", model_path, "-o", out, "--passes", "ptq", "--no-latency")
    assert code == 2, err
    assert "--calib" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_dynamic_mode_needs_no_calib_but_a_dynamic_target(
    capfd: pytest.CaptureFixture[str], model_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "q.onnx"
    code, err = _cli(
        capfd, "optimize", model_path, "-o", out, "--passes", "ptq(mode=dynamic)",
        "--no-latency",
    )
    assert code == 0, err
    assert "MatMulInteger" in ops(ir.load(out))
    trt = tmp_path / "trt.onnx"
    code, err = _cli(
        capfd, "optimize", model_path, "-o", trt, "--passes", "ptq(mode=dynamic)",
        "--target", "tensorrt", "--no-latency",
    )
    assert code == 2 and "dynamic" in err and len(err.strip().splitlines()) == 1
    assert not trt.exists()


def test_cli_quantizes_verifies_and_reports(
    capfd: pytest.CaptureFixture[str], model_path: Path, calib_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "q.onnx"
    report = tmp_path / "report.json"
    code, err = _cli(
        capfd, "optimize", model_path, "-o", out, "--passes", "ptq", "--calib", calib_dir,
        "--inputs", calib_dir, "--no-latency", "--report", report,
    )
    assert code == 0, err
    data = json.loads(report.read_text())
    stats = data["passes"][0]["stats"]
    assert stats["nodes_quantized"] == 3 and stats["calibration_samples"] == 6
    assert data["tolerance"] == "quantized"
    assert out.stat().st_size < model_path.stat().st_size
    loaded = ir.load(out)
    assert "QuantizeLinear" in ops(loaded) and "DequantizeLinear" in ops(loaded)


def test_stats_name_what_was_skipped_and_layer_sqnr() -> None:
    model = convnet(seed=1)
    result = run_pass(PtqPass(PtqOptions(exclude=("fc",))), model, context(images(4)))
    stats = result.stats
    assert stats["nodes_quantized"] == 2 and stats["skipped"] == {"excluded": 1}
    assert any("fc: excluded" in r for r in stats["skip_reasons"])
    assert set(stats["layer_sqnr_db"]) == {"conv1", "conv2"}
    assert all(v > 25 for v in stats["layer_sqnr_db"].values())
    assert stats["observer"] == "mse" and stats["activation_spec"] == "u8:asym:tensor"


def test_max_loss_keeps_sensitive_nodes_in_float() -> None:
    feeds = images(4)
    reference = convnet(seed=1)
    ref_proto = ir.serde.serialize_model(reference)
    # An unreachable bound: every node goes back to float and the model is unchanged.
    model = convnet(seed=1)
    result = run_pass(PtqPass(PtqOptions(max_loss=0.0)), model, context(feeds))
    assert sorted(result.stats["kept_float_for_max_loss"]) == ["conv1", "conv2", "fc"]
    assert "QuantizeLinear" not in ops(model)
    np.testing.assert_array_equal(outputs(ref_proto, feeds[0])[0], outputs(model, feeds[0])[0])
    # A loose bound keeps everything quantized.
    model = convnet(seed=1)
    result = run_pass(PtqPass(PtqOptions(max_loss=0.5)), model, context(feeds))
    assert result.stats["kept_float_for_max_loss"] == []
    assert result.stats["output_loss"] <= 0.5 and result.stats["nodes_quantized"] == 3


def test_max_loss_bound_holds_when_reachable() -> None:
    feeds = images(4)
    full = run_pass(PtqPass(PtqOptions(calib="minmax", max_loss=0.9)), convnet(seed=1), context(feeds))
    assert full.stats["nodes_quantized"] == 3 and full.stats["kept_float_for_max_loss"] == []
    bound = full.stats["output_loss"] / 3
    model = convnet(seed=1)
    result = run_pass(PtqPass(PtqOptions(calib="minmax", max_loss=bound)), model, context(feeds))
    assert result.stats["output_loss"] <= bound
    kept = result.stats["kept_float_for_max_loss"]
    assert 0 < len(kept) < 3, kept
    assert result.stats["nodes_quantized"] == 3 - len(kept)
    assert result.stats["skipped"]["max-loss"] == len(kept)


def test_samples_option_limits_calibration() -> None:
    result = run_pass(PtqPass(PtqOptions(samples=2)), convnet(), context(images(5)))
    assert result.stats["calibration_samples"] == 2


def test_nan_in_calibration_is_exit_3(
    capfd: pytest.CaptureFixture[str], model_path: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    feed = images(1)[0]
    feed["image"][0, 0, 0, 0] = np.nan
    np.savez(folder / "000.npz", **feed)
    code, err = _cli(
        capfd, "optimize", model_path, "-o", tmp_path / "q.onnx", "--passes", "ptq",
        "--calib", folder, "--no-latency",
    )
    assert code == 3 and "NaN" in err
