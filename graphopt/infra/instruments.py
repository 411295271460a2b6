"""Instruments observe pass execution: timing, statistics, printing, crash reproducers."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx_ir as ir

if TYPE_CHECKING:
    from graphopt.infra.pass_base import Pass, PassResult

logger = logging.getLogger(__name__)


class Instrument:
    """Hooks called around each pass; override the ones you need."""

    def before_pipeline(self, model: ir.Model, pipeline_text: str) -> None:
        """Called once before the first pass."""

    def before_pass(self, pass_: Pass[Any], model: ir.Model, position: int) -> None:
        """Called before a pass runs."""

    def after_pass(
        self, pass_: Pass[Any], model: ir.Model, result: PassResult, position: int
    ) -> None:
        """Called after a pass succeeded."""

    def on_failure(
        self, pass_: Pass[Any], model: ir.Model, error: BaseException, position: int
    ) -> None:
        """Called when a pass raised."""


def op_histogram(model: ir.Model) -> Counter[str]:
    """Counts nodes by ``domain::op_type`` (plain op_type for the default domain), subgraphs
    included."""
    counts: Counter[str] = Counter()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        counts[key] += 1
    return counts


@dataclass
class PassRecord:
    """What one pass did, for the report.

    Attributes:
        name: Pass name.
        text: The pass as pipeline text.
        seconds: Wall time.
        modified: Whether it changed the model.
        nodes_before: Node count before (subgraphs included).
        nodes_after: Node count after.
        stats: The pass's own counters.
        preserved: Preserved aspects' names.
    """

    name: str
    text: str
    seconds: float
    modified: bool
    nodes_before: int
    nodes_after: int
    stats: dict[str, Any]
    preserved: list[str]


@dataclass
class TimingInstrument(Instrument):
    """Records per-pass wall time, node counts and statistics."""

    records: list[PassRecord] = field(default_factory=list)
    #: (start time, nodes before) per pass in flight; nested pass managers push too.
    _open: list[tuple[float, int]] = field(default_factory=list)

    def before_pass(self, pass_: Pass[Any], model: ir.Model, position: int) -> None:
        self._open.append((time.perf_counter(), sum(op_histogram(model).values())))

    def on_failure(
        self, pass_: Pass[Any], model: ir.Model, error: BaseException, position: int
    ) -> None:
        if self._open:
            self._open.pop()

    def after_pass(
        self, pass_: Pass[Any], model: ir.Model, result: PassResult, position: int
    ) -> None:
        start, nodes_before = self._open.pop()
        elapsed = time.perf_counter() - start
        nodes_after = sum(op_histogram(model).values())
        self.records.append(
            PassRecord(
                name=pass_.info.name,
                text=pass_.to_text(),
                seconds=elapsed,
                modified=result.modified,
                nodes_before=nodes_before,
                nodes_after=nodes_after,
                stats=dict(result.stats),
                preserved=result.preserved.names(),
            )
        )
        logger.info(
            "%s: %.3fs, nodes %d -> %d%s",
            pass_.info.name,
            elapsed,
            nodes_before,
            nodes_after,
            "" if result.modified else " (no change)",
        )


@dataclass
class PrintAfterChangeInstrument(Instrument):
    """Logs the model as ONNX text after every pass that changed it.

    Attributes:
        only: Restrict to these pass names (all when empty).
    """

    only: frozenset[str] = frozenset()

    def after_pass(
        self, pass_: Pass[Any], model: ir.Model, result: PassResult, position: int
    ) -> None:
        if not result.modified or (self.only and pass_.info.name not in self.only):
            return
        logger.info("model after %s:\n%s", pass_.info.name, str(model.graph))


@dataclass
class CrashReproducerInstrument(Instrument):
    """On a pass failure, writes the model the pipeline started from and the pipeline text,
    so ``graphopt optimize repro.onnx -o out.onnx --passes "$(cat repro.pipeline)"``
    reproduces the crash (passes are deterministic).

    The starting model is serialized once, before the first pass, when it is smaller than
    ``max_snapshot_bytes``; larger models are referenced by ``source_path`` instead.

    Attributes:
        directory: Where the reproducer is written.
        source_path: The model file the pipeline was loaded from, if any.
        max_snapshot_bytes: Upper bound for the in-memory snapshot.
        written: The files written, once a failure happened.
    """

    directory: Path
    source_path: Path | None = None
    max_snapshot_bytes: int = 512 * 2**20
    written: list[Path] = field(default_factory=list)
    _snapshot: bytes | None = None
    _pipeline: str = ""

    def before_pipeline(self, model: ir.Model, pipeline_text: str) -> None:
        self._pipeline = pipeline_text
        size = sum(
            v.const_value.nbytes
            for v in model.graph.initializers.values()
            if v.const_value is not None
        )
        self._snapshot = None
        if size <= self.max_snapshot_bytes:
            self._snapshot = ir.serde.serialize_model(model).SerializeToString()

    def on_failure(
        self, pass_: Pass[Any], model: ir.Model, error: BaseException, position: int
    ) -> None:
        if self.written:
            return  # nested pass managers report the same failure again
        self.directory.mkdir(parents=True, exist_ok=True)
        text_path = self.directory / "repro.pipeline"
        text_path.write_text(self._pipeline + "\n")
        self.written.append(text_path)
        if self._snapshot is not None:
            model_path = self.directory / "repro.onnx"
            model_path.write_bytes(self._snapshot)
            self.written.insert(0, model_path)
        elif self.source_path is not None:
            (self.directory / "repro.source").write_text(str(self.source_path) + "\n")
        logger.error(
            "pass %s failed; reproducer written to %s", pass_.info.name, self.directory
        )
