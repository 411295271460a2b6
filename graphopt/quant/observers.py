"""Observers: streaming statistics of a value during calibration, and the range they choose.

An observer sees one value (activation) across calibration samples through
``update(array, sample)`` and answers ``range() -> (min, max)``; ``qparams(spec)`` turns
that into scales. State is constant in the number of samples (``state_bytes()`` does not
grow), and ``merge(other)`` combines observers that saw different shards.

===============  ==========================================================================
name             range it chooses
===============  ==========================================================================
``minmax``       exact running min/max, per tensor or per channel along ``axis``; an outlier
                 such as an attention-mask fill of -3.4e38 is kept (and sets the scale).
``percentile``   ``[q(1 - p), q(p)]`` of the binned values (two-sided).
``entropy``      KL-divergence window over the bins (:mod:`graphopt.quant.kl`); exact
                 zeros are left out of the comparison (every grid holds 0 exactly, and a
                 ReLU's spike at 0 would otherwise pull the window far in).
``mse``          clip range minimising the expected quantization MSE of the binned values
                 for a given spec (:mod:`graphopt.quant.mse`).
===============  ==========================================================================

The three histogram observers share :class:`~graphopt.quant.histogram.Histogram`
(streaming, fixed bins) and are per-tensor. The histogram splits off values separated
from the bulk by a gap of more than 16 empty octaves (a factor of ~65536: mask fills like
-3.4e38 or -1e9, however many positions hold them) into exact tails; these three
observers choose from the bins only, so such outliers are always clipped and the bulk
keeps its resolution, while ``minmax`` keeps them. Every range lies inside the exact
``[min, max]`` of the data seen (bulk outliers included: percentile/entropy/MSE clip
rare bulk extremes as their method says). Degenerate data never fails: a constant (or all
zeros) gives ``(c, c)``, which ``compute_qparams`` turns into an exact scale.

Resolution: a streaming histogram widens its bins as the range grows (see
:mod:`graphopt.quant.histogram`), which limits how finely entropy and MSE can clip. For
full resolution run the data twice: ``obs2 = obs.second_pass()`` starts from the first
pass's range and never widens.

Errors: a NaN or infinity, a non-numeric dtype or a wrong channel count raises
:class:`~graphopt.errors.CalibrationError` naming the value, the sample index (the
caller's, or the count of earlier updates) and the observer. An empty array is ignored.
"""

from __future__ import annotations

import abc
import copy
import difflib
import math
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from graphopt.errors import CalibrationError, UsageError
from graphopt.quant.histogram import DEFAULT_OUTLIER_GAP, Histogram
from graphopt.quant.kl import kl_window
from graphopt.quant.mse import mse_clip_range
from graphopt.quant.qparams import QParams, compute_qparams
from graphopt.quant.spec import ACT_U8_ASYM, QuantSpec

FloatArray = np.ndarray[Any, np.dtype[np.float64]]
RealArray = np.ndarray[Any, np.dtype[Any]]


