"""BERT attention rules of ``graphopt/passes/fusion/bert.py``: structure and numerics.

Small synthetic BERT attention blocks (hidden 16, 2 heads of 8, two layers sharing one
padding mask) in ONNX text with seeded random weights, in the forms the exporters write:

- ``torchscript``: what ``torch.onnx.export(dynamo=False)`` writes for Hugging Face's SDPA
  attention (transformers 5): head reshapes with targets computed by
  Shape/Gather/Unsqueeze/Concat and a -1 head count, Q and Kᵀ each scaled by d^-1/4, the
  padding mask traced into index arithmetic (Range, Flatten, Gather, torch's ``expand``),
  a ``-inf`` mask bias with an ``IsNaN``/``Where`` guard after the softmax, and a no-op
  reshape after the attention; biases added as ``Add(bias, MatMul)``.
- ``eager``: the older eager attention: ``Div`` by √d after Q·Kᵀ, an additive
  ``(1 - mask) · min`` bias of shape ``[B, 1, 1, T]``, explicit head counts.
- ``dynamo``: what ``torch.onnx.export(dynamo=True)`` writes: ``allowzero=1`` reshapes,
  a ``[B, 1, S, T]`` bool mask, shapes annotated by the exporter.

Each block goes through ``fuse`` (target ``ort``): every layer must become one
com.microsoft ``Attention`` whose bias input is the shared, expanded padding mask, and the
fused model must match the original on ONNX Runtime CPU (graph optimizations off on both
sides) under the ``fusion`` tolerance on padded masks (rows with 0, some and many padded
keys). For ``tensorrt`` only standard ops come out and the outputs are bit-identical.
Then each rule on its own: exact before/after structure, and the near misses it must
refuse (with ``explain`` saying why).

Helpers come from ``test_norm_activation_rules.py`` (same folder).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from graphopt.testing.builders import assert_same_structure

try:  # rootdir-relative import (no __init__.py in the test folders)
    from test_norm_activation_rules import (
        Fused,
        assert_equivalent,
        f32,
        fuse,
        i64,
        make_model,
        weights,
    )
except ImportError:  # pragma: no cover - when the folder becomes a package
    from .test_norm_activation_rules import (
        Fused,
        assert_equivalent,
        f32,
        fuse,
        i64,
        make_model,
        weights,
    )

HIDDEN, HEADS, HEAD = 16, 2, 8
LOWEST = float(np.finfo(np.float32).min)

#: The rules of bert.py that make the TorchScript form fusable, in catalog order.
BERT_RULES = (
    "bert-softmax-guard",
    "bert-padding-mask",
    "bert-head-reshape",
    "bert-mask-broadcast",
    "bert-bias-add-order",
)


def layer_weights(prefix: str, seed: int) -> dict[str, np.ndarray]:
    return {
        f"{prefix}{name}": weights(*shape, seed=seed + i, scale=0.3)
        for i, (name, shape) in enumerate(
            [("wq", (HIDDEN, HIDDEN)), ("wk", (HIDDEN, HIDDEN)), ("wv", (HIDDEN, HIDDEN)),
             ("wo", (HIDDEN, HIDDEN)), ("bq", (HIDDEN,)), ("bk", (HIDDEN,)),
             ("bv", (HIDDEN,)), ("bo", (HIDDEN,))]
        )
    }


COMMON = {
    "c0": np.array(0, np.int64), "c1": np.array(1, np.int64), "c2": np.array(2, np.int64),
    "c3": np.array(3, np.int64), "cm1": np.array(-1, np.int64), "a0": i64(0), "a1": i64(1),
    "a2": i64(2), "a3": i64(3), "a12": i64(1, 2), "a013": i64(0, 1, 3), "m1": i64(-1),
    "dh": i64(HEAD), "hh": i64(HEADS), "dd": i64(HIDDEN), "four": i64(4),
    "empty": np.zeros((0,), np.int64), "zf": f32(0.0).reshape(1), "zs": f32(0.0),
    "ninf": f32(-np.inf).reshape(1), "lowest": f32(LOWEST), "onef": f32(1.0),
    "qkscale": f32(HEAD ** -0.25), "sqrtd": f32(math.sqrt(HEAD)),
}

# --------------------------------------------------------------------------- TorchScript

TS_MASK = """
  m = Cast <to=9> (attention_mask)
  hs = Shape(x)
  bsz = Gather <axis=0> (hs, c0)
  seq = Gather <axis=0> (hs, c1)
  ms = Shape(m)
  klen = Gather <axis=0> (ms, c1)
  rb = Range(c0, bsz, c1)
  rq = Range(c0, seq, c1)
  rk = Range(c0, klen, c1)
  b1 = Unsqueeze(rb, a1)
  b2 = Unsqueeze(b1, a2)
  b4 = Unsqueeze(b2, a3)
  q1 = Unsqueeze(rq, a0)
  q2 = Unsqueeze(q1, a1)
  q4 = Unsqueeze(q2, a3)
  k1 = Unsqueeze(rk, a0)
  k2 = Unsqueeze(k1, a1)
  k4 = Unsqueeze(k2, a2)
  tru = ConstantOfShape <value = bool[1] {1}> (empty)
  ge = GreaterOrEqual(q4, c0)
  qok = And(tru, ge)
  stride = Gather <axis=0> (ms, a1)
  flat = Flatten <axis=2> (m)
  off = Mul(b4, stride)
  idx = Add(k4, off)
  g5 = Gather <axis=0> (flat, idx)
  r1 = Reshape(g5, m1)
  ishape = Shape(idx)
  kv = Reshape(r1, ishape)
  both = And(qok, kv)
  ub = Unsqueeze(bsz, a0)
  us = Unsqueeze(seq, a0)
  uk = Unsqueeze(klen, a0)
  cat = Concat <axis=0> (ub, m1, us, uk)
  flatcat = Reshape(cat, m1)
  ones = ConstantOfShape <value = int64[1] {1}> (four)
  negs = Mul(ones, cm1)
  eq = Equal(flatcat, negs)
  target = Where(eq, ones, flatcat)
  mask4 = Expand(both, target)
  shp = Concat <axis=0> (ub, us, m1, dh)
  mshp = Concat <axis=0> (ub, us, m1)
