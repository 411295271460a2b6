"""``graphopt compare A B``: agreement, size and latency side by side; with
``--per-layer``, the SQNR of every intermediate value both models compute (which layer
broke it?)."""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import onnx_ir as ir
from rich.console import Console
from rich.table import Table

from graphopt import io
from graphopt.errors import UsageError
from graphopt.verify.compare import format_db, json_float, tolerance_for
from graphopt.verify.inputs import load_feeds, make_feeds
from graphopt.verify.latency import measure_latency
from graphopt.verify.verify import verify_model


def run_compare(
    model_a: Path,
    model_b: Path,
    *,
    inputs: Path | None,
    dims: dict[str, int],
    tolerance: str,
    latency: bool,
    threads: int,
    seed: int,
    console: Console,
) -> bool:
    """Compares B against A on ONNX Runtime and prints the result.

    Returns:
        Whether B agrees with A within ``tolerance``.
    """
    loaded_a = io.load(model_a)
    loaded_b = io.load(model_b)
    feeds = load_feeds(inputs, loaded_a.path) if inputs else [
        make_feeds(loaded_a.path, dims=dims, seed=seed)
    ]
    tol = tolerance_for([tolerance])
    agreement = verify_model(loaded_a.path, loaded_b.path, tol, feeds, threads=threads)

    table = Table(title=f"{model_a.name} vs {model_b.name}")
    for col in ("metric", "A", "B", "B/A"):
        table.add_column(col, justify="right")
    size_a, size_b = io.model_files_size(loaded_a), io.model_files_size(loaded_b)
    table.add_row("size (MiB)", f"{size_a / 2**20:.2f}", f"{size_b / 2**20:.2f}",
                  f"{size_b / max(size_a, 1):.3f}")
    if latency:
        stats = measure_latency({"A": loaded_a.path, "B": loaded_b.path}, feeds[0],
                                threads=threads)
        a, b = stats["A"].median_ms, stats["B"].median_ms
        table.add_row("latency median (ms)", f"{a:.2f}", f"{b:.2f}", f"{b / a:.3f}")
    console.print(table)

    out = Table(title=f"output agreement (tolerance {tol.name})")
    for col in ("output", "max abs", "max rel", "SQNR dB", "cosine", "ok"):
        out.add_column(col)
    for o in agreement.outputs:
        out.add_row(
            o.name,
            f"{o.max_abs:.3g}",
            f"{o.max_rel:.3g}",
            f"{o.sqnr_db:.1f}",
            f"{o.cosine:.6f}",
            "yes" if o.passed else f"NO: {o.reason}",
        )
    console.print(out)
    console.print(agreement.summary())
    return bool(agreement.passed)


# --------------------------------------------------------------------------- per layer
#
# ``graphopt compare A B --calib data.npz --per-layer``: which layer broke it? Every float
# value computed in both models under the same name (node outputs of the main graphs:
# quantization passes keep the names of the values they rewrite) is added as an extra
# output of a copy of each model; both run on the calibration feeds (ONNX Runtime,
# optimizations off, so every value exists as written) and the SQNR of B's value against
# A's is accumulated over all feeds (sums of squares: one feed in memory at a time).


#: SQNR treated as exact (float32 rounding alone gives ~140 dB).
SQNR_CEILING = 120.0
#: |x| from here on is a fill (a dtype-minimum mask value), not a signal.
FILL_MAGNITUDE = 1e30