class Observer(abc.ABC):
    """Base class: validates each update, counts samples, turns ranges into qparams.

    Subclasses set ``name`` (the registry name) and implement ``_observe``, ``range``,
    ``_merge``, ``_config`` and ``state_bytes``.

    Args:
        value_name: The observed value's name, used in error messages.

    Attributes:
        value_name: The observed value's name.
        num_updates: Number of accepted ``update`` calls (empty arrays included; a call
            that raised leaves the observer unchanged).
    """

    name: ClassVar[str]

    def __init__(self, *, value_name: str = "tensor") -> None:
        self.value_name = value_name
        self.num_updates = 0

    def update(self, x: npt.ArrayLike, sample: int | None = None) -> None:
        """Adds one sample's values.

        Args:
            x: The value's array for this sample (any real dtype; float16, bfloat16 and
                integers are converted).
            sample: The sample index for error messages (default: ``num_updates``).

        Raises:
            CalibrationError: ``x`` holds NaN/inf, is not real-valued, or does not fit
                the observer (channel count).
        """
        index = self.num_updates if sample is None else sample
        arr = self._as_real(x, index)
        if arr.size:
            lo, hi = float(np.min(arr)), float(np.max(arr))
            if not (math.isfinite(lo) and math.isfinite(hi)):
                self._raise_non_finite(arr, index)
            self._observe(arr, lo, hi, index)
        self.num_updates += 1

    def _as_real(self, x: npt.ArrayLike, sample: int) -> RealArray:
        arr = np.asarray(x)
        kind = arr.dtype.kind
        if kind == "f":
            return arr if arr.dtype.itemsize >= 4 else arr.astype(np.float32)
        if kind in "iu":
            return arr.astype(np.float64)
        if arr.dtype.name == "bfloat16" or arr.dtype.name.startswith("float8"):
            return arr.astype(np.float32)
        raise self._error(sample, f"dtype {arr.dtype} is not a real number type")

    def _raise_non_finite(self, arr: RealArray, sample: int) -> None:
        bad = ~np.isfinite(arr)
        flat = int(np.flatnonzero(bad.reshape(-1))[0])
        where = tuple(int(i) for i in np.unravel_index(flat, arr.shape))
        value = arr.reshape(-1)[flat]
        what = "NaN" if np.isnan(value) else ("+inf" if value > 0 else "-inf")
        raise self._error(sample, f"contains {what} (first at index {where})")

    def _error(self, sample: int, message: str) -> CalibrationError:
        return CalibrationError(
            f"calibration value '{self.value_name}' sample {sample}: {message} "
            f"[{self.name} observer]"
        )

    def _no_data(self) -> CalibrationError:
        return CalibrationError(
            f"calibration value '{self.value_name}': {self.name} observer has seen no data"
        )

    @abc.abstractmethod
    def _observe(self, arr: RealArray, lo: float, hi: float, sample: int) -> None:
        """Adds a validated, non-empty, finite array whose min/max are ``lo``/``hi``."""

    @abc.abstractmethod
    def range(self) -> tuple[FloatArray, FloatArray]:
        """The chosen ``(min, max)``: 0-d arrays per tensor, 1-D per channel.

        Raises:
            CalibrationError: No data was seen.
        """

    @abc.abstractmethod
    def _config(self) -> tuple[object, ...]:
        """The settings two observers must share to be merged."""

    @abc.abstractmethod
    def _merge(self, other: Any) -> None:
        """Adds the state of ``other`` (same class and config)."""

    @abc.abstractmethod
    def state_bytes(self) -> int:
        """Bytes of statistics held; the same after 16 or 512 updates."""

    def merge(self, other: Observer) -> None:
        """Adds the statistics of an observer that saw another shard of the data.

        Args:
            other: An observer of the same class and settings.

        Raises:
            ValueError: ``other`` has another class or other settings.
        """
        if type(other) is not type(self) or other._config() != self._config():
            raise ValueError(
                f"cannot merge {type(other).__name__}{other._config()} into "
                f"{type(self).__name__}{self._config()}"
            )
        self._merge(other)
        self.num_updates += other.num_updates

    def qparams(self, spec: QuantSpec) -> QParams:
        """``compute_qparams(*self.range(), spec)``.

        Args:
            spec: The quantization spec.

        Returns:
            The quantization parameters.
        """
        lo, hi = self.range()
        return compute_qparams(lo, hi, spec, value_name=self.value_name)


class MinMaxObserver(Observer):
    """Exact running minimum and maximum, per tensor or per channel.

    Args:
        axis: Channel axis for per-channel ranges; ``None`` for per tensor.
        value_name: The observed value's name, used in error messages.
    """

    name: ClassVar[str] = "minmax"

    def __init__(self, axis: int | None = None, *, value_name: str = "tensor") -> None:
        super().__init__(value_name=value_name)
        self.axis = axis
        self._min: FloatArray | None = None
        self._max: FloatArray | None = None

    def _observe(self, arr: RealArray, lo: float, hi: float, sample: int) -> None:
        if self.axis is None:
            new_min, new_max = np.array(lo), np.array(hi)
        else:
            if not -arr.ndim <= self.axis < arr.ndim:
                raise self._error(sample, f"has rank {arr.ndim}, no channel axis {self.axis}")
            axis = self.axis % arr.ndim
            others = tuple(i for i in range(arr.ndim) if i != axis)
            new_min = np.min(arr, axis=others).astype(np.float64)
            new_max = np.max(arr, axis=others).astype(np.float64)
        if self._min is None or self._max is None:
            self._min, self._max = new_min.astype(np.float64), new_max.astype(np.float64)
            return
        if new_min.shape != self._min.shape:
            raise self._error(
                sample,
                f"has {new_min.shape[0]} channels along axis {self.axis}, "
                f"earlier samples had {self._min.shape[0]}",
            )
        np.minimum(self._min, new_min, out=self._min)
        np.maximum(self._max, new_max, out=self._max)

    def range(self) -> tuple[FloatArray, FloatArray]:
        """The exact ``(min, max)`` seen; see :meth:`Observer.range`."""
        if self._min is None or self._max is None:
            raise self._no_data()
        return self._min.copy(), self._max.copy()

    def _config(self) -> tuple[object, ...]:
        return (self.axis,)

    def _merge(self, other: MinMaxObserver) -> None:
        if other._min is None or other._max is None:
            return
        if self._min is None or self._max is None:
            self._min, self._max = other._min.copy(), other._max.copy()
            return
        if other._min.shape != self._min.shape:
            raise ValueError(
                f"cannot merge per-channel ranges of {other._min.shape} and {self._min.shape} "
                f"for '{self.value_name}'"
            )
        np.minimum(self._min, other._min, out=self._min)
        np.maximum(self._max, other._max, out=self._max)

    def state_bytes(self) -> int:
        """Bytes of the min/max arrays (16 per tensor, 16 per channel)."""
        if self._min is None or self._max is None:
            return 0
        return int(self._min.nbytes + self._max.nbytes)


