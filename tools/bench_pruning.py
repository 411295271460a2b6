"""Structured pruning and sparsity benchmark -> docs/bench/pruning.md.

Rows:

* MiniLM-L6 (dynamo export): ``prune(heads=0.25,ffn=0.25,...)`` with and without
  reconstruction: parameters, ORT latency ratio at batch 8 x seq 128 (interleaved, graph
  optimizations on), mean embedding cosine vs fp32 on held-apart sentences.
* SmolLM2-135M (no-cache): 20% of FFN neurons, and separately one KV group (3 of 9 query
  heads with their KV head) in the middle third of the layers (10..19): perplexity on
  evaluation windows, with and without reconstruction.
* CNNs (conv channel pruning from graphopt.passes.pruning.channels): the digits CNN
  (accuracy, with and without reconstruction) and an onnx ``light`` CNN (params, latency),
  plus ``sparsify(pattern=2:4,ratio=0.5)`` on the digits CNN. Rows are left out when those
  pieces are missing.

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python tools/bench_pruning.py [--skip-smollm2] [--skip-cnn]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
for extra in (ROOT, ROOT / "tests" / "e2e"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from graphopt.api import OptimizeConfig, optimize
from graphopt.verify.latency import measure_latency

logger = logging.getLogger("bench_pruning")
OUTPUT = ROOT / "docs" / "bench" / "pruning.md"

MINILM_PRUNE = "prune(heads=0.25,ffn=0.25,importance=hessian,scope=global,damp=0.001{})"
SMOLLM2_FFN = "prune(ffn=0.2,importance=activation,damp=1.0{})"
SMOLLM2_KV = "prune(heads=0.34,gqa=groups,layers=[10,11,12,13,14,15,16,17,18,19],importance=hessian,damp=1.0{})"
CALIB_WINDOWS, CALIB_WINDOW = 16, 128
EVAL_WINDOWS, EVAL_WINDOW = 8, 256


def _plain() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return options


def _ratio(src: Path, out: Path, feed: dict[str, np.ndarray]) -> float:
    lat = measure_latency({"before": src, "after": out}, feed, repeats=20, threads=2, budget_s=20.0)
    return lat["after"].median_ms / lat["before"].median_ms


def minilm_rows(work: Path) -> list[str]:
    """MiniLM: 25% heads + 25% FFN, with and without reconstruction."""
    from test_prune_minilm import write_sorted_calibration

    from models import minilm, text

    src = minilm.build("dynamo")
    calib = work / "minilm-calib"
    write_sorted_calibration(calib)
    sentences = text.evaluation_split()
    ref = minilm.embed(src, sentences, session_options=_plain())
    feed = minilm.tokenize(text.evaluation_split()[:8], seq_len=128, pad_to_max=True)
    rows = []
    for flag, label in ((",reconstruct=true", "with"), ("", "without")):
        out = work / f"minilm-{label}.onnx"
        t0 = time.perf_counter()
        report = optimize(src, out, OptimizeConfig(passes=MINILM_PRUNE.format(flag), calib=calib,
                                                   verify=False, latency=False, overwrite=True))
        seconds = time.perf_counter() - t0
        got = minilm.embed(out, sentences, session_options=_plain())
        cosine = minilm.embedding_cosine(ref, got)
        ratio = _ratio(src, out, feed)
        rows.append(
            f"| MiniLM-L6 | 25% heads + 25% FFN, reconstruction {label} | "
            f"{report.params_before / 1e6:.2f}M -> {report.params_after / 1e6:.2f}M | "
            f"{ratio:.2f} | cosine {cosine:.4f} ({len(sentences)} sentences) | {seconds:.0f} s |"
        )
        logger.info(rows[-1])
    return rows


def smollm2_rows(work: Path) -> list[str]:
    """SmolLM2: 20% FFN, and one KV group in the middle third of the layers."""
    import onnx_ir as ir

    from graphopt.infra.analysis import AnalysisManager
    from graphopt.infra.context import PassContext
    from graphopt.infra.pipeline_text import parse_pipeline
    from graphopt.passes.pruning.prune_pass import PrunePass
    from models import smollm2

    src = smollm2.build("no-cache")
    windows = smollm2.calibration_windows(CALIB_WINDOWS, window=CALIB_WINDOW, seed=0)
    ctx = PassContext(calibration=lambda: iter(windows))

    def ppl(path: Path) -> float:
        return smollm2.perplexity(path, window=EVAL_WINDOW, max_windows=EVAL_WINDOWS, threads=2)

    base = ppl(src)
    rows = [f"| SmolLM2-135M | fp32 | - | - | perplexity {base:.2f} | - |"]
    for text, what in ((SMOLLM2_FFN, "20% FFN"), (SMOLLM2_KV, "1 of 3 KV groups in layers 10-19")):
        for flag, label in ((",reconstruct=true", "with"), ("", "without")):
            (item,) = parse_pipeline(text.format(flag))
            model = ir.load(src)
            from graphopt.report import count_parameters

            before = count_parameters(model)
            t0 = time.perf_counter()
            result = PrunePass.from_options(dict(item.options)).run_with(model, ctx, AnalysisManager(ctx))
            seconds = time.perf_counter() - t0
            out = work / "smollm2-pruned.onnx"
            ir.save(model, out)
            value = ppl(out)
            rows.append(
                f"| SmolLM2-135M | {what}, reconstruction {label} | {before / 1e6:.1f}M -> "
                f"{count_parameters(model) / 1e6:.1f}M | - | perplexity {value:.2f} "
                f"({(value / base - 1) * 100:+.1f}%) | {seconds:.0f} s |"
            )
            logger.info(rows[-1])
            del model, result
    return rows


def cnn_rows(work: Path) -> list[str]:
    """Conv channel pruning and 2:4 sparsity, when those passes exist."""
    try:
        import graphopt.passes.pruning.channels
        import graphopt.passes.pruning.sparsify  # noqa: F401
    except ImportError:
        logger.warning("channel pruning / sparsify not available: CNN rows left out")
        return []
    from models import digits_cnn

    rows = []
    x_train, _, _, _ = digits_cnn.dataset()
    calib = work / "digits-calib"
    calib.mkdir()
    for i in range(8):
        np.savez(calib / f"{i:03d}.npz", image=np.array(x_train[i * 32 : (i + 1) * 32]))
    src = digits_cnn.build()
    fp32 = digits_cnn.accuracy(src)
    image = {"image": np.array(x_train[:64])}
    cases = (
        ("prune(channels=0.3)", "30% channels, reconstruction without"),
        ("prune(channels=0.3,importance=activation,reconstruct=true)", "30% channels, reconstruction with"),
        ("sparsify(pattern=2:4,ratio=0.5)", "2:4 sparsity (masks only)"),
    )
    for passes, what in cases:
        out = work / "digits-out.onnx"
        report = optimize(src, out, OptimizeConfig(passes=passes, calib=calib, verify=False,
                                                   latency=False, overwrite=True))
        acc = digits_cnn.accuracy(out)
        rows.append(
            f"| digits CNN | `{passes}`: {what} | {report.params_before} -> {report.params_after} | "
            f"{_ratio(src, out, image):.2f} | accuracy {acc:.4f} (fp32 {fp32:.4f}) | - |"
        )
        logger.info(rows[-1])
    try:
        from test_prune_cnn import prune_light
    except ImportError:
        return rows
    for name in ("resnet50",):
        try:
            source, out, feed, report = prune_light(name, work)
        except Exception as e:  # noqa: BLE001 - a missing model only drops its row
            logger.warning("light %s: %s", name, e)
            continue
        rows.append(
            f"| onnx light {name} (random weights) | `cleanup,prune(channels=0.3)` | "
            f"{report.params_before / 1e6:.1f}M -> {report.params_after / 1e6:.1f}M | "
            f"{_ratio(source, out, feed):.2f} | - (no task metric) | - |"
        )
        logger.info(rows[-1])
    return rows


def main() -> None:
    """Runs the selected rows and writes docs/bench/pruning.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--skip-cnn", action="store_true")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sections: list[tuple[str, Callable[[Path], list[str]]]] = [("minilm", minilm_rows)]
    if not args.skip_smollm2:
        sections.append(("smollm2", smollm2_rows))
    if not args.skip_cnn:
        sections.append(("cnn", cnn_rows))
    rows: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-pruning-") as tmp:
        for name, fn in sections:
            folder = Path(tmp, name)
            folder.mkdir()
            rows.extend(fn(folder))
    text = HEAD + "\n".join(rows) + "\n" + NOTES
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)


