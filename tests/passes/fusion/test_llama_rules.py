"""Llama rules of ``graphopt/passes/fusion/llama.py``: structure and numerics.

Small synthetic Llama decoders built with ``onnx.helper`` and seeded random weights, in the
form the dynamo exporter writes for Hugging Face Llama (SmolLM2): hidden 48, 6 query heads
and 2 KV heads of 8 (3 query heads per KV head), MLP width 32, 2 layers;
RMSNorm as ``Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul/Mul``; rotary as
``x·cos + Concat(-x2, x1)·sin`` with ``cos/sin = Cos/Sin(Concat(f, f))`` and
``f = Mul(Cast(Unsqueeze(positions)), inv_freq)``; KV heads repeated with
``Unsqueeze/Expand/Reshape``; ``Softmax(Q·Kᵀ·scale + mask)·V`` with the additive mask
``Where(causal ∧ attention_mask, 0, float32 min)``; SiLU gating ``g·Sigmoid(g)·up``.

Two signatures, as the SmolLM2 recipe exports them:

- ``no-cache``: ``x [B, S, D], attention_mask [B, S] -> y``, positions ``Range(0, S, 1)``;
- ``kv-cache``: adds ``position_ids [B, S]`` and per layer ``past_k/past_v [B, 2, P, 8]``,
  returns ``present_k/present_v [B, 2, P + S, 8]`` (``Concat`` with the cache).

Each model goes through the registered ``fuse`` pass (target ``ort``) and must come out as
SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization, 2 RotaryEmbedding, one
GroupQueryAttention and one QuickGelu per layer, with no Softmax, Neg, Sigmoid or Expand
left. Numerics: original vs fused on ONNX Runtime CPU with graph optimizations off on both
sides, element-wise within rtol 1e-5 / atol 1e-6, on all-ones, right-padded and left-padded
masks, prefill and decode steps, and batched multi-token steps with a past. One exception,
by design: with left padding, a query row whose keys are *all* masked (a padding position
at the start) is only compared through what reads it — nothing unmasked does — because the
export averages V over every key there and GroupQueryAttention over the causally visible
ones; those rows are checked to be the only ones that differ.

Then each rule alone (exact structure, numerics), near misses each rule must refuse with
``explain`` saying why, and the targets without contrib ops.

Helpers come from ``test_norm_activation_rules.py`` (same folder).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.verify import FUSION

try:  # rootdir-relative import (no __init__.py in the test folders)
    from test_norm_activation_rules import Fused, fuse
except ImportError:  # pragma: no cover - when the folder becomes a package
    from .test_norm_activation_rules import Fused, fuse

HEADS, KV_HEADS, HEAD = 6, 2, 8
GROUP = HEADS // KV_HEADS
HIDDEN, KV_HIDDEN, FFN = HEADS * HEAD, KV_HEADS * HEAD, 32
LAYERS = 2
EPS = 1e-5
MIN = float(np.finfo(np.float32).min)
INT64_MAX = np.iinfo(np.int64).max
RTOL = FUSION.rtol

LLAMA_RULES = ("rms-norm", "skip-rms-norm", "llama-silu", "llama-rotary", "llama-gqa")


# --------------------------------------------------------------------------- builder


class _Graph:
    """Collects nodes and initializers with generated names."""

    def __init__(self, seed: int) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.rng = np.random.default_rng(seed)
        self._n = 0

    def name(self, stem: str) -> str:
        self._n += 1
        return f"{stem}_{self._n}"

    def const(self, value: np.ndarray | float | Sequence[int], stem: str = "c") -> str:
        array = np.asarray(value)
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        name = self.name(stem)
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def weight(self, rows: int, cols: int) -> str:
        """A [rows, cols] projection scaled 1/√rows (activations stay O(1))."""
        return self.const(self.rng.standard_normal((rows, cols)) / np.sqrt(rows), "w")

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs: object) -> str | list[str]:
        names = [self.name(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names


@dataclass(frozen=True)
class Variant:
    """Knobs for near-miss models (defaults: the export's form)."""

    softmax_axis: int = -1
    split: int = HEAD // 2  # where rotate_half splits the head
    kv_heads: int = KV_HEADS


def _rms(g: _Graph, x: str) -> str:
    square = g.op("Pow", x, g.const(np.float32(2.0)))
    mean = g.op(
        "ReduceMean", square, g.const(np.array([-1], np.int64)), keepdims=1, noop_with_empty_axes=0
    )  # written out by the dynamo exporter
    rsqrt = g.op("Reciprocal", g.op("Sqrt", g.op("Add", mean, g.const(np.float32(EPS)))))
    weight = g.const(1.0 + 0.1 * g.rng.standard_normal(HIDDEN))
    return g.op("Mul", weight, g.op("Mul", x, rsqrt))


def _rotary(g: _Graph, x: str, cos4: str, sin4: str, split: int) -> str:
    x1 = g.op(
        "Slice",
        x,
        g.const(np.array([0], np.int64)),
        g.const(np.array([split], np.int64)),
        g.const(np.array([3], np.int64)),
        g.const(np.array([1], np.int64)),
    )
    x2 = g.op(
        "Slice",
        x,
        g.const(np.array([split], np.int64)),
        g.const(np.array([INT64_MAX], np.int64)),
        g.const(np.array([3], np.int64)),
        g.const(np.array([1], np.int64)),
    )
    rotated = g.op("Concat", g.op("Neg", x2), x1, axis=-1)
    return g.op("Add", g.op("Mul", x, cos4), g.op("Mul", rotated, sin4))


def _heads(g: _Graph, x: str, heads: int) -> str:
    reshaped = g.op("Reshape", x, g.const(np.array([0, 0, heads, HEAD], np.int64)))
    return g.op("Transpose", reshaped, perm=[0, 2, 1, 3])


def _repeat(g: _Graph, x: str, kv_heads: int) -> str:
    group = HEADS // kv_heads
    expanded = g.op(
        "Expand",
        g.op("Unsqueeze", x, g.const(np.array([2], np.int64))),
        g.const(np.array([1, 1, group, 1, 1], np.int64)),
    )
    return g.op("Reshape", expanded, g.const(np.array([0, HEADS, -1, HEAD], np.int64)))


def build(kv_cache: bool, *, seed: int = 0, variant: Variant = Variant()) -> onnx.ModelProto:
    """A 2-layer Llama decoder in the dynamo export's form (see the module docstring)."""
    g = _Graph(seed)
    kv_heads = variant.kv_heads
    kv_hidden = kv_heads * HEAD
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", HIDDEN]),
        helper.make_tensor_value_info(
            "attention_mask",
            TensorProto.INT64,
            ["batch", "total_sequence" if kv_cache else "sequence"],
        ),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", HIDDEN])]
    seq = g.op("Squeeze", g.op("Shape", "x", start=1, end=2))
    query_pos = g.op("Range", g.const(np.int64(0)), seq, g.const(np.int64(1)))
    if kv_cache:
        inputs.append(
            helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence"])
        )
        for i in range(LAYERS):
            for kind in ("k", "v"):
                inputs.append(
                    helper.make_tensor_value_info(
                        f"past_{kind}{i}",
                        TensorProto.FLOAT,
                        ["batch", kv_heads, "past_sequence", HEAD],
                    )
                )
                outputs.append(
                    helper.make_tensor_value_info(
                        f"present_{kind}{i}",
                        TensorProto.FLOAT,
                        ["batch", kv_heads, "total_sequence", HEAD],
                    )
                )
        past = g.op("Squeeze", g.op("Shape", "past_k0", start=2, end=3))
        total = g.op("Add", past, seq)
        key_pos = g.op("Range", g.const(np.int64(0)), total, g.const(np.int64(1)))
        query_pos = g.op("Add", query_pos, past)
        pos_3d = g.op("Unsqueeze", "position_ids", g.const(np.array([2], np.int64)))
    else:
        key_pos = query_pos
        arange = g.op("Range", g.const(np.int64(0)), seq, g.const(np.int64(1)))
        pos_3d = g.op("Unsqueeze", arange, g.const(np.array([0, 2], np.int64)))
    # mask: Where(causal ∧ attention_mask, 0, min), [B, 1, S, T]
    causal = g.op(
        "LessOrEqual",
        g.op("Unsqueeze", key_pos, g.const(np.array([0, 1, 2], np.int64))),
        g.op("Unsqueeze", query_pos, g.const(np.array([0, 1, 3], np.int64))),
    )
    padding = g.op(
        "Unsqueeze",
        g.op("Cast", "attention_mask", to=TensorProto.BOOL),
        g.const(np.array([1, 2], np.int64)),
    )
    mask = g.op(
        "Where", g.op("And", causal, padding), g.const(np.float32(0.0)), g.const(np.float32(MIN))
    )
    # rotary cos/sin
    inv_freq = g.const((1.0 / (10000.0 ** (np.arange(0, HEAD, 2) / HEAD))).astype(np.float32))
    freqs = g.op("Mul", g.op("Cast", pos_3d, to=TensorProto.FLOAT), inv_freq)
    emb = g.op("Concat", freqs, freqs, axis=-1)
    axis = g.const(np.array([1], np.int64))
    cos4 = g.op("Unsqueeze", g.op("Cos", emb), axis)
    sin4 = g.op("Unsqueeze", g.op("Sin", emb), axis)

    x = "x"
    for layer in range(LAYERS):
        h = _rms(g, x)
        q = _heads(g, g.op("MatMul", h, g.weight(HIDDEN, HIDDEN)), HEADS)
        k = _heads(g, g.op("MatMul", h, g.weight(HIDDEN, kv_hidden)), kv_heads)
        v = _heads(g, g.op("MatMul", h, g.weight(HIDDEN, kv_hidden)), kv_heads)
        q = _rotary(g, q, cos4, sin4, variant.split)
        k = _rotary(g, k, cos4, sin4, variant.split)
        if kv_cache:
            g.nodes.append(
                helper.make_node("Concat", [f"past_k{layer}", k], [f"present_k{layer}"], axis=-2)
            )
            g.nodes.append(
                helper.make_node("Concat", [f"past_v{layer}", v], [f"present_v{layer}"], axis=-2)
            )
            k, v = f"present_k{layer}", f"present_v{layer}"
        k = g.op("Transpose", _repeat(g, k, kv_heads), perm=[0, 1, 3, 2])
        v = _repeat(g, v, kv_heads)
        scores = g.op(
            "Add", g.op("Mul", g.op("MatMul", q, k), g.const(np.float32(HEAD**-0.5))), mask
        )
        probs = g.op("Softmax", scores, axis=variant.softmax_axis)
        attn = g.op("Transpose", g.op("MatMul", probs, v), perm=[0, 2, 1, 3])
        attn = g.op("Reshape", attn, g.const(np.array([0, 0, HIDDEN], np.int64)))
        x = g.op("Add", x, g.op("MatMul", attn, g.weight(HIDDEN, HIDDEN)))
        h = _rms(g, x)
        gate = g.op("MatMul", h, g.weight(HIDDEN, FFN))
        up = g.op("MatMul", h, g.weight(HIDDEN, FFN))
        silu = g.op("Mul", gate, g.op("Sigmoid", gate))
        x = g.op("Add", x, g.op("MatMul", g.op("Mul", silu, up), g.weight(FFN, HIDDEN)))
    g.nodes.append(helper.make_node("Mul", [_rms(g, x), g.const(np.float32(1.0))], ["y"]))
    graph = helper.make_graph(g.nodes, "llama", inputs, outputs, g.inits)
    # the exporter knows the lengths of the position ranges; ONNX shape inference does not
    known = {query_pos: ["sequence"], key_pos: ["total_sequence" if kv_cache else "sequence"]}
    if not kv_cache:
        known[arange] = ["sequence"]
    for name, dims in known.items():
        graph.value_info.append(helper.make_tensor_value_info(name, TensorProto.INT64, dims))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    # value_info for every intermediate, as the dynamo exporter writes it
    return onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)


