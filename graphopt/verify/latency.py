"""Latency of several models measured interleaved in one process.

On a small, noisy machine absolute latencies drift by tens of percent between runs; ratios
measured in the same process over the same period carry over (BASELINES.md). So every
repeat runs each model once, round-robin, with the starting model rotated each repeat so
that none is always first. Sessions have thread spinning off: spinning sessions steal each
other's cores on 2 vCPUs. Sessions use ORT's full graph optimizations by default, as users
deploy them. The garbage collector is paused while timing.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.errors import UsageError
from graphopt.verify.compare import json_float
from graphopt.verify.runner import bind, make_session

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LatencyStats:
    """Latency of one model over the repeats.

    Attributes:
        name: The key the model was given under.
        median_ms: Median wall time of one run.
        p90_ms: 90th percentile.
        mean_ms: Mean.
        min_ms: Fastest run.
        max_ms: Slowest run.
        repeats: Timed runs.
        warmup: Untimed runs before them.
        threads: ORT intra-op threads.
        optimized: Whether ORT graph optimizations were on.
    """

    name: str
    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    repeats: int
    warmup: int
    threads: int
    optimized: bool

    @classmethod
    def from_samples(
        cls,
        name: str,
        samples_ms: Sequence[float],
        *,
        warmup: int,
        threads: int,
        optimized: bool,
    ) -> LatencyStats:
        """Summarises timed runs (milliseconds)."""
        values = np.asarray(samples_ms, dtype=np.float64)
        return cls(
            name=name,
            median_ms=float(np.median(values)),
            p90_ms=float(np.percentile(values, 90)),
            mean_ms=float(values.mean()),
            min_ms=float(values.min()),
            max_ms=float(values.max()),
            repeats=int(values.size),
            warmup=warmup,
            threads=threads,
            optimized=optimized,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "name": self.name,
            "median_ms": json_float(self.median_ms),
            "p90_ms": json_float(self.p90_ms),
            "mean_ms": json_float(self.mean_ms),
            "min_ms": json_float(self.min_ms),
            "max_ms": json_float(self.max_ms),
            "repeats": self.repeats,
            "warmup": self.warmup,
            "threads": self.threads,
            "optimized": self.optimized,
        }


def measure_latency(
    paths: Mapping[str, str | os.PathLike[str]],
    feed: Mapping[str, np.ndarray],
    *,
    repeats: int = 20,
    warmup: int = 3,
    threads: int = 2,
    optimize: bool = True,
    custom_op_libraries: Sequence[str] = (),
    budget_s: float | None = None,
    min_repeats: int = 5,
) -> dict[str, LatencyStats]:
    """Measures several models interleaved (round-robin per repeat) in this process.

    Args:
        paths: Models by a short name (``{"original": a, "optimized": b}``).
        feed: One feed, valid for every model.
        repeats: Timed runs per model.
        warmup: Untimed runs per model first (also interleaved).
        threads: ORT intra-op threads per session.
        optimize: ORT graph optimizations (``ORT_ENABLE_ALL``) when True.
        custom_op_libraries: Custom-op libraries to register in every session.
        budget_s: When set, lowers ``repeats`` (not below ``min_repeats``) so that the
            timed loop takes about this long, judged from the first (checking) runs.

    Returns:
        Statistics by the same names, in the same order.

    Raises:
        UsageError: No models, or ``repeats < 1`` or ``warmup < 0``.
        InvalidModelError: A model does not load or run with the feed.
    """
    if not paths:
        raise UsageError("measure_latency needs at least one model")
    if repeats < 1 or warmup < 0:
        raise UsageError(f"repeats must be >= 1 and warmup >= 0 (got {repeats}, {warmup})")
    names = list(paths)
    libraries = tuple(custom_op_libraries)
    sessions = {
        name: make_session(
            Path(paths[name]), threads=threads, optimize=optimize, custom_op_libraries=libraries
        )
        for name in names
    }
    calls = {name: bind(sessions[name], feed, label=str(paths[name])) for name in names}
    first_ms = 0.0
    for name in names:  # checks the feed and gives clean errors before timing
        start = time.perf_counter_ns()
        calls[name]()
        first_ms += (time.perf_counter_ns() - start) / 1e6
    if budget_s is not None and first_ms > 0:
        affordable = int(budget_s * 1e3 / first_ms)
        repeats = max(min(repeats, affordable), min(min_repeats, repeats))
        warmup = min(warmup, max(1, repeats // 5))
    samples: dict[str, list[float]] = {name: [] for name in names}
    count = len(names)
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for step in range(warmup + repeats):
            for k in range(count):
                name = names[(step + k) % count]
                call = calls[name]
                start = time.perf_counter_ns()
                call()
                elapsed = time.perf_counter_ns() - start
                if step >= warmup:
                    samples[name].append(elapsed / 1e6)
    finally:
        if was_enabled:
            gc.enable()
    stats = {
        name: LatencyStats.from_samples(
            name, samples[name], warmup=warmup, threads=threads, optimized=optimize
        )
        for name in names
    }
    for s in stats.values():
        logger.info("latency %s: median %.3f ms, p90 %.3f ms", s.name, s.median_ms, s.p90_ms)
    return stats


def ratio(stats: Mapping[str, LatencyStats], a: str, b: str) -> float:
    """Median latency of ``a`` over that of ``b`` (< 1 means ``a`` is faster).

    Raises:
        UsageError: A name not in ``stats``.
    """
    for name in (a, b):
        if name not in stats:
            raise UsageError(f"no latency measured for '{name}' (have: {', '.join(stats)})")
    denominator = stats[b].median_ms
    if denominator <= 0:
        return math.nan
    return stats[a].median_ms / denominator
