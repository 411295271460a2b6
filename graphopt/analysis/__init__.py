"""Read-only analyses over models: cached by the :class:`~graphopt.infra.AnalysisManager`.

* :mod:`~graphopt.analysis.calibration`: activation statistics from calibration runs on
  ONNX Runtime (:class:`ActivationStatsAnalysis`).
"""

from __future__ import annotations

from graphopt.analysis.calibration import ActivationStats, ActivationStatsAnalysis

__all__ = ["ActivationStats", "ActivationStatsAnalysis"]
