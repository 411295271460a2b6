"""The ordered catalog of fusion rules.

Order matters: normalizations and activations first (attention patterns match over their
fused forms), then the attention chain (SDPA -> MHA -> Attention), then generic
rewrites. Each backend takes the rules legal for it, in this order.
"""

from __future__ import annotations

from graphopt.passes.fusion import activation, attention, generic, normalization
from graphopt.rewrite import Rule


def catalog() -> list[Rule]:
    """All fusion rules, in application order."""
    return [
        *generic.PRE_RULES,
        *normalization.RULES,
        *activation.RULES,
        *attention.RULES,
        *generic.RULES,
    ]


def rule_names() -> list[str]:
    """Names of every rule in the catalog."""
    return [r.name for r in catalog()]
