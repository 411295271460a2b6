"""Fusion on MiniLM-L6: graphopt's ``fuse`` against ONNX Runtime's transformers optimizer.

For each export of the encoder (``models.minilm.build``: dynamo opset 20, TorchScript
opset 17) this builds

* ``unfused``: the export as it is;
* ``graphopt``: ``fuse`` for target ``ort`` (load, the pass, save; that is its tool time);
* ``ort-optimizer``: ``onnxruntime.transformers.optimizer.optimize_model(path,
  model_type="bert", num_heads=12, hidden_size=384, opt_level=L)`` for every level in
  ``--ort-levels``; levels whose saved graphs are identical are measured once (the row
  names them all), so the table shows every distinct result ORT's tool can give;

and reports, side by side: fused-op counts (attention, SkipLayerNorm, GELU), node counts,
the mean cosine of mean-pooled sentence embeddings against ``unfused`` on held-out
sentences (ORT graph optimizations off, so the graphs themselves are compared), and ORT
CPU latency at batch 1 and batch 8 x seq 128 (real sentences, padded). Latency is
measured in one process, interleaved, with thread spinning off, 2 intra-op threads and
ORT's default optimizations on for every variant
(:func:`graphopt.verify.latency.measure_latency`); ratios are to ``unfused``, and ratios
within +-10% count as equal on this machine.

Usage::

    .venv/bin/python tools/bench_fusion_transformers.py              # writes docs/bench/fusion_transformers.md
    .venv/bin/python tools/bench_fusion_transformers.py --out -      # prints the report only
    .venv/bin/python tools/bench_fusion_transformers.py --exporters torchscript --repeats 10
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the models/ recipes live beside graphopt/
    sys.path.insert(0, str(ROOT))

import onnx
import onnxruntime as ort

import graphopt
from graphopt.testing.machine import cpu_name
from graphopt.verify.latency import measure_latency
from models import minilm

NUM_HEADS = 12
HIDDEN_SIZE = 384
SEQ_LEN = 128
EQUAL_BAND = 0.10

ATTENTION_OPS = ("com.microsoft::Attention", "com.microsoft::MultiHeadAttention")
SKIP_NORM_OPS = (
    "com.microsoft::SkipLayerNormalization",
    "com.microsoft::SkipSimplifiedLayerNormalization",
)
GELU_OPS = ("com.microsoft::BiasGelu", "com.microsoft::Gelu", "com.microsoft::FastGelu")


@dataclass
class Variant:
    """One model measured in the benchmark."""

    name: str
    path: Path
    tool_s: float | None = None
    ops: Counter[str] = field(default_factory=Counter)
    nodes: int = 0
    cosine: float = float("nan")
    latency_ms: dict[int, float] = field(default_factory=dict)
    fastest_ms: dict[int, float] = field(default_factory=dict)

    def count(self, names: Sequence[str]) -> int:
        return sum(self.ops[n] for n in names)


def _histogram(path: Path) -> tuple[Counter[str], int, tuple[tuple[str, str], ...]]:
    model = onnx.load(str(path), load_external_data=False)
    nodes = list(model.graph.node)
    ops = Counter(
        f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
        for n in nodes
    )
    signature = tuple((n.domain, n.op_type) for n in nodes)
    return ops, len(nodes), signature


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silences the ORT optimizer's and onnxscript's per-fusion log lines."""
    names = ("onnxruntime", "onnxscript", "onnx_ir", "graphopt", "fusion", "onnx_model")
    saved = {n: logging.getLogger(n).level for n in names}
    root = logging.getLogger().level
    try:
        for n in names:
            logging.getLogger(n).setLevel(logging.ERROR)
        logging.getLogger().setLevel(logging.ERROR)
        yield
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)
        logging.getLogger().setLevel(root)


def run_graphopt(src: Path, dst: Path) -> float:
    """``fuse`` for target ``ort``; returns the tool time (load + pass + save)."""
    start = time.perf_counter()
    loaded = graphopt.load(src)
    pm = graphopt.default_registry(plugins=False).build("fuse")
    pm.execute(loaded.model, graphopt.PassContext(target="ort"))
    graphopt.save(loaded.model, dst)
    return time.perf_counter() - start


