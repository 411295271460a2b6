"""A streaming histogram with a fixed number of bins: constant memory in the sample count.

How the approximation works
---------------------------
* **Bins.** ``num_bins`` equal-width bins over ``[lo, hi]`` with exact int64 counts. The
  first batch sets ``[lo, hi]`` to its own ``[min, max]``; a batch with a single value
  (or all zeros) is held as a *point* (``lo == hi``, all mass in bin 0) until a batch with
  another value arrives, at which point it is placed exactly.
* **Widening.** When a batch falls outside ``[lo, hi]`` the bin width is multiplied by
  ``2**k`` (smallest ``k >= 1`` that covers the batch) and the grid is shifted by a whole
  number of old bins, so every old bin lies inside exactly one new bin: old counts are
  summed into the new bins without splitting. Counts stay integers and the total is
  exact; what is lost is resolution (each widening merges ``2**k`` old bins). The new
  grid is centred on the data, so extremes that creep outwards over later samples rarely
  widen it again. The bin count never grows, so memory is constant.
* **Two passes.** Widening costs resolution (a stream whose range grows 16x ends with
  16x coarser bins). ``initial_range`` (see ``HistogramObserver.second_pass``) starts
  the grid at a known range, as ONNX Runtime's two-pass calibration does.
* **Within a bin** values are taken as uniformly spread, clamped to the exact binned
  ``[min, max]``: the CDF is piecewise linear. Quantiles, the ``|x|`` view used by
  symmetric searches and merges of histograms whose grids do not align read that CDF;
  a merge re-bins the other histogram's CDF onto this grid and rounds the *cumulative*
  counts, so every count stays a non-negative integer and the total is exact.
* **Outliers.** A uniform grid cannot hold ``-3.4e38`` (an attention-mask fill value) and
  values near 1 at once: the bulk would fall into one bin. Such values are kept out of
  the bins and summarised exactly in two tails (count, sum, min, max). The rule looks at
  *gaps* in magnitude, not at mass, and at each batch on its own: bucket the batch's
  non-zero ``|x|`` by binary exponent (octave); split the occupied octaves into clusters
  wherever more than ``outlier_gap`` (default 16, a factor of about 65536) octaves in a
  row are empty; the batch's *bulk* is, among the clusters holding at least 1/1024 of
  its non-zero values, the one nearest to magnitude 1 (network activations are kept
  O(1); fills are huge and underflow debris, like ``exp(-100)`` in a masked softmax, is
  tiny). Clusters below the bulk are binned too (they are near zero); every value in a
  cluster above it is an outlier. So a mask fill is split off however many positions
  are masked, continuous heavy tails (LLM outlier channels, which occupy the octaves in
  between) stay binned, and a stream may grow by any factor from one batch to the next. The histogram observers choose their range from the bins
  alone: tails are always clipped. Limitation: a batch whose non-zero values are all
  fill values (a sample that is only padding) is its own bulk and is binned; that is
  right for the mask tensor itself. ``outlier_gap=None`` turns the split off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

FloatArray = np.ndarray[Any, np.dtype[np.float64]]
IntArray = np.ndarray[Any, np.dtype[np.int64]]

#: Default gap, in empty binary octaves, that separates outliers from the bulk.
DEFAULT_OUTLIER_GAP: int = 16
#: A batch's bulk cluster must hold at least this fraction of its non-zero values.
_BULK_FRACTION = 1.0 / 1024


@dataclass
class TailSummary:
    """Exact summary of the values kept out of the bins on one side.

    Attributes:
        count: Number of values.
        total: Their sum.
        min: Smallest value (``inf`` when empty).
        max: Largest value (``-inf`` when empty).
    """

    count: int = 0
    total: float = 0.0
    min: float = math.inf
    max: float = -math.inf

    def add(self, values: FloatArray) -> None:
        """Adds values (already known to be finite).

        Args:
            values: 1-D float64 values.
        """
        if values.size == 0:
            return
        self.count += int(values.size)
        self.total += float(np.sum(values))
        self.min = min(self.min, float(np.min(values)))
        self.max = max(self.max, float(np.max(values)))

    def merge(self, other: TailSummary) -> None:
        """Adds another summary of the same side.

        Args:
            other: The summary to add.
        """
        self.count += other.count
        self.total += other.total
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)


def _power_of_two(exponent: int) -> float:
    """``2.0**exponent``, or ``inf`` past the float64 range."""
    return math.ldexp(1.0, exponent) if exponent < 1024 else math.inf


class Histogram:
    """Streaming fixed-bin histogram with power-of-two widening and outlier tails.

    See the module docstring for how the approximation works.

    Args:
        num_bins: Number of bins (at least 2).
        outlier_gap: Empty binary octaves that separate outliers from the bulk; ``None``
            bins everything.
        initial_range: Start with this grid instead of the first batch's range (a second
            pass over the same data with the first pass's binned range never widens, so
            it keeps the full resolution).
    """

    def __init__(
        self,
        num_bins: int = 2048,
        *,
        outlier_gap: int | None = DEFAULT_OUTLIER_GAP,
        initial_range: tuple[float, float] | None = None,
    ) -> None:
        if num_bins < 2:
            raise ValueError(f"Histogram needs at least 2 bins, got {num_bins}")
        if outlier_gap is not None and outlier_gap < 1:
            raise ValueError(f"outlier_gap must be at least 1 octave, got {outlier_gap}")
        self.num_bins = int(num_bins)
        self.outlier_gap = outlier_gap
        self._counts: IntArray = np.zeros(self.num_bins, dtype=np.int64)
        self._lo = math.nan
        self._hi = math.nan
        if initial_range is not None:
            lo, hi = float(initial_range[0]), float(initial_range[1])
            if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
                raise ValueError(f"initial_range {initial_range} is not a finite [lo, hi]")
            if lo < hi:
                self._lo, self._hi = lo, hi
        self._bmin = math.inf
        self._bmax = -math.inf
        self.zeros = 0
        self.below = TailSummary()
        self.above = TailSummary()

    # ----------------------------------------------------------------- views
    @property
    def binned_count(self) -> int:
        """Number of values held in the bins."""
        return int(self._counts.sum())

    @property
    def total(self) -> int:
        """Number of values seen (bins and tails)."""
        return self.binned_count + self.below.count + self.above.count

    @property
    def is_point(self) -> bool:
        """Whether every binned value is the same number (``lo == hi``)."""
        return self.binned_count > 0 and self._lo == self._hi

    @property
    def lo(self) -> float:
        """Left edge of the grid (NaN while nothing is binned)."""
        return self._lo

    @property
    def hi(self) -> float:
        """Right edge of the grid (NaN while nothing is binned)."""
        return self._hi

    @property
    def binned_min(self) -> float:
        """Exact smallest binned value (``inf`` while empty)."""
        return self._bmin

    @property
    def binned_max(self) -> float:
        """Exact largest binned value (``-inf`` while empty)."""
        return self._bmax

    @property
    def data_min(self) -> float:
        """Exact smallest value seen, tails included."""
        return min(self._bmin, self.below.min, self.above.min)

    @property
    def data_max(self) -> float:
        """Exact largest value seen, tails included."""
        return max(self._bmax, self.below.max, self.above.max)

    @property
    def counts(self) -> IntArray:
        """A copy of the bin counts."""
        return self._counts.copy()

    @property
    def edges(self) -> FloatArray:
        """The ``num_bins + 1`` bin edges (all equal for a point)."""
        return np.linspace(self._lo, self._hi, self.num_bins + 1)

    def state_bytes(self) -> int:
        """Bytes of state: the counts plus a fixed number of scalars; constant in samples."""
        scalars = 5 + 2 * 4  # lo, hi, bmin, bmax, zeros; two tails of four numbers
        return int(self._counts.nbytes) + 8 * scalars

    # ---------------------------------------------------------------- update
    def add(
        self,
        values: np.ndarray[Any, np.dtype[Any]],
        vmin: float | None = None,
        vmax: float | None = None,
    ) -> None:
        """Adds a batch of finite values.

        Args:
            values: Finite real values, any shape (the caller checked them).
            vmin: ``values.min()`` if the caller has it.
            vmax: ``values.max()`` if the caller has it.
        """
        flat = np.asarray(values, dtype=np.float64).reshape(-1)
        if flat.size == 0:
            return
        if vmin is None or vmax is None:
            vmin, vmax = float(flat.min()), float(flat.max())
        bound = self._outlier_bound(flat, vmin, vmax)
        if max(-vmin, vmax) >= bound:
            outlier = np.abs(flat) >= bound
            self.below.add(flat[outlier & (flat < 0)])
            self.above.add(flat[outlier & (flat > 0)])
            flat = flat[~outlier]
            if flat.size == 0:
                return
            vmin, vmax = float(flat.min()), float(flat.max())
        self._add_binned(flat, vmin, vmax)

    def _outlier_bound(self, flat: FloatArray, vmin: float, vmax: float) -> float:
        """The magnitude from which this batch's values are outliers (module docstring)."""
        if self.outlier_gap is None:
            return math.inf
        # Biased float64 exponent: |x| in [2**(e - 1023), 2**(e - 1022)); 0 for zeros.
        octaves = np.bincount((flat.view(np.int64) >> 52) & 0x7FF, minlength=2048)
        occupied = np.flatnonzero(octaves[1:]) + 1
        if occupied.size < 2:
            return math.inf
        starts = np.flatnonzero(np.diff(occupied) > self.outlier_gap + 1) + 1
        if starts.size == 0:
            return math.inf
        clusters = np.split(occupied, starts)
        masses = [int(octaves[c].sum()) for c in clusters]
        need = max(1.0, sum(masses) * _BULK_FRACTION)

        def distance_to_one(cluster: np.ndarray[Any, np.dtype[np.intp]]) -> int:
            low, high = int(cluster[0]) - 1023, int(cluster[-1]) - 1023  # octaves of |x|
            return low if low > 0 else (-high if high < 0 else 0)

        eligible = [i for i, m in enumerate(masses) if m >= need] or [int(np.argmax(masses))]
        bulk = min(eligible, key=lambda i: (distance_to_one(clusters[i]), -masses[i]))
        if bulk == len(clusters) - 1:
            return math.inf
        return _power_of_two(int(clusters[bulk][-1]) - 1022)

    def _add_binned(self, flat: FloatArray, vmin: float, vmax: float) -> None:
        if self.binned_count == 0 and not self._lo < self._hi:
            self._lo, self._hi = vmin, vmax
        elif self.binned_count == 0 and (vmin < self._lo or vmax > self._hi):
            self._widen(vmin, vmax)
        elif self._lo == self._hi and not (vmin == vmax == self._lo):
            point, mass = self._lo, int(self._counts[0])
            self._counts[:] = 0
            self._lo, self._hi = min(point, vmin), max(point, vmax)
            self._counts[self._index(np.array([point]))[0]] += mass
        elif vmin < self._lo or vmax > self._hi:
            self._widen(vmin, vmax)
        if self._lo == self._hi:
            self._counts[0] += flat.size
        else:
            self._counts += np.bincount(self._index(flat), minlength=self.num_bins)
        self.zeros += int(np.count_nonzero(flat == 0.0))
        self._bmin = min(self._bmin, vmin)
        self._bmax = max(self._bmax, vmax)

    def _index(self, flat: FloatArray) -> np.ndarray[Any, np.dtype[np.intp]]:
        scale = self.num_bins / (self._hi - self._lo)
        idx = np.floor((flat - self._lo) * scale)
        return np.clip(idx, 0, self.num_bins - 1).astype(np.intp)

    def _widen(self, vmin: float, vmax: float) -> None:
        """Multiplies the bin width by ``2**k`` so the grid covers ``[vmin, vmax]``.

        The new grid is shifted by a whole number of old bins (so old bins merge without
        splitting) and centred on the data seen so far, leaving headroom on both sides
        so that slowly growing extremes do not widen it again and again.
        """
        n = self.num_bins
        width = (self._hi - self._lo) / n
        union_lo, union_hi = min(self._lo, vmin), max(self._hi, vmax)
        min_shift = max(0, math.ceil((self._lo - vmin) / width))
        reach = math.ceil((vmax - self._lo) / width)  # old bins from lo up to vmax
        span = (union_hi - union_lo) / width
        k = max(1, math.ceil(math.log2(max(span, n) / n)))
        while True:
            units = n * 2**k
            max_shift = min(units - n, units - reach)
            if min_shift <= max_shift:
                break
            k += 1
        centred = (self._lo - union_lo) / width + (units - span) / 2.0
        shift = int(min(max(round(centred), min_shift), max_shift))
        new_width = width * 2.0**k
        new_lo = self._lo - shift * width
        centers = self._lo + (np.arange(n) + 0.5) * width
        idx = np.clip(np.floor((centers - new_lo) / new_width), 0, n - 1).astype(np.intp)
        merged = np.bincount(idx, weights=self._counts.astype(np.float64), minlength=n)
        self._counts = np.rint(merged).astype(np.int64)
        self._lo = new_lo
        self._hi = new_lo + n * new_width

    # ----------------------------------------------------------------- merge
    def merge(self, other: Histogram) -> None:
        """Adds another histogram's data (for calibration shards run in parallel).

        Tails and extremes merge exactly; bins add exactly when the grids coincide and
        are otherwise re-binned through the other histogram's CDF (see module docstring).

        Args:
            other: A histogram with the same ``num_bins``.

        Raises:
            ValueError: The bin counts differ.
        """
        if other.num_bins != self.num_bins:
            raise ValueError(
                f"cannot merge histograms of {self.num_bins} and {other.num_bins} bins"
            )
        zeros = self.zeros + other.zeros
        self._merge_bins(other)
        self.zeros = zeros

    def _merge_bins(self, other: Histogram) -> None:
        self.below.merge(other.below)
        self.above.merge(other.above)
        if other.binned_count == 0:
            return
        if self.binned_count == 0:
            self._counts = other._counts.copy()
            self._lo, self._hi = other._lo, other._hi
            self._bmin, self._bmax = other._bmin, other._bmax
            return
        if other.is_point:
            self._add_point(other._lo, int(other._counts[0]))
            return
        if self.is_point:
            point, mass = self._lo, int(self._counts[0])
            self._counts = other._counts.copy()
            self._lo, self._hi = other._lo, other._hi
            self._bmin, self._bmax = other._bmin, other._bmax
            self._add_point(point, mass)
            return
        if other._bmin < self._lo or other._bmax > self._hi:
            self._widen(other._bmin, other._bmax)
        if self._lo == other._lo and self._hi == other._hi:
            self._counts += other._counts
        else:
            cum = np.rint(other.cdf(self.edges))
            cum[0], cum[-1] = 0.0, float(other.binned_count)
            self._counts += np.diff(cum).astype(np.int64)
        self._bmin = min(self._bmin, other._bmin)
        self._bmax = max(self._bmax, other._bmax)

    def _add_point(self, value: float, mass: int) -> None:
        self._add_binned(np.array([value]), value, value)
        if self._lo == self._hi:
            self._counts[0] += mass - 1
        else:
            self._counts[self._index(np.array([value]))[0]] += mass - 1

    # ------------------------------------------------------------------- CDF
    def nonzero_counts(self) -> FloatArray:
        """Bin counts without the exact zeros (taken out of the bin that holds 0).

        Exact zeros (ReLU outputs, padding) are exactly representable on every grid, so
        the clip searches leave them out.

        Returns:
            Float counts.
        """
        counts = self._counts.astype(np.float64)
        if self.zeros and self.binned_count:
            if self._lo == self._hi:
                counts[0] = 0.0
            else:
                zero_bin = int(self._index(np.zeros(1))[0])
                counts[zero_bin] = max(0.0, counts[zero_bin] - self.zeros)
        return counts

    def _knots(self, counts: FloatArray) -> tuple[FloatArray, FloatArray]:
        """CDF knots: edges clamped to the exact binned range, cumulative counts."""
        x = np.clip(self.edges, self._bmin, self._bmax)
        c = np.concatenate([[0.0], np.cumsum(counts)])
        return x, c

    def cdf(
        self, t: np.ndarray[Any, np.dtype[Any]] | float, *, exclude_zeros: bool = False
    ) -> FloatArray:
        """Binned mass at or below ``t`` (piecewise linear; tails not included).

        Args:
            t: Points to evaluate at.
            exclude_zeros: Leave the exact zeros out (see :meth:`nonzero_counts`).

        Returns:
            Float counts, same shape as ``t``.
        """
        pts = np.asarray(t, dtype=np.float64)
        counts = self.nonzero_counts() if exclude_zeros else self._counts.astype(np.float64)
        total = float(counts.sum())
        if total == 0:
            return np.zeros(pts.shape)
        if self.is_point:
            return np.where(pts >= self._lo, total, 0.0)
        x, c = self._knots(counts)
        j = np.searchsorted(x, pts, side="right")
        inner = np.clip(j, 1, len(x) - 1)
        x0, x1 = x[inner - 1], x[inner]
        c0, c1 = c[inner - 1], c[inner]
        span = np.where(x1 > x0, x1 - x0, 1.0)
        frac = np.clip((pts - x0) / span, 0.0, 1.0)
        out = c0 + (c1 - c0) * frac
        out = np.where(j <= 0, 0.0, out)
        result: FloatArray = np.where(j >= len(x), total, out)
        return result

    def quantile(self, q: float) -> float:
        """The value below which a fraction ``q`` of the *binned* values lies.

        Tails (outliers) are not counted: this is a quantile of the bulk.

        Args:
            q: Fraction in ``[0, 1]``; 0 gives the exact binned minimum, 1 the maximum.

        Returns:
            The interpolated quantile, inside ``[binned_min, binned_max]``.

        Raises:
            ValueError: Nothing is binned or ``q`` is outside ``[0, 1]``.
        """
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile fraction {q} is outside [0, 1]")
        binned = self.binned_count
        if binned == 0:
            raise ValueError("quantile of a histogram with no binned values")
        if self.is_point or q == 0.0:
            return self._bmin
        if q == 1.0:
            return self._bmax
        rank = q * binned
        x, c = self._knots(self._counts.astype(np.float64))
        j = int(np.searchsorted(c, rank, side="left"))
        if j == 0:
            return float(x[0])
        frac = (rank - c[j - 1]) / (c[j] - c[j - 1])
        return float(np.clip(x[j - 1] + frac * (x[j] - x[j - 1]), self._bmin, self._bmax))

    def folded(
        self, num_bins: int | None = None, *, exclude_zeros: bool = False
    ) -> tuple[FloatArray, FloatArray]:
        """The histogram of ``|x|`` over ``[0, max |binned x|]``, from the CDF.

        Args:
            num_bins: Bins of the folded histogram (default: this one's).
            exclude_zeros: Leave the exact zeros out (see :meth:`nonzero_counts`).

        Returns:
            ``(edges, counts)`` with float counts; tails are not included.

        Raises:
            ValueError: Nothing is binned.
        """
        n = num_bins or self.num_bins
        if self.binned_count == 0:
            raise ValueError("folded view of a histogram with no binned values")
        top = max(abs(self._bmin), abs(self._bmax))
        edges = np.linspace(0.0, top, n + 1)
        total = float(self.binned_count - (self.zeros if exclude_zeros else 0))
        if self.is_point:
            counts = np.zeros(n)
            counts[-1 if top > 0 else 0] = total
        else:
            mass = self.cdf(edges, exclude_zeros=exclude_zeros)
            mass -= self.cdf(-edges, exclude_zeros=exclude_zeros)
            mass[0] = 0.0
            mass[-1] = total
            counts = np.maximum(np.diff(np.maximum.accumulate(mass)), 0.0)
        return edges, counts
