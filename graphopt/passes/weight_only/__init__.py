"""Weight-only low-bit quantization passes.

* :mod:`~graphopt.passes.weight_only.base`: :class:`WeightSite`, :class:`WeightOnlyOptions`,
  :class:`WeightOnlyPass` (select -> quantize_sites -> lower).
* :mod:`~graphopt.passes.weight_only.selection`: which MatMul/Gemm/Gather weights qualify.
* :mod:`~graphopt.passes.weight_only.rtn`: ``wq`` (round to nearest).
* :mod:`~graphopt.passes.weight_only.lower`: dispatch to ``lower_nbits`` (ORT),
  ``lower_dq`` (opset-21 blocked DequantizeLinear) and ``lower_ext`` (runtime_ext).
* :mod:`~graphopt.passes.weight_only.convert`: reads a ``GroupQuantized`` back from any
  lowered node, so the lowerings convert into each other without re-rounding.
"""

from __future__ import annotations

from graphopt.infra.registry import PassRegistry
from graphopt.passes.weight_only.base import (
    WeightOnlyOptions,
    WeightOnlyPass,
    WeightSite,
    group_sites,
)
from graphopt.passes.weight_only.rtn import QuantizeWeightsRtnPass


def register(registry: PassRegistry) -> None:
    """Registers the weight-only passes."""
    registry.register_pass(QuantizeWeightsRtnPass)
    from graphopt.analysis.hessian import InputHessianAnalysis
    from graphopt.passes.weight_only.awq_pass import QuantizeWeightsAwqPass
    from graphopt.passes.weight_only.gptq_pass import QuantizeWeightsGptqPass
    from graphopt.passes.weight_only.smoothquant_pass import SmoothActivationsPass

    registry.register_pass(QuantizeWeightsGptqPass)
    registry.register_pass(QuantizeWeightsAwqPass)
    registry.register_pass(SmoothActivationsPass)
    registry.register_analysis(InputHessianAnalysis)


__all__ = [
    "QuantizeWeightsRtnPass",
    "WeightOnlyOptions",
    "WeightOnlyPass",
    "WeightSite",
    "group_sites",
    "register",
]
