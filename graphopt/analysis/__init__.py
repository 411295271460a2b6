"""Read-only analyses over models: cached by the :class:`~graphopt.infra.AnalysisManager`.

* :mod:`~graphopt.analysis.calibration`: activation statistics from calibration runs on
  ONNX Runtime (:class:`ActivationStatsAnalysis`).
* :mod:`~graphopt.analysis.hessian`: input Hessians ``XᵀX/rows`` of linear layers
  (:class:`InputHessianAnalysis`) for GPTQ, AWQ, SmoothQuant and pruning.
"""

from __future__ import annotations

from graphopt.analysis.calibration import ActivationStats, ActivationStatsAnalysis
from graphopt.analysis.hessian import InputHessianAnalysis, InputHessians

__all__ = ["ActivationStats", "ActivationStatsAnalysis", "InputHessianAnalysis", "InputHessians"]
