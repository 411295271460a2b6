"""``graphopt optimize --passes fuse`` on MiniLM-L6, both exports, for ``ort`` and ``tensorrt``.

The dynamo (opset 20) and TorchScript (opset 17) exports of the encoder
(``models.minilm.build``) each go through :func:`graphopt.api.optimize`: the ``fuse``
pass, then verification against the original on ONNX Runtime (optimizations off) under the
``fusion`` tolerance on real, padded sentences; nothing is published if they disagree.

What must happen:

* ``ort``: every one of the 6 layers has its attention fused (com.microsoft ``Attention``
  or ``MultiHeadAttention``: 6), both residual LayerNorms (``SkipLayerNormalization``: 12)
  and its GELU (``BiasGelu``/``Gelu``: 6), and no attention internals (Softmax, the
  traced mask's Range/Flatten) are left.
* ``tensorrt``: no com.microsoft op at all.
* For both: sentence embeddings (``models.minilm.embed``: mean-pooled, L2-normalised) of
  96 held-out sentences, batched 16 at a time and padded to the longest of each batch,
  have a mean cosine >= 0.99999 against the unfused export (every row >= 0.9999).
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
if str(REPO_ROOT) not in sys.path:  # `pytest` (not `python -m pytest`) from elsewhere
    sys.path.insert(0, str(REPO_ROOT))

from graphopt.api import OptimizeConfig, optimize
from models import minilm

pytestmark = pytest.mark.slow

EXPORTERS = ("dynamo", "torchscript")
LAYERS = 6
N_SENTENCES = 96
MIN_COSINE = 0.99999


@pytest.fixture(scope="module")
def sentences() -> list[str]:
    held_out = minilm.evaluation_sentences()[:N_SENTENCES]
    assert len(held_out) == N_SENTENCES
    padded = sum(
        int((minilm.tokenize(held_out[i : i + 16], pad_to_max=False)["attention_mask"] == 0).sum())
        for i in range(0, N_SENTENCES, 16)
    )
    assert padded > 100, "the embedding batches must contain padding"
    return held_out


def _no_optimizations() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 2
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


@pytest.fixture(scope="module", params=EXPORTERS)
def export(request: pytest.FixtureRequest, sentences: list[str]) -> tuple[str, Path, np.ndarray]:
    """(exporter, unfused model, its embeddings of the held-out sentences)."""
    path = minilm.build(request.param)
    reference = minilm.embed(path, sentences, batch=16, session_options=_no_optimizations())
    return request.param, path, reference


@pytest.fixture(scope="module")
def feeds_dir(tmp_path_factory: pytest.TempPathFactory, sentences: list[str]) -> Path:
    """Verification feeds: real sentences, padded (to the longest and to 128 tokens)."""
    folder = tmp_path_factory.mktemp("minilm-feeds")
    batches = [
        minilm.tokenize(sentences[:8], pad_to_max=False),
        minilm.tokenize(sentences[8:12], seq_len=128, pad_to_max=True),
    ]
    for i, feed in enumerate(batches):
        assert (feed["attention_mask"] == 0).any(), "the feeds must contain padding"
        np.savez(folder / f"feed{i}.npz", **feed)
    return folder


def _fuse(src: Path, dst: Path, target: str, feeds: Path) -> Counter[str]:
    config = OptimizeConfig(
        passes="fuse", target=target, inputs=feeds, latency=False, overwrite=True,
        plugins=False,
    )
    report = optimize(src, dst, config)
    assert report.agreement is not None and report.agreement.passed, report.agreement
    model = onnx.load(str(dst), load_external_data=False)
    return Counter(
        f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
        for n in model.graph.node
    )


def _assert_same_embeddings(
    path: Path, sentences: list[str], reference: np.ndarray
) -> None:
    got = minilm.embed(path, sentences, batch=16, session_options=_no_optimizations())
    cosine = minilm.embedding_cosine(reference, got)
    rows = np.sum(reference * got, axis=1) / (
        np.linalg.norm(reference, axis=1) * np.linalg.norm(got, axis=1)
    )
    assert cosine >= MIN_COSINE, f"mean cosine {cosine:.8f}"
    assert rows.min() >= 0.9999, f"worst sentence cosine {rows.min():.8f}"


def test_fuse_for_ort(
    export: tuple[str, Path, np.ndarray], sentences: list[str], feeds_dir: Path,
    tmp_path: Path,
) -> None:
    exporter, src, reference = export
    dst = tmp_path / f"{exporter}-ort.onnx"
    ops = _fuse(src, dst, "ort", feeds_dir)
    attention = ops["com.microsoft::Attention"] + ops["com.microsoft::MultiHeadAttention"]
    gelu = ops["com.microsoft::BiasGelu"] + ops["com.microsoft::Gelu"]
    assert attention == LAYERS, ops
    assert ops["com.microsoft::SkipLayerNormalization"] == 2 * LAYERS, ops
    assert gelu == LAYERS, ops
    for internal in ("Softmax", "IsNaN", "Erf", "Flatten", "Div"):
        assert ops[internal] == 0, f"{internal} left: {ops}"
    _assert_same_embeddings(dst, sentences, reference)


def test_fuse_for_tensorrt(
    export: tuple[str, Path, np.ndarray], sentences: list[str], feeds_dir: Path,
    tmp_path: Path,
) -> None:
    exporter, src, reference = export
    dst = tmp_path / f"{exporter}-tensorrt.onnx"
    ops = _fuse(src, dst, "tensorrt", feeds_dir)
    assert not [op for op in ops if "::" in op], ops
    _assert_same_embeddings(dst, sentences, reference)