HEAD = """# Structured pruning and sparsity

`HF_HUB_OFFLINE=1 .venv/bin/python tools/bench_pruning.py` (ORT 1.32 CPU, 2 threads).
Latency ratio: pruned / original median, interleaved, graph optimizations on (MiniLM at
batch 8 x seq 128). Quality: MiniLM mean embedding cosine vs fp32 on the held-apart
evaluation sentences; SmolLM2 perplexity on the first 8 evaluation windows of 256
tokens; digits accuracy on its test split. Time: the pass alone (calibration included).

| model | pruning | parameters | latency ratio | quality | time |
| --- | --- | --- | --- | --- | --- |
"""

NOTES = """
Pipelines: MiniLM `prune(heads=0.25,ffn=0.25,importance=hessian,scope=global,damp=0.001[,reconstruct=true])`
with `--calib` = the 300 calibration sentences sorted by length, 8 per feed (padded rows
would enter the input Grams). SmolLM2 `prune(ffn=0.2,importance=activation,damp=1.0[,reconstruct=true])`
and `prune(heads=0.34,gqa=groups,layers=[10..19],importance=hessian,damp=1.0[,reconstruct=true])`
with 16 calibration windows of 128 tokens (all the calibration prose: 2048 rows for
1536-wide projections, hence the strong ridge toward the kept weights; damp 0.01
overfits and made perplexity worse than plain removal). Reconstruction refits the projection after each
pruned block (attention output, FFN down) by ridge least squares against the unpruned
model's input Gram (closed form). The light CNN has random weights (the onnx package ships
stubs), so it has no quality figure.
"""

if __name__ == "__main__":
    main()
