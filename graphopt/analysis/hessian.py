"""Input Hessians of linear layers from calibration runs: :class:`InputHessianAnalysis`.

For a layer ``y = x W^T`` the squared output error of a weight perturbation ``dW`` is
``tr(dW H dW^T)`` with ``H = (1/rows) * sum over rows of x^T x``, the input's (uncentred)
second-moment matrix. GPTQ rounds against ``H``; AWQ and SmoothQuant read its diagonal and
per-channel magnitudes; pruning scores channels by it.

The analysis runs the model on ONNX Runtime exactly as
:class:`~graphopt.analysis.calibration.ActivationStatsAnalysis` does (a serialized copy
with the values as extra outputs, graph optimizations off, one calibration feed at a time)
and accumulates, per value, the Gram matrix ``sum x^T x`` in float64 over all rows
(leading dimensions flattened: batch and sequence positions are rows), plus per-channel
``sum |x|`` and ``max |x|``. Memory is the Gram matrices (``K * K`` doubles per value),
independent of the number of samples.

A NaN or infinity in a value raises :class:`~graphopt.errors.CalibrationError` naming the
value and the sample. Results are cached by the :class:`~graphopt.infra.AnalysisManager`
and depend on the model's STRUCTURE and WEIGHTS.

Example::

    hs = am.get(InputHessianAnalysis(["/model/layers.0/mlp/Mul_output_0"]), model)
    h = hs.hessian("/model/layers.0/mlp/Mul_output_0")   # float64 [K, K]
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from graphopt.analysis.calibration import (
    run_feed,
    session_with_outputs,
    total_feeds,
    values_by_name,
)
from graphopt.errors import CalibrationError, UsageError
from graphopt.infra.analysis import Analysis, AnalysisManager, Aspect
from graphopt.infra.context import PassContext
from graphopt.infra.progress import LazyProgress

logger = logging.getLogger(__name__)

Float64Array = np.ndarray[Any, np.dtype[np.float64]]


@dataclass
class _Accumulator:
    """Running sums for one value: Gram matrix, row count, per-channel |x| sum and max."""

    gram: Float64Array
    abs_sum: Float64Array
    abs_max: Float64Array
    rows: int = 0

    @classmethod
    def new(cls, k: int) -> _Accumulator:
        return cls(np.zeros((k, k)), np.zeros(k), np.zeros(k))

    def add(self, x2d: np.ndarray) -> None:
        # float32 products per feed (fast BLAS), accumulated in float64 across feeds.
        x32 = np.ascontiguousarray(x2d, dtype=np.float32)
        self.gram += (x32.T @ x32).astype(np.float64)
        ax = np.abs(x32)
        self.abs_sum += ax.sum(axis=0, dtype=np.float64)
        if ax.shape[0]:
            np.maximum(self.abs_max, ax.max(axis=0), out=self.abs_max)
        self.rows += int(x2d.shape[0])


@dataclass
class InputHessians:
    """What :class:`InputHessianAnalysis` returns.

    Attributes:
        samples: Calibration feeds seen.
        seconds: Wall time of the calibration runs and accumulation.
    """

    _acc: dict[str, _Accumulator]
    samples: int
    seconds: float

    @property
    def values(self) -> list[str]:
        """The analysed value names, in request order."""
        return list(self._acc)

    def _get(self, value: str) -> _Accumulator:
        try:
            acc = self._acc[value]
        except KeyError:
            raise KeyError(f"no input Hessian was computed for value {value!r}") from None
        if acc.rows == 0:
            raise CalibrationError(f"value {value!r} had no rows in the calibration data")
        return acc

    def hessian(self, value: str) -> Float64Array:
        """``float64[K, K]``: ``(1/rows) * sum x^T x`` over every row of ``value``."""
        acc = self._get(value)
        return acc.gram / float(acc.rows)

    def gram(self, value: str) -> Float64Array:
        """``float64[K, K]``: the unnormalised ``sum x^T x`` (read-only view; do not modify)."""
        return self._get(value).gram

    def rows(self, value: str) -> int:
        """Rows (all leading positions of every feed) accumulated for ``value``."""
        return self._get(value).rows

    def channel_rms(self, value: str) -> Float64Array:
        """``float64[K]``: root mean square of each input channel (sqrt of H's diagonal)."""
        acc = self._get(value)
        return np.sqrt(np.maximum(np.diag(acc.gram) / float(acc.rows), 0.0))

    def channel_mean_abs(self, value: str) -> Float64Array:
        """``float64[K]``: mean ``|x|`` of each input channel."""
        acc = self._get(value)
        return acc.abs_sum / float(acc.rows)

    def channel_max_abs(self, value: str) -> Float64Array:
        """``float64[K]``: largest ``|x|`` seen in each input channel."""
        return self._get(value).abs_max.copy()


class InputHessianAnalysis(Analysis[InputHessians]):
    """Streams calibration feeds through ONNX Runtime and accumulates input Hessians.

    Args:
        values: Names of main-graph values (the inputs of linear layers); each must have a
            fixed last dimension ``K``.
        max_samples: Use at most this many calibration feeds (None: all).
        progress_after_s: Show a progress bar once the runs have taken this long (not part
            of the cache key).
        threads: ONNX Runtime intra-op threads (not part of the cache key).
    """

    name = "input-hessian"
    depends_on = Aspect.STRUCTURE | Aspect.WEIGHTS

    def __init__(
        self,
        values: Sequence[str],
        max_samples: int | None = None,
        *,
        progress_after_s: float = 3.0,
        threads: int = 2,
    ) -> None:
        if isinstance(values, str):
            raise TypeError("values must be a sequence of value names, not one string")
        if max_samples is not None and max_samples < 1:
            raise UsageError(f"{self.name}: max_samples must be positive, got {max_samples}")
        self.values = tuple(dict.fromkeys(values))
        self.max_samples = max_samples
        self.progress_after_s = float(progress_after_s)
        self.threads = int(threads)

    def key(self) -> Hashable:
        return (type(self).__qualname__, self.values, self.max_samples)

    def run(self, model: ir.Model, am: AnalysisManager, ctx: PassContext) -> InputHessians:
        by_name = values_by_name(model.graph)
        missing = [v for v in self.values if v not in by_name]
        if missing:
            raise UsageError(
                f"{self.name}: no value named {', '.join(repr(m) for m in missing[:5])} "
                "in the main graph"
            )
        acc: dict[str, _Accumulator | None] = {v: None for v in self.values}
        fed = [v for v in self.values if by_name[v].is_graph_input()]
        constants = [
            v
            for v in self.values
            if v not in fed and by_name[v].is_initializer() and by_name[v].const_value is not None
        ]
        computed = [v for v in self.values if v not in fed and v not in constants]

        started = time.perf_counter()
        samples = 0
        feeds = ctx.calibration_feeds()  # fails before any session is built without data
        for v in constants:
            const = by_name[v].const_value
            assert const is not None
            self._accumulate(acc, v, np.asarray(const.numpy()), 0)
        total = total_feeds(ctx)
        if total is not None and self.max_samples is not None:
            total = min(total, self.max_samples)
        with tempfile.TemporaryDirectory(prefix="graphopt-hessian-") as scratch:
            session = (
                session_with_outputs(model, computed, Path(scratch), self.threads)
                if computed
                else None
            )
            progress = LazyProgress("calibrating", total, "samples", self.progress_after_s)
            try:
                for index, feed in enumerate(feeds):
                    if self.max_samples is not None and index >= self.max_samples:
                        break
                    for v in fed:
                        if v not in feed:
                            raise CalibrationError(
                                f"calibration sample {index}: no array for graph input '{v}'"
                            )
                        self._accumulate(acc, v, np.asarray(feed[v]), index)
                    if session is not None:
                        results = run_feed(session, computed, feed, index)
                        for v in computed:
                            self._accumulate(acc, v, results.pop(v), index)
                        del results
                    samples += 1
                    progress.advance()
            finally:
                progress.close()
        if samples == 0:
            raise CalibrationError("calibration data has zero samples")
        seconds = time.perf_counter() - started
        logger.info(
            "%s: %d values over %d samples in %.1fs", self.name, len(self.values), samples, seconds
        )
        done = {v: a for v, a in acc.items() if a is not None}
        return InputHessians(done, samples, seconds)

    @staticmethod
    def _accumulate(
        acc: dict[str, _Accumulator | None], value: str, arr: np.ndarray, index: int
    ) -> None:
        if arr.dtype.kind != "f":
            raise CalibrationError(
                f"calibration sample {index}: value '{value}' has dtype {arr.dtype}, "
                "an input Hessian needs a float value"
            )
        if arr.ndim == 0:
            arr = arr.reshape(1, 1)
        x2d = arr.reshape(-1, arr.shape[-1])
        if not np.all(np.isfinite(x2d)):
            bad = int(np.count_nonzero(~np.isfinite(x2d)))
            raise CalibrationError(
                f"calibration sample {index}: value '{value}' has {bad} NaN/Inf entries"
            )
        current = acc[value]
        if current is None:
            current = acc[value] = _Accumulator.new(int(x2d.shape[1]))
        elif current.gram.shape[0] != x2d.shape[1]:
            raise CalibrationError(
                f"calibration sample {index}: value '{value}' has last dimension "
                f"{x2d.shape[1]}, earlier samples had {current.gram.shape[0]}"
            )
        current.add(x2d)
