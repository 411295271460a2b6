"""``graphopt compare A B``: agreement, size and latency side by side."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from graphopt import io
from graphopt.verify.compare import tolerance_for
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
