"""Llama-style fusions: SiLU gating, RMSNorm variants, rotary embedding and grouped-query attention as exported from SmolLM2 (with and without KV cache)."""

from __future__ import annotations

from graphopt.rewrite import Rule

#: Rules of this module, in application order (see catalog.py for where they run).
RULES: list[Rule] = []
