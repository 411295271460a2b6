"""``graphopt compare A B --calib DATA --per-layer``: per-value SQNR, worst first."""

from __future__ import annotations

import io as stdio
import json
import math
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from rich.console import Console

QUANT_TESTS = Path(__file__).resolve().parents[1] / "passes" / "quantize"
if str(QUANT_TESTS) not in sys.path:
    sys.path.insert(0, str(QUANT_TESTS))

from _qdq_support import context, convnet, images, run_pass, save

from graphopt.cli.compare_cmd import per_layer_sqnr, run_per_layer_compare
from graphopt.errors import UsageError
from graphopt.passes.quantize.ptq import PtqOptions, PtqPass


@pytest.fixture
def calib_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "calib"
    folder.mkdir()
    for i, feed in enumerate(images(4, batch=4, seed=3)):
        np.savez(folder / f"{i:03d}.npz", **feed)
    return folder


@pytest.fixture
def fp32(tmp_path: Path) -> Path:
    return save(convnet(seed=1), tmp_path / "a" / "cnn.onnx")


def _corrupted(tmp_path: Path, layer_weight: str, noise: float) -> Path:
    """The convnet with noise added to one layer's weight (names unchanged)."""
    model = convnet(seed=1)
    w = model.graph.initializers[layer_weight]
    array = w.const_value.numpy()
    rng = np.random.default_rng(0)
    w.const_value = ir.tensor(array + noise * np.abs(array).max() * rng.standard_normal(array.shape).astype(np.float32))
    return save(model, tmp_path / "b" / "broken.onnx")


def test_the_broken_layer_has_the_largest_drop(fp32: Path, calib_dir: Path, tmp_path: Path) -> None:
    broken = _corrupted(tmp_path, "W2", 0.2)
    result = per_layer_sqnr(fp32, broken, calib_dir)
    by_name = {r.name: r for r in result.layers}
    assert result.samples == 4
    # Upstream of conv2 nothing changed: identical values.
    assert math.isinf(by_name["c1"].sqnr_db) and math.isinf(by_name["p1"].sqnr_db)
    # conv2's output is where the SQNR falls; ReLU, Flatten and the Gemm only carry it on.
    assert by_name["c2"].sqnr_db < 30 and by_name["c2"].inputs_sqnr_db == math.inf
    assert max(result.layers, key=lambda r: r.drop_db).name == "c2"
    first = result.first_below()
    assert first is not None and first.name == "c2"
    assert by_name["logits"].drop_db < by_name["c2"].drop_db
    # Worst first.
    sqnrs = [r.sqnr_db for r in result.layers]
    assert sqnrs == sorted(sqnrs)


def test_on_a_quantized_model(fp32: Path, calib_dir: Path, tmp_path: Path) -> None:
    model = convnet(seed=1)
    run_pass(PtqPass(PtqOptions()), model, context(images(4, batch=4, seed=3)))
    int8 = save(model, tmp_path / "b" / "int8.onnx")
    out = stdio.StringIO()
    result = run_per_layer_compare(
        fp32, int8, calib=calib_dir, samples=2, top=5, as_json=False, threads=1,
        console=Console(file=out, width=140),
    )
    text = out.getvalue()
    assert "per-layer SQNR, worst first" in text and result.samples == 2
    names = {r.name for r in result.layers}
    assert {"c1", "c2", "logits"} <= names
    assert all(15 < r.sqnr_db < 80 for r in result.layers if r.name in ("c1", "c2", "logits"))
    # The quantized input image is matched too (it keeps its name), through Q/DQ only.
    assert text.splitlines()[-1].startswith("largest loss at one value")


def test_json_lists_every_matched_value(
    fp32: Path, calib_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = _corrupted(tmp_path, "W3", 0.1)
    run_per_layer_compare(
        fp32, broken, calib=calib_dir, samples=None, top=3, as_json=True, threads=1,
        console=Console(file=stdio.StringIO()),
    )
    data = json.loads(capsys.readouterr().out)
    assert data["matched"] == len(data["layers"]) and data["samples"] == 4
    assert data["layers"][0]["name"] == "logits"
    assert data["layers"][-1]["sqnr_db"] == "inf"


def test_nothing_in_common_is_a_clear_usage_error(fp32: Path, calib_dir: Path, tmp_path: Path) -> None:
    model = convnet(seed=1)
    for node in model.graph:
        for out in node.outputs:
            if not out.is_graph_output():
                out.name = f"other_{out.name}"
    # Only the graph output is left in common; rename that too (a different model).
    model.graph.outputs[0].name = "scores"
    other = save(model, tmp_path / "b" / "other.onnx")
    with pytest.raises(UsageError, match="no float value under the same name"):
        per_layer_sqnr(fp32, other, calib_dir)


def test_without_calib_is_a_usage_error(fp32: Path) -> None:
    with pytest.raises(UsageError, match="--calib"):
        run_per_layer_compare(fp32, fp32, calib=None, samples=1, top=1, as_json=False,
                              threads=1, console=Console(file=stdio.StringIO()))


def test_cli_flag(fp32: Path, calib_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    from graphopt.cli.main import compare, main

    if not any(p.name == "per_layer" for p in compare.params):
        pytest.skip("graphopt compare has no --per-layer option wired yet (graphopt/cli/main.py)")
    broken = _corrupted(tmp_path, "W2", 0.2)
    capfd.readouterr()
    code = main(["compare", str(fp32), str(broken), "--calib", str(calib_dir), "--per-layer", "--json"])
    captured = capfd.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out)["layers"][0]["sqnr_db"] != "inf"
    code = main(["compare", str(fp32), str(broken), "--per-layer"])
    assert code == 2 and "--calib" in capfd.readouterr().err