"""


def ts_layer(p: str, h: str, out: str, *, guard: bool = True) -> str:
    """One TorchScript-form attention layer reading ``h``, writing ``out`` (residual)."""
    probs = f"{p}pg" if guard else f"{p}p"
    guard_text = (
        f"""
  {p}nan = IsNaN({p}p)
  {p}pg = Where({p}nan, zf, {p}p)"""
        if guard
        else ""
    )
    return f"""
  {p}q0 = MatMul({h}, {p}wq)
  {p}q = Add({p}bq, {p}q0)
  {p}k0 = MatMul({h}, {p}wk)
  {p}k = Add({p}bk, {p}k0)
  {p}v0 = MatMul({h}, {p}wv)
  {p}v = Add({p}bv, {p}v0)
  {p}q4 = Reshape({p}q, shp)
  {p}qt = Transpose <perm=[0,2,1,3]> ({p}q4)
  {p}k4 = Reshape({p}k, shp)
  {p}kt = Transpose <perm=[0,2,3,1]> ({p}k4)
  {p}v4 = Reshape({p}v, shp)
  {p}vt = Transpose <perm=[0,2,1,3]> ({p}v4)
  {p}qs = Mul({p}qt, qkscale)
  {p}ks = Mul({p}kt, qkscale)
  {p}sc = MatMul({p}qs, {p}ks)
  {p}bias = Where(mask4, zf, ninf)
  {p}a = Add({p}sc, {p}bias)
  {p}p = Softmax <axis=-1> ({p}a){guard_text}
  {p}o = MatMul({probs}, {p}vt)
  {p}os = Shape({p}o)
  {p}ob = Gather <axis=0> ({p}os, c0)
  {p}qts = Shape({p}qt)
  {p}oq = Gather <axis=0> ({p}qts, c2)
  {p}vts = Shape({p}vt)
  {p}od = Gather <axis=0> ({p}vts, c3)
  {p}uob = Unsqueeze({p}ob, a0)
  {p}uoq = Unsqueeze({p}oq, a0)
  {p}uod = Unsqueeze({p}od, a0)
  {p}oshp = Concat <axis=0> ({p}uob, m1, {p}uoq, {p}uod)
  {p}o2 = Reshape({p}o, {p}oshp)
  {p}o3 = Transpose <perm=[0,2,1,3]> ({p}o2)
  {p}o4 = Reshape({p}o3, mshp)
  {p}y0 = MatMul({p}o4, {p}wo)
  {p}y1 = Add({p}bo, {p}y0)
  {out} = Add({p}y1, {h})"""


def torchscript_block(*, guard: bool = True, layers: int = 2) -> onnx.ModelProto:
    body = TS_MASK
    init = dict(COMMON)
    h = "x"
    for i in range(layers):
        out = "y" if i == layers - 1 else f"h{i + 1}"
        body += ts_layer(f"l{i}_", h, out, guard=guard)
        init.update(layer_weights(f"l{i}_", seed=10 * i))
        h = out
    text = f"""g (float[B,S,{HIDDEN}] x, int64[B,S] attention_mask) => (float[B,S,{HIDDEN}] y) {{
{body}
}}"""
    return make_model(text, 17, **init)


# --------------------------------------------------------------------------- eager

EAGER_MASK = """
  ext = Unsqueeze(attention_mask, a12)
  extf = Cast <to=1> (ext)
  inv = Sub(onef, extf)
  maskb = Mul(inv, lowest)
  hs = Shape(x)
  bsz = Gather <axis=0> (hs, c0)
  seq = Gather <axis=0> (hs, c1)
  ub = Unsqueeze(bsz, a0)
  us = Unsqueeze(seq, a0)
  shp = Concat <axis=0> (ub, us, hh, dh)
  mshp = Concat <axis=0> (ub, us, dd)
