"""Benchmarks int8 PTQ (``ptq``, static and dynamic) against ONNX Runtime's quantizers and fp32.

MiniLM-L6 (dynamo export, opset 20):

* calibration: the 300 sentences of ``models.text.calibration_split()``, 8 per feed,
  padded to the longest of each feed, written once as a ``--calib`` folder; the very same
  feeds go to ONNX Runtime through a ``CalibrationDataReader``;
* variants: fp32; graphopt ``ptq`` (defaults: MSE ranges, u8 activations, s8 per-channel
  weights); graphopt ``ptq(max_loss=...)`` (mixed precision); ONNX Runtime
  ``quantize_static`` (QDQ, per-channel, MinMax, its defaults otherwise); graphopt
  ``ptq(mode=dynamic)`` (no calibration) and ONNX Runtime ``quantize_dynamic``
  (per-channel, s8 weights, its defaults otherwise);
* quality: mean cosine of mean-pooled, L2-normalised sentence embeddings vs fp32 over the
  455 held-apart ``evaluation_split()`` sentences (never calibrated on), every session
  with ONNX Runtime's default optimizations (what users deploy);
* latency: batch 8 x sequence 128, every variant timed interleaved in this process with
  :func:`graphopt.verify.latency.measure_latency` (ORT optimizations on, spinning off);
  ratios to fp32, within +-10% is noise on a shared 2-core machine (BASELINES.md);
* size: file size over fp32's; tool time: wall time of the quantization call.

digits CNN (``models.digits_cnn``): fp32, graphopt ``fuse(rules=[batchnorm-folding]),ptq``
and ONNX Runtime ``quantize_static`` (QDQ, per-channel, MinMax), calibrated on 256 training
images; top-1 accuracy on the 450 test images, latency on all 450 at once.

Usage::

    .venv/bin/python tools/bench_ptq.py                    # -> docs/bench/ptq.md, printed
    .venv/bin/python tools/bench_ptq.py --out - --budget 20
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import onnxruntime as ort

from graphopt.api import OptimizeConfig, optimize
from graphopt.backends.ort_quant import u8s8_saturates
from graphopt.testing.machine import cpu_name
from graphopt.verify.latency import measure_latency
from models import digits_cnn, minilm, text

logger = logging.getLogger("bench_ptq")

MIXED_MAX_LOSS = 0.005
#: Rounds of the paired ours-vs-ORT latency comparison.
H2H_REPEATS = 30

NOTES = [
    "## Notes",
    "",
    ("- Latency ratios are medians of interleaved runs in one process; on this shared 2-core "
    "machine they move by about +-10% between runs (graphopt ptq on MiniLM measured 0.48 to "
    "0.58 over the session's runs; with other jobs on the machine, more). Quality and size do "
    "not move. The head-to-head table compares graphopt with ORT directly: per-round paired "
    "ratios and the ratio of each model's fastest run (ratios below 1: graphopt faster)."),
    ("- ORT's `quantize_static` collapses on MiniLM because it quantizes the attention-mask "
    "path (values of -3.4e38: the scale makes every attention logit round to zero) and "
    "everything else per tensor with s8 activations. graphopt's ORT policy quantizes only the "
    "inputs of the 36 projections (u8 asymmetric, MSE-calibrated ranges), keeps Softmax, "
    "LayerNorm, GELU and the attention products in float, and never quantizes a value whose "
    "calibrated range holds fills (it records `mask path: ... range [-3.4e+38, ...]`)."),
    ("- On this CPU (AVX512-VNNI) ORT's u8 x s8 kernels accumulate in int32, so the policy "
    "uses 8-bit weights; on CPUs without VNNI it switches to 7-bit weights "
    "(`reduce_range`), measured by a probe at quantization time (MiniLM: cosine 0.9927 "
    "instead of 0.9939, same speed). s8 activations are what made ORT's static int8 slower "
    "than fp32 on the no-VNNI baseline machine (BASELINES.md: 1.19); here it is ~1.0."),
    ("- Size: the 46.9 MB word-embedding table is stored as int8 with per-column scales "
    "(gathered as int8, dequantized after the lookup); without it the file is 0.65 of fp32."),
    ("- Mixed precision: `max_loss` bounds 1 - cosine of the model's outputs (MiniLM: the "
    "hidden states, padding positions included) on the first 4 calibration feeds; nodes are "
    "ranked by the loss each causes when quantized alone (one run per node up to 64 nodes) "
    "and the smallest set meeting the bound goes back to float (here the FFN projections "
    "of layers 0-2 and layer 4)."),
    ("- Dynamic int8: graphopt writes the 36 projections as `DynamicQuantizeLinear -> "
    "MatMulInteger -> Cast -> Mul`, the pattern ORT's own `quantize_dynamic` writes; ORT's "
    "optimizer turns both models into the same 18 `DynamicQuantizeMatMul` + 18 "
    "`MatMulIntegerToFloat` kernels, so their latencies are equal up to noise. Both use "
    "symmetric [-127, 127] per-column weight grids; the quality gap is the embedding tables "
    "(graphopt: s8 with one scale per column; ORT: u8 with one scale per table; with the "
    "tables left float ORT's model reaches 0.9933). No calibration: `--calib`, when given, "
    "adds per-layer SQNR and `max_loss`. On a CPU without VNNI the probe switches graphopt "
    "to 7-bit weights here too (forced on this CPU: cosine 0.9922), where ORT's s8 weights "
    "saturate the int16 pair sums instead (BASELINES.md: 0.992 there)."),
    ("- digits CNN: the network is too small for int8 to pay (1.7 ms for 450 images in fp32); "
    "graphopt's QDQ model runs as QLinearConv/QGemm at fp32 speed and keeps the accuracy, "
    "ORT's s8-activation QDQ model is 2.5x slower."),
    "",
]


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


class _FolderReader:
    """An ``onnxruntime.quantization.CalibrationDataReader`` over a ``--calib`` folder."""

    def __init__(self, folder: Path) -> None:
        self.files = sorted(folder.glob("*.npz"))
        self._it: Iterator[Path] = iter(self.files)

    def get_next(self) -> dict[str, np.ndarray] | None:
        path = next(self._it, None)
        if path is None:
            return None
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}

    def rewind(self) -> None:
        self._it = iter(self.files)


def _ort_quantize_static(src: Path, dst: Path, calib: Path) -> str | None:
    """ONNX Runtime's static QDQ quantization; returns an error line or None."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        quantize_static,
    )

    class Reader(_FolderReader, CalibrationDataReader):  # type: ignore[misc]
        pass

    try:
        quantize_static(
            str(src),
            str(dst),
            Reader(calib),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            calibrate_method=CalibrationMethod.MinMax,
        )
    except Exception as e:  # noqa: BLE001 - a baseline may crash; the table says how
        return " ".join(str(e).split())[:160] or type(e).__name__
    return None