def run_ort_optimizer(src: Path, dst: Path, level: int) -> float:
    """ORT's transformers optimizer at ``level``; returns its tool time."""
    from onnxruntime.transformers.optimizer import optimize_model

    start = time.perf_counter()
    optimized = optimize_model(
        str(src),
        model_type="bert",
        num_heads=NUM_HEADS,
        hidden_size=HIDDEN_SIZE,
        opt_level=level,
        use_gpu=False,
    )
    optimized.save_model_to_file(str(dst))
    return time.perf_counter() - start


def _no_opt_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 2
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def build_variants(exporter: str, work: Path, levels: Sequence[int]) -> list[Variant]:
    """The unfused export, graphopt's result and ORT's distinct results."""
    src = minilm.build(exporter)  # type: ignore[arg-type]
    variants = [Variant("unfused", src)]
    ours = work / f"{exporter}-graphopt.onnx"
    with _quiet():
        tool = run_graphopt(src, ours)
    variants.append(Variant("graphopt fuse", ours, tool_s=tool))
    seen: dict[tuple[tuple[str, str], ...], Variant] = {}
    for level in levels:
        dst = work / f"{exporter}-ort-{level}.onnx"
        with _quiet():
            tool = run_ort_optimizer(src, dst, level)
        signature = _histogram(dst)[2]
        if signature in seen:  # the same graph as a level already kept
            kept = seen[signature]
            kept.name = f"{kept.name},{level}"
            continue
        variant = Variant(f"ORT optimizer opt_level={level}", dst, tool_s=tool)
        seen[signature] = variant
        variants.append(variant)
    for v in variants:
        v.ops, v.nodes, _ = _histogram(v.path)
    return variants


def measure(
    variants: list[Variant], sentences: Sequence[str], repeats: int, batches: Sequence[int]
) -> None:
    """Fills in embedding cosine and latency."""
    options = _no_opt_options()
    reference = minilm.embed(variants[0].path, sentences, batch=16, session_options=options)
    for v in variants:
        got = minilm.embed(v.path, sentences, batch=16, session_options=options)
        v.cosine = minilm.embedding_cosine(reference, got)
    paths = {v.name: v.path for v in variants}
    for batch in batches:
        feed = minilm.tokenize(sentences[:batch], seq_len=SEQ_LEN, pad_to_max=True)
        stats = measure_latency(paths, feed, repeats=repeats, warmup=3, threads=2, optimize=True)
        for v in variants:
            v.latency_ms[batch] = stats[v.name].median_ms
            v.fastest_ms[batch] = stats[v.name].min_ms


def _ratio(v: Variant, base: Variant, batch: int) -> float:
    return v.latency_ms[batch] / base.latency_ms[batch]


def verdict(ours: float, theirs: float) -> str:
    """``faster``/``equal``/``slower`` for two latencies, with the +-10% band."""
    r = ours / theirs
    if r < 1 - EQUAL_BAND:
        return f"faster ({r:.2f}x)"
    if r > 1 + EQUAL_BAND:
        return f"slower ({r:.2f}x)"
    return f"equal ({r:.2f}x)"


