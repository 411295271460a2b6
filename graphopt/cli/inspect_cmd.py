"""``graphopt inspect`` and ``graphopt passes``: read-only descriptions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx_ir as ir
from rich.console import Console
from rich.table import Table

from graphopt import io
from graphopt.infra.instruments import op_histogram
from graphopt.infra.registry import PassRegistry
from graphopt.report import count_parameters


def _shape_text(value: ir.Value) -> str:
    if value.shape is None:
        return "?"
    dims = [str(d) if d is not None else "?" for d in value.shape]
    return "[" + ",".join(dims) + "]"


def describe(path: Path) -> dict[str, Any]:
    """A JSON-serialisable description of the model at ``path`` (validated load)."""
    loaded = io.load(path)
    model = loaded.model
    hist = op_histogram(model)
    inits = model.graph.initializers
    return {
        "path": str(loaded.path),
        "size_bytes": io.model_files_size(loaded),
        "external_data_files": [str(p) for p in loaded.external_files],
        "ir_version": model.ir_version,
        "opset_imports": dict(model.opset_imports),
        "producer": f"{model.producer_name or ''} {model.producer_version or ''}".strip(),
        "inputs": [
            {"name": v.name, "dtype": str(v.dtype), "shape": _shape_text(v)}
            for v in model.graph.inputs
            if v.name not in inits
        ],
        "outputs": [
            {"name": v.name, "dtype": str(v.dtype), "shape": _shape_text(v)}
            for v in model.graph.outputs
        ],
        "nodes": sum(hist.values()),
        "parameters": count_parameters(model),
        "initializers": len(inits),
        "functions": [f"{f.domain}::{f.name}" for f in model.functions.values()],
        "metadata": dict(model.metadata_props),
        "ops": dict(sorted(hist.items(), key=lambda kv: (-kv[1], kv[0]))),
    }


def render_description(info: dict[str, Any], console: Console) -> None:
    """Prints :func:`describe`'s result as tables."""
    summary = Table(title=info["path"], show_header=False)
    summary.add_column("field")
    summary.add_column("value")
    summary.add_row("size", f"{info['size_bytes'] / 2**20:.2f} MiB")
    summary.add_row("ir_version", str(info["ir_version"]))
    summary.add_row(
        "opsets", ", ".join(f"{d or 'ai.onnx'}:{v}" for d, v in info["opset_imports"].items())
    )
    summary.add_row("producer", info["producer"] or "-")
    summary.add_row("nodes", str(info["nodes"]))
    summary.add_row("parameters", f"{info['parameters']:,}")
    summary.add_row("external data", ", ".join(info["external_data_files"]) or "none")
    if info["functions"]:
        summary.add_row("functions", ", ".join(info["functions"]))
    console.print(summary)
    io_table = Table(title="graph inputs and outputs")
    for col in ("kind", "name", "dtype", "shape"):
        io_table.add_column(col)
    for kind in ("inputs", "outputs"):
        for v in info[kind]:
            io_table.add_row(kind[:-1], v["name"], v["dtype"], v["shape"])
    console.print(io_table)
    ops = Table(title="operators")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, n in info["ops"].items():
        ops.add_row(op, str(n))
    console.print(ops)


def render_registry(registry: PassRegistry, console: Console) -> None:
    """Prints every registered pass with its options, then the named pipelines."""
    table = Table(title="passes")
    for col in ("name", "summary", "options", "tolerance", "from"):
        table.add_column(col)
    for name in sorted(registry.passes):
        cls = registry.passes[name]
        opts = ", ".join(f"{n}: {t} = {d}" for n, t, d in cls.Options.describe()) or "-"
        table.add_row(name, cls.info.summary, opts, cls.info.tolerance, registry.sources[name])
    console.print(table)
    pipes = Table(title="named pipelines")
    for col in ("name", "expands to", "summary", "from"):
        pipes.add_column(col)
    for name in sorted(registry.pipelines):
        p = registry.pipelines[name]
        pipes.add_row(name, p.text, p.summary, p.source)
    console.print(pipes)
