"""``graphopt optimize --passes ptq`` on MiniLM-L6 (dynamo export, opset 20): static int8.

Calibration: the 300 sentences of ``models.text.calibration_split()``, tokenized 8 per
feed and padded to the longest of each feed (so feeds have different sequence lengths),
written as a ``--calib`` folder of ``.npz`` files. Evaluation: mean cosine of the
mean-pooled, L2-normalised sentence embeddings against fp32 on the held-apart
``evaluation_split()`` (455 sentences, never calibrated on).

What must hold (the issue's bar): cosine >= 0.99 (ONNX Runtime's ``quantize_static`` QDQ
per-channel MinMax reaches 0.366 on this model: it quantizes the -3.4e38 attention-mask
path). Also: every projection (36 MatMuls) quantized, the attention products and the mask
path left in float, and ORT runs every projection as MatMulIntegerToFloat.

The per-output SQNR criterion of the ``quantized`` tolerance (30 dB) is replaced here by
the task metric (RELIABILITY.md: "SQNR >= 30 dB per output, or the task metric"): the
encoder's hidden states carry per-tensor int8 noise of ~20 dB that mean pooling averages
out.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
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


def write_calibration(folder: Path, batch: int = 8) -> int:
    """Tokenized calibration split as a --calib folder; returns the number of feeds."""
    folder.mkdir(parents=True, exist_ok=True)
    sentences = text.calibration_split()
    count = 0
    for i in range(0, len(sentences), batch):
        feed = minilm.tokenize(sentences[i : i + batch], pad_to_max=False)
        np.savez(folder / f"{count:04d}.npz", **feed)
        count += 1
    return count


def _no_optimizations() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return options


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:  # type: ignore[type-arg]
    src = minilm.build("dynamo")
    work = tmp_path_factory.mktemp("ptq-minilm")
    feeds = write_calibration(work / "calib")
    assert feeds == 38
    out = work / "minilm-int8.onnx"
    report = optimize(
        src,
        out,
        OptimizeConfig(passes="ptq", calib=work / "calib", verify=False, latency=False),
    )
    (record,) = report.passes
    return src, out, record.stats


def test_embedding_cosine_on_held_apart_sentences(quantized) -> None:  # type: ignore[no-untyped-def]
    src, out, _ = quantized
    sentences = text.evaluation_split()
    assert len(sentences) >= 300
    assert not set(sentences) & set(text.calibration_split())
    ref = minilm.embed(src, sentences, session_options=_no_optimizations())
    got = minilm.embed(out, sentences, session_options=_no_optimizations())
    cosine = minilm.embedding_cosine(ref, got)
    assert cosine >= MIN_COSINE, cosine
    # ORT's own optimizations (what users deploy) keep it.
    fast = minilm.embed(out, sentences[:96])
    assert minilm.embedding_cosine(ref[:96], fast) >= MIN_COSINE


def test_what_was_quantized(quantized) -> None:  # type: ignore[no-untyped-def]
    _, out, stats = quantized
    assert stats["nodes_by_op"] == {"MatMul": 36}
    assert stats["skipped"].get("act-x-act") == 12
    assert stats["calibration_samples"] == 38
    model = onnx.load(str(out))
    inits = {t.name: t for t in model.graph.initializer}
    # The -3.4e38 mask constants and the attention math stay float.
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["Softmax"] == 6 and ops["LayerNormalization"] == 13
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            src = producers.get(node.input[0])
            assert src is None or src.op_type not in ("Where", "Softmax"), node.name
    int8 = {t.name for t in inits.values() if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2}
    # 36 projection weights and the word and position embedding tables.
    assert len(int8) == 38, sorted(int8)
    assert stats["embedding_tables_quantized"] == 2


def test_ort_runs_integer_kernels(quantized, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, out, _ = quantized
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
    assert ops["MatMulIntegerToFloat"] == 36, ops
    # Projections and embedding tables (46.9 MB of word embeddings) shrink 4x.
    assert out.stat().st_size < 0.3 * minilm.build("dynamo").stat().st_size