def markdown(
    results: dict[str, list[Variant]], batches: Sequence[int], n_sentences: int, repeats: int
) -> str:
    lines = [
        "# Fusion on MiniLM-L6: graphopt `fuse` vs ONNX Runtime's transformers optimizer",
        "",
        (
            "Reproduce: `.venv/bin/python tools/bench_fusion_transformers.py` "
            f"(writes this file). Machine: {platform.machine()}, {os.cpu_count()} CPUs "
            f"({cpu_name()}); onnxruntime {ort.__version__}."
        ),
        "",
        (
            f"Latency: ORT CPU, median of {repeats} interleaved runs per variant in one "
            "process, spinning off, 2 intra-op threads, ORT default graph optimizations "
            f"(ENABLE_ALL) on for every variant; batch b x seq {SEQ_LEN}, real held-out "
            f"sentences padded to {SEQ_LEN}. Ratios are to `unfused` of the same export; "
            "within +-10% counts as equal. cos: mean cosine of mean-pooled, L2-normalised "
            f"embeddings vs `unfused` on {n_sentences} held-out sentences (batches of 16 "
            "padded to their longest; ORT optimizations off)."
        ),
        "",
    ]
    header = "| export | variant | nodes | attention | SkipLN | GELU | cos vs unfused |"
    rule = "| --- | --- | --- | --- | --- | --- | --- |"
    for b in batches:
        header += f" b{b} ms (ratio) |"
        rule += " --- |"
    header += " tool time |"
    rule += " --- |"
    lines += [header, rule]
    for exporter, variants in results.items():
        base = variants[0]
        for v in variants:
            row = (
                f"| {exporter} | {v.name} | {v.nodes} | {v.count(ATTENTION_OPS)} | "
                f"{v.count(SKIP_NORM_OPS)} | {v.count(GELU_OPS)} | {v.cosine:.7f} |"
            )
            for b in batches:
                row += f" {v.latency_ms[b]:.1f} ({_ratio(v, base, b):.2f}) |"
            row += f" {v.tool_s:.1f} s |" if v.tool_s is not None else " — |"
            lines.append(row)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines += [
        "",
        (
            "graphopt vs the best ORT optimizer result (lowest median), per export and "
            f"batch (1-minute load average at the end: {load:.1f} on {os.cpu_count()} CPUs):"
        ),
        "",
    ]
    for exporter, variants in results.items():
        ours = variants[1]
        ort_variants = variants[2:]
        for b in batches:
            best = min(ort_variants, key=lambda v: v.latency_ms[b])
            lines.append(
                f"- {exporter}, b{b}: graphopt {ours.latency_ms[b]:.1f} ms vs "
                f"{best.name} {best.latency_ms[b]:.1f} ms: "
                f"{verdict(ours.latency_ms[b], best.latency_ms[b])}; fastest runs "
                f"{ours.fastest_ms[b]:.1f} vs {best.fastest_ms[b]:.1f} ms "
                f"({ours.fastest_ms[b] / best.fastest_ms[b]:.2f}x)"
            )
    lines += [
        "",
        (
            "Reading: at seq 128 the projections and the FFN are ~95% of the work (per token "
            "and layer ~1.77 M multiply-adds in MatMuls against ~0.1 M in Q·Kᵀ and P·V), and "
            "ORT's own session optimizations already give every variant BiasGelu (and "
            "SkipLayerNormalization on the dynamo export) and fold the score scaling into "
            "FusedMatMul, so graph-level fusion can move latency by only a few percent: the "
            "ratios sit inside the +-10% band of this shared 2-vCPU machine. The fastest-run "
            "ratios above are less disturbed by the other load than the medians."
        ),
    ]
    lines += ["", "Fusions graphopt has and ORT's optimizer lacks (or the reverse):", ""]
    for exporter, variants in results.items():
        ours, theirs = variants[1], variants[2:]
        for label, names in (("attention", ATTENTION_OPS), ("SkipLN", SKIP_NORM_OPS),
                             ("GELU", GELU_OPS)):
            best_theirs = max(v.count(names) for v in theirs)
            if ours.count(names) != best_theirs:
                lines.append(
                    f"- {exporter}: {label} {ours.count(names)} (graphopt) vs "
                    f"{best_theirs} (best ORT level)"
                )
    lines += [
        "",
        (
            "Fused-op columns count com.microsoft ops: `Attention`/`MultiHeadAttention`, "
            "`SkipLayerNormalization` (and the simplified form), `BiasGelu`/`Gelu`/`FastGelu` "
            "(the dynamo export's standard `Gelu` is not counted); `nodes` counts every node "
            "of the saved graph, `Constant` nodes included."
        ),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        default=str(ROOT / "docs" / "bench" / "fusion_transformers.md"),
        help="Markdown report path, or - to print it only.",
    )
    parser.add_argument(
        "--exporters", nargs="+", default=["dynamo", "torchscript"],
        choices=["dynamo", "torchscript"],
    )
    parser.add_argument("--ort-levels", type=int, nargs="+", default=[0, 1, 2, 99])
    parser.add_argument("--repeats", type=int, default=30, help="Timed runs per variant.")
    parser.add_argument("--sentences", type=int, default=128, help="Held-out sentences.")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args(argv)

    sentences = minilm.evaluation_sentences()[: args.sentences]
    results: dict[str, list[Variant]] = {}
    with tempfile.TemporaryDirectory(prefix="graphopt-bench-fusion-") as work:
        for exporter in args.exporters:
            print(f"[{exporter}] building variants", file=sys.stderr)
            variants = build_variants(exporter, Path(work), args.ort_levels)
            print(f"[{exporter}] measuring {len(variants)} variants", file=sys.stderr)
            measure(variants, sentences, args.repeats, args.batches)
            results[exporter] = variants
    report = markdown(results, args.batches, len(sentences), args.repeats)
    print(report)
    if args.out != "-":
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