# --------------------------------------------------------------------------- running


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def run(model: onnx.ModelProto | Fused, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    proto = model.proto if isinstance(model, Fused) else model
    s = session(proto)
    names = [o.name for o in s.get_outputs()]
    return dict(zip(names, s.run(names, feeds), strict=True))


def no_cache_feeds(
    batch: int, seq: int, *, pad: str = "none", seed: int = 1
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.int64)
    if pad == "left":
        mask[-1, : seq // 3] = 0
    elif pad == "right":
        mask[-1, seq - seq // 3 :] = 0
    return {
        "x": rng.standard_normal((batch, seq, HIDDEN)).astype(np.float32),
        "attention_mask": mask,
    }


def kv_feeds(
    batch: int,
    seq: int,
    past: int,
    *,
    left_pad: int = 0,
    seed: int = 2,
    kv_heads: int = KV_HEADS,
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, past + seq), np.int64)
    mask[-1, :left_pad] = 0
    positions = np.clip(np.cumsum(mask, -1) - 1, 0, None)[:, past:]
    feeds = {
        "x": rng.standard_normal((batch, seq, HIDDEN)).astype(np.float32),
        "attention_mask": mask,
        "position_ids": positions.astype(np.int64),
    }
    for i in range(LAYERS):
        for kind in ("k", "v"):
            feeds[f"past_{kind}{i}"] = rng.standard_normal((batch, kv_heads, past, HEAD)).astype(
                np.float32
            )
    return feeds


def attended(mask: np.ndarray, seq: int) -> np.ndarray:
    """[B, S]: query rows (the last ``seq`` positions) that see at least one unmasked key."""
    total = mask.shape[1]
    query_pos = np.arange(total - seq, total)
    causal = np.arange(total)[None, :] <= query_pos[:, None]
    return (causal[None] & (mask[:, None, :] > 0)).any(-1)


def assert_close(expected: np.ndarray, actual: np.ndarray, rows: np.ndarray | None = None) -> float:
    """The ``fusion`` tolerance: |a - e| <= 1e-6 + 1e-5·rms(e) + 1e-5·|e| element-wise (on
    ``rows`` of ``[B, S, ...]`` when given). Returns the worst absolute error."""
    if rows is not None:
        expected, actual = expected[rows], actual[rows]
    if expected.size == 0:
        return 0.0
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=FUSION.effective_atol(expected))
    return float(np.abs(actual - expected).max())


def histogram(fused: Fused) -> Counter[str]:
    return Counter(fused.ops)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def no_cache() -> onnx.ModelProto:
    return build(kv_cache=False)


@pytest.fixture(scope="module")
def kv_cache() -> onnx.ModelProto:
    return build(kv_cache=True)


@pytest.fixture(scope="module")
def no_cache_fused(no_cache: onnx.ModelProto) -> Fused:
    return fuse(no_cache)


@pytest.fixture(scope="module")
def kv_cache_fused(kv_cache: onnx.ModelProto) -> Fused:
    return fuse(kv_cache)


# --------------------------------------------------------------------------- whole decoder


def _assert_all_fused(fused: Fused) -> None:
    ops = histogram(fused)
    assert ops["com.microsoft::GroupQueryAttention"] == LAYERS
    assert ops["com.microsoft::RotaryEmbedding"] == 2 * LAYERS
    assert ops["com.microsoft::QuickGelu"] == LAYERS
    assert ops["SimplifiedLayerNormalization"] == 1
    assert ops["com.microsoft::SkipSimplifiedLayerNormalization"] == 2 * LAYERS
    for gone in ("Softmax", "Neg", "Sigmoid", "Slice", "Pow", "ReduceMean", "Sqrt"):
        assert ops[gone] == 0, f"{gone} left: {ops}"
    assert ops["Expand"] <= 2  # only the shared sequence-length vectors
    counts = fused.counts
    assert counts["llama-gqa"] == LAYERS
    assert counts["llama-rotary"] == 2 * LAYERS
    assert counts["llama-silu"] == LAYERS
    for rule in ("sdpa", "gqa", "mha", "sdpa-via-mha", "rotary-embedding"):
        assert counts.get(rule, 0) == 0, f"onnxscript's {rule} fired after llama's rules"


def test_no_cache_decoder_fuses_every_layer(no_cache_fused: Fused) -> None:
    _assert_all_fused(no_cache_fused)
    gqa = no_cache_fused.nodes("GroupQueryAttention")[0]
    attrs = {k: a.value for k, a in gqa.attributes.items()}
    assert attrs["num_heads"] == HEADS and attrs["kv_num_heads"] == KV_HEADS
    assert attrs["scale"] == pytest.approx(HEAD**-0.5)
    assert attrs.get("do_rotary", 0) == 0  # rotary stays outside, with the real positions
    assert gqa.inputs[3] is None and gqa.inputs[4] is None  # no past
    assert gqa.inputs[10] is not None  # the graph's mask, as attention_bias
    # positions Range(0, S, 1) become the start offset [0]
    rope = no_cache_fused.nodes("RotaryEmbedding")[0]
    assert rope.inputs[1].const_value is not None
    assert rope.inputs[1].const_value.numpy().tolist() == [0]
    # one shared cos/sin cache for every rotary node
    assert len({n.inputs[2] for n in no_cache_fused.nodes("RotaryEmbedding")}) == 1


@pytest.mark.parametrize("pad", ["none", "right"])
@pytest.mark.parametrize("batch,seq", [(1, 7), (3, 5)])
def test_no_cache_decoder_numerics(
    no_cache: onnx.ModelProto, no_cache_fused: Fused, batch: int, seq: int, pad: str
) -> None:
    feeds = no_cache_feeds(batch, seq, pad=pad)
    assert_close(run(no_cache, feeds)["y"], run(no_cache_fused, feeds)["y"])


def test_no_cache_left_padding_differs_only_on_fully_masked_rows(
    no_cache: onnx.ModelProto, no_cache_fused: Fused
) -> None:
    feeds = no_cache_feeds(2, 9, pad="left")
    expected, actual = run(no_cache, feeds)["y"], run(no_cache_fused, feeds)["y"]
    rows = attended(feeds["attention_mask"], 9)
    assert not rows.all()  # the case exists
    assert_close(expected, actual, rows)
    assert not np.allclose(expected[~rows], actual[~rows], rtol=RTOL, atol=1e-3)


def test_kv_cache_decoder_fuses_every_layer(kv_cache_fused: Fused) -> None:
    _assert_all_fused(kv_cache_fused)
    gqas = kv_cache_fused.nodes("GroupQueryAttention")
    graph_inputs = {v.name for v in kv_cache_fused.model.graph.inputs}
    graph_outputs = {v.name: v for v in kv_cache_fused.model.graph.outputs}
    for layer, gqa in enumerate(gqas):
        assert gqa.inputs[3].name == f"past_k{layer}" and gqa.inputs[4].name == f"past_v{layer}"
        assert graph_outputs[f"present_k{layer}"].producer() is gqa
        assert graph_outputs[f"present_v{layer}"].producer() is gqa
        assert len(gqa.inputs) == 17 and gqa.inputs[16] is not None  # query_seqlens
    # the rotary positions are the graph's position_ids
    assert all(n.inputs[1].name == "position_ids" for n in kv_cache_fused.nodes("RotaryEmbedding"))
    assert "position_ids" in graph_inputs
    # seqlens / total length computed once, shared by the layers
    assert len({g.inputs[5] for g in gqas}) == 1 and len({g.inputs[6] for g in gqas}) == 1


@pytest.mark.parametrize(
    "batch,seq,past,left_pad",
    [
        (1, 6, 0, 0),  # prefill
        (1, 1, 6, 0),  # decode step
        (2, 1, 7, 3),  # batched decode, one row left-padded
        (2, 3, 5, 2),  # batched multi-token step with a past
        (3, 4, 0, 0),  # batched prefill
    ],
)
def test_kv_cache_decoder_numerics(
    kv_cache: onnx.ModelProto, kv_cache_fused: Fused, batch: int, seq: int, past: int, left_pad: int
) -> None:
    feeds = kv_feeds(batch, seq, past, left_pad=left_pad)
    expected, actual = run(kv_cache, feeds), run(kv_cache_fused, feeds)
    rows = attended(feeds["attention_mask"], seq)
    assert rows.all(), "every query row here sees a key"
    assert_close(expected["y"], actual["y"])
    for name in expected:
        if name.startswith("present_"):
            assert_close(expected[name], actual[name])


def test_kv_cache_left_padded_prefill_then_decode(
    kv_cache: onnx.ModelProto, kv_cache_fused: Fused
) -> None:
    """Left-padded prefill, then two decode steps fed each graph's own presents."""
    feeds = kv_feeds(2, 5, 0, left_pad=2)
    pasts = {"expected": dict(feeds), "actual": dict(feeds)}
    mask = feeds["attention_mask"]
    positions = feeds["position_ids"]
    rng = np.random.default_rng(7)
    for _ in range(3):
        outs = {
            "expected": run(kv_cache, pasts["expected"]),
            "actual": run(kv_cache_fused, pasts["actual"]),
        }
        seq = pasts["expected"]["x"].shape[1]
        rows = attended(mask, seq)
        assert_close(outs["expected"]["y"], outs["actual"]["y"], rows)
        # cache entries of unmasked keys agree; padded ones are never read again
        keys = mask.astype(bool)
        for name in outs["expected"]:
            if name.startswith("present_"):
                assert_close(
                    outs["expected"][name].transpose(0, 2, 1, 3),
                    outs["actual"][name].transpose(0, 2, 1, 3),
                    keys,
                )
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
        positions = positions[:, -1:] + 1
        x = rng.standard_normal((2, 1, HIDDEN)).astype(np.float32)
        for key, out in outs.items():
            nxt = {"x": x, "attention_mask": mask, "position_ids": positions}
            for i in range(LAYERS):
                for kind in ("k", "v"):
                    nxt[f"past_{kind}{i}"] = out[f"present_{kind}{i}"]
            pasts[key] = nxt


# --------------------------------------------------------------------------- rules alone


def test_silu_alone_is_exact(no_cache: onnx.ModelProto) -> None:
    fused = fuse(no_cache, ["llama-silu"])
    ops = histogram(fused)
    assert ops["com.microsoft::QuickGelu"] == LAYERS and ops["Sigmoid"] == 0
    node = fused.nodes("QuickGelu")[0]
    assert node.attributes["alpha"].value == 1.0
    feeds = no_cache_feeds(2, 5)
    np.testing.assert_array_equal(run(no_cache, feeds)["y"], run(fused, feeds)["y"])


def test_silu_operand_order() -> None:
    """``Mul(Sigmoid(x), x)`` fuses too; ``Mul(x, Sigmoid(y))`` does not."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 4])
    for first, second, fires in (("s", "x", True), ("x", "t", False)):
        nodes = [
            helper.make_node("Sigmoid", ["x"], ["s"]),
            helper.make_node("Neg", ["x"], ["n"]),
            helper.make_node("Sigmoid", ["n"], ["t"]),
            helper.make_node("Mul", [first, second], ["z"]),
        ]
        proto = helper.make_model(
            helper.make_graph(nodes, "g", [x], [z]),
            opset_imports=[helper.make_opsetid("", 20)],
            ir_version=10,
        )
        fused = fuse(proto, ["llama-silu"], explain=True)
        assert ("com.microsoft::QuickGelu" in fused.ops) is fires, fused.ops
        if not fires:
            assert "llama-silu" in fused.explain


def test_rotary_alone(no_cache: onnx.ModelProto, kv_cache: onnx.ModelProto) -> None:
    for proto, feeds in (
        (no_cache, no_cache_feeds(2, 6)),
        (kv_cache, kv_feeds(2, 3, 4, left_pad=1)),
    ):
        fused = fuse(proto, ["llama-rotary"])
        ops = histogram(fused)
        assert ops["com.microsoft::RotaryEmbedding"] == 2 * LAYERS
        assert ops["Neg"] == 0 and ops["Slice"] == 0
        assert ops["Cos"] == 1 and ops["Sin"] == 1  # the shared cache
        expected, actual = run(proto, feeds), run(fused, feeds)
        for name in expected:
            assert_close(expected[name], actual[name])


def test_rotary_with_one_dim_positions_broadcasts_to_batch() -> None:
    """Positions ``[S]`` that are not ``Range(0, S, 1)`` are expanded to ``[B, S]``."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", HEADS, "s", HEAD])
    pos = helper.make_tensor_value_info("pos", TensorProto.INT64, ["s"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", HEADS, "s", HEAD])
    g = _Graph(3)
    inv_freq = g.const((1.0 / (100.0 ** (np.arange(0, HEAD, 2) / HEAD))).astype(np.float32))
    freqs = g.op(
        "Mul",
        g.op(
            "Cast",
            g.op("Unsqueeze", "pos", g.const(np.array([0, 2], np.int64))),
            to=TensorProto.FLOAT,
        ),
        inv_freq,
    )
    emb = g.op("Concat", freqs, freqs, axis=-1)
    one = g.const(np.array([1], np.int64))
    out = _rotary(
        g,
        "x",
        g.op("Unsqueeze", g.op("Cos", emb), one),
        g.op("Unsqueeze", g.op("Sin", emb), one),
        HEAD // 2,
    )
    g.nodes.append(helper.make_node("Identity", [out], ["y"]))
    proto = helper.make_model(
        helper.make_graph(g.nodes, "g", [x, pos], [y], g.inits),
        opset_imports=[helper.make_opsetid("", 20)],
        ir_version=10,
    )
    fused = fuse(proto, ["llama-rotary"])
    assert histogram(fused)["com.microsoft::RotaryEmbedding"] == 1
    assert "Expand" in fused.ops
    rng = np.random.default_rng(0)
    feeds = {
        "x": rng.standard_normal((3, HEADS, 4, HEAD)).astype(np.float32),
        "pos": np.array([5, 2, 9, 0], np.int64),
    }
    assert_close(run(proto, feeds)["y"], run(fused, feeds)["y"])


def test_gqa_needs_the_rotary_rule_first(no_cache: onnx.ModelProto) -> None:
    fused = fuse(no_cache, ["llama-gqa"], explain=True)
    assert "GroupQueryAttention" not in fused.ops
    assert "RotaryEmbedding" in fused.explain["llama-gqa"]


# --------------------------------------------------------------------------- near misses


@pytest.mark.parametrize(
    "variant,rule,reason",
    [
        (Variant(softmax_axis=2), "llama-gqa", "Softmax is not over the keys"),
        (Variant(split=3), "llama-rotary", "not split into its two halves"),
    ],
)
def test_near_misses_are_refused(variant: Variant, rule: str, reason: str) -> None:
    proto = build(kv_cache=False, variant=variant)
    fused = fuse(proto, ["llama-rotary", "llama-gqa"], explain=True)
    ops = histogram(fused)
    if rule == "llama-rotary":
        assert ops["com.microsoft::RotaryEmbedding"] == 0
    assert ops["com.microsoft::GroupQueryAttention"] == 0
    assert reason in fused.explain[rule], fused.explain[rule]


def test_other_group_size() -> None:
    """3 KV heads for 6 query heads (groups of 2) fuse the same way."""
    proto = build(kv_cache=False, variant=Variant(kv_heads=3))
    fused = fuse(proto, ["llama-rotary", "llama-gqa"])
    assert histogram(fused)["com.microsoft::GroupQueryAttention"] == LAYERS
    feeds = no_cache_feeds(2, 4)
    assert_close(run(proto, feeds)["y"], run(fused, feeds)["y"])


# --------------------------------------------------------------------------- other targets


@pytest.mark.parametrize("target", ["tensorrt", "portable"])
def test_standard_targets_keep_standard_ops(no_cache: onnx.ModelProto, target: str) -> None:
    """At opset 20 no Llama fusion exists in standard ONNX: nothing contrib comes out."""
    fused = fuse(no_cache, target=target, explain=True)
    assert not any(op.startswith("com.microsoft::") for op in fused.ops)
    assert "needs opset >= 23" in fused.explain["llama-rotary-onnx"]
    assert "needs opset >= 23" in fused.explain["rms-norm-onnx"]
    feeds = no_cache_feeds(2, 5)
    assert_close(run(no_cache, feeds)["y"], run(fused, feeds)["y"])


def test_rotary_onnx_at_opset_23(no_cache: onnx.ModelProto) -> None:
    proto = onnx.ModelProto()
    proto.CopyFrom(no_cache)
    proto.opset_import[0].version = 23
    proto.ir_version = 10
    fused = fuse(proto, ["llama-rotary-onnx"], target="tensorrt")
    ops = histogram(fused)
    assert ops["RotaryEmbedding"] == 2 * LAYERS and ops["Neg"] == 0
    feeds = no_cache_feeds(2, 5)
    assert_close(run(proto, feeds)["y"], run(fused, feeds)["y"])
