"""The ordered catalog of fusion rules.

Order matters:

1. ``generic.PRE_RULES``: no-op elimination and shape-chain collapse expose patterns.
2. normalizations (LayerNorm, RMSNorm, Skip*Norm) and activations (GELU forms).
3. ``llama``: SiLU gating, rotary/GQA shapes that onnxscript's chain does not cover.
4. ``bert``: attention forms of other exporters, standard-op variants.
5. ``attention``: onnxscript's chain SDPA -> MHA -> Attention / GQA.
6. ``conv`` and ``generic``: BatchNorm folding, Conv/Gemm + activation, Gemm, Pad.

Each backend takes the rules legal for it, in this order.
"""

from __future__ import annotations

from graphopt.passes.fusion import activation, attention, bert, conv, generic, llama, normalization
from graphopt.rewrite import Rule


def catalog() -> list[Rule]:
    """All fusion rules, in application order."""
    return [
        *generic.PRE_RULES,
        *normalization.RULES,
        *activation.RULES,
        *llama.RULES,
        *bert.RULES,
        *attention.RULES,
        *generic.RULES,
        *conv.RULES,
    ]


def rule_names() -> list[str]:
    """Names of every rule in the catalog."""
    return [r.name for r in catalog()]