@dataclass
class LayerAgreement:
    """How one intermediate value of B compares with A's.

    Attributes:
        name: The value name (the same in both models).
        op_a: The op producing it in A.
        op_b: The op producing it in B.
        shape: Its shape on the first feed.
        sqnr_db: Signal-to-noise ratio of B's value against A's over all feeds (dB).
        cosine: Cosine similarity over all feeds.
        max_abs: Largest ``|b - a|``.
        inputs_sqnr_db: The worst SQNR among the nearest matched values upstream of it in
            A (None when none is matched: it is computed from the graph inputs).
        position: Its producer's position in A's graph (topological order).
    """

    name: str
    op_a: str
    op_b: str
    shape: tuple[int, ...]
    sqnr_db: float
    cosine: float
    max_abs: float
    inputs_sqnr_db: float | None
    position: int = 0

    @property
    def drop_db(self) -> float:
        """dB lost at this value: its inputs' SQNR minus its own (what this layer adds).

        SQNRs count as at most :data:`SQNR_CEILING` (identical values are infinite), and
        values computed straight from the graph inputs (identical feeds) have exact
        inputs: the first value where the models part is the one with the largest drop.
        """
        inputs = SQNR_CEILING if self.inputs_sqnr_db is None else self.inputs_sqnr_db
        return min(inputs, SQNR_CEILING) - min(self.sqnr_db, SQNR_CEILING)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "op_a": self.op_a,
            "op_b": self.op_b,
            "shape": list(self.shape),
            "sqnr_db": json_float(self.sqnr_db),
            "inputs_sqnr_db": json_float(self.inputs_sqnr_db),
            "drop_db": json_float(self.drop_db),
            "cosine": json_float(self.cosine),
            "max_abs": json_float(self.max_abs),
        }


#: A value whose SQNR is below this carries more than 1% noise power: "broken" from here.
BROKEN_DB = 20.0


@dataclass
class PerLayerResult:
    """All matched values, worst (lowest SQNR) first, and what could not be compared."""

    layers: list[LayerAgreement]
    samples: int
    unmatched_a: int
    shape_mismatch: list[str] = field(default_factory=list)

    def first_below(self, threshold: float = BROKEN_DB) -> LayerAgreement | None:
        """The earliest value (in A's graph order) whose SQNR is below ``threshold``: where
        the answers start to go wrong."""
        below = [r for r in self.layers if r.sqnr_db < threshold]
        return min(below, key=lambda r: r.position) if below else None

    def largest_drop(self) -> LayerAgreement | None:
        """The value that loses the most dB against its inputs."""
        return max(self.layers, key=lambda r: r.drop_db) if self.layers else None

    def to_dict(self) -> dict[str, Any]:
        first = self.first_below()
        drop = self.largest_drop()
        return {
            "samples": self.samples,
            "matched": len(self.layers),
            "unmatched_in_a": self.unmatched_a,
            "shape_mismatch": self.shape_mismatch,
            "first_below": {"threshold_db": BROKEN_DB, "name": first.name if first else None},
            "largest_drop": drop.name if drop else None,
            "layers": [layer.to_dict() for layer in self.layers],
        }


def _float_values(model: ir.Model) -> dict[str, tuple[ir.Value, ir.Node]]:
    """Main-graph node outputs that are (or may be) float32, by name."""
    found: dict[str, tuple[ir.Value, ir.Node]] = {}
    for node in model.graph:
        for out in node.outputs:
            if out.name and out.dtype in (None, ir.DataType.FLOAT):
                found[out.name] = (out, node)
    return found


def _upstream(model: ir.Model, matched: set[str]) -> dict[str, set[str]]:
    """For each matched value, the nearest matched values it is computed from (in A)."""
    result: dict[str, set[str]] = {}
    by_name = {v.name: v for node in model.graph for v in node.outputs if v.name}
    for name in matched:
        producer = by_name[name].producer()
        seen: set[int] = set()
        found: set[str] = set()
        stack = [v for v in (producer.inputs if producer is not None else ()) if v is not None]
        while stack:
            value = stack.pop()
            if id(value) in seen:
                continue
            seen.add(id(value))
            if value.name in matched:
                found.add(value.name)
                continue
            p = value.producer()
            if p is not None:
                stack.extend(v for v in p.inputs if v is not None)
        result[name] = found
    return result


