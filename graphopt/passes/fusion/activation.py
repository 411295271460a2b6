"""Activation fusions.

erf-form GELU -> Gelu (ORT contrib), tanh-form -> FastGelu (ORT); Add of a bias before
Gelu -> BiasGelu (ORT).
"""

from __future__ import annotations

from onnxscript.rewriter.ort_fusions import bias_gelu, erfgelu, gelu

from graphopt.rewrite import ORT_TARGETS, Rule

RULES: list[Rule] = [
    Rule(
        "gelu-erf",
        "0.5·x·(1 + erf(x/√2)) -> Gelu (ORT)",
        lambda: erfgelu.rules,
        ORT_TARGETS,
        group="activation",
    ),
    Rule(
        "gelu",
        "tanh- and erf-form GELU -> FastGelu / Gelu (ORT)",
        lambda: gelu.gelu_rules,
        ORT_TARGETS,
        group="activation",
    ),
    Rule(
        "bias-gelu",
        "Add(x, bias) feeding Gelu -> BiasGelu (ORT)",
        lambda: bias_gelu.bias_gelu_rules,
        ORT_TARGETS,
        group="activation",
    ),
]
