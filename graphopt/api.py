"""The library entry point behind ``graphopt optimize``.

:func:`optimize` loads a model safely, runs a pipeline, stages the result beside its
destination, verifies it against the original on ONNX Runtime and publishes it only if it
agrees within the pipeline's tolerance.
"""

from __future__ import annotations

import itertools
import logging
import resource
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir

from graphopt import io
from graphopt.calibration_data import CalibrationDataset
from graphopt.errors import (
    InvalidModelError,
    ResourceLimitError,
    UsageError,
    VerificationError,
)
from graphopt.infra.context import PassContext
from graphopt.infra.instruments import (
    CrashReproducerInstrument,
    Instrument,
    PrintAfterChangeInstrument,
    TimingInstrument,
    op_histogram,
)
from graphopt.infra.manager import PassManager
from graphopt.infra.pass_base import Pass
from graphopt.infra.registry import PassRegistry, default_registry
from graphopt.report import Report, count_parameters
from graphopt.verify.compare import Tolerance, tolerance_for
from graphopt.verify.inputs import load_feeds, make_feeds
from graphopt.verify.latency import measure_latency
from graphopt.verify.verify import verify_model

logger = logging.getLogger(__name__)

from graphopt import __version__

#: Calibration feeds verification uses when ``--calib`` is given and ``--inputs`` is not.
VERIFY_CALIB_FEEDS = 2

TARGETS = ("ort", "tensorrt", "ext", "portable")


@dataclass
class OptimizeConfig:
    """Everything :func:`optimize` needs besides the input and output paths.

    Attributes:
        passes: Pipeline text (``fuse,ptq(bits=8)``); ``default`` when empty.
        target: Backend that picks policies: ort, tensorrt or ext.
        calib: ``.npz`` file or folder of ``.npz`` feeds for calibration.
        inputs: ``.npz`` file or folder used as verification inputs (generated otherwise).
        dims: Sizes for symbolic dimensions by name (``batch=1``).
        report: Where to write the JSON report.
        overwrite: Replace an existing destination.
        in_place: Allow the destination to be the input (staged, then swapped).
        verify: Compare against the original on ONNX Runtime before publishing.
        latency: Measure the ORT latency ratio (interleaved, in one process).
        tolerance: Override the pipeline's tolerance class by name.
        plugins: Load third-party plugins from entry points.
        plugin_files: Extra plugin ``.py`` files.
        seed: Seed for every random choice.
        verify_each: Run the ONNX checker after every pass.
        print_after_change: Log the graph after each pass that changed it.
        explain: Ask passes that can (``fuse``) to record why rules did not fire.
        reproducer_dir: Where a crash reproducer goes (none when None).
        max_memory: Upper bound on the process's data segment in bytes (exit 6 beyond).
        threads: ORT intra-op threads for verification and latency.
        size_limit: Single-file size limit; larger models get external data.
        latency_budget_s: About how long the latency measurement may take.
        extra_instruments: More instruments to attach to the pipeline.
    """

    passes: str = "default"
    target: str = "ort"
    calib: Path | None = None
    inputs: Path | None = None
    dims: Mapping[str, int] = field(default_factory=dict)
    report: Path | None = None
    overwrite: bool = False
    in_place: bool = False
    verify: bool = True
    latency: bool = True
    tolerance: str | None = None
    plugins: bool = True
    plugin_files: Sequence[Path] = ()
    seed: int = 0
    verify_each: bool = False
    print_after_change: bool = False
    explain: bool = False
    reproducer_dir: Path | None = None
    max_memory: int | None = None
    threads: int = 2
    size_limit: int = io.PROTOBUF_LIMIT
    latency_budget_s: float = 10.0
    extra_instruments: Sequence[Instrument] = ()


def _flatten(passes: Sequence[Pass[Any]]) -> list[Pass[Any]]:
    out: list[Pass[Any]] = []
    for p in passes:
        if isinstance(p, PassManager):
            out.extend(_flatten(p.passes))
        else:
            out.append(p)
    return out


def pipeline_tolerance(pm: PassManager, override: str | None = None) -> Tolerance:
    """The loosest tolerance class among the pipeline's passes (or the override)."""
    if override:
        return tolerance_for([override])
    names = [p.info.tolerance for p in _flatten(pm.passes)] or ["exact"]
    return tolerance_for(names)


def _set_memory_limit(limit: int | None) -> tuple[int, int] | None:
    """Sets RLIMIT_DATA's soft limit; returns the previous limits to restore (or None)."""
    if limit is None:
        return None
    previous = resource.getrlimit(resource.RLIMIT_DATA)
    hard = previous[1]
    # RLIM_INFINITY is -1: min(limit, hard) would turn the limit off.
    soft = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))
    return previous


#: How ONNX Runtime's errors say that an allocation failed.
_OUT_OF_MEMORY_MARKERS = (
    "Cannot allocate memory",
    "Failed to allocate memory",
    "bad_alloc",
)


def _add_provenance(model: ir.Model, pipeline_text: str, seed: int) -> None:
    model.metadata_props["graphopt.version"] = __version__
    model.metadata_props["graphopt.pipeline"] = pipeline_text
    model.metadata_props["graphopt.seed"] = str(seed)


def build_pipeline(registry: PassRegistry, text: str) -> PassManager:
    """Builds the pipeline; ``""`` means ``default``."""
    return registry.build(text.strip() or "default")