"""


def eager_layer(p: str, h: str, out: str) -> str:
    return f"""
  {p}q0 = MatMul({h}, {p}wq)
  {p}q = Add({p}q0, {p}bq)
  {p}k0 = MatMul({h}, {p}wk)
  {p}k = Add({p}k0, {p}bk)
  {p}v0 = MatMul({h}, {p}wv)
  {p}v = Add({p}v0, {p}bv)
  {p}q4 = Reshape({p}q, shp)
  {p}qt = Transpose <perm=[0,2,1,3]> ({p}q4)
  {p}k4 = Reshape({p}k, shp)
  {p}kt = Transpose <perm=[0,2,1,3]> ({p}k4)
  {p}ktt = Transpose <perm=[0,1,3,2]> ({p}kt)
  {p}v4 = Reshape({p}v, shp)
  {p}vt = Transpose <perm=[0,2,1,3]> ({p}v4)
  {p}sc = MatMul({p}qt, {p}ktt)
  {p}scd = Div({p}sc, sqrtd)
  {p}a = Add({p}scd, maskb)
  {p}p = Softmax <axis=-1> ({p}a)
  {p}o = MatMul({p}p, {p}vt)
  {p}o3 = Transpose <perm=[0,2,1,3]> ({p}o)
  {p}o4 = Reshape({p}o3, mshp)
  {p}y0 = MatMul({p}o4, {p}wo)
  {p}y1 = Add({p}y0, {p}bo)
  {out} = Add({p}y1, {h})"""


def eager_block(layers: int = 2) -> onnx.ModelProto:
    body = EAGER_MASK
    init = dict(COMMON)
    h = "x"
    for i in range(layers):
        out = "y" if i == layers - 1 else f"h{i + 1}"
        body += eager_layer(f"l{i}_", h, out)
        init.update(layer_weights(f"l{i}_", seed=10 * i))
        h = out
    text = f"""g (float[B,S,{HIDDEN}] x, int64[B,S] attention_mask) => (float[B,S,{HIDDEN}] y) {{
{body}
}}"""
    return make_model(text, 17, **init)


# --------------------------------------------------------------------------- dynamo

DYNAMO_MASK = """
  m = Cast <to=9> (attention_mask)
  mu = Unsqueeze(m, a12)
  s1 = Shape <start=1, end=2> (x)
  b1 = Shape <start=0, end=1> (x)
  seqs = Squeeze(s1)
  rq = Range(c0, seqs, c1)
  q4 = Unsqueeze(rq, a013)
  ge = GreaterOrEqual(q4, c0)
  full = And(ge, mu)
  bias = Where(full, zs, lowest)
  shp = Concat <axis=0> (b1, s1, m1, dh)
  mshp = Concat <axis=0> (b1, s1, m1)