class HistogramObserver(Observer):
    """Base of the per-tensor observers built on a streaming :class:`Histogram`.

    Args:
        num_bins: Histogram bins.
        outlier_gap: See :class:`Histogram`.
        value_name: The observed value's name, used in error messages.
    """

    name: ClassVar[str] = "histogram"

    def __init__(
        self,
        num_bins: int = 2048,
        *,
        outlier_gap: int | None = DEFAULT_OUTLIER_GAP,
        value_name: str = "tensor",
    ) -> None:
        super().__init__(value_name=value_name)
        self.histogram = Histogram(num_bins, outlier_gap=outlier_gap)

    def second_pass(self) -> HistogramObserver:
        """A fresh observer with the same settings whose grid starts at this one's range.

        Run the calibration data through it again: its bins are never widened, so the
        range it chooses uses the histogram's full resolution (two-pass calibration).

        Returns:
            A new, empty observer of the same class and settings.

        Raises:
            CalibrationError: This observer has seen no data.
        """
        if self.histogram.total == 0:
            raise self._no_data()
        fresh = copy.copy(self)
        fresh.num_updates = 0
        hist = self.histogram
        fresh.histogram = Histogram(
            hist.num_bins,
            outlier_gap=hist.outlier_gap,
            initial_range=(hist.binned_min, hist.binned_max) if hist.binned_count else None,
        )
        return fresh

    def _observe(self, arr: RealArray, lo: float, hi: float, sample: int) -> None:
        self.histogram.add(arr, lo, hi)

    def _merge(self, other: HistogramObserver) -> None:
        self.histogram.merge(other.histogram)

    def _config(self) -> tuple[object, ...]:
        return (self.histogram.num_bins, self.histogram.outlier_gap)

    def state_bytes(self) -> int:
        """Bytes of the histogram (constant)."""
        return self.histogram.state_bytes()

    def range(self) -> tuple[FloatArray, FloatArray]:
        """The chosen ``(min, max)`` as 0-d arrays; see :meth:`Observer.range`."""
        hist = self.histogram
        if hist.total == 0:
            raise self._no_data()
        lo, hi = self._choose(hist)
        lo = min(max(lo, hist.data_min), hist.data_max)
        hi = min(max(hi, lo), hist.data_max)
        return np.array(lo), np.array(hi)

    @abc.abstractmethod
    def _choose(self, hist: Histogram) -> tuple[float, float]:
        """The range for a non-empty histogram."""


class PercentileObserver(HistogramObserver):
    """Range ``[q(1 - p), q(p)]`` of all values, ``p = percentile / 100``.

    Args:
        percentile: In ``(50, 100]``; 100 gives the exact min/max.
        num_bins: Histogram bins.
        outlier_gap: See :class:`Histogram`.
        value_name: The observed value's name, used in error messages.
    """

    name: ClassVar[str] = "percentile"

    def __init__(
        self,
        percentile: float = 99.99,
        num_bins: int = 2048,
        *,
        outlier_gap: int | None = DEFAULT_OUTLIER_GAP,
        value_name: str = "tensor",
    ) -> None:
        if not 50.0 < percentile <= 100.0:
            raise UsageError(f"percentile must be in (50, 100], got {percentile}")
        super().__init__(num_bins, outlier_gap=outlier_gap, value_name=value_name)
        self.percentile = float(percentile)

    def _config(self) -> tuple[object, ...]:
        return (*super()._config(), self.percentile)

    def _choose(self, hist: Histogram) -> tuple[float, float]:
        p = self.percentile / 100.0
        return hist.quantile(1.0 - p), hist.quantile(p)


