"""The ``weight-only`` verification tolerance class.

Low-bit weights move a deep model's outputs far more than int8 QDQ does. On SmolLM2-135M
the logits' SQNR against fp32 (the verification's generated feed, ORT lowering) measured
25.9 dB at int8 per-channel (31.1 dB with ``accuracy_level=0``: the int8 activations of
level 4 cost the rest) and 9.7 dB at int4 group-128 round-to-nearest, whose quality is
measured by perplexity instead. Verification therefore checks what holds at every bit
width: that the lowering computes the quantized model, not noise. A lowering bug gives
outputs uncorrelated with the reference (MiniLM with int4 nibbles swapped: hidden-state
SQNR -5.2 dB, embedding cosine 0.02), so the class asks for SQNR >= :data:`MIN_SQNR_DB`
per output and no new NaN/Inf. Quality bounds belong to the task metric (RELIABILITY.md:
"or the task metric"); the lowerings' exactness is tested bit for bit against a numpy
reference in the unit tests.
"""

from __future__ import annotations

from graphopt.verify.compare import WEIGHT_ONLY

#: Per-output SQNR floor: above the < 0 dB of broken lowerings, below the 9.7 dB measured
#: for 4-bit group-128 RTN on SmolLM2's logits.
MIN_SQNR_DB = WEIGHT_ONLY.min_sqnr_db


def register_tolerance() -> None:
    """Kept for callers: ``weight-only`` is a preset of :mod:`graphopt.verify.compare`."""
