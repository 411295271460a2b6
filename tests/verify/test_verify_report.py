"""Report: model facts, strict JSON, atomic write, terminal rendering."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from rich.console import Console
from verify_builders import two_head_model

from graphopt.infra.instruments import PassRecord
from graphopt.report import Report, count_parameters, files_size, histogram
from graphopt.verify.compare import FUSION, compare_outputs
from graphopt.verify.latency import LatencyStats


def _report(tmp_path: Path) -> Report:
    ref = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    agreement = compare_outputs(
        {"logits": ref, "ids": np.arange(3)},
        {"logits": ref + np.float32(1e-7), "ids": np.arange(3)},
        FUSION,
    )
    latency = {
        "before": LatencyStats.from_samples(
            "before", [10.0, 11.0, 12.0], warmup=1, threads=2, optimized=True
        ),
        "after": LatencyStats.from_samples(
            "after", [7.0, 7.5, 8.0], warmup=1, threads=2, optimized=True
        ),
    }
    return Report(
        input_path=tmp_path / "in.onnx",
        output_path=str(tmp_path / "out.onnx"),
        pipeline="fuse,prune(heads=0.25)",
        tolerance="fusion",
        size_before=4_000_000,
        size_after=1_000_000,
        params_before=1_000_000,
        params_after=250_000,
        ops_before={"MatMul": 6, "Add": 6, "Relu": 2},
        ops_after={"Gemm": 6, "Relu": 2},
        passes=[
            PassRecord(
                name="fuse-gemm",
                text="fuse-gemm",
                seconds=0.0123,
                modified=True,
                nodes_before=14,
                nodes_after=8,
                stats={"fused": 6, "score": math.inf, "loss": math.nan, "arr": np.int64(3)},
                preserved=["WEIGHTS"],
            ),
            PassRecord("dce", "dce", 0.001, False, 8, 8, {}, ["ALL"]),
        ],
        agreement=agreement,
        latency=latency,
        total_seconds=1.5,
        warnings=["node 'loop1' body skipped"],
    )


def test_to_dict_is_strict_json_and_round_trips(tmp_path: Path) -> None:
    report = _report(tmp_path)
    data = report.to_dict()
    text = json.dumps(data, allow_nan=False)
    assert json.loads(text) == data
    assert list(data)[:4] == ["format", "version", "input", "output"]
    assert data["size_bytes"] == {"before": 4_000_000, "after": 1_000_000, "ratio": 0.25}
    assert data["ops"]["changed"] == {"Add": [6, 0], "Gemm": [0, 6], "MatMul": [6, 0]}
    assert data["nodes"] == {"before": 14, "after": 8}
    assert data["passes"][0]["stats"] == {"fused": 6, "score": "inf", "loss": None, "arr": 3}
    assert data["agreement"]["passed"] is True
    ids = data["agreement"]["outputs"][1]
    assert ids["name"] == "ids" and ids["sqnr_db"] == "inf"
    assert data["latency"]["ratio"] == 7.5 / 11.0
    # Stable: the same report gives the same text.
    assert report.to_json() == _report(tmp_path).to_json()


def test_write_json_is_atomic(tmp_path: Path) -> None:
    dest = tmp_path / "report.json"
    dest.write_text("old")
    _report(tmp_path).write_json(dest)
    assert json.loads(dest.read_text())["pipeline"] == "fuse,prune(heads=0.25)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_render_shows_the_key_figures(tmp_path: Path) -> None:
    console = Console(record=True, width=120)
    _report(tmp_path).render(console)
    text = console.export_text()
    assert "4.0 MB" in text and "1.0 MB" in text and "0.25×" in text
    assert "PASS (fusion" in text
    assert "11.00 ms" in text and "7.50 ms" in text and "0.68×" in text
    assert "Gemm" in text and "MatMul" in text and "-6" in text and "+6" in text
    assert "Relu" not in text  # unchanged ops are not listed
    assert "fuse-gemm" in text and "14 → 8" in text and "fused=6" in text
    assert "dce" in text
    assert "warning: node 'loop1' body skipped" in text


def test_render_failure_and_missing_parts(tmp_path: Path) -> None:
    ref = np.ones((2, 2), np.float32)
    failed = compare_outputs({"y": ref}, {"y": ref * 2}, FUSION)
    report = Report(input_path="m.onnx", output_path=None, agreement=failed)
    console = Console(record=True, width=120)
    report.render(console)
    text = console.export_text()
    assert (
        "FAIL (fusion" in text and "outputs outside tolerance" in text and "(not written)" in text
    )
    json.dumps(report.to_dict(), allow_nan=False)


def test_model_facts(
    weights: tuple[np.ndarray, np.ndarray], save: Callable[..., Path], tmp_path: Path
) -> None:
    proto = two_head_model(*weights)
    path = save(proto, "ext.onnx", external=True)
    data = tmp_path / "ext.onnx.data"
    assert files_size(path) == path.stat().st_size + data.stat().st_size
    assert count_parameters(proto) == 4 * 3 * 2 + 3
    model = ir.serde.deserialize_model(proto)
    assert count_parameters(model) == count_parameters(proto)
    assert histogram(model) == histogram(proto) == {"Add": 1, "ArgMax": 1, "MatMul": 2}
    assert histogram(onnx.load(str(path), load_external_data=False))["MatMul"] == 2
