"""Activation statistics from calibration runs: :class:`ActivationStatsAnalysis`.

The analysis runs the model on ONNX Runtime (CPU, graph optimizations off, so every
intermediate value exists exactly as written) over ``ctx.calibration_feeds()``, one feed at
a time, with the requested intermediate values added as extra graph outputs of a
serialized *copy* (the model object is never changed). Each value has one observer
(:mod:`graphopt.quant.observers`) that is updated per feed, so memory is constant in the
number of samples; feeds may have different shapes (batch, sequence).

Values that are graph inputs are observed from the feeds, constants (initializers that are
not graph inputs) once from their stored value; neither needs an extra output.

A NaN or infinity in an observed value raises
:class:`~graphopt.errors.CalibrationError` naming the value and the sample.

Results are cached by the :class:`~graphopt.infra.AnalysisManager` under the configured
values and observer; they depend on the model's STRUCTURE and WEIGHTS (a pass that keeps
both, e.g. one that only renames metadata, keeps them valid).

Example::

    stats = am.get(ActivationStatsAnalysis(("x", "h"), "percentile", percentile=99.9), model)
    lo, hi = stats.range("h")
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from graphopt.errors import CalibrationError, InvalidModelError, UsageError
from graphopt.infra.analysis import Analysis, AnalysisManager, Aspect
from graphopt.infra.context import PassContext
from graphopt.infra.progress import LazyProgress
from graphopt.quant.observers import HistogramObserver, Observer, make_observer

logger = logging.getLogger(__name__)

FloatArray = np.ndarray[Any, np.dtype[np.float64]]

#: Distinct shapes remembered per value (the statistics stay constant-size).
_MAX_SHAPES = 64
#: Single-file protobuf limit; larger copies are written with external data.
_PROTO_LIMIT = 2**31 - 1024


def _hashable(value: Any) -> Hashable:
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value  # type: ignore[no-any-return]


@dataclass
class ActivationStats:
    """What :class:`ActivationStatsAnalysis` returns.

    Attributes:
        observers: One observer per requested value, in request order.
        samples: Calibration feeds seen.
        seconds: Wall time of the calibration runs.
        observer: The observers' registry name.
        shapes: The shapes each value took across feeds.
        octaves: Per value, which orders of magnitude its entries occupy (fill detection).
    """

    observers: dict[str, Observer]
    samples: int
    seconds: float
    observer: str
    shapes: dict[str, set[tuple[int, ...]]] = field(default_factory=dict)
    octaves: dict[str, Octaves] = field(default_factory=dict)

    def outlier_gap(self, name: str, min_gap: int) -> tuple[float, float] | None:
        """Magnitudes far above the bulk of ``name``: see :meth:`Octaves.outlier_gap`."""
        oct_ = self.octaves.get(name)
        return oct_.outlier_gap(min_gap) if oct_ is not None else None

    def range(self, name: str) -> tuple[FloatArray, FloatArray]:
        """The observer's chosen ``(min, max)`` for ``name``.

        Raises:
            KeyError: ``name`` was not observed.
            CalibrationError: The observer saw no data.
        """
        return self.observers[name].range()

    def extremes(self, name: str) -> tuple[float, float]:
        """The exact smallest and largest value seen (outliers included), whatever the
        observer chose to clip."""
        obs = self.observers[name]
        if isinstance(obs, HistogramObserver):
            hist = obs.histogram
            if hist.total == 0:
                raise obs._no_data()
            return float(hist.data_min), float(hist.data_max)
        lo, hi = obs.range()
        return float(np.min(lo)), float(np.max(hi))

    @property
    def ranges(self) -> dict[str, tuple[FloatArray, FloatArray]]:
        """``range`` of every value."""
        return {name: obs.range() for name, obs in self.observers.items()}


class Octaves:
    """Which binary orders of magnitude a value's non-zero entries occupy.

    ``counts[e]`` counts entries with ``2**(e - 1 - OFFSET) <= |x| < 2**(e - OFFSET)``
    (``frexp`` exponents), from a strided sample of at most :data:`SAMPLE` entries per
    update. It is the cheap, observer-independent evidence of *fills*: an attention mask's
    -3.4e38 (or -1e9) sits many empty octaves above the bulk of real values, however many
    positions hold it; natural activations, outlier channels included, occupy a contiguous
    run of octaves.
    """

    SAMPLE = 1 << 18
    OFFSET = 160
    BINS = 160 + 140

    def __init__(self) -> None:
        self.counts = np.zeros(self.BINS, dtype=np.int64)

    def update(self, arr: np.ndarray) -> None:
        flat = np.asarray(arr).reshape(-1)
        if flat.size > self.SAMPLE:
            flat = flat[:: -(-flat.size // self.SAMPLE)]
        if flat.dtype.kind != "f":
            flat = flat.astype(np.float64)
        flat = flat[flat != 0]
        if flat.size == 0:
            return
        _, exp = np.frexp(np.abs(flat))
        idx = np.clip(exp.astype(np.int64) + self.OFFSET, 0, self.BINS - 1)
        self.counts += np.bincount(idx, minlength=self.BINS)

    def outlier_gap(self, min_gap: int) -> tuple[float, float] | None:
        """``(bulk_max, outlier_min)`` magnitudes when some entries lie ``min_gap`` or more
        empty octaves above the most populated cluster of octaves; None otherwise."""
        occupied = np.flatnonzero(self.counts)
        if occupied.size < 2:
            return None
        breaks = np.flatnonzero(np.diff(occupied) > min_gap)
        if breaks.size == 0:
            return None
        starts = np.concatenate([[0], breaks + 1])
        ends = np.concatenate([breaks, [occupied.size - 1]])
        mass = [int(self.counts[occupied[a] : occupied[b] + 1].sum()) for a, b in zip(starts, ends)]
        bulk = int(np.argmax(mass))
        if bulk == len(mass) - 1:
            return None  # only clusters below the bulk: tiny values, harmless
        bulk_max = math.ldexp(1.0, int(occupied[ends[bulk]]) - self.OFFSET)
        outlier_min = math.ldexp(1.0, int(occupied[starts[bulk + 1]]) - self.OFFSET - 1)
        return bulk_max, outlier_min


class ActivationStatsAnalysis(Analysis[ActivationStats]):
    """Streams calibration feeds through ONNX Runtime and observes intermediate values.

    Args:
        values: Names of the main graph's values to observe.
        observer: Observer registry name (``minmax``, ``percentile``, ``entropy``, ``mse``).
        progress_after_s: Show a progress bar on stderr once the runs have taken this long
            (not part of the cache key).
        threads: ONNX Runtime intra-op threads.
        **observer_kwargs: Passed to every observer (``percentile=99.9``, ``spec=...``).
    """

    name = "activation-stats"
    depends_on = Aspect.STRUCTURE | Aspect.WEIGHTS

    def __init__(
        self,
        values: Sequence[str],
        observer: str = "minmax",
        *,
        progress_after_s: float = 3.0,
        threads: int = 2,
        **observer_kwargs: Any,
    ) -> None:
        if isinstance(values, str):
            raise TypeError("values must be a sequence of value names, not one string")
        self.values = tuple(dict.fromkeys(values))
        self.observer = observer
        self.observer_kwargs = dict(observer_kwargs)
        self.progress_after_s = float(progress_after_s)
        self.threads = int(threads)
        # Fails early on an unknown observer or bad arguments.
        make_observer(observer, value_name="check", **self.observer_kwargs)

    def key(self) -> Hashable:
        return (
            type(self).__qualname__,
            self.values,
            self.observer,
            _hashable(self.observer_kwargs),
        )

    def _new_observer(self, value: str) -> Observer:
        return make_observer(self.observer, value_name=value, **self.observer_kwargs)

    def run(self, model: ir.Model, am: AnalysisManager, ctx: PassContext) -> ActivationStats:
        graph = model.graph
        by_name = values_by_name(graph)
        missing = [v for v in self.values if v not in by_name]
        if missing:
            raise UsageError(
                f"{self.name}: no value named {', '.join(repr(m) for m in missing[:5])} "
                "in the main graph"
            )
        observers = {v: self._new_observer(v) for v in self.values}
        octaves = {v: Octaves() for v in self.values}
        shapes: dict[str, set[tuple[int, ...]]] = {v: set() for v in self.values}
        fed: list[str] = []
        computed: list[str] = []
        for v in self.values:
            value = by_name[v]
            if value.is_graph_input():
                fed.append(v)
            elif value.is_initializer() and value.const_value is not None:
                arr = value.const_value.numpy()
                observers[v].update(arr, sample=0)
                octaves[v].update(arr)
                shapes[v].add(tuple(arr.shape))
            else:
                computed.append(v)

        started = time.perf_counter()
        samples = 0
        feeds = ctx.calibration_feeds()  # fails before any session is built without data
        with tempfile.TemporaryDirectory(prefix="graphopt-calib-") as scratch:
            session = (
                session_with_outputs(model, computed, Path(scratch), self.threads)
                if computed
                else None
            )
            progress = LazyProgress(
                "calibrating", total_feeds(ctx), "samples", self.progress_after_s
            )
            try:
                for index, feed in enumerate(feeds):
                    arrays: dict[str, np.ndarray] = {}
                    for v in fed:
                        if v not in feed:
                            raise CalibrationError(
                                f"calibration sample {index}: no array for graph input '{v}'"
                            )
                        arrays[v] = np.asarray(feed[v])
                    if session is not None:
                        arrays.update(run_feed(session, computed, feed, index))
                    for v, arr in arrays.items():
                        observers[v].update(arr, sample=index)
                        octaves[v].update(arr)
                        if len(shapes[v]) < _MAX_SHAPES:
                            shapes[v].add(tuple(arr.shape))
                    del arrays
                    samples += 1
                    progress.advance()
            finally:
                progress.close()
        if samples == 0:
            raise CalibrationError("calibration data has zero samples")
        seconds = time.perf_counter() - started
        logger.info(
            "%s: %d values over %d samples in %.1fs (%s)",
            self.name,
            len(self.values),
            samples,
            seconds,
            self.observer,
        )
        return ActivationStats(observers, samples, seconds, self.observer, shapes, octaves)


# ----------------------------------------------------------------------------- helpers


def total_feeds(ctx: PassContext) -> int | None:
    """How many feeds the source will yield, when it can say so cheaply."""
    source = ctx.calibration
    if source is None:
        return None
    try:
        return len(source)  # type: ignore[arg-type]
    except TypeError:
        pass
    from graphopt.calibration_data import CalibrationDataset

    if isinstance(source, CalibrationDataset) and source.path.is_dir():
        n = len(source.files)
        return min(n, source.limit) if source.limit is not None else n
    return None


def _value_info(value: ir.Value) -> onnx.ValueInfoProto | None:
    if value.dtype is None or value.name is None:
        return None
    return onnx.helper.make_tensor_value_info(value.name, int(value.dtype), None)


def values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    """Every named value of ``graph``: inputs, initializers and node outputs."""
    by_name: dict[str, ir.Value] = {}
    for inp in graph.inputs:
        if inp.name:
            by_name[inp.name] = inp
    for name, init in graph.initializers.items():
        by_name.setdefault(name, init)
    for node in graph:
        for out in node.outputs:
            if out.name:
                by_name[out.name] = out
    return by_name


def session_with_outputs(
    model: ir.Model, names: Sequence[str], scratch: Path, threads: int
) -> Any:
    """An ORT session (optimizations off) on a copy of ``model`` that also outputs ``names``."""
    from graphopt.verify.runner import make_session

    proto = ir.serde.serialize_model(model)
    existing = {o.name for o in proto.graph.output}
    by_name = {v.name: v for node in model.graph for v in node.outputs if v.name}
    untyped = [n for n in names if by_name[n].dtype is None]
    inferred: dict[str, onnx.ValueInfoProto] = {}
    if untyped:
        try:
            with_shapes = onnx.shape_inference.infer_shapes(proto)
            inferred = {vi.name: vi for vi in with_shapes.graph.value_info}
        except Exception as e:  # noqa: BLE001 - inference is a best effort
            logger.debug("shape inference failed: %s", e)
    for n in names:
        if n in existing:
            continue
        info = _value_info(by_name[n])
        if info is None:
            found = inferred.get(n)
            if found is None or not found.type.tensor_type.elem_type:
                raise InvalidModelError(
                    f"cannot calibrate '{n}': its element type is unknown (run shape inference)"
                )
            info = onnx.helper.make_tensor_value_info(n, found.type.tensor_type.elem_type, None)
        proto.graph.output.append(info)
    path = scratch / "calibration.onnx"
    if proto.ByteSize() > _PROTO_LIMIT:
        onnx.save_model(
            proto, str(path), save_as_external_data=True, location="calibration.onnx.data"
        )
    else:
        path.write_bytes(proto.SerializeToString())
    del proto
    return make_session(path, threads=threads, optimize=False)


def run_feed(
    session: Any, names: Sequence[str], feed: Mapping[str, np.ndarray], index: int
) -> dict[str, np.ndarray]:
    """Runs one calibration feed (``index`` for messages) and returns ``names``' arrays.

    :func:`session_with_outputs`, :func:`run_feed`, :func:`total_feeds`,
    :func:`values_by_name` and :class:`graphopt.infra.progress.LazyProgress` are the
    streaming machinery the other calibration-driven analyses (input Hessians,
    ``compare --per-layer``, pruning reconstruction) share.
    """
    wanted = {i.name for i in session.get_inputs()}
    selected = {k: np.asarray(v) for k, v in feed.items() if k in wanted}
    missing = wanted - set(selected)
    if missing:
        raise CalibrationError(
            f"calibration sample {index}: no array for graph input '{min(missing)}'"
        )
    try:
        results = session.run(list(names), selected)
    except Exception as e:  # noqa: BLE001 - ORT error types vary
        text = " ".join(str(e).strip().splitlines()[0].split()) if str(e).strip() else type(e).__name__
        raise CalibrationError(
            f"calibration sample {index}: ONNX Runtime failed to run: {text}"
        ) from None
    return dict(zip(names, results, strict=True))