def _ort_quantize_dynamic(src: Path, dst: Path) -> str | None:
    """ONNX Runtime's dynamic quantization (per-channel s8 weights); an error line or None."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        quantize_dynamic(str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8)
    except Exception as e:  # noqa: BLE001 - a baseline may crash; the table says how
        return " ".join(str(e).split())[:160] or type(e).__name__
    return None


def _integer_products(path: Path) -> int:
    """MatMulInteger/ConvInteger nodes of a model (what ORT's dynamic quantizer made)."""
    import onnx

    ops = [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]
    return sum(op in ("MatMulInteger", "ConvInteger") for op in ops)


def head_to_head(
    pairs: dict[str, tuple[Path, Path]], feed: dict[str, np.ndarray], repeats: int
) -> dict[str, tuple[float, float, float, float]]:
    """Paired latency ratios ``ours / theirs``: each round times both models back to back
    (order alternating), so load that drifts over the run cancels in the round's ratio.

    Returns:
        Per pair: the median, 25th and 75th percentile of the per-round ratios, and the
        ratio of the two fastest runs (the least disturbed by other load).
    """
    import gc

    from graphopt.verify.runner import bind, make_session

    runs = {
        key: (bind(make_session(a, threads=2, optimize=True), feed),
              bind(make_session(b, threads=2, optimize=True), feed))
        for key, (a, b) in pairs.items()
    }
    ratios: dict[str, list[float]] = {key: [] for key in pairs}
    fastest: dict[str, dict[str, float]] = {key: {"a": np.inf, "b": np.inf} for key in pairs}
    for run_a, run_b in runs.values():  # warm-up
        run_a()
        run_b()
    gc.disable()
    try:
        for r in range(repeats):
            for key, (run_a, run_b) in runs.items():
                times = {}
                for which, fn in ((("a", run_a), ("b", run_b)) if r % 2 == 0 else (("b", run_b), ("a", run_a))):
                    start = time.perf_counter()
                    fn()
                    times[which] = time.perf_counter() - start
                    fastest[key][which] = min(fastest[key][which], times[which])
                ratios[key].append(times["a"] / times["b"])
    finally:
        gc.enable()
    return {
        key: (float(np.median(v)), float(np.percentile(v, 25)), float(np.percentile(v, 75)),
              fastest[key]["a"] / fastest[key]["b"])
        for key, v in ratios.items()
    }


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def _fmt(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def bench_minilm(work: Path, budget: float) -> list[str]:
    src = minilm.build("dynamo")
    calib = work / "minilm-calib"
    calib.mkdir()
    sentences = text.calibration_split()
    for i in range(0, len(sentences), 8):
        np.savez(calib / f"{i // 8:04d}.npz", **minilm.tokenize(sentences[i : i + 8], pad_to_max=False))
    variants: dict[str, Path] = {"fp32": src}
    notes: dict[str, str] = {}
    tool: dict[str, float] = {}
    stats: dict[str, dict[str, Any]] = {}
    for name, passes in (
        ("graphopt ptq (static int8)", "ptq"),
        (f"graphopt ptq(max_loss={MIXED_MAX_LOSS}) (mixed)", f"ptq(max_loss={MIXED_MAX_LOSS})"),
    ):
        out = work / f"minilm-{len(variants)}.onnx"
        report, seconds = _timed(
            lambda out=out, passes=passes: optimize(
                src, out, OptimizeConfig(passes=passes, calib=calib, verify=False, latency=False)
            )
        )
        variants[name] = out
        tool[name] = seconds
        stats[name] = report.passes[-1].stats
    ort_name = "ORT quantize_static QDQ per-channel MinMax"
    ort_out = work / "minilm-ort-static.onnx"
    error, seconds = _timed(lambda: _ort_quantize_static(src, ort_out, calib))
    tool[ort_name] = seconds
    if error is None:
        variants[ort_name] = ort_out
    else:
        notes[ort_name] = f"crashed: {error}"

    dyn_name = "graphopt ptq(mode=dynamic) (no calibration)"
    dyn_out = work / "minilm-dynamic.onnx"
    report, tool[dyn_name] = _timed(
        lambda: optimize(
            src, dyn_out, OptimizeConfig(passes="ptq(mode=dynamic)", verify=False, latency=False)
        )
    )
    variants[dyn_name] = dyn_out
    stats[dyn_name] = report.passes[-1].stats
    dyn_mixed = f"graphopt ptq(mode=dynamic,max_loss={MIXED_MAX_LOSS}) (mixed, --calib)"
    dyn_mixed_out = work / "minilm-dynamic-mixed.onnx"
    report, tool[dyn_mixed] = _timed(
        lambda: optimize(
            src, dyn_mixed_out,
            OptimizeConfig(passes=f"ptq(mode=dynamic,max_loss={MIXED_MAX_LOSS})", calib=calib,
                           verify=False, latency=False),
        )
    )
    variants[dyn_mixed] = dyn_mixed_out
    stats[dyn_mixed] = report.passes[-1].stats
    ort_dyn = "ORT quantize_dynamic per-channel s8"
    ort_dyn_out = work / "minilm-ort-dynamic.onnx"
    error, tool[ort_dyn] = _timed(lambda: _ort_quantize_dynamic(src, ort_dyn_out))
    if error is None:
        variants[ort_dyn] = ort_dyn_out
        stats[ort_dyn] = {"nodes_quantized": _integer_products(ort_dyn_out)}
    else:
        notes[ort_dyn] = f"crashed: {error}"

    evaluation = text.evaluation_split()
    ref = minilm.embed(src, evaluation)
    cosine = {name: minilm.embedding_cosine(ref, minilm.embed(p, evaluation)) for name, p in variants.items()}
    feed = minilm.tokenize(evaluation[:8], seq_len=128, pad_to_max=True)
    latency = measure_latency({k: str(v) for k, v in variants.items()}, feed, threads=2, budget_s=budget, repeats=30)
    base_ms = latency["fp32"].median_ms
    base_size = _size(src)
    pairs = {}
    if ort_name in variants:
        pairs["static: graphopt ptq / ORT quantize_static"] = (
            variants["graphopt ptq (static int8)"], variants[ort_name])
    if ort_dyn in variants:
        pairs["dynamic: graphopt ptq(mode=dynamic) / ORT quantize_dynamic"] = (
            variants[dyn_name], variants[ort_dyn])
    paired = head_to_head(pairs, feed, repeats=H2H_REPEATS) if pairs else {}
    lines = [
        "## MiniLM-L6 (dynamo export, opset 20)",
        "",
        (f"Calibration: {len(sentences)} sentences in {len(list(calib.glob('*.npz')))} feeds (8 per "
        "feed, padded to the longest); quality: mean embedding cosine vs fp32 over "
        f"{len(evaluation)} held-apart sentences; latency: batch 8 x seq 128, fp32 = "
        f"{base_ms:.0f} ms."),
        "",
        "| variant | cos vs fp32 | size ratio | latency ratio b8 | nodes int8 | tool time |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in ["fp32", *[n for n in tool]]:
        if name in notes:
            lines.append(f"| {name} | {notes[name]} | | | | {tool[name]:.0f} s |")
            continue
        path = variants[name]
        ratio = latency[name].median_ms / base_ms
        quantized = stats.get(name, {}).get("nodes_quantized", "—" if name == "fp32" else "all")
        t = f"{tool[name]:.0f} s" if name in tool else "—"
        lines.append(
            f"| {name} | {cosine[name]:.4f} | {_size(path) / base_size:.2f} | {ratio:.2f} | "
            f"{quantized} | {t} |"
        )
    if paired:
        lines += [
            "",
            (f"Head to head (each round runs both models back to back, order alternating; "
             f"{H2H_REPEATS} rounds; ratio of the two times per round, so drifting load "
             "cancels):"),
            "",
            "| pair | latency ratio, median | 25th-75th percentile | ratio of the fastest runs |",
            "| --- | --- | --- | --- |",
        ]
        for key, (med, q25, q75, best) in paired.items():
            lines.append(f"| {key} | {med:.2f} | {q25:.2f}-{q75:.2f} | {best:.2f} |")
    ours = stats["graphopt ptq (static int8)"]
    mixed = stats[f"graphopt ptq(max_loss={MIXED_MAX_LOSS}) (mixed)"]
    lines += [
        "",
        (f"graphopt ptq: {ours['nodes_quantized']} MatMuls quantized "
        f"(activations {ours['activation_spec']}, weights {', '.join(ours.get('weight_spec', []))}); "
        f"left in float: {ours['skipped']}; calibration {ours['calibration_seconds']} s over "
        f"{ours['calibration_samples']} feeds ({ours['observer']} ranges). Mixed: kept in float "
        f"{mixed.get('kept_float_for_max_loss')} (hidden-state loss {mixed.get('output_loss', 0):.4f})."),
        "",
    ]
    dyn = stats.get(dyn_name, {})
    if dyn:
        lines += [
            (f"graphopt ptq(mode=dynamic): {dyn['nodes_quantized']} MatMuls as "
            f"DynamicQuantizeLinear + MatMulInteger (weights {', '.join(dyn.get('weight_spec', []))}, "
            f"{dyn.get('activations_quantized')} activations quantized per run, shared by the "
            f"projections that read them), {dyn.get('embedding_tables_quantized', 0)} embedding "
            f"tables int8; left in float: {dyn['skipped']}. Mixed: kept in float "
            f"{stats[dyn_mixed].get('kept_float_for_max_loss')} (hidden-state loss "
            f"{stats[dyn_mixed].get('output_loss', 0):.4f})."),
            "",
        ]
    return lines


def bench_digits(work: Path, budget: float) -> list[str]:
    src = digits_cnn.build()
    x_train, _, x_test, _ = digits_cnn.dataset()
    calib = work / "digits-calib"
    calib.mkdir()
    for i in range(8):
        np.savez(calib / f"{i:03d}.npz", image=np.array(x_train[i * 32 : (i + 1) * 32]))
    variants: dict[str, Path] = {"fp32": src}
    tool: dict[str, float] = {}
    notes: dict[str, str] = {}
    folded = work / "digits-fused-fp32.onnx"
    _, tool["graphopt fuse(batchnorm-folding), fp32"] = _timed(
        lambda: optimize(
            src, folded, OptimizeConfig(passes="fuse(rules=[batchnorm-folding])", latency=False)
        )
    )
    variants["graphopt fuse(batchnorm-folding), fp32"] = folded
    ours = work / "digits-ptq.onnx"
    _, tool["graphopt fuse(batchnorm-folding),ptq"] = _timed(
        lambda: optimize(
            src,
            ours,
            OptimizeConfig(passes="fuse(rules=[batchnorm-folding]),ptq", calib=calib, verify=False, latency=False),
        )
    )
    variants["graphopt fuse(batchnorm-folding),ptq"] = ours
    ort_name = "ORT quantize_static QDQ per-channel MinMax"
    ort_out = work / "digits-ort-static.onnx"
    error, tool[ort_name] = _timed(lambda: _ort_quantize_static(src, ort_out, calib))
    if error is None:
        variants[ort_name] = ort_out
    else:
        notes[ort_name] = f"crashed: {error}"
    accuracy = {k: digits_cnn.accuracy(v) for k, v in variants.items()}
    feed = {"image": np.array(x_test)}
    latency = measure_latency({k: str(v) for k, v in variants.items()}, feed, threads=2, budget_s=budget, repeats=200)
    base = latency["fp32"].median_ms
    lines = [
        "## digits CNN (Conv-BN-ReLU x2, MaxPool, Gemm x2; opset 17)",
        "",
        (f"Calibration: 256 training images; accuracy: 450 test images; latency: batch {len(x_test)} (the test set), "
        f"fp32 = {base:.2f} ms."),
        "",
        "| variant | top-1 accuracy | size ratio | latency ratio | tool time |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in ["fp32", *tool]:
        if name in notes:
            lines.append(f"| {name} | {notes[name]} | | | {tool[name]:.1f} s |")
            continue
        t = f"{tool[name]:.1f} s" if name in tool else "—"
        lines.append(
            f"| {name} | {accuracy[name] * 100:.2f}% | {_size(variants[name]) / _size(src):.2f} | "
            f"{latency[name].median_ms / base:.2f} | {t} |"
        )
    lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench" / "ptq.md"),
                        help="Markdown destination, '-' for stdout only.")
    parser.add_argument("--budget", type=float, default=60.0,
                        help="About how many seconds each latency measurement may take.")
    parser.add_argument("--models", default="minilm,digits")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    models = set(args.models.split(","))
    vnni = "exact (VNNI): 8-bit weights" if not u8s8_saturates() else "saturating (no VNNI): 7-bit weights"
    lines = [
        "# int8 PTQ benchmark (`ptq`, static and dynamic)",
        "",
        (f"Written by `tools/bench_ptq.py` on {datetime.date.today()}: {cpu_name()}, {os.cpu_count()} CPUs, "
        f"ONNX Runtime {ort.__version__}, `intra_op_num_threads=2`, spinning off, ORT optimizations "
        f"on. ONNX Runtime's u8 x s8 kernel on this CPU: {vnni}."),
        "",
        "Reproduce: `.venv/bin/python tools/bench_ptq.py` (about 8 minutes).",
        "",
    ]
    with tempfile.TemporaryDirectory(prefix="bench-ptq-") as scratch:
        work = Path(scratch)
        if "minilm" in models:
            lines += bench_minilm(work, args.budget)
        if "digits" in models:
            lines += bench_digits(work, args.budget / 3)
    lines += NOTES
    text_out = "\n".join(lines) + "\n"
    if args.out != "-":
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text_out, encoding="utf-8")
    print(text_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
