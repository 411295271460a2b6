"""Tests for the model recipes in ``models/`` (corpus, tokenizer, cache, exports).

Real-model tests are marked ``slow``; they build into the shared model cache, so only the
first run pays for the exports (about 30 s on 2 cores) and later runs reuse them.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # `pytest` (not `python -m pytest`) from elsewhere
    sys.path.insert(0, str(REPO_ROOT))

from models import cache, digits_cnn, minilm, text

os.environ.setdefault("HF_HUB_OFFLINE", "1")

N_REFERENCE_SENTENCES = 16
COSINE_FLOOR = 0.9999


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def minilm_dynamo() -> Path:
    return minilm.build("dynamo")


@pytest.fixture(scope="session")
def minilm_torchscript() -> Path:
    return minilm.build("torchscript")


@pytest.fixture(scope="session")
def digits_model() -> Path:
    return digits_cnn.build()


@pytest.fixture(scope="session")
def reference_sentences() -> list[str]:
    # All well under 128 tokens, so neither side truncates (sentence-transformers cuts
    # at 256, the ONNX helpers at 128).
    return text.evaluation_split()[:N_REFERENCE_SENTENCES]


@pytest.fixture(scope="session")
def reference_embeddings(reference_sentences: list[str]) -> np.ndarray:
    """Embeddings from the sentence-transformers package itself (pooling + normalise)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm.model_dir()), device="cpu")
    return np.asarray(model.encode(reference_sentences, convert_to_numpy=True))


def _no_opt() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return options


def _dims(value_info: onnx.ValueInfoProto) -> list[str | int]:
    return [
        d.dim_param if d.HasField("dim_param") else d.dim_value
        for d in value_info.type.tensor_type.shape.dim
    ]


def _assert_minilm_signature(path: Path, opset: int) -> onnx.ModelProto:
    model = onnx.load(str(path), load_external_data=False)
    assert {o.domain: o.version for o in model.opset_import}[""] == opset
    assert [i.name for i in model.graph.input] == list(minilm.INPUT_NAMES)
    for value in model.graph.input:
        assert value.type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert _dims(value) == ["batch", "sequence"]
    (output,) = model.graph.output
    assert output.name == "last_hidden_state"
    assert output.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert _dims(output) == ["batch", "sequence", 384]
    # Self-contained: no initializer points at an external data file.
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    return model


# --------------------------------------------------------------------------- corpus


def test_corpus_split_sizes_and_disjoint() -> None:
    sentences = text.load_sentences()
    calibration = text.calibration_split()
    evaluation = text.evaluation_split()
    assert len(sentences) >= 700
    assert len(set(sentences)) == len(sentences), "corpus has duplicate lines"
    assert all(s and s == s.strip() for s in sentences)
    assert len(calibration) == text.CALIBRATION_SIZE == 300
    assert len(evaluation) >= 400
    assert calibration + evaluation == sentences
    assert not set(calibration) & set(evaluation)
    assert minilm.evaluation_sentences() == evaluation


def test_load_sentences_returns_fresh_lists() -> None:
    first = text.load_sentences()
    first.clear()
    assert len(text.load_sentences()) >= 700


# --------------------------------------------------------------------------- tokenizer


def test_tokenize_shapes_and_dtypes() -> None:
    sentences = ["Hello world.", "A somewhat longer sentence, with punctuation and 42 numbers!"]
    feeds = minilm.tokenize(sentences, seq_len=128)
    assert list(feeds) == list(minilm.INPUT_NAMES)
    for array in feeds.values():
        assert array.dtype == np.int64
        assert array.shape == (2, 128)
    assert (feeds["input_ids"][:, 0] == 101).all()  # [CLS]
    assert (feeds["token_type_ids"] == 0).all()
    lengths = feeds["attention_mask"].sum(axis=1)
    assert 2 < lengths[0] < lengths[1] < 128
    assert (feeds["input_ids"][0, lengths[0] :] == 0).all()  # [PAD] after the text

    ragged = minilm.tokenize(sentences, seq_len=128, pad_to_max=False)
    assert ragged["input_ids"].shape == (2, int(lengths[1]))
    np.testing.assert_array_equal(ragged["input_ids"], feeds["input_ids"][:, : lengths[1]])


def test_tokenize_truncates_and_handles_empty() -> None:
    long = " ".join(["word"] * 300)
    feeds = minilm.tokenize([long], seq_len=32, pad_to_max=False)
    assert feeds["input_ids"].shape == (1, 32)
    assert feeds["input_ids"][0, -1] == 102  # [SEP] kept after truncation
    empty = minilm.tokenize([], seq_len=16)
    assert all(a.shape == (0, 16) and a.dtype == np.int64 for a in empty.values())
    with pytest.raises(ValueError):
        minilm.tokenize(["x"], seq_len=1000)
    with pytest.raises(TypeError):
        minilm.tokenize("not a list")  # type: ignore[arg-type]


def test_calibration_feeds_come_from_calibration_split() -> None:
    feeds = minilm.calibration_feeds(n=20, batch=8, seq_len=64)
    assert [f["input_ids"].shape for f in feeds] == [(8, 64), (8, 64), (4, 64)]
    expected = minilm.tokenize(text.calibration_split()[:8], seq_len=64)
    np.testing.assert_array_equal(feeds[0]["input_ids"], expected["input_ids"])
    with pytest.raises(ValueError):
        minilm.calibration_feeds(n=301)


# --------------------------------------------------------------------------- pooling


