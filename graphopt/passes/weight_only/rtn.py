"""``wq``: round-to-nearest weight-only quantization.

Matches: see :class:`~graphopt.passes.weight_only.base.WeightOnlyPass` (MatMul/Gemm
constant weights, Gather embeddings).

Changes: every selected weight ``W[N, K]`` becomes ``bits``-bit codes with one scale (and
zero point when ``sym=false``) per ``group`` input features, chosen by
:func:`~graphopt.quant.groupwise.quantize_rtn` (``clip=true`` adds the MSE range search),
then lowered for the target: ORT ``MatMulNBits`` / ``GatherBlockQuantized``; opset-21
blocked ``DequantizeLinear`` + ``MatMul`` (tensorrt, portable); graphopt ``MatMulLowBit``
(ext).

Preserves: graph inputs and outputs; numerics within the ``weight-only`` tolerance
(:mod:`~graphopt.passes.weight_only.tolerance`).

Example (``--passes "wq(bits=4,group=128,sym=true)" --target ort``)::

    before: y = MatMul(x, W[576, 1536])
    after:  y = com.microsoft.MatMulNBits(x, W_q4[1536, 5, 64], scales[1536, 5],
                                          K=576, N=1536, bits=4, block_size=128)
"""

from __future__ import annotations

from graphopt.infra.pass_base import PassInfo
from graphopt.passes.weight_only.base import WeightOnlyOptions, WeightOnlyPass


class QuantizeWeightsRtnPass(WeightOnlyPass[WeightOnlyOptions]):
    """Round-to-nearest weight-only quantization (registry name ``wq``)."""

    info = PassInfo(
        name="wq",
        summary="weight-only low-bit quantization, round to nearest (MatMulNBits / blocked DQ / ext)",
        tolerance="weight-only",
    )
    Options = WeightOnlyOptions