def optimize(
    input_path: str | Path,
    output_path: str | Path,
    config: OptimizeConfig | None = None,
    *,
    registry: PassRegistry | None = None,
) -> Report:
    """Optimizes a model file and publishes the result only if it verifies.

    Args:
        input_path: The ``.onnx`` to read (never modified).
        output_path: Where to write the result (``.onnx``; external data beside it).
        config: Pipeline and behaviour; defaults run the ``default`` pipeline.
        registry: Pass registry (built-ins plus plugins by default).

    Returns:
        The report (also written as JSON when ``config.report`` is set).

    Raises:
        GraphoptError: A subclass naming what failed; nothing is published.
    """
    cfg = config or OptimizeConfig()
    if cfg.target not in TARGETS:
        raise UsageError(f"--target {cfg.target!r} is not one of {', '.join(TARGETS)}")
    started = time.perf_counter()
    registry = registry or default_registry(
        plugins=cfg.plugins, plugin_files=tuple(cfg.plugin_files)
    )
    pm = build_pipeline(registry, cfg.passes)
    # The limit applies from here on: plugin imports above must not fail for it (a
    # MemoryError there would read as a plugin error).
    previous_limit = _set_memory_limit(cfg.max_memory)
    limit = f" (--max-memory {cfg.max_memory} bytes)" if cfg.max_memory else ""
    try:
        return _optimize(input_path, Path(output_path), cfg, pm, started)
    except MemoryError:
        raise ResourceLimitError(f"{input_path}: out of memory{limit}; nothing written") from None
    except InvalidModelError as e:
        # ONNX Runtime reports failed allocations as load/run failures of the model.
        if not any(marker in str(e) for marker in _OUT_OF_MEMORY_MARKERS):
            raise
        raise ResourceLimitError(
            f"{input_path}: out of memory in ONNX Runtime{limit}; nothing written"
        ) from None
    finally:
        if previous_limit is not None:
            resource.setrlimit(resource.RLIMIT_DATA, previous_limit)


def _optimize(
    input_path: str | Path, output: Path, cfg: OptimizeConfig, pm: PassManager, started: float
) -> Report:
    """The body of :func:`optimize` once the pipeline is built and limits are set."""
    pipeline_text = pm.to_text()
    tolerance = pipeline_tolerance(pm, cfg.tolerance)
    loaded = io.load(input_path)
    io.check_destination(
        output,
        (loaded.path, *loaded.external_files),
        overwrite=cfg.overwrite,
        in_place=cfg.in_place,
    )
    feeds = load_feeds(cfg.inputs, loaded.path) if cfg.inputs else None
    model = loaded.model
    if feeds is None and cfg.calib is not None and cfg.verify:
        # Real data verifies lossy pipelines better than generated feeds do.
        feeds = list(itertools.islice(CalibrationDataset(cfg.calib, model), VERIFY_CALIB_FEEDS))
        feeds = feeds or None
    size_before = io.model_files_size(loaded)
    hist_before = op_histogram(model)
    params_before = count_parameters(model)

    timing = TimingInstrument()
    instruments: list[Instrument] = [timing, *cfg.extra_instruments]
    if cfg.print_after_change:
        instruments.append(PrintAfterChangeInstrument())
        logging.getLogger("graphopt.infra.instruments").setLevel(logging.INFO)
    if cfg.reproducer_dir is not None:
        instruments.append(CrashReproducerInstrument(cfg.reproducer_dir, loaded.path))
    ctx = PassContext(
        target=cfg.target,
        seed=cfg.seed,
        calibration=CalibrationDataset(cfg.calib, model) if cfg.calib else None,
        instruments=instruments,
        verify_each=cfg.verify_each,
        options={"explain": cfg.explain},
    )
    try:
        result = pm.execute(model, ctx)
    except MemoryError:
        raise ResourceLimitError(
            f"{loaded.path}: out of memory while running the pipeline (limit "
            f"{cfg.max_memory or 'none'}); nothing written"
        ) from None
    if result.modified:
        _add_provenance(model, pipeline_text, cfg.seed)

    report = Report(
        input_path=str(loaded.path),
        output_path=str(output),
        pipeline=pipeline_text,
        tolerance=tolerance.name,
        size_before=size_before,
        params_before=params_before,
        params_after=count_parameters(model),
        ops_before=dict(hist_before),
        ops_after=dict(op_histogram(model)),
        passes=timing.records,
    )
    with io.stage_model(
        model,
        output,
        external_data=True if loaded.has_external_data else None,
        size_limit=cfg.size_limit,
        fidelity=loaded.fidelity,
    ) as staged:
        report.size_after = io.model_files_size(staged.files)
        if cfg.verify:
            if feeds is None:
                feeds = [make_feeds(loaded.path, dims=dict(cfg.dims), seed=cfg.seed)]
            agreement = verify_model(
                loaded.path,
                staged.model_path,
                tolerance,
                feeds,
                threads=cfg.threads,
            )
            report.agreement = agreement
            if not agreement.passed:
                report.total_seconds = time.perf_counter() - started
                if cfg.report:
                    report.write_json(cfg.report)
                raise VerificationError(
                    f"{output}: not published: {agreement.summary()} "
                    f"(tolerance '{tolerance.name}')"
                )
        if cfg.latency:
            feed = (feeds or [make_feeds(loaded.path, dims=dict(cfg.dims), seed=cfg.seed)])[0]
            report.latency = measure_latency(
                {"before": loaded.path, "after": staged.model_path},
                feed,
                threads=cfg.threads,
                budget_s=cfg.latency_budget_s,
            )
        staged.commit()
    report.total_seconds = time.perf_counter() - started
    if cfg.report:
        report.write_json(cfg.report)
    return report
