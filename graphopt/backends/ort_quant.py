"""Quantizer policy for ONNX Runtime CPU (target ``ort``, also ``ext`` and ``portable``).

Decisions (measurements in docs/bench/ptq.md and the module's notes below):

* Weights of Conv/Gemm/MatMul that are constants (not graph inputs): s8 symmetric
  ``[-127, 127]``, per output channel (Conv axis 0, MatMul axis 1, Gemm axis 0 or 1 by
  ``transB``), stored pre-quantized. ``reduce_range`` (7-bit codes): see
  :data:`OrtQuantizer.reduce_range`.
* Activations: u8 asymmetric per tensor on the inputs of Conv/MatMul/Gemm. ONNX Runtime
  fuses ``DQ -> Conv -> Q`` into QLinearConv, ``DQ -> MatMul`` (float output) into
  MatMulIntegerToFloat and ``DQ -> Gemm`` into QGemm; u8 activations with s8 weights are
  MLAS's fast kernels on x86.
* Pass-through ops (Transpose, Reshape, Flatten, Squeeze, Unsqueeze, Slice, Split, MaxPool,
  Identity) and Concat share one scale with their input(s) when every consumer is
  quantized: ``DQ -> op -> Q`` with equal parameters runs on integers.
* Softmax, LayerNormalization, Gelu and the attention score arithmetic stay in float
  (they are never compute units); activation x activation MatMuls (Q.K^T, P.V) stay float
  unless ``act_matmul=true``.
* Values whose calibrated range is degenerate (attention-mask fills of -3.4e38, anything
  ``1e4`` x beyond the typical magnitude) are never quantized; their units stay float
  (generic rule, :func:`graphopt.passes.quantize.plan.finalize_plan`).
"""

from __future__ import annotations

from typing import ClassVar

from graphopt.passes.quantize.quantizer import Quantizer
from graphopt.quant.spec import ACT_U8_ASYM, QuantSpec


class OrtQuantizer(Quantizer):
    """ONNX Runtime CPU policy: u8 asymmetric activations, s8 symmetric weights.

    ``reduce_range`` is on by default: on x86 CPUs without VNNI, MLAS's u8 x s8 kernels add
    pairs of products in int16 (``vpmaddubsw``), which saturates for full-range s8 weights
    (BASELINES.md: SmolLM2 collapses). 7-bit weights never saturate, run at the same speed,
    and cost little accuracy (MiniLM: see docs/bench/ptq.md), so the produced model is
    correct on every x86 CPU rather than only on the one it was made on.
    """

    name: ClassVar[str] = "ort"
    activation_spec: ClassVar[QuantSpec] = ACT_U8_ASYM
    reduce_range: ClassVar[bool] = True
    compute_ops: ClassVar[frozenset[str]] = frozenset({"Conv", "MatMul", "Gemm"})
    residual_adds: ClassVar[bool] = False
    matmul_add_bias: ClassVar[bool] = True


__all__ = ["OrtQuantizer"]
