"""``ptq(mode=dynamic)`` on MiniLM-L6 (dynamo export, opset 20), against ORT's quantize_dynamic.

No calibration data: weights int8 per output channel, activations quantized per run.
Quality: mean cosine of mean-pooled, L2-normalised sentence embeddings against fp32 on
the 455 held-apart ``evaluation_split()`` sentences, sessions with ORT's default
optimizations (what users deploy). The bar (issue 4): >= 0.99 and >= ONNX Runtime's
``quantize_dynamic`` (per-channel, s8 weights) on the same sentences. Latency is compared
in ``tools/bench_ptq.py`` (interleaved), not here.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from graphopt.api import OptimizeConfig, optimize
from models import minilm, text

pytestmark = pytest.mark.slow

MIN_COSINE = 0.99


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, dict]:  # type: ignore[type-arg]
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = minilm.build("dynamo")
    work = tmp_path_factory.mktemp("ptq-dynamic-minilm")
    ours = work / "minilm-dynamic.onnx"
    report = optimize(
        src, ours, OptimizeConfig(passes="ptq(mode=dynamic)", verify=False, latency=False)
    )
    theirs = work / "minilm-ort-dynamic.onnx"
    logging.getLogger().setLevel(logging.ERROR)  # ORT's pre-processing advice
    quantize_dynamic(str(src), str(theirs), per_channel=True, weight_type=QuantType.QInt8)
    (record,) = report.passes
    return src, ours, theirs, record.stats


def test_cosine_at_least_ort_quantize_dynamic(models) -> None:  # type: ignore[no-untyped-def]
    src, ours, theirs, _ = models
    sentences = text.evaluation_split()
    assert len(sentences) >= 300
    ref = minilm.embed(src, sentences)
    cos_ours = minilm.embedding_cosine(ref, minilm.embed(ours, sentences))
    cos_theirs = minilm.embedding_cosine(ref, minilm.embed(theirs, sentences))
    assert cos_ours >= MIN_COSINE, cos_ours
    assert cos_ours >= cos_theirs, (cos_ours, cos_theirs)


def test_projections_run_as_fused_integer_kernels(models, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, ours, _, stats = models
    assert stats["nodes_by_op"] == {"MatMul": 36}
    assert stats["skipped"] == {"act-x-act": 12}
    assert stats["weight_spec"] == [s for s in stats["weight_spec"] if ":axis1" in s]
    assert [r["decision"] for r in stats["layers"]].count("quantized") == 36
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(ours), options, providers=["CPUExecutionProvider"])
    fused = Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
    assert fused["MatMulIntegerToFloat"] + fused["DynamicQuantizeMatMul"] == 36, fused
    assert fused["MatMulInteger"] == 0
    # Projection weights and embedding tables stored int8: about a quarter of fp32.
    assert ours.stat().st_size < 0.3 * minilm.build("dynamo").stat().st_size


def test_per_layer_compare_finds_the_quantized_projections(models, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """``compare --per-layer`` on the real int8 model: every projection output is matched
    (it keeps its name; its producer is now the rescaling Mul), fp32 vs int8 per value."""
    import numpy as np

    from graphopt.cli.compare_cmd import per_layer_sqnr

    src, ours, _, _ = models
    calib = tmp_path / "calib"
    calib.mkdir()
    sentences = text.calibration_split()[:32]
    for i in range(0, len(sentences), 8):
        np.savez(calib / f"{i // 8}.npz", **minilm.tokenize(sentences[i : i + 8], pad_to_max=False))
    result = per_layer_sqnr(src, ours, calib, samples=4)
    assert result.samples == 4
    projections = [r for r in result.layers if r.op_a == "MatMul" and r.op_b == "Mul"]
    assert len(projections) == 36
    assert all(3.0 < r.sqnr_db < 60.0 for r in projections)
    # Layer 0's Q, K and V see int8 noise only from their own input: above 25 dB.
    first_layer = sorted(projections, key=lambda r: r.position)[:3]
    assert all(r.sqnr_db > 25.0 for r in first_layer), [(r.name, r.sqnr_db) for r in first_layer]
    by_name = {r.name: r for r in result.layers}
    assert "last_hidden_state" in by_name
    # Noise accumulates with depth: the worst values sit after the first layers.
    positions = sorted(r.position for r in result.layers)
    assert result.layers[0].position > positions[len(positions) // 4]
    sqnrs = [r.sqnr_db for r in result.layers]
    assert sqnrs == sorted(sqnrs)