def test_mean_pool_ignores_padding_and_normalises() -> None:
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(2, 5, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=np.int64)
    pooled = minilm.mean_pool(hidden, mask)
    noisy = hidden.copy()
    noisy[0, 3:] = 1e6  # padding positions must not matter
    np.testing.assert_allclose(minilm.mean_pool(noisy, mask), pooled, rtol=1e-6)
    expected = hidden[0, :3].mean(axis=0)
    np.testing.assert_allclose(pooled[0], expected / np.linalg.norm(expected), rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(pooled, axis=1), 1.0, rtol=1e-6)


def test_embedding_cosine() -> None:
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    assert minilm.embedding_cosine(a, a) == pytest.approx(1.0)
    assert minilm.embedding_cosine(a, a[::-1]) == pytest.approx(0.0)
    assert minilm.embedding_cosine(a, np.array([[1.0, 0.0], [0.0, -1.0]])) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        minilm.embedding_cosine(a, a[:1])


# --------------------------------------------------------------------------- cache


def test_cached_build_skips_rebuilds_and_is_atomic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    calls: list[Path] = []

    def builder(dest: Path) -> None:
        calls.append(dest)
        assert dest.parent == cache.cache_dir()
        dest.write_bytes(b"model-" + str(len(calls)).encode())

    out = cache.cached_build("m.onnx", "v1", builder)
    assert out == tmp_path / "cache" / "m.onnx"
    assert out.read_bytes() == b"model-1"
    assert cache.cached_build("m.onnx", "v1", builder) == out
    assert len(calls) == 1, "a current build must be skipped"
    cache.cached_build("m.onnx", "v2", builder)
    assert out.read_bytes() == b"model-2", "a new recipe version must rebuild"
    cache.cached_build("m.onnx", "v2", builder, force=True)
    assert len(calls) == 3

    def failing(dest: Path) -> None:
        dest.write_bytes(b"half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        cache.cached_build("m.onnx", "v3", failing)
    assert out.read_bytes() == b"model-3", "a failed build must not replace the artifact"
    assert not cache.is_current(out, "v3")
    assert not cache.is_current(out, "v2"), "the old stamp is dropped before rebuilding"
    assert not list((tmp_path / "cache").glob("*.tmp")), "temporary files left behind"


def test_cache_dir_default_is_under_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cache.CACHE_ENV, raising=False)
    assert cache.cache_dir() == REPO_ROOT / ".cache" / "models"


# --------------------------------------------------------------------------- digits


def test_digits_dataset_split() -> None:
    x_train, y_train, x_test, y_test = digits_cnn.dataset()
    assert x_train.dtype == x_test.dtype == np.float32
    assert y_train.dtype == y_test.dtype == np.int64
    assert x_train.shape == (1347, 1, 8, 8) and x_test.shape == (450, 1, 8, 8)
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0
    assert set(np.unique(y_test)) == set(range(10))


@pytest.mark.slow
def test_digits_cnn_onnx_accuracy(digits_model: Path) -> None:
    model = onnx.load(str(digits_model))
    assert {o.domain: o.version for o in model.opset_import}[""] == 17
    ops = {n.op_type for n in model.graph.node}
    assert {"Conv", "BatchNormalization", "Relu", "MaxPool", "Flatten", "Gemm"} <= ops
    assert [i.name for i in model.graph.input] == ["image"]
    assert _dims(model.graph.input[0]) == ["batch", 1, 8, 8]
    assert _dims(model.graph.output[0]) == ["batch", 10]
    assert digits_cnn.accuracy(digits_model, _no_opt()) >= 0.95
    assert digits_cnn.accuracy(digits_model) >= 0.95


# --------------------------------------------------------------------------- MiniLM


@pytest.mark.slow
def test_minilm_dynamo_export_matches_sentence_transformers(
    minilm_dynamo: Path,
    reference_sentences: list[str],
    reference_embeddings: np.ndarray,
) -> None:
    _assert_minilm_signature(minilm_dynamo, opset=20)
    embeddings = minilm.embed(minilm_dynamo, reference_sentences, batch=8)
    assert embeddings.shape == (N_REFERENCE_SENTENCES, 384)
    assert minilm.embedding_cosine(embeddings, reference_embeddings) >= COSINE_FLOOR
    unoptimised = minilm.embed(minilm_dynamo, reference_sentences, session_options=_no_opt())
    assert minilm.embedding_cosine(unoptimised, reference_embeddings) >= COSINE_FLOOR


@pytest.mark.slow
def test_minilm_torchscript_export_matches_sentence_transformers(
    minilm_torchscript: Path,
    reference_sentences: list[str],
    reference_embeddings: np.ndarray,
) -> None:
    _assert_minilm_signature(minilm_torchscript, opset=17)
    embeddings = minilm.embed(minilm_torchscript, reference_sentences, batch=8)
    assert minilm.embedding_cosine(embeddings, reference_embeddings) >= COSINE_FLOOR


@pytest.mark.slow
def test_minilm_runs_fixed_length_calibration_feeds(minilm_dynamo: Path) -> None:
    session = ort.InferenceSession(str(minilm_dynamo), providers=["CPUExecutionProvider"])
    (feed,) = minilm.calibration_feeds(n=4, batch=4, seq_len=128)
    (hidden,) = session.run(None, feed)
    assert hidden.shape == (4, 128, 384) and hidden.dtype == np.float32
    assert np.isfinite(hidden).all()


@pytest.mark.slow
def test_minilm_second_build_is_a_cache_hit(minilm_dynamo: Path) -> None:
    stat = minilm_dynamo.stat()
    start = time.perf_counter()
    assert minilm.build("dynamo") == minilm_dynamo
    assert time.perf_counter() - start < 1.0
    assert minilm_dynamo.stat().st_mtime_ns == stat.st_mtime_ns
