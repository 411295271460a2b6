"""Search for the clipping range that minimises the expected quantization MSE of a histogram.

The expected error of a candidate range ``[a, b]`` is computed for the *actual* grid that
``compute_qparams(a, b, spec)`` produces (zero-point rounding, saturation, scale floor),
not for an idealised one:

* exact zeros are left out (0 is on every grid, so they add no error);
* each occupied bin contributes ``samples_per_bin`` equally weighted points spread
  evenly across the bin (clamped to the exact binned range); the error is the weighted
  sum of ``(x - fake_quantize(x))**2`` over those points;
* the tails (outliers kept out of the bins, see :mod:`graphopt.quant.histogram`) are
  left out: every candidate clips them, and their squared error (``~1e76`` for a
  ``-3.4e38`` mask fill) would drown the bulk's and drag the range to the binned extremes.

Candidates stay inside the binned data range. Symmetric specs search one threshold ``T`` (range ``[-T, T]`` intersected with the
data); asymmetric specs run coordinate descent (``max``, then ``min``, then ``max`` again).
Each 1-D search evaluates ``num_candidates`` evenly spaced values, then as many again
between the neighbours of the best one. Ties go to the wider range.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from graphopt.quant.histogram import Histogram
from graphopt.quant.qparams import compute_qparams, fake_quantize
from graphopt.quant.spec import QuantSpec

FloatArray = np.ndarray[Any, np.dtype[np.float64]]


def _sample_points(hist: Histogram, samples_per_bin: int) -> tuple[FloatArray, FloatArray]:
    counts = hist.nonzero_counts()
    occupied = np.flatnonzero(counts > 0)
    edges = hist.edges
    width = edges[1] - edges[0]
    offsets = (np.arange(samples_per_bin) + 0.5) / samples_per_bin
    points = edges[occupied][:, None] + width * offsets[None, :]
    points = np.clip(points, hist.binned_min, hist.binned_max).reshape(-1)
    weights = np.repeat(counts[occupied] / samples_per_bin, samples_per_bin)
    return points, weights


def expected_error(
    hist: Histogram, lo: float, hi: float, spec: QuantSpec, samples_per_bin: int = 4
) -> float:
    """Expected summed squared error of quantizing the binned data with ``[lo, hi]``.

    Args:
        hist: A histogram with binned values.
        lo: Clip range minimum.
        hi: Clip range maximum.
        spec: The per-tensor quantization spec.
        samples_per_bin: Points per occupied bin.

    Returns:
        The summed squared error over the binned values (tails left out).
    """
    points, weights = _sample_points(hist, samples_per_bin)
    return _error(points, weights, hist, lo, hi, spec)


def _error(
    points: FloatArray, weights: FloatArray, hist: Histogram, lo: float, hi: float, spec: QuantSpec
) -> float:
    qp = compute_qparams(lo, hi, spec)
    approx = fake_quantize(points, qp, spec).astype(np.float64)
    return float(np.sum(weights * (points - approx) ** 2))


def _search_1d(start: float, stop: float, num: int, cost: Callable[[float], float]) -> float:
    """Minimises ``cost`` over ``(start, stop]``: a grid, then a finer grid near the best."""
    if not stop > start:
        return stop
    grid = start + (stop - start) * np.arange(1, num + 1) / num
    values = [cost(float(v)) for v in grid]
    i = _widest_best(values)
    step = (stop - start) / num
    lo = max(start, float(grid[i]) - step)
    hi = min(stop, float(grid[i]) + step)
    fine = [float(v) for v in np.linspace(lo, hi, num + 1)[1:]] + [float(grid[i])]
    fine.sort()
    return fine[_widest_best([cost(v) for v in fine])]


def _widest_best(values: list[float]) -> int:
    """Largest index whose value is within a relative 1e-9 of the minimum."""
    best = min(values)
    tol = 1e-9 * abs(best) if math.isfinite(best) else 0.0
    return max(i for i, v in enumerate(values) if v <= best + tol)


def mse_clip_range(
    hist: Histogram,
    spec: QuantSpec,
    *,
    num_candidates: int = 64,
    samples_per_bin: int = 4,
) -> tuple[float, float]:
    """The clip range inside the binned data range with the smallest expected MSE.

    Args:
        hist: A histogram with binned values.
        spec: A per-tensor quantization spec (the grid the error is measured on).
        num_candidates: Grid points per 1-D search stage.
        samples_per_bin: Points per occupied bin in the error estimate.

    Returns:
        ``(min, max)`` with ``binned_min <= min <= max <= binned_max``.

    Raises:
        ValueError: The histogram has no binned values or the spec is per-channel.
    """
    if spec.per_channel:
        raise ValueError("MSE clip search works on per-tensor specs only")
    if hist.binned_count == 0:
        raise ValueError("MSE clip search over a histogram with no binned values")
    dmin, dmax = hist.binned_min, hist.binned_max
    if hist.is_point or dmin == dmax or hist.zeros == hist.binned_count:
        return dmin, dmax
    points, weights = _sample_points(hist, samples_per_bin)

    def cost(lo: float, hi: float) -> float:
        return _error(points, weights, hist, lo, hi, spec)

    if spec.symmetric:
        low_t = dmin if dmin > 0 else (-dmax if dmax < 0 else 0.0)
        top_t = max(abs(dmin), abs(dmax))
        t = _search_1d(low_t, top_t, num_candidates, lambda v: cost(max(dmin, -v), min(dmax, v)))
        return max(dmin, -t), min(dmax, t)

    lo, hi = dmin, dmax
    hi_floor = max(dmin, 0.0)
    lo_ceil = min(dmax, 0.0)

    def best_hi(lo: float) -> float:
        if not dmax > hi_floor:
            return dmax
        return _search_1d(hi_floor, dmax, num_candidates, lambda v: cost(lo, v))

    def best_lo(hi: float) -> float:
        if not dmin < lo_ceil:
            return dmin
        # Search the magnitude |min| so that "wider" means a larger candidate.
        return -_search_1d(-lo_ceil, -dmin, num_candidates, lambda v: cost(-v, hi))

    hi = best_hi(lo)
    lo = best_lo(hi)
    hi = best_hi(lo)
    return lo, hi
