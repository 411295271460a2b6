"""Attention fusions (ORT contrib ops), applied as a chain.

Scaled dot-product attention subgraphs -> an internal SDPA op, then -> MultiHeadAttention
(with or without past), scale and bias absorbed, and finally the Q/K/V projections packed
into ORT's ``Attention``; Llama-style rotary embedding -> RotaryEmbedding and grouped-query
attention -> GroupQueryAttention (llama.py's rule; onnxscript's own GQA rule is left out:
its causal-mask check accepts any mask and its rewrite drops the attention mask).
"""

from __future__ import annotations

from onnxscript.rewriter.ort_fusions import (
    attention,
    cos_sin_cache,
    gqa_packed_qkv,
    mha,
    mha_bias,
    mha_scale,
    rotary_embedding,
    sdpa,
    sdpa_via_mha,
)

from graphopt.rewrite import ORT_TARGETS, Rule

RULES: list[Rule] = [
    Rule(
        "rotary-embedding",
        "x·cos + rotate_half(x)·sin -> RotaryEmbedding (ORT)",
        lambda: rotary_embedding.rotary_embedding_rules,
        ORT_TARGETS,
        group="attention",
    ),
    Rule(
        "cos-sin-cache",
        "cos/sin computed from position ids -> precomputed caches feeding RotaryEmbedding",
        lambda: cos_sin_cache.cos_sin_cache_rules,
        ORT_TARGETS,
        group="attention",
    ),
    Rule(
        "partial-rotary-embedding",
        "rotary embedding over part of the head -> RotaryEmbedding (ORT)",
        lambda: rotary_embedding.partial_embedding_rules,
        ORT_TARGETS,
        group="attention",
    ),
    Rule(
        "sdpa",
        "softmax(Q·Kᵀ·scale + mask)·V -> scaled dot-product attention (internal)",
        lambda: sdpa.sdpa_rules,
        ORT_TARGETS,
        group="attention",
        shape_inference=True,
    ),
    Rule(
        "packed-qkv-gqa",
        "GroupQueryAttention over slices of one packed QKV -> packed form (ORT)",
        lambda: gqa_packed_qkv.fuse_qkv_gqa_rules,
        ORT_TARGETS,
        group="attention",
    ),
    Rule(
        "mha",
        "SDPA with head split/merge reshapes -> MultiHeadAttention (ORT)",
        lambda: [*mha.mha_rules_with_past.rules, *mha.mha_rules_no_past.rules],
        ORT_TARGETS,
        group="attention",
    ),
    Rule(
        "mha-scale",
        "scale applied to Q before MultiHeadAttention -> its scale attribute",
        lambda: mha_scale._mha_scale_rules,
        ORT_TARGETS,
        group="attention",
    ),
    Rule(
        "mha-bias",
        "Q/K/V bias Adds before MultiHeadAttention -> its bias input",
        lambda: mha_bias.mha_bias_rules,
        ORT_TARGETS,
        group="attention",
    ),
    Rule(
        "attention",
        "Q/K/V projections of one input + MultiHeadAttention -> Attention (ORT)",
        lambda: attention.attention_rules,
        ORT_TARGETS,
        group="attention",
    ),
    Rule(
        "sdpa-via-mha",
        "remaining scaled dot-product attention -> MultiHeadAttention (ORT)",
        lambda: sdpa_via_mha._rules,
        ORT_TARGETS,
        group="attention",
    ),
]
