"""Quantization passes: ``ptq`` (user-facing) and the generic ``InsertQDQPass``.

* :mod:`~graphopt.passes.quantize.plan`: annotations (edges, units, shared groups) and
  their finalization with calibration ranges.
* :mod:`~graphopt.passes.quantize.quantizer`: the policy base class backends extend
  (:mod:`graphopt.backends.ort_quant`, :mod:`graphopt.backends.tensorrt_quant`).
* :mod:`~graphopt.passes.quantize.insert`: ``InsertQDQPass``.
* :mod:`~graphopt.passes.quantize.ptq`: ``PtqPass`` (registry name ``ptq``).
"""

from __future__ import annotations

from graphopt.infra.registry import PassRegistry
from graphopt.passes.quantize.insert import InsertQDQPass
from graphopt.passes.quantize.ptq import PtqPass


def register(registry: PassRegistry) -> None:
    """Registers ``ptq`` and the activation-statistics analysis."""
    from graphopt.analysis.calibration import ActivationStatsAnalysis

    registry.register_pass(PtqPass)
    registry.register_analysis(ActivationStatsAnalysis)


__all__ = ["InsertQDQPass", "PtqPass", "register"]
