"""``fuse`` (target ``ort``) on SmolLM2-135M, both exports: every layer fused, same logits.

The two dynamo exports of ``models.smollm2`` (built once into the shared model cache) go
through the registered ``fuse`` pass. What must come out, for all 30 layers of each graph:

* RMSNorm -> 1 SimplifiedLayerNormalization + 60 SkipSimplifiedLayerNormalization
  (normalization.py's rules), rotary -> 60 RotaryEmbedding, attention with repeated KV
  heads -> 30 GroupQueryAttention (with the past/present cache in the kv-cache graph),
  SiLU -> 30 QuickGelu (llama.py); no Softmax, Neg, Sigmoid, Pow, ReduceMean left.
* No-cache logits on real prose windows (batch 2 × 32 tokens), ORT graph optimizations off
  on both sides: max |Δ| <= 1e-4 (logits reach ~34; ORT's own graph optimizations move them
  by ~3e-5) with an all-ones mask, a right-padded row and a left-padded row; with left
  padding the padding positions themselves (query rows whose keys are all masked) are
  excluded: there the export averages V over every key and GroupQueryAttention over the
  causally visible ones, and nothing unmasked reads them (see llama.py).
* KV cache: greedy decoding for 8 steps gives the same tokens, logits within 1e-4 at every
  step; a batch of 2 with a left-padded row, prefilled and then stepped, agrees within
  1e-4 on every unmasked position.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # the models/ recipes live beside graphopt/
    sys.path.insert(0, str(REPO_ROOT))

from graphopt.infra import PassContext
from graphopt.infra.registry import default_registry
from models import smollm2

pytestmark = pytest.mark.slow

LOGITS_ATOL = 1e-4
LAYERS = smollm2.NUM_LAYERS

EXPECTED = {
    "com.microsoft::GroupQueryAttention": LAYERS,
    "com.microsoft::RotaryEmbedding": 2 * LAYERS,
    "com.microsoft::QuickGelu": LAYERS,
    "SimplifiedLayerNormalization": 1,
    "com.microsoft::SkipSimplifiedLayerNormalization": 2 * LAYERS,
}
GONE = ("Softmax", "Neg", "Sigmoid", "Pow", "ReduceMean", "Sqrt", "Reciprocal", "Slice")


def _histogram(model: ir.Model) -> Counter[str]:
    return Counter(
        n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
        for n in model.graph
    )


def _fuse(variant: smollm2.Variant, dest: Path) -> tuple[Path, Counter[str], dict]:
    model = ir.load(smollm2.build(variant))
    result = default_registry(plugins=False).build("fuse").execute(model, PassContext(target="ort"))
    ir.save(model, dest)
    return dest, _histogram(model), dict(result.stats)


@pytest.fixture(scope="module")
def fused(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Counter[str], dict]]:
    folder = tmp_path_factory.mktemp("smollm2-fused")
    return {v: _fuse(v, folder / f"{v}.onnx") for v in smollm2.VARIANTS}


def _session(path: Path) -> ort.InferenceSession:
    return smollm2.make_session(path, threads=2, optimize=False)


@pytest.mark.parametrize("variant", smollm2.VARIANTS)
def test_every_layer_is_fused(fused: dict, variant: str) -> None:
    _, ops, stats = fused[variant]
    for op, count in EXPECTED.items():
        assert ops[op] == count, f"{variant}: {op} {ops[op]} != {count}"
    for op in GONE:
        assert ops[op] == 0, f"{variant}: {ops[op]} {op} left"
    assert ops["Expand"] <= 5 and ops["MatMul"] == 7 * LAYERS + 1
    rules = stats["fuse.rules"]
    assert rules["llama-gqa"] == LAYERS and rules["llama-rotary"] == 2 * LAYERS


def _attended(mask: np.ndarray, seq: int) -> np.ndarray:
    """[B, S]: query rows (the last ``seq`` positions) that see at least one unmasked key."""
    total = mask.shape[1]
    causal = np.arange(total)[None, :] <= np.arange(total - seq, total)[:, None]
    return (causal[None] & (mask[:, None, :] > 0)).any(-1)


def test_no_cache_logits(fused: dict) -> None:
    original = _session(smollm2.build("no-cache"))
    candidate = _session(fused["no-cache"][0])
    windows = smollm2.calibration_windows(2, window=32, seed=3)
    ids = np.concatenate([w["input_ids"] for w in windows])
    masks = {"ones": np.ones_like(ids)}
    masks["right-padded"] = masks["ones"].copy()
    masks["right-padded"][1, -9:] = 0
    masks["left-padded"] = masks["ones"].copy()
    masks["left-padded"][1, :9] = 0
    for name, mask in masks.items():
        feed = {"input_ids": ids, "attention_mask": mask}
        (expected,) = original.run(["logits"], feed)
        (actual,) = candidate.run(["logits"], feed)
        rows = _attended(mask, ids.shape[1])
        worst = float(np.abs(actual - expected)[rows].max())
        assert worst <= LOGITS_ATOL, f"{name}: max |Δlogits| {worst:.3g}"
        assert (actual.argmax(-1) == expected.argmax(-1))[rows].all()


def test_kv_cache_greedy_decoding(fused: dict) -> None:
    runners = [
        smollm2.KVDecoder(_session(smollm2.build("kv-cache"))),
        smollm2.KVDecoder(_session(fused["kv-cache"][0])),
    ]
    prompt = smollm2.evaluation_tokens()[:24]
    logits = [r.prefill(prompt) for r in runners]
    tokens: list[list[int]] = [[], []]
    for step in range(9):
        worst = float(np.abs(logits[1] - logits[0]).max())
        assert worst <= LOGITS_ATOL, f"step {step}: max |Δlogits| {worst:.3g}"
        if step == 8:
            break
        for i, runner in enumerate(runners):
            token = int(np.argmax(logits[i][0, -1]))
            tokens[i].append(token)
            logits[i] = runner.step(token)
    assert tokens[0] == tokens[1]


def test_kv_cache_padded_batch(fused: dict) -> None:
    """Batch of 2, row 1 left-padded: prefill, then a 1-token and a 2-token step."""
    sessions = [_session(smollm2.build("kv-cache")), _session(fused["kv-cache"][0])]
    names = [i.name for i in sessions[0].get_inputs()]
    past_names = [n for n in names if n.startswith("past_key_values.")]
    outputs = [o.name for o in sessions[0].get_outputs()]
    stream = smollm2.evaluation_tokens()
    ids = np.stack([stream[:20], stream[40:60]]).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :6] = 0
    positions = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    empty = np.zeros((2, smollm2.NUM_KV_HEADS, 0, smollm2.HEAD_DIM), np.float32)
    pasts = [[empty] * len(past_names), [empty] * len(past_names)]
    for new in (20, 1, 2):
        if new != 20:
            ids = np.repeat(ids[:, -1:], new, axis=1)
            positions = positions[:, -1:] + 1 + np.arange(new)[None]
            mask = np.concatenate([mask, np.ones((2, new), np.int64)], axis=1)
        results = []
        for i, s in enumerate(sessions):
            feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
            feed.update(zip(past_names, pasts[i], strict=True))
            out = dict(zip(outputs, s.run(outputs, feed), strict=True))
            pasts[i] = [out[n.replace("past_key_values.", "present.")] for n in past_names]
            results.append(out)
        rows = _attended(mask, new)
        worst = float(np.abs(results[1]["logits"] - results[0]["logits"])[rows].max())
        assert worst <= LOGITS_ATOL, f"{new}-token step: max |Δlogits| {worst:.3g}"
        keys = mask.astype(bool)
        for name in outputs[1:]:
            delta = np.abs(results[1][name] - results[0][name]).transpose(0, 2, 1, 3)[keys]
            assert float(delta.max()) <= LOGITS_ATOL, name
