"""AWQ: activation-aware per-input-channel weight scaling before round-to-nearest.

Input channels that carry large activations matter more to a layer's output. AWQ (Lin et
al., 2023, "AWQ: activation-aware weight quantization for LLM compression and
acceleration") multiplies weight column ``k`` by ``s_k`` and divides the activation by the
same ``s_k`` (folded into the op that produces it), so ``y = (x / s) (W diag(s))ᵀ`` is
unchanged in float while the rounding error of important columns shrinks relative to their
weight. The scales are ``s = mean|x|^α`` (normalised so that ``sqrt(max(s) * min(s)) = 1``),
with ``α`` chosen on a grid to minimise the layer's output error.

This module is numerics only. The output error of a candidate is measured exactly through
the input Hessian ``H = XᵀX / rows`` of the original activation: with
``Ŵ = Q(W diag(s)) diag(1/s)``, the mean squared output error per row is
``tr((Ŵ - W) H (Ŵ - W)ᵀ)`` (:func:`~graphopt.quant.gptq.layer_error`), summed over every
weight that reads the activation (q/k/v projections share one scale vector).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphopt.quant.gptq import layer_error
from graphopt.quant.groupwise import GroupQuantized, quantize_rtn

logger = logging.getLogger(__name__)

Float64Array = np.ndarray[Any, np.dtype[np.float64]]

#: Smallest per-channel activation magnitude used (dead channels get a neutral scale).
MIN_MAGNITUDE = 1e-8


@dataclass(frozen=True)
class AWQResult:
    """The chosen scales of one activation.

    Attributes:
        scales: ``float32[K]``: weights are multiplied by it, the activation divided.
        alpha: The chosen exponent (0 means no scaling).
        error: Summed Hessian-weighted output error at ``alpha``.
        error_unscaled: The same for plain round-to-nearest (``alpha = 0``).
        errors: Error at each grid point, for reports.
    """

    scales: np.ndarray
    alpha: float
    error: float
    error_unscaled: float
    errors: dict[float, float] = field(default_factory=dict)


def awq_grid(points: int = 20) -> tuple[float, ...]:
    """``α`` candidates ``0, 1/points, ..., (points - 1)/points``."""
    if points < 1:
        raise ValueError(f"points must be positive, got {points}")
    return tuple(i / points for i in range(points))


def scales_for_alpha(mean_abs: np.ndarray, alpha: float) -> np.ndarray:
    """``mean|x|^α`` normalised to a geometric mid-range of 1, as float32 (all positive)."""
    mag = np.maximum(np.asarray(mean_abs, dtype=np.float64), MIN_MAGNITUDE)
    s = mag**alpha
    s = s / np.sqrt(s.max() * s.min())
    return np.clip(s, 1e-4, 1e4).astype(np.float32)


def quantize_scaled(
    w: np.ndarray,
    s: np.ndarray,
    bits: int,
    group_size: int,
    symmetric: bool,
    clip_search: bool = False,
    signed_scale: bool = True,
) -> GroupQuantized:
    """Round-to-nearest of ``W diag(s)`` (the weight that is stored after folding)."""
    ws = np.asarray(w, dtype=np.float32) * np.asarray(s, dtype=np.float32)[None, :]
    return quantize_rtn(ws, bits, group_size, symmetric, clip_search=clip_search, signed_scale=signed_scale)


def search_awq_scales(
    weights: Sequence[np.ndarray],
    h: np.ndarray,
    mean_abs: np.ndarray,
    bits: int = 4,
    group_size: int = 128,
    symmetric: bool = True,
    *,
    grid: Sequence[float] | None = None,
    clip_search: bool = False,
    signed_scale: bool = True,
) -> AWQResult:
    """Chooses AWQ scales for the weights ``W_i[N_i, K]`` that read one activation.

    Args:
        weights: Every weight multiplied by the activation (float32 ``[N_i, K]``).
        h: ``float64[K, K]`` input Hessian of the activation.
        mean_abs: ``float64[K]`` mean ``|x|`` per channel.
        bits: Code width.
        group_size: Group length along ``K``.
        symmetric: Implicit middle zero point.
        grid: ``α`` candidates (default :func:`awq_grid`); 0 (no scaling) is always tried.
        clip_search: MSE clipping in the round-to-nearest step.
        signed_scale: Symmetric scales may be negative (see
            :func:`~graphopt.quant.groupwise.group_params`).

    Returns:
        The best scales; ``alpha == 0`` (all-ones scales) when no candidate beats RTN.
    """
    if not weights:
        raise ValueError("no weights")
    k = int(np.asarray(weights[0]).shape[1])
    h = np.asarray(h, dtype=np.float64)
    mean_abs = np.asarray(mean_abs, dtype=np.float64)
    if h.shape != (k, k) or mean_abs.shape != (k,):
        raise ValueError(f"h must be [{k}, {k}] and mean_abs [{k}], got {h.shape} and {mean_abs.shape}")
    for w in weights:
        if np.asarray(w).shape[1] != k:
            raise ValueError("every weight must have the same K")
    candidates = sorted({0.0, *(float(a) for a in (grid if grid is not None else awq_grid()))})
    errors: dict[float, float] = {}
    best_alpha, best_err, best_s = 0.0, np.inf, np.ones(k, dtype=np.float32)
    for alpha in candidates:
        s = scales_for_alpha(mean_abs, alpha) if alpha > 0 else np.ones(k, dtype=np.float32)
        err = 0.0
        for w in weights:
            q = quantize_scaled(w, s, bits, group_size, symmetric, clip_search, signed_scale)
            w_hat = q.dequantize() / s[None, :]
            err += layer_error(w, w_hat, h)
        errors[alpha] = err
        if err < best_err:
            best_alpha, best_err, best_s = alpha, err, s
    return AWQResult(best_s, best_alpha, best_err, errors[0.0], errors)