"""


def dynamo_layer(p: str, h: str, out: str) -> str:
    return f"""
  {p}q0 = MatMul({h}, {p}wq)
  {p}q = Add({p}q0, {p}bq)
  {p}k0 = MatMul({h}, {p}wk)
  {p}k = Add({p}k0, {p}bk)
  {p}v0 = MatMul({h}, {p}wv)
  {p}v = Add({p}v0, {p}bv)
  {p}q4 = Reshape <allowzero=1> ({p}q, shp)
  {p}qt = Transpose <perm=[0,2,1,3]> ({p}q4)
  {p}k4 = Reshape <allowzero=1> ({p}k, shp)
  {p}kt = Transpose <perm=[0,2,1,3]> ({p}k4)
  {p}ktt = Transpose <perm=[0,1,3,2]> ({p}kt)
  {p}v4 = Reshape <allowzero=1> ({p}v, shp)
  {p}vt = Transpose <perm=[0,2,1,3]> ({p}v4)
  {p}qs = Mul({p}qt, qkscale)
  {p}ks = Mul({p}ktt, qkscale)
  {p}sc = MatMul({p}qs, {p}ks)
  {p}a = Add({p}sc, bias)
  {p}p = Softmax <axis=-1> ({p}a)
  {p}nan = IsNaN({p}p)
  {p}pg = Where({p}nan, zs, {p}p)
  {p}o = MatMul({p}pg, {p}vt)
  {p}o3 = Transpose <perm=[0,2,1,3]> ({p}o)
  {p}o4 = Reshape <allowzero=1> ({p}o3, mshp)
  {p}y0 = MatMul({p}o4, {p}wo)
  {p}y1 = Add({p}y0, {p}bo)
  {out} = Add({p}y1, {h})"""


def dynamo_block(layers: int = 2) -> onnx.ModelProto:
    body = DYNAMO_MASK
    init = dict(COMMON)
    # The dynamo exporter annotates every value with its symbolic shape.
    infos = ["bool[B,1,S,S] full", "float[B,1,S,S] bias"]
    h = "x"
    for i in range(layers):
        p = f"l{i}_"
        out = "y" if i == layers - 1 else f"h{i + 1}"
        body += dynamo_layer(p, h, out)
        init.update(layer_weights(p, seed=10 * i))
        infos += [f"float[B,S,{HEADS},{HEAD}] {p}{n}4" for n in "qkv"]
        infos += [f"float[B,S,{HIDDEN}] {p}o4"]
        h = out
    text = f"""g (float[B,S,{HIDDEN}] x, int64[B,S] attention_mask) => (float[B,S,{HIDDEN}] y)
      <{", ".join(infos)}> {{
{body}
}}"""
    return make_model(text, 17, **init)


BLOCKS = {"torchscript": torchscript_block, "eager": eager_block, "dynamo": dynamo_block}


# --------------------------------------------------------------------------- feeds


def padded_feeds(batch: int = 3, seq: int = 7, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Hidden states with padding masks: a full row, some padding, mostly padding."""
    rng = np.random.default_rng(seed)
    lengths = [seq, seq - 2, 1][:batch]
    mask = np.zeros((batch, seq), np.int64)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    x = rng.standard_normal((batch, seq, HIDDEN)).astype(np.float32)
    single = {"x": x[:1, :4].copy(), "attention_mask": np.array([[1, 1, 1, 0]], np.int64)}
    return [{"x": x, "attention_mask": mask}, single]


