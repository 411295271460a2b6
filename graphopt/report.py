"""The optimize report: what a pipeline did to a model, as JSON and as a terminal summary.

A :class:`Report` gathers facts about the model before and after (file size with external
data, parameter count, op histogram: :func:`files_size`, :func:`count_parameters`,
:func:`histogram`), the per-pass records of
:class:`~graphopt.infra.instruments.TimingInstrument`, the verification
:class:`~graphopt.verify.compare.Agreement`, optional latency statistics, the pipeline
text and warnings. The caller takes the "before" facts before the pipeline runs: passes
change the model in place.

``to_dict`` is strict JSON (``allow_nan=False`` works): infinities are written as the
strings ``"inf"``/``"-inf"`` and NaN as null. ``write_json`` is atomic.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from graphopt.errors import InvalidModelError, UsageError
from graphopt.infra.instruments import PassRecord, op_histogram
from graphopt.verify.compare import Agreement, format_db, json_float
from graphopt.verify.latency import LatencyStats

logger = logging.getLogger(__name__)

REPORT_FORMAT = "graphopt-report"
REPORT_VERSION = 1


# --------------------------------------------------------------------------- model facts


def _proto_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """Yields a graph and all its subgraphs (If/Loop/Scan bodies), depth first, iteratively."""
    stack = [graph]
    while stack:
        current = stack.pop()
        yield current
        for node in current.node:
            for attr in node.attribute:
                if attr.HasField("g"):
                    stack.append(attr.g)
                stack.extend(attr.graphs)


def _proto_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Yields every tensor of the model: initializers and attribute tensors, subgraphs and
    functions included."""
    graphs = list(_proto_graphs(model.graph))
    nodes: list[onnx.NodeProto] = [n for g in graphs for n in g.node]
    for function in model.functions:
        nodes.extend(function.node)
    for g in graphs:
        yield from g.initializer
        for sparse in g.sparse_initializer:
            yield sparse.values
            yield sparse.indices
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors


def proto_op_histogram(model: onnx.ModelProto) -> Counter[str]:
    """Counts nodes like :func:`~graphopt.infra.instruments.op_histogram`, for a protobuf."""
    counts: Counter[str] = Counter()
    for graph in _proto_graphs(model.graph):
        for node in graph.node:
            domain = node.domain
            key = node.op_type if domain in ("", "ai.onnx") else f"{domain}::{node.op_type}"
            counts[key] += 1
    return counts


def count_parameters(model: ir.Model | onnx.ModelProto) -> int:
    """Sums the element counts of all initializers, subgraphs included.

    Weights held in ``Constant`` nodes are not initializers and are not counted. External
    data is not read (counts come from shapes).
    """
    total = 0
    if isinstance(model, ir.Model):
        for graph in (model.graph, *model.graph.subgraphs()):
            for value in graph.initializers.values():
                if value.const_value is not None:
                    total += int(value.const_value.size)
                elif value.shape is not None and value.shape.is_static():
                    total += int(math.prod(int(d) for d in value.shape))
        return total
    for graph in _proto_graphs(model.graph):
        for tensor in graph.initializer:
            total += int(math.prod(tensor.dims))
        for sparse in graph.sparse_initializer:
            total += int(math.prod(sparse.dims))
    return total


def files_size(path: str | os.PathLike[str], model: onnx.ModelProto | None = None) -> int:
    """Bytes on disk of a model file plus the external data files it references.

    Only data files inside the model's folder are counted (others are not the model's own,
    and loading refuses them anyway).

    Args:
        path: The ``.onnx`` file.
        model: Its protobuf, when already read (external data need not be loaded).

    Raises:
        UsageError: The file does not exist.
        InvalidModelError: The file is not ONNX.
    """
    model_path = Path(path)
    if not model_path.is_file():
        raise UsageError(f"{model_path}: no such file")
    proto = model if model is not None else _read_header(model_path)
    folder = model_path.resolve().parent
    locations: set[Path] = set()
    for tensor in _proto_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        for entry in tensor.external_data:
            if entry.key == "location":
                candidate = (folder / entry.value).resolve()
                if candidate.parent == folder or folder in candidate.parents:
                    locations.add(candidate)
    size = model_path.stat().st_size
    size += sum(p.stat().st_size for p in locations if p.is_file())
    return size