class EntropyObserver(HistogramObserver):
    """KL-divergence clip range (TensorRT-style entropy calibration).

    Args:
        num_bins: Histogram bins.
        num_quant_bins: Quantization cells in the KL model; default 255 (asymmetric,
            signed windows) or 128 (symmetric, ``|x|`` windows).
        symmetric: Search ``|x|`` thresholds ``T`` for symmetric specs; the range is
            ``[-T, T]`` intersected with the data.
        outlier_gap: See :class:`Histogram`.
        value_name: The observed value's name, used in error messages.
    """

    name: ClassVar[str] = "entropy"

    def __init__(
        self,
        num_bins: int = 2048,
        num_quant_bins: int | None = None,
        symmetric: bool = False,
        *,
        outlier_gap: int | None = DEFAULT_OUTLIER_GAP,
        value_name: str = "tensor",
    ) -> None:
        super().__init__(num_bins, outlier_gap=outlier_gap, value_name=value_name)
        self.symmetric = bool(symmetric)
        self.num_quant_bins = num_quant_bins or (128 if symmetric else 255)
        if self.num_quant_bins < 2:
            raise UsageError(f"num_quant_bins must be at least 2, got {self.num_quant_bins}")

    def _config(self) -> tuple[object, ...]:
        return (*super()._config(), self.num_quant_bins, self.symmetric)

    def _choose(self, hist: Histogram) -> tuple[float, float]:
        if hist.binned_count == 0:
            # Only tail values: nothing to search; keep them (MinMax behaviour).
            return hist.data_min, hist.data_max
        dmin, dmax = hist.binned_min, hist.binned_max
        if hist.is_point or dmin == dmax:
            return dmin, dmax
        if hist.zeros == hist.binned_count:
            return dmin, dmax
        if self.symmetric:
            edges, counts = hist.folded(exclude_zeros=True)
            _, t = kl_window(counts, edges, self.num_quant_bins)
            return max(dmin, -t), min(dmax, t)
        lo, hi = kl_window(hist.nonzero_counts(), hist.edges, self.num_quant_bins)
        return max(lo, dmin), min(hi, dmax)


class MSEObserver(HistogramObserver):
    """Clip range minimising the expected quantization MSE for ``spec``.

    Args:
        spec: The per-tensor spec the range will be used with.
        num_bins: Histogram bins.
        outlier_gap: See :class:`Histogram`.
        value_name: The observed value's name, used in error messages.
    """

    name: ClassVar[str] = "mse"

    def __init__(
        self,
        spec: QuantSpec = ACT_U8_ASYM,
        num_bins: int = 2048,
        *,
        outlier_gap: int | None = DEFAULT_OUTLIER_GAP,
        value_name: str = "tensor",
    ) -> None:
        if spec.per_channel:
            raise UsageError(f"MSEObserver is per-tensor; got spec {spec.to_text()}")
        super().__init__(num_bins, outlier_gap=outlier_gap, value_name=value_name)
        self.spec = spec

    def _config(self) -> tuple[object, ...]:
        return (*super()._config(), self.spec)

    def _choose(self, hist: Histogram) -> tuple[float, float]:
        if hist.binned_count == 0:
            return hist.data_min, hist.data_max
        return mse_clip_range(hist, self.spec)


#: Registry names -> observer classes.
OBSERVERS: dict[str, type[Observer]] = {
    MinMaxObserver.name: MinMaxObserver,
    PercentileObserver.name: PercentileObserver,
    EntropyObserver.name: EntropyObserver,
    MSEObserver.name: MSEObserver,
}


def make_observer(name: str, **kwargs: Any) -> Observer:
    """Builds a registered observer by name.

    Args:
        name: ``minmax``, ``percentile``, ``entropy`` or ``mse``.
        **kwargs: Passed to the observer's constructor (e.g. ``value_name``, ``axis``).

    Returns:
        A new observer.

    Raises:
        UsageError: The name is unknown (the closest known one is suggested) or the
            arguments do not fit the observer.
    """
    cls = OBSERVERS.get(name)
    if cls is None:
        close = difflib.get_close_matches(name, list(OBSERVERS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        known = ", ".join(sorted(OBSERVERS))
        raise UsageError(f"unknown observer '{name}' (known: {known}){hint}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise UsageError(f"observer '{name}': {e}") from None
