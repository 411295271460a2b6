"""Tests for the SmolLM2-135M recipe (``models/smollm2.py``): exports, KV cache, data, perplexity.

All tests are ``slow``: they build both exports into the shared model cache (a few minutes
on 2 cores the first time; later runs reuse the cached files and take about a minute).
"""

from __future__ import annotations

import logging
import math
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

from models import smollm2

pytestmark = pytest.mark.slow

logger = logging.getLogger(__name__)

ATOL = 1e-3


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def no_cache_path() -> Path:
    return smollm2.build("no-cache")


@pytest.fixture(scope="session")
def kv_cache_path() -> Path:
    return smollm2.build("kv-cache")


@pytest.fixture(scope="session")
def no_cache_session(no_cache_path: Path) -> ort.InferenceSession:
    return smollm2.make_session(no_cache_path, optimize=False)


@pytest.fixture(scope="session")
def kv_cache_session(kv_cache_path: Path) -> ort.InferenceSession:
    return smollm2.make_session(kv_cache_path, optimize=False)


def _dims(value_info: onnx.ValueInfoProto) -> list[str | int]:
    return [
        d.dim_param if d.HasField("dim_param") else d.dim_value
        for d in value_info.type.tensor_type.shape.dim
    ]


def _run_no_cache(session: ort.InferenceSession, ids: np.ndarray) -> np.ndarray:
    (logits,) = session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    return logits


# --------------------------------------------------------------------------- data


def test_prose_is_long_enough_and_split_disjoint() -> None:
    tokens = smollm2.load_prose_tokens()
    assert tokens.dtype == np.int64 and tokens.ndim == 1
    assert len(tokens) >= 9000
    split = smollm2.split_index()
    assert split == int(len(tokens) * smollm2.CALIBRATION_FRACTION)
    np.testing.assert_array_equal(smollm2.calibration_tokens(), tokens[:split])
    np.testing.assert_array_equal(smollm2.evaluation_tokens(), tokens[split:])
    words = smollm2.PROSE_PATH.read_text(encoding="utf-8").split()
    assert 7000 <= len(words) <= 9500


@pytest.mark.parametrize("n", [4, 20])  # within the disjoint tiles, and beyond (overlapping)
def test_calibration_windows_stay_in_calibration_part(n: int) -> None:
    window = 256
    tokens = smollm2.load_prose_tokens()
    split = smollm2.split_index()
    feeds = smollm2.calibration_windows(n, window=window, seed=3)
    assert len(feeds) == n
    # Every window is a slice of tokens[:split]: find its start among all such slices.
    candidates = np.lib.stride_tricks.sliding_window_view(tokens[:split], window)
    for feed in feeds:
        assert set(feed) == {"input_ids", "attention_mask"}
        ids = feed["input_ids"]
        assert ids.shape == (1, window) and ids.dtype == np.int64
        assert feed["attention_mask"].shape == (1, window) and feed["attention_mask"].all()
        assert np.any(np.all(candidates == ids[0], axis=1)), "window not inside calibration part"
    again = smollm2.calibration_windows(n, window=window, seed=3)
    for a, b in zip(feeds, again, strict=True):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])


# --------------------------------------------------------------------------- exports


def test_no_cache_signature_and_weights(no_cache_path: Path) -> None:
    assert no_cache_path.stat().st_size < 2**31
    assert not list(no_cache_path.parent.glob(no_cache_path.name + ".data"))
    model = onnx.load(str(no_cache_path), load_external_data=False)
    assert {o.domain: o.version for o in model.opset_import}[""] == smollm2.OPSET
    inputs = [(i.name, i.type.tensor_type.elem_type, _dims(i)) for i in model.graph.input]
    assert inputs == [
        ("input_ids", onnx.TensorProto.INT64, ["batch", "sequence"]),
        ("attention_mask", onnx.TensorProto.INT64, ["batch", "sequence"]),
    ]
    (output,) = model.graph.output
    assert (output.name, output.type.tensor_type.elem_type, _dims(output)) == (
        "logits",
        onnx.TensorProto.FLOAT,
        ["batch", "sequence", smollm2.VOCAB_SIZE],
    )
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    assert inits["model.embed_tokens.weight"] == [smollm2.VOCAB_SIZE, smollm2.HIDDEN_SIZE]
    assert inits["model.layers.0.self_attn.q_proj.weight.T"] == [576, 576]
    assert inits["model.layers.29.mlp.down_proj.weight.T"] == [1536, 576]
    assert inits["model.layers.5.self_attn.k_proj.weight.T"] == [576, 192]
    # The tied head: MatMul(x, Transpose(embedding)), and the embedding Gather on the same table.
    producers = {o: n for n in model.graph.node for o in n.output}
    head = producers["logits"]
    assert head.op_type == "MatMul"
    transpose = producers[head.input[1]]
    assert transpose.op_type == "Transpose"
    assert list(transpose.input) == ["model.embed_tokens.weight"]
    gathers = [n for n in model.graph.node if n.op_type == "Gather"]
    assert any(n.input[0] == "model.embed_tokens.weight" for n in gathers)
    ops = {n.op_type for n in model.graph.node}
    assert {"Softmax", "Sigmoid", "ReduceMean", "Neg", "Expand"} <= ops


