"""Normalization fusions.

Decomposed LayerNorm -> LayerNormalization (opset 17, every target); decomposed RMSNorm ->
ORT SimplifiedLayerNormalization (ORT) or RMSNormalization (opset 23, standard targets);
Add + LayerNorm / RMSNorm -> ORT SkipLayerNormalization / SkipSimplifiedLayerNormalization.
"""

from __future__ import annotations

from onnxscript.rewriter.ort_fusions import rms_normalization as ort_rms
from onnxscript.rewriter.ort_fusions import skip_normalization as ort_skip
from onnxscript.rewriter.rules.fusion import _layer_norm as layer_norm
from onnxscript.rewriter.rules.fusion import _rms_normalization as onnx_rms

from graphopt.rewrite import ORT_TARGETS, STANDARD_TARGETS, Rule

RULES: list[Rule] = [
    Rule(
        "layer-norm",
        "ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/Add -> LayerNormalization",
        lambda: layer_norm.layer_normalization_ruleset,
        STANDARD_TARGETS,
        group="normalization",
        min_opset=17,
    ),
    Rule(
        "rms-norm",
        "x * rsqrt(mean(x²) + eps) * w -> SimplifiedLayerNormalization (ORT)",
        lambda: ort_rms.rms_normalization_ruleset,
        ORT_TARGETS,
        group="normalization",
    ),
    Rule(
        "rms-norm-onnx",
        "x * rsqrt(mean(x²) + eps) * w -> RMSNormalization (opset 23)",
        lambda: onnx_rms.rms_normalization_ruleset,
        STANDARD_TARGETS - ORT_TARGETS,
        group="normalization",
        min_opset=23,
    ),
    Rule(
        "skip-layer-norm",
        "Add (+ bias) feeding LayerNormalization -> SkipLayerNormalization (ORT)",
        lambda: ort_skip.skip_layer_normalization_ruleset,
        ORT_TARGETS,
        group="normalization",
    ),
    Rule(
        "skip-rms-norm",
        "Add feeding SimplifiedLayerNormalization -> SkipSimplifiedLayerNormalization (ORT)",
        lambda: ort_skip.skip_rms_normalization_ruleset,
        ORT_TARGETS,
        group="normalization",
    ),
]