def run_ort(proto: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, feed)[0]


def contrib_ops(fused: Fused) -> list[str]:
    return [op for op in fused.ops if "::" in op]


# --------------------------------------------------------------------------- whole blocks


@pytest.mark.parametrize("form", list(BLOCKS))
def test_every_layer_fuses_to_attention(form: str) -> None:
    fused = fuse(BLOCKS[form](), target="ort")
    attention = fused.nodes("Attention")
    assert len(attention) == 2, fused.ops
    assert contrib_ops(fused) == ["com.microsoft::Attention"] * 2
    gone = ["Softmax", "IsNaN", "Transpose", "Reshape", "Div"]
    if form == "torchscript":  # its index-arithmetic mask is gone too
        gone += ["Range", "Flatten", "Gather", "Equal"]
    for op in gone:
        assert op not in fused.ops, f"{op} left in {fused.ops}"
    for node in attention:
        assert node.domain == "com.microsoft"
        assert node.attributes["num_heads"].value == HEADS
        assert list(node.attributes["qkv_hidden_sizes"].value) == [HIDDEN] * 3
        assert node.inputs[2] is not None  # packed Q/K/V bias
        assert len(node.inputs) < 4 or node.inputs[3] is None  # no mask_index
    biases = {node.inputs[5] for node in attention}
    assert len(biases) == 1, "the layers should share one attention bias"
    (bias,) = biases
    assert bias is not None
    if form == "dynamo":  # already [B, 1, S, S]
        assert bias.producer().op_type == "Where"
        return
    assert bias.producer().op_type == "Expand"  # [B, 1, 1, T] -> [B, 1, S, T], once
    if form == "torchscript":  # the one-node padding mask made by bert-padding-mask
        where = bias.producer().inputs[0].producer()
        assert where.op_type == "Where"
        assert where.inputs[0].producer().op_type == "Unsqueeze"
        assert where.inputs[0].producer().inputs[0].producer().op_type == "Cast"


@pytest.mark.parametrize("form", list(BLOCKS))
def test_fused_blocks_match_the_original(form: str, tmp_path: Path) -> None:
    before = BLOCKS[form]()
    fused = fuse(before, target="ort")
    assert_equivalent(before, fused, tmp_path, padded_feeds())


def test_padded_keys_do_not_leak_into_the_result() -> None:
    # The padding mask must keep its meaning after fusion: changing the hidden states at
    # padded positions must not change any valid position's output.
    fused = fuse(torchscript_block(), target="ort")
    feed = padded_feeds()[0]
    out = run_ort(fused.proto, feed)
    noisy = dict(feed)
    x = feed["x"].copy()
    x[feed["attention_mask"] == 0] += 100.0
    noisy["x"] = x
    out_noisy = run_ort(fused.proto, noisy)
    valid = feed["attention_mask"].astype(bool)
    np.testing.assert_array_equal(out[valid], out_noisy[valid])
    assert not np.array_equal(out[~valid], out_noisy[~valid])