def _read_header(path: Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf error types vary
        raise InvalidModelError(f"{path}: not an ONNX model ({type(e).__name__})") from None


def histogram(model: ir.Model | onnx.ModelProto) -> dict[str, int]:
    """Op histogram of an IR model or a protobuf, sorted by op (subgraphs included)."""
    counts = op_histogram(model) if isinstance(model, ir.Model) else proto_op_histogram(model)
    return dict(sorted(counts.items()))


# --------------------------------------------------------------------------- JSON


def _jsonable(value: Any) -> Any:
    """Converts a value to strict-JSON types (inf as a string, NaN as null)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, np.bool_):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (float, np.floating)):
        return json_float(float(value))
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted((_jsonable(v) for v in value), key=str)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if hasattr(value, "to_dict"):
        return _jsonable(value.to_dict())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    return str(value)


def _record_dict(record: PassRecord) -> dict[str, Any]:
    return {
        "name": record.name,
        "text": record.text,
        "seconds": json_float(record.seconds),
        "modified": record.modified,
        "nodes_before": record.nodes_before,
        "nodes_after": record.nodes_after,
        "stats": _jsonable(record.stats),
        "preserved": list(record.preserved),
    }


# --------------------------------------------------------------------------- formatting


def _size_text(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"  # pragma: no cover


def _count_text(n: int | None) -> str:
    if n is None:
        return "-"
    if n >= 1_000_000_000:
        return f"{n / 1e9:.2f}G"
    if n >= 1_000_000:
        return f"{n / 1e6:.2f}M"
    if n >= 10_000:
        return f"{n / 1e3:.1f}k"
    return f"{n:,}"


def _ratio_text(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return ""
    return f"{value:.2f}×"


def _divide(a: int | None, b: int | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _value_text(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4g}"
    if isinstance(value, np.generic):
        return str(value.item())
    return str(value)


#: Pass statistics shown in their own table rather than in the passes table's summary.
_TABLE_STATS = frozenset({"layers", "layer_sqnr_db", "skip_reasons"})
#: Rows of the per-layer quantization table in the terminal (the JSON has them all).
LAYER_ROWS = 40


def _stats_text(stats: Mapping[str, Any], limit: int = 60) -> str:
    text = ", ".join(f"{k}={_value_text(v)}" for k, v in stats.items() if k not in _TABLE_STATS)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _layer_order(record: Mapping[str, Any]) -> tuple[int, float]:
    """Returned to float first, then quantized by rising SQNR, then kept float."""
    decision = str(record.get("decision", ""))
    db = record.get("sqnr_db")
    value = float(db) if isinstance(db, (int, float)) else math.inf
    rank = 0 if decision.startswith("float (") else 1 if decision == "quantized" else 2
    return rank, value


def layers_table(name: str, layers: list[Mapping[str, Any]], limit: int = LAYER_ROWS) -> Table:
    """Each layer a quantization pass considered: decision, output SQNR and reason.

    Args:
        name: The pass (title).
        layers: ``{"node", "op", "decision", "reason", "sqnr_db"}`` records (a pass's
            ``stats["layers"]``).
        limit: Rows shown; the rest are counted in the caption.
    """
    rows = sorted(layers, key=_layer_order)
    quantized = sum(1 for r in layers if r.get("decision") == "quantized")
    table = Table(
        box=box.SIMPLE, title=f"{name}: {quantized} of {len(layers)} layers quantized",
        title_justify="left", pad_edge=False,
    )
    table.add_column("node")
    table.add_column("op")
    table.add_column("decision")
    table.add_column("SQNR", justify="right")
    table.add_column("reason", overflow="ellipsis", no_wrap=True, max_width=70)
    for r in rows[:limit]:
        db = r.get("sqnr_db")
        table.add_row(
            Text(str(r.get("node", ""))),
            str(r.get("op", "")),
            str(r.get("decision", "")),
            format_db(float(db)) if isinstance(db, (int, float)) else "-",
            Text(str(r.get("reason", ""))),
        )
    if len(rows) > limit:
        table.caption = f"{len(rows) - limit} more layers in the JSON report"
    return table


# --------------------------------------------------------------------------- report


@dataclass
class Report:
    """Everything an optimize run did, for JSON and the terminal.

    Fields left None are unknown (e.g. ``size_after`` before anything was written) and
    shown as "-".

    Attributes:
        input_path: The input model.
        output_path: The written model (None when nothing is written).
        pipeline: The pipeline text.
        tolerance: The tolerance class name used for verification.
        size_before: Input bytes on disk, external data included.
        size_after: Output bytes on disk, external data included.
        params_before: Initializer element count of the input (subgraphs included).
        params_after: The same for the output.
        ops_before: Node counts by op type of the input (see :func:`histogram`).
        ops_after: The same for the output.
        passes: Per-pass records, in order.
        agreement: The verification result (None when not verified).
        latency: Latency statistics by model name, baseline first (e.g. ``before``,
            ``after``).
        latency_ratio: Candidate over baseline median latency; when None and ``latency``
            has two or more entries, the last over the first.
        total_seconds: Wall time of the whole run.
        warnings: One-line warnings to show.
    """

    input_path: str | Path
    output_path: str | Path | None = None
    pipeline: str = ""
    tolerance: str | None = None
    size_before: int | None = None
    size_after: int | None = None
    params_before: int | None = None
    params_after: int | None = None
    ops_before: dict[str, int] = field(default_factory=dict)
    ops_after: dict[str, int] | None = None
    passes: list[PassRecord] = field(default_factory=list)
    agreement: Agreement | None = None
    latency: dict[str, LatencyStats] | None = None
    latency_ratio: float | None = None
    total_seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    # ----------------------------------------------------------------------- derived

    @property
    def size_ratio(self) -> float | None:
        """Output size over input size (None when unknown)."""
        return _divide(self.size_after, self.size_before)

    @property
    def nodes_before(self) -> int:
        """Node count of the input."""
        return sum(self.ops_before.values())

    @property
    def nodes_after(self) -> int | None:
        """Node count of the output (None when unknown)."""
        return None if self.ops_after is None else sum(self.ops_after.values())

    @property
    def speedup_ratio(self) -> float | None:
        """``latency_ratio``, or the last model's median over the first's."""
        if self.latency_ratio is not None:
            return self.latency_ratio
        if not self.latency or len(self.latency) < 2:
            return None
        stats = list(self.latency.values())
        if stats[0].median_ms <= 0:
            return None
        return stats[-1].median_ms / stats[0].median_ms

    def op_changes(self) -> list[tuple[str, int, int]]:
        """``(op, before, after)`` for op types whose count changed, sorted by op."""
        if self.ops_after is None:
            return []
        before = self.ops_before
        after = self.ops_after
        return [
            (op, before.get(op, 0), after.get(op, 0))
            for op in sorted(set(before) | set(after))
            if before.get(op, 0) != after.get(op, 0)
        ]

    # ----------------------------------------------------------------------- JSON

    def to_dict(self) -> dict[str, Any]:
        """Strict-JSON form with a fixed key order (op histograms sorted by op)."""
        return {
            "format": REPORT_FORMAT,
            "version": REPORT_VERSION,
            "input": str(self.input_path),
            "output": str(self.output_path) if self.output_path is not None else None,
            "pipeline": self.pipeline,
            "tolerance": self.tolerance,
            "total_seconds": json_float(self.total_seconds),
            "size_bytes": {
                "before": self.size_before,
                "after": self.size_after,
                "ratio": json_float(self.size_ratio),
            },
            "parameters": {"before": self.params_before, "after": self.params_after},
            "nodes": {"before": self.nodes_before, "after": self.nodes_after},
            "ops": {
                "before": dict(sorted(self.ops_before.items())),
                "after": dict(sorted(self.ops_after.items()))
                if self.ops_after is not None
                else None,
                "changed": {op: [b, a] for op, b, a in self.op_changes()},
            },
            "passes": [_record_dict(r) for r in self.passes],
            "agreement": self.agreement.to_dict() if self.agreement is not None else None,
            "latency": None
            if self.latency is None
            else {
                "models": {name: s.to_dict() for name, s in self.latency.items()},
                "ratio": json_float(self.speedup_ratio),
            },
            "warnings": [str(w) for w in self.warnings],
        }

    def to_json(self) -> str:
        """The report as strict JSON text (2-space indent, trailing newline)."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    def write_json(self, path: str | os.PathLike[str]) -> Path:
        """Writes the JSON atomically: a temp file in the same folder, then ``os.replace``.

        Args:
            path: Destination file.

        Returns:
            The destination.

        Raises:
            UsageError: The destination's folder does not exist.
        """
        dest = Path(path)
        folder = dest.parent
        if not folder.is_dir():
            raise UsageError(f"{dest}: folder {folder} does not exist")
        text = self.to_json()
        fd, temp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        logger.debug("report written to %s", dest)
        return dest

    # ----------------------------------------------------------------------- terminal

    def _summary_table(self) -> Table:
        table = Table(box=box.SIMPLE, pad_edge=False)
        table.add_column("")
        table.add_column("before", justify="right")
        table.add_column("after", justify="right")
        table.add_column("ratio", justify="right")
        table.add_row(
            "size",
            _size_text(self.size_before),
            _size_text(self.size_after),
            _ratio_text(self.size_ratio),
        )
        table.add_row(
            "parameters",
            _count_text(self.params_before),
            _count_text(self.params_after),
            _ratio_text(_divide(self.params_after, self.params_before)),
        )
        table.add_row(
            "nodes",
            _count_text(self.nodes_before),
            _count_text(self.nodes_after),
            _ratio_text(_divide(self.nodes_after, self.nodes_before)),
        )
        if self.latency:
            stats = list(self.latency.values())
            first, last = stats[0], stats[-1]
            table.add_row(
                "latency (median)",
                f"{first.median_ms:.2f} ms",
                f"{last.median_ms:.2f} ms" if len(stats) > 1 else "-",
                _ratio_text(self.speedup_ratio),
            )
        return table

    def _agreement_text(self) -> Text:
        line = Text("agreement: ", style="bold")
        agreement = self.agreement
        if agreement is None:
            line.append("not verified", style="yellow")
            return line
        feeds = f"{agreement.samples} feed{'s' if agreement.samples != 1 else ''}"
        head = f"{'PASS' if agreement.passed else 'FAIL'} ({agreement.tolerance.name}, {feeds})"
        line.append(head, style="bold green" if agreement.passed else "bold red")
        worst = agreement.worst()
        if agreement.error is not None:
            line.append(f" {agreement.error}")
        elif agreement.passed and worst is not None:
            line.append(
                f" {len(agreement.outputs)} outputs; worst '{worst.name}': max_abs "
                f"{worst.max_abs:.3g}, SQNR {format_db(worst.sqnr_db)}"
            )
        elif worst is not None:
            failed = agreement.failed_outputs
            names = ", ".join(f"'{o.name}'" for o in failed[:3])
            more = f" (+{len(failed) - 3})" if len(failed) > 3 else ""
            line.append(f" {len(failed)} of {len(agreement.outputs)} outputs differ: {names}{more}")
        return line

    def _failures_table(self) -> Table | None:
        if self.agreement is None or self.agreement.passed or not self.agreement.outputs:
            return None
        table = Table(
            box=box.SIMPLE, title="outputs outside tolerance", title_justify="left", pad_edge=False
        )
        table.add_column("output")
        table.add_column("reason", overflow="fold")
        for o in self.agreement.failed_outputs:
            table.add_row(Text(o.name), Text(o.reason))
        return table

    def _ops_table(self) -> Table | None:
        changes = self.op_changes()
        if not changes:
            return None
        table = Table(box=box.SIMPLE, title="op changes", title_justify="left", pad_edge=False)
        table.add_column("op")
        table.add_column("before", justify="right")
        table.add_column("after", justify="right")
        table.add_column("Δ", justify="right")
        for op, b, a in changes:
            table.add_row(Text(op), str(b), str(a), f"{a - b:+d}")
        b_total, a_total = self.nodes_before, self.nodes_after or 0
        table.add_section()
        table.add_row("total", str(b_total), str(a_total), f"{a_total - b_total:+d}", style="bold")
        return table

    def _passes_table(self) -> Table | None:
        if not self.passes:
            return None
        table = Table(box=box.SIMPLE, title="passes", title_justify="left", pad_edge=False)
        table.add_column("#", justify="right")
        table.add_column("pass")
        table.add_column("time", justify="right")
        table.add_column("nodes", justify="right")
        table.add_column("stats", overflow="ellipsis", no_wrap=True)
        for i, r in enumerate(self.passes):
            nodes = f"{r.nodes_before} → {r.nodes_after}" if r.modified else f"{r.nodes_before} (=)"
            table.add_row(
                str(i),
                Text(r.text or r.name),
                f"{r.seconds:.3f}s",
                nodes,
                Text(_stats_text(r.stats)),
            )
        return table

    def render(self, console: Console) -> None:
        """Writes a compact report to ``console``: summary, agreement, failing outputs, op
        changes, passes, warnings.

        Args:
            console: Where to write (nothing goes to stdout directly).
        """
        head = Text("graphopt ", style="bold")
        head.append(str(self.input_path))
        head.append(" → ")
        head.append(str(self.output_path) if self.output_path is not None else "(not written)")
        console.print(head)
        details = Text()
        if self.pipeline:
            details.append(f"pipeline: {self.pipeline}  ")
        if self.tolerance:
            details.append(f"tolerance: {self.tolerance}  ")
        details.append(f"time: {self.total_seconds:.2f}s")
        console.print(details)
        console.print(self._summary_table())
        console.print(self._agreement_text())
        for table in (self._failures_table(), self._ops_table(), self._passes_table()):
            if table is not None:
                console.print(table)
        for record in self.passes:
            layers = record.stats.get("layers")
            if isinstance(layers, list) and layers:
                console.print(layers_table(record.text or record.name, layers))
        for warning in self.warnings:
            console.print(Text(f"warning: {warning}", style="yellow"))