def per_layer_sqnr(
    model_a: Path, model_b: Path, calib: Path, *, samples: int | None = 16, threads: int = 2
) -> PerLayerResult:
    """Per-value SQNR of B's intermediate values against A's, on calibration feeds.

    Args:
        model_a: The reference model (fp32).
        model_b: The model under test (e.g. int8), with value names in common with A.
        calib: ``.npz`` file or folder of ``.npz`` feeds keyed by graph-input name.
        samples: Use at most this many feeds (None: all).
        threads: ONNX Runtime intra-op threads.

    Returns:
        The matched values, lowest SQNR first.

    Raises:
        UsageError: No float value is computed under the same name in both models.
        CalibrationError: The data is unusable (from the dataset or a failed run).
    """
    from graphopt.analysis.calibration import run_feed, session_with_outputs
    from graphopt.calibration_data import CalibrationDataset

    loaded_a, loaded_b = io.load(model_a), io.load(model_b)
    values_a = _float_values(loaded_a.model)
    values_b = _float_values(loaded_b.model)
    common = [n for n in values_a if n in values_b]
    inputs_b = {v.name for v in loaded_b.model.graph.inputs}
    common = [n for n in common if n not in inputs_b]
    if not common:
        raise UsageError(
            f"compare --per-layer: {model_a.name} and {model_b.name} compute no float value "
            f"under the same name ({len(values_a)} and {len(values_b)} float values); "
            "per-layer comparison needs B derived from A with value names kept"
        )
    dataset = CalibrationDataset(calib, loaded_a.model, limit=samples)
    signal = dict.fromkeys(common, 0.0)
    noise = dict.fromkeys(common, 0.0)
    cross = dict.fromkeys(common, 0.0)
    energy_b = dict.fromkeys(common, 0.0)
    max_abs = dict.fromkeys(common, 0.0)
    shapes: dict[str, tuple[int, ...]] = {}
    mismatch: set[str] = set()
    count = 0
    with tempfile.TemporaryDirectory(prefix="graphopt-compare-") as scratch:
        dir_a, dir_b = Path(scratch) / "a", Path(scratch) / "b"
        dir_a.mkdir()
        dir_b.mkdir()
        session_a = session_with_outputs(loaded_a.model, common, dir_a, threads)
        session_b = session_with_outputs(loaded_b.model, common, dir_b, threads)
        for index, feed in enumerate(dataset):
            got_a = run_feed(session_a, common, feed, index)
            got_b = run_feed(session_b, common, feed, index)
            for name in common:
                a, b = got_a[name], got_b[name]
                if a.shape != b.shape or a.dtype.kind != "f" or b.dtype.kind != "f":
                    mismatch.add(name)
                    continue
                shapes.setdefault(name, tuple(int(d) for d in a.shape))
                a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
                # Fills (an attention mask's -3.4e38, inf) would swamp the signal sums;
                # they are compared by position only.
                fill = ~(np.abs(a64) < FILL_MAGNITUDE)
                if fill.any():
                    if not np.array_equal(a64[fill], b64[fill]):
                        mismatch.add(name)
                        continue
                    a64, b64 = a64[~fill], b64[~fill]
                diff = b64 - a64
                signal[name] += float(a64 @ a64)
                noise[name] += float(diff @ diff)
                cross[name] += float(a64 @ b64)
                energy_b[name] += float(b64 @ b64)
                if diff.size:
                    max_abs[name] = max(max_abs[name], float(np.abs(diff).max()))
            del got_a, got_b
            count += 1
    matched = [n for n in common if n not in mismatch]
    if not matched:
        raise UsageError(
            f"compare --per-layer: the {len(common)} values named alike in both models "
            "differ in shape, type or fill positions; nothing to compare"
        )
    sqnr = {n: _db(signal[n], noise[n]) for n in matched}
    upstream = _upstream(loaded_a.model, set(matched))
    order = {id(node): i for i, node in enumerate(loaded_a.model.graph)}
    layers = []
    for n in matched:
        ups = [sqnr[u] for u in upstream[n]]
        na, nb = math.sqrt(signal[n]), math.sqrt(energy_b[n])
        cosine = 1.0 if noise[n] == 0 else (cross[n] / (na * nb) if na > 0 and nb > 0 else 0.0)
        producer_b = values_b[n][1]
        layers.append(LayerAgreement(
            name=n,
            op_a=values_a[n][1].op_type,
            op_b=producer_b.op_type,
            shape=shapes.get(n, ()),
            sqnr_db=sqnr[n],
            cosine=cosine,
            max_abs=max_abs[n],
            inputs_sqnr_db=min(ups) if ups else None,
            position=order.get(id(values_a[n][1]), len(order)),
        ))
    layers.sort(key=lambda r: (r.sqnr_db, -r.drop_db))
    return PerLayerResult(layers, count, len(values_a) - len(common), sorted(mismatch))