def test_fully_masked_row_is_finite_after_fusion() -> None:
    # An all-zero attention_mask row: the exported guard makes its attention 0; ORT's
    # Attention has no guard, so bert-softmax-guard masks with the lowest float instead of
    # -inf: the row averages V (finite) rather than becoming NaN. Other rows are unchanged.
    before = torchscript_block()
    fused = fuse(before, target="ort")
    feed = padded_feeds()[0]
    feed["attention_mask"][2] = 0
    ref, got = run_ort(before, feed), run_ort(fused.proto, feed)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got[:2], ref[:2], rtol=1e-5, atol=1e-5)


def test_torchscript_block_for_tensorrt_is_standard_and_exact(tmp_path: Path) -> None:
    before = torchscript_block()
    fused = fuse(before, target="tensorrt")
    assert contrib_ops(fused) == []
    # The mask and the head reshapes got simpler; the guard stays (its -inf semantics too).
    for op in ("Range", "Flatten", "Equal", "Expand"):
        assert op not in fused.ops, f"{op} left in {fused.ops}"
    split_targets = [
        n.inputs[1].producer().op_type for n in fused.nodes("Reshape")
        if n.inputs[0].producer().op_type == "Add"
    ]
    assert split_targets == ["Constant"] * 6
    assert fused.ops.count("IsNaN") == 2
    assert fused.counts["bert-padding-mask"] == 2
    for feed in padded_feeds():
        np.testing.assert_array_equal(run_ort(before, feed), run_ort(fused.proto, feed))


def test_dynamo_block_needs_none_of_the_bert_rules() -> None:
    fused = fuse(dynamo_block(), target="ort", explain=True)
    assert all(fused.counts.get(rule, 0) == 0 for rule in BERT_RULES), fused.counts
    assert fused.counts["attention"] == 2


def test_torchscript_block_needs_every_bert_rule() -> None:
    fused = fuse(torchscript_block(), target="ort")
    assert all(fused.counts[rule] > 0 for rule in BERT_RULES), fused.counts
    without = fuse(
        torchscript_block(),
        [r for r in _ort_rule_names() if r not in BERT_RULES],
        target="ort",
    )
    assert "com.microsoft::Attention" not in without.ops


def _ort_rule_names() -> list[str]:
    from graphopt.passes.fusion.catalog import catalog

    return [r.name for r in catalog() if "ort" in r.targets]


# --------------------------------------------------------------------------- single rules


def graph(signature: str, body: str) -> str:
    return f"{signature} {{\n{body}\n}}"


def test_head_reshape_structure() -> None:
    sig = f"g (float[B,S,{HIDDEN}] x) => (float[B,S,{HEADS},{HEAD}] y)"
    w = weights(HIDDEN, HIDDEN)
    before = make_model(
        graph(sig, """
  p = MatMul(x, w)
  hs = Shape(x)
  bsz = Gather <axis=0> (hs, c0)
  seq = Gather <axis=0> (hs, c1)
  ub = Unsqueeze(bsz, a0)
  us = Unsqueeze(seq, a0)
  shp = Concat <axis=0> (ub, us, m1, dh)
  y = Reshape(p, shp)"""),
        **{k: COMMON[k] for k in ("c0", "c1", "a0", "m1", "dh")},
        w=w,
    )
    expected = make_model(
        graph(sig, """
  p = MatMul(x, w)
  t = Constant <value_ints = [0, 0, 2, 8]> ()
  y = Reshape(p, t)"""),
        w=w,
    )
    fused = fuse(before, ["bert-head-reshape"])
    assert_same_structure(fused.model, ir.serde.deserialize_model(expected))


