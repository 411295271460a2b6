"""Quantizer policy for TensorRT (target ``tensorrt``): explicit quantization with Q/DQ.

TensorRT's explicit-quantization rules: int8 is symmetric (zero point 0) for activations
and weights; weights per output channel; Q/DQ go on the inputs of the layers that should
run in int8 (Conv, MatMul, Gemm) and on residual Adds, where both inputs share one scale so
that the Add fuses into the preceding convolution's epilogue (only Adds fed by a Conv: a
transformer's residual stream stays float, its outlier channels defeat a per-tensor
scale; MiniLM's embedding cosine fell to 0.68 with it quantized); TensorRT propagates Q/DQ
through pass-through layers itself, and shared scales across them keep requantization out.
Weights use the full ``[-127, 127]`` range (no 16-bit accumulation on GPUs).
"""

from __future__ import annotations

from typing import ClassVar

from graphopt.passes.quantize.quantizer import Quantizer
from graphopt.quant.spec import ACT_S8_SYM, QuantSpec


class TensorRTQuantizer(Quantizer):
    """TensorRT policy: s8 symmetric everywhere, residual Adds quantized with a shared scale."""

    name: ClassVar[str] = "tensorrt"
    activation_spec: ClassVar[QuantSpec] = ACT_S8_SYM
    reduce_range: ClassVar[bool] = False
    compute_ops: ClassVar[frozenset[str]] = frozenset({"Conv", "MatMul", "Gemm"})
    residual_adds: ClassVar[bool] = True
    #: TensorRT has no DynamicQuantizeLinear/MatMulInteger kernels: static only.
    supports_dynamic: ClassVar[bool] = False


__all__ = ["TensorRTQuantizer"]
