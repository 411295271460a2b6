"""Benchmarks the ``fuse`` pass: node counts, ONNX Runtime latency ratio, numerics.

For each model and target, the model goes through ``graphopt.api.optimize(passes="fuse")``
(which verifies it against the original under the ``fusion`` tolerance); then the fused and
the unfused model are timed side by side in this process with
:func:`graphopt.verify.latency.measure_latency` (interleaved round-robin, thread spinning
off), once with ONNX Runtime's default graph optimizations ON for both (what users deploy)
and once with them OFF (what graphopt's fusions buy on their own). Ratios below 1 mean the
fused model is faster; on a noisy 2-core machine treat ratios within ±10% as equal
(BASELINES.md).

Usage::

    .venv/bin/python tools/bench_fusion.py                       # CNN set -> docs/bench/fusion.md
    .venv/bin/python tools/bench_fusion.py --models resnet50,digits-cnn --out -
    .venv/bin/python tools/bench_fusion.py --models minilm-dynamo,minilm-torchscript,smollm2

Models: the onnx package's ``light`` models (``resnet50``, ``densenet121``, ``inception_v1``,
``inception_v2``, ``shufflenet``, ``squeezenet``, ``vgg19``, ``zfnet512``, ``bvlc_alexnet``;
stub weights built by ``ConstantOfShape`` from shapes that are graph inputs, fed
``arange(n)/n``), ``resnet50-const`` / ``squeezenet-const`` / ``shufflenet-const`` (the same
graphs with the stub weights materialized as initializers that are not graph inputs, as a
modern export has them, so BatchNorm folding applies), ``digits-cnn`` (real weights, a test
image batch), and on request ``minilm-dynamo``, ``minilm-torchscript`` and ``smollm2``
(batch 1, sequence 128). A model whose recipe is missing or fails is skipped with a note.
``--models cnn`` (the default) is the light models, their ``-const`` variants and the digits
CNN; ``--models all`` adds the transformers.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import logging
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # ``models`` is a top-level package of the repository
    sys.path.insert(0, str(ROOT))

import onnx
import onnxruntime as ort
from onnx import numpy_helper

from graphopt.api import OptimizeConfig, optimize
from graphopt.testing.backend_models import discover, load_io
from graphopt.testing.machine import cpu_name
from graphopt.verify.inputs import make_feeds
from graphopt.verify.latency import measure_latency, ratio

logger = logging.getLogger("bench_fusion")

DEFAULT_OUT = ROOT / "docs" / "bench" / "fusion.md"
TARGETS = ("ort", "tensorrt")
LIGHT_NAMES = (
    "resnet50",
    "densenet121",
    "inception_v1",
    "inception_v2",
    "shufflenet",
    "squeezenet",
    "vgg19",
    "zfnet512",
    "bvlc_alexnet",
)
CONST_NAMES = ("resnet50", "squeezenet", "shufflenet")
TRANSFORMERS = ("minilm-dynamo", "minilm-torchscript", "smollm2")
Feed = dict[str, np.ndarray]


class Skip(Exception):
    """A model that cannot be benchmarked here (its note goes into the report)."""


@dataclass
class Row:
    """One model × target."""

    model: str
    target: str
    nodes_before: int = 0
    nodes_after: int = 0
    fusions: dict[str, int] = field(default_factory=dict)
    ratio_on: float = float("nan")
    ratio_off: float = float("nan")
    ms_on: float = float("nan")
    ms_off: float = float("nan")
    max_abs: float = float("nan")
    fuse_s: float = float("nan")
    error: str = ""


# --------------------------------------------------------------------------- model sources


def _light(name: str) -> Callable[[Path], tuple[Path, Feed]]:
    def source(work: Path) -> tuple[Path, Feed]:
        del work
        cases = [c for c in discover(("light",)) if c.name == f"light_{name}"]
        if not cases:
            raise Skip("the installed onnx package ships no light models")
        feed, _ = load_io(cases[0])
        return cases[0].model, feed

    return source


def _materialized(name: str) -> Callable[[Path], tuple[Path, Feed]]:
    """A light model with its ConstantOfShape stub weights as real initializers."""

    def source(work: Path) -> tuple[Path, Feed]:
        path, feed = _light(name)(work)
        model = onnx.load(str(path))
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        kept = []
        new_inits = []
        for node in model.graph.node:
            shape_name = node.input[0] if node.input else ""
            if node.op_type == "ConstantOfShape" and shape_name in inits:
                value = numpy_helper.to_array(node.attribute[0].t).reshape(-1)
                shape = tuple(int(d) for d in inits[shape_name])
                array = np.full(shape, value[0], dtype=value.dtype)
                new_inits.append(numpy_helper.from_array(array, node.output[0]))
            else:
                kept.append(node)
        del model.graph.node[:]
        model.graph.node.extend(kept)
        model.graph.initializer.extend(new_inits)
        # A modern export: initializers are constants, not overridable graph inputs.
        all_inits = {t.name for t in model.graph.initializer}
        graph_inputs = [i for i in model.graph.input if i.name not in all_inits]
        del model.graph.input[:]
        model.graph.input.extend(graph_inputs)
        used = {i for n in model.graph.node for i in n.input}
        unused = [t for t in model.graph.initializer if t.name not in used]
        for t in unused:
            model.graph.initializer.remove(t)
        model.ir_version = max(model.ir_version, 4)
        out = work / f"{name}-const.onnx"
        onnx.save(model, str(out))
        return out, feed

    return source


def _digits(work: Path) -> tuple[Path, Feed]:
    del work
    from models import digits_cnn

    path = digits_cnn.build()
    _, _, x_test, _ = digits_cnn.dataset()
    return path, {digits_cnn.INPUT_NAME: np.ascontiguousarray(x_test[:64])}


def _recipe(module_name: str, **build_kwargs: object) -> Callable[[Path], tuple[Path, Feed]]:
    """A ``models.<name>.build(...)`` recipe, fed batch 1 × sequence 128."""

    def source(work: Path) -> tuple[Path, Feed]:
        del work
        try:
            module = importlib.import_module(f"models.{module_name}")
        except ModuleNotFoundError as e:
            raise Skip(f"recipe models/{module_name}.py is missing ({e.name})") from None
        build = getattr(module, "build", None)
        if build is None:
            raise Skip(f"recipe models/{module_name}.py has no build() yet")
        try:
            path = Path(build(**build_kwargs))
        except Exception as e:  # a recipe's failure is a note, not a benchmark crash
            raise Skip(f"models.{module_name}.build() failed: {type(e).__name__}: {e}") from e
        dims = {"batch": 1, "sequence": 128, "seq": 128, "total_sequence": 128, "past_sequence": 0}
        return path, make_feeds(path, dims=dims, seed=0)

    return source


SOURCES: dict[str, Callable[[Path], tuple[Path, Feed]]] = {
    **{name: _light(name) for name in LIGHT_NAMES},
    **{f"{name}-const": _materialized(name) for name in CONST_NAMES},
    "digits-cnn": _digits,
    "minilm-dynamo": _recipe("minilm", exporter="dynamo"),
    "minilm-torchscript": _recipe("minilm", exporter="torchscript"),
    "smollm2": _recipe("smollm2"),
}
CNN_SET = (*LIGHT_NAMES, *(f"{n}-const" for n in CONST_NAMES), "digits-cnn")


# --------------------------------------------------------------------------- measuring


def _bench_one(
    name: str,
    target: str,
    source: Path,
    feed: Feed,
    work: Path,
    budget_s: float,
    off_budget_s: float,
    threads: int,
) -> Row:
    row = Row(name, target)
    inputs = work / f"{name}-feed.npz"
    np.savez(inputs, **feed)  # type: ignore[arg-type]
    out = work / f"{name}-{target}.onnx"
    start = time.perf_counter()
    report = optimize(
        source,
        out,
        OptimizeConfig(
            passes="fuse",
            target=target,
            latency=False,
            inputs=inputs,
            threads=threads,
            overwrite=True,
        ),
    )
    row.fuse_s = time.perf_counter() - start
    row.nodes_before = sum(report.ops_before.values())
    row.nodes_after = sum(report.ops_after.values())
    for record in report.passes:
        stats = getattr(record, "stats", None) or {}
        for rule, count in (stats.get("rules") or {}).items():
            if count:
                row.fusions[rule] = row.fusions.get(rule, 0) + int(count)
    if report.agreement is not None and report.agreement.outputs:
        row.max_abs = max(o.max_abs for o in report.agreement.outputs)
    paths = {"unfused": source, "fused": out}
    on = measure_latency(paths, feed, threads=threads, optimize=True, budget_s=budget_s, repeats=50)
    row.ratio_on = ratio(on, "fused", "unfused")
    row.ms_on = on["unfused"].median_ms
    if off_budget_s > 0:
        off = measure_latency(
            paths, feed, threads=threads, optimize=False, budget_s=off_budget_s, repeats=50
        )
        row.ratio_off = ratio(off, "fused", "unfused")
        row.ms_off = off["unfused"].median_ms
    return row


def _fmt(value: float, spec: str) -> str:
    return "—" if math.isnan(value) else format(value, spec)


def markdown(rows: list[Row], skipped: dict[str, str], args: argparse.Namespace) -> str:
    """The report: a table and the notes."""
    cpu = cpu_name()
    lines = [
        "# Fusion benchmark (`fuse` pass)",
        "",
        (
            f"Written by `tools/bench_fusion.py` on {datetime.date.today().isoformat()}: {cpu}, "
            f"{os.cpu_count()} CPUs, ONNX Runtime {ort.__version__}, "
            f"`intra_op_num_threads={args.threads}`, spinning off."
        ),
        "",
        (
            "Latency ratio = median fused / median unfused, measured interleaved in one process "
            "(< 1: the fused model is faster; within ±10% is noise on this machine). "
            "*ORT opt ON*: both sessions with ONNX Runtime's default graph optimizations "
            "(`ORT_ENABLE_ALL`, what users deploy); *ORT opt OFF*: both without, i.e. what "
            "graphopt's fusions buy on their own. The `tensorrt` rows run on ONNX Runtime as a "
            "proxy (standard ops only). max abs diff: fused vs original on ONNX Runtime "
            "(optimizations off), from graphopt's own verification (`fusion` tolerance)."
        ),
        "",
        (
            "| model | target | nodes before → after | fusions | ratio (ORT opt ON) "
            "| ratio (ORT opt OFF) | unfused ms (ON / OFF) | max abs diff | fuse s |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if r.error:
            lines.append(f"| {r.model} | {r.target} | error: {r.error} | | | | | | |")
            continue
        fusions = ", ".join(f"{k} {v}" for k, v in sorted(r.fusions.items())) or "—"
        lines.append(
            f"| {r.model} | {r.target} | {r.nodes_before} → {r.nodes_after} | {fusions} | "
            f"{_fmt(r.ratio_on, '.2f')} | {_fmt(r.ratio_off, '.2f')} | "
            f"{_fmt(r.ms_on, '.1f')} / {_fmt(r.ms_off, '.1f')} | {_fmt(r.max_abs, '.2g')} | "
            f"{_fmt(r.fuse_s, '.1f')} |"
        )
    if skipped:
        lines += ["", "Skipped:", ""]
        lines += [f"- `{name}`: {why}" for name, why in skipped.items()]
    lines += [
        "",
        "Notes:",
        "",
        (
            "- The `light` models are IR version 3: every initializer is also a graph input, so "
            "graphopt treats their weights, BatchNorm parameters and the shapes of the "
            "`ConstantOfShape` stub weights as overridable, never as constants. Only fusions "
            "that need no constant (Conv/Gemm + activation -> FusedConv/FusedGemm) apply; "
            "`tensorrt` has nothing to do. The `-const` variants materialize the stub weights "
            "as initializers that are not graph inputs, so BatchNorm folding applies too "
            "(their weights are constant-valued stubs: latency is meaningful, accuracy is not)."
        ),
        (
            "- Rows whose node count did not change time the same graph twice: they are an A/A "
            "measurement of this run's noise (other processes share the machine); read the "
            "other ratios against them."
        ),
        (
            "- ONNX Runtime's own optimizer (opt ON) already fuses Conv+BN, Conv+activation and "
            "Gemm+activation on CPU, so ratios near 1 with opt ON are expected; the OFF column "
            "shows the work moved from run time to graphopt."
        ),
    ]
    return "\n".join(lines) + "\n"


def _select(spec: str) -> list[str]:
    names: list[str] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part == "cnn":
            names += CNN_SET
        elif part == "all":
            names += [*CNN_SET, *TRANSFORMERS]
        elif part == "light":
            names += LIGHT_NAMES
        elif part in SOURCES:
            names.append(part)
        else:
            raise SystemExit(
                f"unknown model {part!r}; known: cnn, all, light, {', '.join(SOURCES)}"
            )
    return list(dict.fromkeys(names))


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark; returns the exit code (1 when a model failed)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", default="cnn", help="Comma-separated names, or cnn (default), light, all."
    )
    parser.add_argument("--targets", default=",".join(TARGETS), help="ort,tensorrt")
    parser.add_argument(
        "--out",
        default=str(DEFAULT_OUT),
        help=f"Markdown path (default {DEFAULT_OUT.relative_to(ROOT)}), - for stdout only.",
    )
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads.")
    parser.add_argument(
        "--budget",
        type=float,
        default=6.0,
        help="Seconds of timed runs per model pair with ORT optimizations on.",
    )
    parser.add_argument(
        "--off-budget",
        type=float,
        default=3.0,
        help="Same with ORT optimizations off (0 skips that column).",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]

    rows: list[Row] = []
    skipped: dict[str, str] = {}
    failed = False
    with tempfile.TemporaryDirectory(prefix="graphopt-bench-fusion-") as tmp:
        work = Path(tmp)
        for name in _select(args.models):
            try:
                source, feed = SOURCES[name](work)
            except Skip as e:
                skipped[name] = str(e)
                print(f"skip {name}: {e}", file=sys.stderr)
                continue
            for target in targets:
                print(f"{name} / {target} ...", file=sys.stderr, flush=True)
                try:
                    row = _bench_one(
                        name,
                        target,
                        Path(source),
                        feed,
                        work,
                        args.budget,
                        args.off_budget,
                        args.threads,
                    )
                except Exception as e:  # noqa: BLE001 - report it, go on with the next model
                    failed = True
                    logger.debug("%s", traceback.format_exc())
                    row = Row(
                        name, target, error=" ".join(f"{type(e).__name__}: {e}".split())[:200]
                    )
                rows.append(row)
                print(f"  {row}", file=sys.stderr)
    text = markdown(rows, skipped, args)
    print(text)
    if args.out != "-":
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
