"""SmoothQuant: migrate activation outliers into the weights before w8a8 quantization.

Per-tensor int8 activations cannot hold a few outlier channels: their range crushes every
other channel's resolution. SmoothQuant (Xiao et al., 2022) divides input channel ``j`` of
the activation by ``s_j`` and multiplies the weights' column ``j`` by it, which leaves the
float product unchanged and moves quantization difficulty from activations (hard) to
weights (easy, per-channel):

    s_j = max|X_j|^α / max|W_j|^(1 - α)

with ``max|W_j|`` over every output row of every weight reading the activation. ``α``
balances the two (0.5 by default; more for models with stronger outliers).

Numerics only; folding the scales into the graph is
:mod:`graphopt.passes.weight_only.smoothquant_pass`'s job.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Magnitudes below this are treated as this (dead channels get a finite scale).
MIN_MAGNITUDE = 1e-5


def smoothquant_scales(
    act_max: np.ndarray, weights: Sequence[np.ndarray], alpha: float = 0.5
) -> np.ndarray:
    """Per-input-channel smoothing scales.

    Args:
        act_max: ``[K]`` largest ``|x|`` per input channel over calibration data.
        weights: The weights ``W_i[N_i, K]`` reading the activation.
        alpha: Migration strength in ``[0, 1]``.

    Returns:
        ``float32[K]``, positive and finite: divide the activation, multiply the weights.
        A channel that is dead in the activations or in every weight gets scale 1.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not weights:
        raise ValueError("no weights")
    a = np.asarray(act_max, dtype=np.float64)
    w_max = np.max([np.max(np.abs(np.asarray(w, dtype=np.float64)), axis=0) for w in weights], axis=0)
    if w_max.shape != a.shape:
        raise ValueError(f"act_max has {a.shape[0]} channels, weights have {w_max.shape[0]}")
    dead = (a < MIN_MAGNITUDE) | (w_max < MIN_MAGNITUDE) | ~np.isfinite(a)
    s = np.maximum(a, MIN_MAGNITUDE) ** alpha / np.maximum(w_max, MIN_MAGNITUDE) ** (1.0 - alpha)
    s = np.where(dead, 1.0, s)
    return np.clip(s, 1e-5, 1e5).astype(np.float32)
