"""The optimize report lists each quantized layer's SQNR and decision."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _qdq_support import convnet, images, save
from rich.console import Console

from graphopt.report import layers_table


def _cli(capfd: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    from graphopt.cli.main import main

    capfd.readouterr()
    code = main([str(a) for a in argv])
    captured = capfd.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def calib_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "calib"
    folder.mkdir()
    for i, feed in enumerate(images(4, batch=4)):
        np.savez(folder / f"{i:03d}.npz", **feed)
    return folder


def test_static_report_lists_layers_with_decisions(
    capfd: pytest.CaptureFixture[str], calib_dir: Path, tmp_path: Path
) -> None:
    model = save(convnet(seed=1), tmp_path / "in" / "cnn.onnx")
    out, report = tmp_path / "q.onnx", tmp_path / "report.json"
    code, stdout, err = _cli(
        capfd, "optimize", model, "-o", out, "--passes", "ptq(exclude=[conv1])",
        "--calib", calib_dir, "--inputs", calib_dir, "--no-latency", "--report", report,
    )
    assert code == 0, err
    layers = json.loads(report.read_text())["passes"][0]["stats"]["layers"]
    by_node = {r["node"]: r for r in layers}
    assert by_node["conv2"]["decision"] == "quantized" and by_node["conv2"]["sqnr_db"] > 20
    assert by_node["fc"]["decision"] == "quantized"
    assert by_node["conv1"]["decision"] == "float"
    assert "excluded" in by_node["conv1"]["reason"] and by_node["conv1"]["sqnr_db"] is None
    assert "2 of 3 layers quantized" in stdout
    assert "conv2" in stdout and "excluded by the user" in stdout


def test_max_loss_decisions_keep_the_sqnr_they_had(
    capfd: pytest.CaptureFixture[str], calib_dir: Path, tmp_path: Path
) -> None:
    model = save(convnet(seed=1), tmp_path / "in" / "cnn.onnx")
    out, report = tmp_path / "q.onnx", tmp_path / "report.json"
    code, stdout, err = _cli(
        capfd, "optimize", model, "-o", out, "--passes", "ptq(max_loss=0.0)",
        "--calib", calib_dir, "--no-latency", "--report", report,
    )
    assert code == 0, err
    layers = json.loads(report.read_text())["passes"][0]["stats"]["layers"]
    assert {r["decision"] for r in layers} == {"float (max_loss)"}
    assert all(isinstance(r["sqnr_db"], float) for r in layers)
    assert "0 of 3 layers quantized" in stdout and "float (max_loss)" in stdout


def test_table_puts_returned_layers_first_and_caps_rows() -> None:
    layers = [{"node": f"q{i}", "op": "MatMul", "decision": "quantized", "reason": "",
               "sqnr_db": 40.0 - i} for i in range(5)]
    layers.append({"node": "back", "op": "MatMul", "decision": "float (max_loss)",
                   "reason": "back: kept in float", "sqnr_db": 12.0})
    console = Console(width=150, record=True)
    console.print(layers_table("ptq", layers, limit=3))
    text = console.export_text()
    rows = [line.split()[0] for line in text.splitlines() if line.strip().startswith(("q", "back"))]
    assert rows == ["back", "q4", "q3"]
    assert "3 more layers in the JSON report" in text