def test_head_reshape_removes_a_no_op_reshape() -> None:
    sig = f"g (float[B,{HEADS},S,{HEAD}] x) => (float[B,{HEADS},S,{HEAD}] y)"
    before = make_model(
        graph(sig, """
  r = Relu(x)
  rs = Shape(r)
  d0 = Gather <axis=0> (rs, c0)
  xs = Shape(x)
  d2 = Gather <axis=0> (xs, c2)
  d3 = Gather <axis=0> (xs, c3)
  u0 = Unsqueeze(d0, a0)
  u2 = Unsqueeze(d2, a0)
  u3 = Unsqueeze(d3, a0)
  shp = Concat <axis=0> (u0, m1, u2, u3)
  y0 = Reshape(r, shp)
  y = Neg(y0)"""),
        **{k: COMMON[k] for k in ("c0", "c2", "c3", "a0", "m1")},
    )
    fused = fuse(before, ["bert-head-reshape"])
    assert fused.ops == ["Relu", "Neg"]
    feed = {"x": np.random.default_rng(0).standard_normal((2, HEADS, 3, HEAD)).astype(np.float32)}
    np.testing.assert_array_equal(run_ort(before, feed), run_ort(fused.proto, feed))


def test_head_reshape_refuses_dims_of_an_unrelated_tensor() -> None:
    # The leading entries come from another input whose dims may differ from x's.
    sig = (f"g (float[B,S,{HIDDEN}] x, float[C,T,{HIDDEN}] other) "
           f"=> (float[B,S,{HEADS},{HEAD}] y)")
    before = make_model(
        graph(sig, """
  hs = Shape(other)
  bsz = Gather <axis=0> (hs, c0)
  seq = Gather <axis=0> (hs, c1)
  ub = Unsqueeze(bsz, a0)
  us = Unsqueeze(seq, a0)
  shp = Concat <axis=0> (ub, us, m1, dh)
  y = Reshape(x, shp)"""),
        **{k: COMMON[k] for k in ("c0", "c1", "a0", "m1", "dh")},
    )
    fused = fuse(before, ["bert-head-reshape"], explain=True)
    assert fused.counts["bert-head-reshape"] == 0
    assert "not a known dim of the input" in fused.explain["bert-head-reshape"]


def mask_only_model(**changes: str) -> onnx.ModelProto:
    """The TorchScript mask added to given scores (``changes`` edit lines of TS_MASK)."""
    mask = TS_MASK
    for old, new in changes.items():
        assert old in mask, old
        mask = mask.replace(old, new)
    text = f"""g (float[B,S,{HIDDEN}] x, int64[B,S] attention_mask, float[B,{HEADS},S,S] scores)
      => (float[B,{HEADS},S,S] y) {{
{mask}
  bias = Where(mask4, zf, ninf)
  y = Add(scores, bias)
}}"""
    return make_model(text, 17, **COMMON)


def test_padding_mask_structure() -> None:
    fused = fuse(mask_only_model(), ["bert-padding-mask"])
    assert fused.ops == ["Cast", "Constant", "Unsqueeze", "Where", "Add"]
    unsqueeze = fused.node("Unsqueeze")
    assert unsqueeze.inputs[0].producer().op_type == "Cast"
    assert list(unsqueeze.inputs[1].const_value.numpy()) == [1, 2]
    where = fused.node("Where")
    assert where.inputs[2].const_value.numpy().tolist() == [-np.inf]  # semantics kept


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        # Gathering rows with a stride of the hidden size, not the mask's length.
        ({"stride = Gather <axis=0> (ms, a1)": "stride = Gather <axis=0> (hs, a2)"},
         "row stride"),
        # The batch index put on the key axis.
        ({"b4 = Unsqueeze(b2, a3)": "b4 = Unsqueeze(b2, a0)"}, "batch index"),
        # A query-side mask that is not provably all True.
        ({"ge = GreaterOrEqual(q4, c0)": "ge = GreaterOrEqual(q4, c1)"}, "all True"),
        # Expanding to another length on the key axis.
        ({"cat = Concat <axis=0> (ub, m1, us, uk)": "cat = Concat <axis=0> (ub, m1, us, us2)",
          "uk = Unsqueeze(klen, a0)": "uk = Unsqueeze(klen, a0)\n  us2 = Add(us, a1)"},
         "Expand's target entry 3"),
    ],
    ids=["wrong-stride", "batch-on-key-axis", "query-mask-not-true", "expand-enlarges"],
)
def test_padding_mask_refuses_near_misses(change: dict[str, str], reason: str) -> None:
    fused = fuse(mask_only_model(**change), ["bert-padding-mask"], explain=True)
    assert fused.counts["bert-padding-mask"] == 0
    assert reason in fused.explain["bert-padding-mask"], fused.explain