def _db(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def render_per_layer(result: PerLayerResult, console: Console, *, top: int = 20) -> None:
    """The ``top`` worst values as a table, then which value lost the most dB."""
    shown = result.layers[:top]
    table = Table(
        title=f"per-layer SQNR, worst first ({len(shown)} of {len(result.layers)} matched "
        f"values, {result.samples} feeds)"
    )
    for col in ("value", "op A -> B", "SQNR", "inputs", "drop", "cosine", "max abs"):
        table.add_column(col, justify="left" if col in ("value", "op A -> B") else "right")
    for r in shown:
        drop = r.drop_db
        table.add_row(
            r.name,
            r.op_a if r.op_a == r.op_b else f"{r.op_a} -> {r.op_b}",
            format_db(r.sqnr_db),
            format_db(r.inputs_sqnr_db) if r.inputs_sqnr_db is not None else "(inputs)",
            f"{drop:.1f} dB",
            f"{r.cosine:.5f}",
            f"{r.max_abs:.3g}",
        )
    console.print(table)
    first = result.first_below()
    if first is not None:
        inputs = format_db(first.inputs_sqnr_db) if first.inputs_sqnr_db is not None else "exact"
        console.print(
            f"first value below {BROKEN_DB:.0f} dB (graph order): '{first.name}' "
            f"({first.op_a} -> {first.op_b}) {format_db(first.sqnr_db)}, inputs {inputs}"
        )
    elif result.layers:
        console.print(f"every matched value is at or above {BROKEN_DB:.0f} dB")
    worst = result.largest_drop()
    if worst is not None:
        console.print(
            f"largest loss at one value: '{worst.name}' ({worst.op_a} -> {worst.op_b}) "
            f"{format_db(worst.sqnr_db)}, {worst.drop_db:.1f} dB below its inputs"
        )
    if result.shape_mismatch:
        console.print(
            f"not compared (shape, type or fill positions differ): "
            f"{len(result.shape_mismatch)} values"
        )


def run_per_layer_compare(
    model_a: Path,
    model_b: Path,
    *,
    calib: Path | None,
    samples: int | None,
    top: int,
    as_json: bool,
    threads: int,
    console: Console,
) -> PerLayerResult:
    """``graphopt compare A B --calib DATA --per-layer [--json]``.

    Raises:
        UsageError: ``--calib`` missing, or nothing matched.
    """
    if calib is None:
        raise UsageError(
            "compare --per-layer runs both models on real inputs: pass --calib PATH (an .npz "
            "file or a folder of .npz feeds)"
        )
    result = per_layer_sqnr(model_a, model_b, calib, samples=samples, threads=threads)
    if as_json:
        payload = {"model_a": str(model_a), "model_b": str(model_b), **result.to_dict()}
        click.echo(json.dumps(payload, indent=2, allow_nan=False))
    else:
        render_per_layer(result, console, top=top)
    return result
