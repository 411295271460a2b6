"""Verification of a transformed model against its original, and latency measurement.

- :mod:`~graphopt.verify.inputs`: feeds generated from a model's signature, or loaded from
  ``.npz`` files (never unpickled).
- :mod:`~graphopt.verify.runner`: ONNX Runtime CPU sessions (optimizations off for
  verification, spinning off always).
- :mod:`~graphopt.verify.compare`: tolerance classes and output comparison.
- :mod:`~graphopt.verify.verify`: :func:`verify_model`, original vs candidate.
- :mod:`~graphopt.verify.latency`: interleaved latency of several models.
"""

from __future__ import annotations

from graphopt.verify.compare import (
    EXACT,
    FP16,
    FUSION,
    QUANTIZED,
    TOLERANCES,
    Agreement,
    OutputAgreement,
    Tolerance,
    compare_output,
    compare_outputs,
    get_tolerance,
    merge_agreements,
    tolerance_for,
)
from graphopt.verify.inputs import InputSpec, input_specs, load_feeds, make_feeds
from graphopt.verify.latency import LatencyStats, measure_latency, ratio
from graphopt.verify.runner import bind, make_session, run
from graphopt.verify.verify import verify_model

__all__ = [
    "EXACT",
    "FP16",
    "FUSION",
    "QUANTIZED",
    "TOLERANCES",
    "Agreement",
    "InputSpec",
    "LatencyStats",
    "OutputAgreement",
    "Tolerance",
    "bind",
    "compare_output",
    "compare_outputs",
    "get_tolerance",
    "input_specs",
    "load_feeds",
    "make_feeds",
    "make_session",
    "measure_latency",
    "merge_agreements",
    "ratio",
    "run",
    "tolerance_for",
    "verify_model",
]
