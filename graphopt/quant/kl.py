"""KL-divergence (entropy) search for a clipping window over a histogram.

The method (as described for TensorRT's int8 calibration): for a candidate window of bins,
``P`` is the histogram inside the window with all mass outside it folded into the two
edge bins (the clipped values), and ``Q`` is the window's histogram *without* that mass,
merged into ``num_quant_bins`` equal quantization cells and spread back uniformly over the
bins where ``P`` is non-zero. The window minimising ``KL(P || Q)`` balances the rounding
error of wide windows against the clipping error of narrow ones.

Our generalisation and the choices that keep it from ever failing:

* Windows are ``[-T, T]`` intersected with the occupied bins, for ``T`` at every bin edge
  magnitude, so one search serves signed histograms (asymmetric quantization: the cells
  cover the window widened to hold 0, as the real grid does) and ``|x|`` histograms
  (symmetric quantization: windows ``[0, T]``).
* Windows narrower than ``num_quant_bins`` bins are not candidates (their KL is trivially
  0). If the occupied bins are fewer than that, the whole occupied range is returned.
* Where ``Q`` is 0 but ``P`` is not (clipped mass piled onto an empty edge bin) ``Q`` gets
  ``1e-12`` instead: the KL is large but finite.
* Among windows within ``1e-12`` of the smallest KL, the widest wins (least clipping).
* The candidate list is searched at a stride of about 1/128 of its length, then
  exhaustively around the best coarse candidate.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

FloatArray = np.ndarray[Any, np.dtype[np.float64]]

_Q_FLOOR = 1e-12
_COARSE_STEPS = 128


def _windows(edges: FloatArray, first: int, last: int, min_bins: int) -> list[tuple[int, int]]:
    """Candidate windows ``[-T, T]`` on occupied bins ``first..last``, narrow to wide."""
    centers = 0.5 * (edges[:-1] + edges[1:])
    thresholds = np.unique(np.abs(edges))
    left = np.maximum(first, np.searchsorted(centers, -thresholds, side="left"))
    right = np.minimum(last, np.searchsorted(centers, thresholds, side="right") - 1)
    keep = right - left + 1 >= min_bins
    pairs = np.unique(np.stack([left[keep], right[keep]], axis=1), axis=0)
    # The windows are nested (T grows), so sorting by width orders them narrow to wide.
    order = np.argsort(pairs[:, 1] - pairs[:, 0], kind="stable")
    return [(int(a), int(b)) for a, b in pairs[order]]


def _kl(
    counts: FloatArray,
    cum: FloatArray,
    edges: FloatArray,
    window: tuple[int, int],
    num_quant_bins: int,
) -> float:
    left, right = window
    inside = counts[left : right + 1]
    if inside.sum() <= 0:
        return math.inf
    p = inside.copy()
    p[0] += cum[left]
    p[-1] += cum[-1] - cum[right + 1]
    grid_lo = min(float(edges[left]), 0.0)
    grid_hi = max(float(edges[right + 1]), 0.0)
    centers = 0.5 * (edges[left : right + 1] + edges[left + 1 : right + 2])
    cells = np.floor((centers - grid_lo) / (grid_hi - grid_lo) * num_quant_bins)
    cells = np.clip(cells, 0, num_quant_bins - 1).astype(np.intp)
    nonzero = p > 0
    cell_mass = np.bincount(cells, weights=inside, minlength=num_quant_bins)
    cell_support = np.bincount(cells, weights=nonzero.astype(np.float64), minlength=num_quant_bins)
    q = np.where(nonzero, cell_mass[cells] / np.maximum(cell_support[cells], 1.0), 0.0)
    p_n = p[nonzero] / p.sum()
    q_n = np.maximum(q[nonzero] / q.sum(), _Q_FLOOR)
    return float(np.sum(p_n * np.log(p_n / q_n)))


def kl_window(counts: FloatArray, edges: FloatArray, num_quant_bins: int) -> tuple[float, float]:
    """The clipping window ``[a, b]`` (bin edges) that minimises ``KL(P || Q)``.

    Args:
        counts: Bin masses (float or int), ``len(edges) - 1`` of them.
        edges: Increasing bin edges.
        num_quant_bins: Number of quantization cells over the window widened to hold 0
            (255 for 8-bit asymmetric windows, 128 for ``|x|`` windows).

    Returns:
        The window's outer edges ``(a, b)``; for an ``|x|`` histogram ``a`` is its first
        occupied edge and ``b`` the threshold ``T``.

    Raises:
        ValueError: No bin holds any mass.
    """
    mass = np.asarray(counts, dtype=np.float64)
    occupied = np.flatnonzero(mass > 0)
    if occupied.size == 0:
        raise ValueError("KL search over an empty histogram")
    first, last = int(occupied[0]), int(occupied[-1])
    min_bins = min(num_quant_bins, last - first + 1)
    windows = _windows(edges, first, last, min_bins)
    if not windows:
        return float(edges[first]), float(edges[last + 1])
    cum = np.concatenate([[0.0], np.cumsum(mass)])

    def score(i: int) -> float:
        return _kl(mass, cum, edges, windows[i], num_quant_bins)

    stride = max(1, len(windows) // _COARSE_STEPS)
    scores: dict[int, float] = {i: score(i) for i in range(0, len(windows), stride)}
    scores.setdefault(len(windows) - 1, score(len(windows) - 1))
    best = _pick(scores)
    for i in range(max(0, best - stride), min(len(windows), best + stride + 1)):
        if i not in scores:
            scores[i] = score(i)
    left, right = windows[_pick(scores)]
    return float(edges[left]), float(edges[right + 1])


def _pick(scores: dict[int, float]) -> int:
    """Index of the widest window whose score is within tolerance of the best."""
    finite = [s for s in scores.values() if math.isfinite(s)]
    if not finite:
        return max(scores)
    best = min(finite)
    tol = 1e-12 * max(1.0, abs(best))
    return max(i for i, s in scores.items() if s <= best + tol)