def test_padding_mask_rewrite_is_exact(tmp_path: Path) -> None:
    before = mask_only_model()
    fused = fuse(before, ["bert-padding-mask"])
    rng = np.random.default_rng(3)
    for feed in padded_feeds():
        b, s = feed["attention_mask"].shape
        feed = dict(feed, scores=rng.standard_normal((b, HEADS, s, s)).astype(np.float32))
        np.testing.assert_array_equal(run_ort(before, feed), run_ort(fused.proto, feed))


def guard_model(fill: str = "ninf") -> onnx.ModelProto:
    text = f"""g (float[B,{HEADS},S,S] scores, bool[B,1,1,S] m) => (float[B,{HEADS},S,S] y) {{
  bias = Where(m, zf, {fill})
  a = Add(scores, bias)
  p = Softmax <axis=-1> (a)
  nan = IsNaN(p)
  y = Where(nan, zf, p)
}}"""
    return make_model(text, 17, **COMMON)


def test_softmax_guard_structure_and_numerics() -> None:
    before = guard_model()
    fused = fuse(before, ["bert-softmax-guard"])
    assert fused.ops == ["Constant", "Where", "Add", "Softmax"]
    fill = fused.node("Where").inputs[2].const_value.numpy()
    assert fill.tolist() == [LOWEST]
    rng = np.random.default_rng(0)
    m = np.ones((2, 1, 1, 5), bool)
    m[1, ..., 3:] = False
    feed = {"scores": rng.standard_normal((2, HEADS, 5, 5)).astype(np.float32), "m": m}
    np.testing.assert_array_equal(run_ort(before, feed), run_ort(fused.proto, feed))
    m[1] = False  # every key masked: 0 before, uniform after, never NaN
    ref, got = run_ort(before, feed), run_ort(fused.proto, feed)
    assert (ref[1] == 0).all()
    np.testing.assert_allclose(got[1], 1 / 5, rtol=1e-6)
    np.testing.assert_array_equal(ref[0], got[0])


def test_softmax_guard_refuses_a_finite_fill_and_is_ort_only() -> None:
    fused = fuse(guard_model("lowest"), ["bert-softmax-guard"], explain=True)
    assert fused.counts["bert-softmax-guard"] == 0
    assert "not -inf" in fused.explain["bert-softmax-guard"]
    fused = fuse(guard_model(), target="tensorrt")
    assert "IsNaN" in fused.ops


def test_mask_broadcast_reads_the_query_length_off_the_layer_input() -> None:
    fused = fuse(eager_block(layers=1), [*BERT_RULES[2:4]], target="ort")
    (expand,) = fused.nodes("Expand")
    shape_node = expand.inputs[1].producer().inputs[2].producer()
    assert shape_node.op_type == "Shape"
    assert shape_node.inputs[0].name == "x"  # not the query projection
    assert shape_node.attributes["start"].value == 1


def test_bias_add_order_structure() -> None:
    text = f"""g (float[B,S,{HIDDEN}] x) => (float[B,S,{HIDDEN}] y) {{
  p = MatMul(x, w)
  y = Add(b, p)
}}"""
    before = make_model(text, w=weights(HIDDEN, HIDDEN), b=weights(HIDDEN, seed=1))
    fused = fuse(before, ["bert-bias-add-order"])
    add = fused.node("Add")
    assert add.inputs[0].producer().op_type == "MatMul"
    assert add.inputs[1].name == "b"