def test_no_cache_matches_torch(no_cache_session: ort.InferenceSession) -> None:
    import torch

    causal_lm = smollm2.load_torch_model()
    ids = smollm2.evaluation_tokens()[: 3 * 96].reshape(3, 96)
    with torch.no_grad():
        ref = causal_lm(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.ones(ids.shape, dtype=torch.int64),
            use_cache=False,
        ).logits.numpy()
    got = _run_no_cache(no_cache_session, ids)
    diff = float(np.max(np.abs(got - ref)))
    logger.info("no-cache ORT vs torch max abs diff %.3g", diff)
    assert diff <= ATOL


def test_kv_cache_signature(kv_cache_path: Path) -> None:
    model = onnx.load(str(kv_cache_path), load_external_data=False)
    inputs = {i.name: _dims(i) for i in model.graph.input}
    outputs = {o.name: _dims(o) for o in model.graph.output}
    assert list(inputs)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert inputs["attention_mask"] == ["batch", "total_sequence"]
    assert len(inputs) == 3 + 2 * smollm2.NUM_LAYERS
    assert len(outputs) == 1 + 2 * smollm2.NUM_LAYERS
    for i in (0, 29):
        for kind in ("key", "value"):
            assert inputs[f"past_key_values.{i}.{kind}"] == ["batch", 3, "past_sequence", 64]
            assert outputs[f"present.{i}.{kind}"] == ["batch", 3, "total_sequence", 64]
    assert outputs["logits"] == ["batch", "sequence", smollm2.VOCAB_SIZE]


def test_kv_cache_decode_matches_no_cache(
    no_cache_session: ort.InferenceSession, kv_cache_session: ort.InferenceSession
) -> None:
    ids = smollm2.evaluation_tokens()[:64]
    ref = _run_no_cache(no_cache_session, ids[None, :])[0]
    runner = smollm2.KVDecoder(kv_cache_session)
    got = [runner.prefill(ids[:32])[0]]  # past_sequence = 0
    got.append(runner.step(ids[32:40])[0])  # a multi-token chunk on top of a cache
    got += [runner.step(int(t))[0] for t in ids[40:]]  # token-by-token decode
    assert runner.length == 64
    assert runner.past[0].shape == (1, 3, 64, 64)
    diff = float(np.max(np.abs(np.concatenate(got, axis=0) - ref)))
    logger.info("kv-cache (prefill 32, chunk 8, 24 steps) vs no-cache max abs diff %.3g", diff)
    assert diff <= ATOL


def test_generate_and_latency(kv_cache_path: Path, kv_cache_session: ort.InferenceSession) -> None:
    text = smollm2.generate(
        kv_cache_path,
        "The three primary colors are",
        max_new_tokens=16,
        session=kv_cache_session,
    )
    logger.info("greedy continuation: %r", text)
    assert len(text.split()) >= 3
    assert sum(c.isalpha() or c.isspace() for c in text) >= 0.7 * len(text)
    stats = smollm2.decode_latency(kv_cache_path, prompt_len=16, new_tokens=8)
    assert stats["prefill_ms"] > 0 and stats["decode_ms"] > 0
    assert stats["tokens_per_s"] == pytest.approx(1e3 / stats["decode_ms"])


# --------------------------------------------------------------------------- perplexity


def test_token_nll_matches_direct_formula() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 11)).astype(np.float32) * 10
    targets = rng.integers(0, 11, size=(2, 5))
    x = logits.astype(np.float64)
    expected = -np.log(np.exp(x) / np.exp(x).sum(-1, keepdims=True))
    expected = np.take_along_axis(expected, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(smollm2.token_nll(logits, targets), expected, rtol=1e-6, atol=1e-6)


def test_fp32_perplexity_is_plausible(no_cache_path: Path) -> None:
    start = time.perf_counter()
    ppl = smollm2.perplexity(no_cache_path)
    elapsed = time.perf_counter() - start
    logger.info(
        "fp32 perplexity %.3f on %d evaluation tokens in %.1fs",
        ppl,
        len(smollm2.evaluation_tokens()),
        elapsed,
    )
    assert math.isfinite(ppl)
    assert 5 < ppl < 60
