"""Benchmarks weight-only quantization (``wq`` RTN, ``gptq``, ``awq``) against fp32 and ONNX
Runtime's ``MatMulNBitsQuantizer``, and ``smoothquant,ptq`` against ``ptq`` on MiniLM.

SmolLM2-135M (no-cache export, models/smollm2.py):

* calibration: ``smollm2.calibration_windows(N, 256)`` (default N = 8: the calibration part
  of the prose holds 2,059 tokens, i.e. 8 disjoint windows; more windows only overlap);
  the very same feeds go to ONNX Runtime's GPTQ through a ``CalibrationDataReader``;
* quality: perplexity on the evaluation prose (8,160 predicted tokens), never calibrated on;
* graphopt rows quantize every MatMul *and* the tied embedding/head table (one copy serves
  the Gather and the head); ONNX Runtime's quantizer leaves the tied head and the embedding
  in fp32 (it only takes MatMuls with an initializer weight), so its files are larger;
* size: the saved file over fp32's; tool time: wall time of the quantization call (for
  GPTQ/AWQ including the calibration runs);
* decode latency: ``smollm2.decode_latency`` on the kv-cache export, fp32 vs int4 (the
  ``wq`` g128 lowering: MatMulNBits, the same kernels GPTQ's output uses), batch 1,
  32-token prompt, 32 new tokens, alternated runs, spinning off.

MiniLM-L6: int4 g32/g128 RTN, GPTQ, AWQ and int8 ``ptq`` with/without ``smoothquant``,
calibrated on ``minilm.calibration_feeds(64)``; quality = mean cosine of sentence
embeddings vs fp32 over the held-out evaluation sentences.

Every row is computed once and stored as JSON under ``--results`` (so rows can run in
separate processes and sessions); the report is assembled from whatever rows exist.

Usage::

    .venv/bin/python tools/bench_weight_only.py --list
    .venv/bin/python tools/bench_weight_only.py --rows llm:gptq:int4-g128-sym,llm:rtn:int4-g128-sym
    .venv/bin/python tools/bench_weight_only.py --rows all          # every missing row
    .venv/bin/python tools/bench_weight_only.py --report-only       # -> docs/bench/weight_only.md
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import onnx_ir as ir

from graphopt.infra.analysis import AnalysisManager, _Entry
from graphopt.infra.context import PassContext
from graphopt.infra.registry import default_registry

logger = logging.getLogger("bench_weight_only")

DEFAULT_RESULTS = ROOT / ".cache" / "bench" / "weight_only"
DEFAULT_OUT = ROOT / "docs" / "bench" / "weight_only.md"

#: Quantization settings by short name: pass options (graphopt) shared by RTN/GPTQ/AWQ.
SETTINGS: dict[str, dict[str, Any]] = {
    "int8-pc": {"bits": 8, "group": -1, "sym": True},
    "int4-g128-sym": {"bits": 4, "group": 128, "sym": True},
    "int4-g128-asym": {"bits": 4, "group": 128, "sym": False},
    "int3-g128-asym": {"bits": 3, "group": 128, "sym": False},
    "int4-g32-asym": {"bits": 4, "group": 32, "sym": False},
    "int4-g32-sym": {"bits": 4, "group": 32, "sym": True},
}

LLM_ROWS = [
    "llm:fp32",
    "llm:gptq:int4-g128-sym",
    "llm:rtn:int4-g128-sym",
    "llm:ort-rtn:int4-g128-sym",
    "llm:ort-gptq:int4-g128-sym",
    "llm:awq:int4-g128-sym",
    "llm:rtn:int4-g128-sym:keep-embed",
    "llm:gptq:int4-g128-sym:keep-embed",
    "llm:gptq:int4-g128-sym:tied-rtn",
    "llm:rtn:int4-g128-asym",
    "llm:gptq:int4-g128-asym",
    "llm:rtn:int3-g128-asym",
    "llm:gptq:int3-g128-asym",
    "llm:rtn:int8-pc",
    "llm:gptq:int8-pc",
    "llm:rtn:int4-g32-asym",
    "llm:gptq:int4-g32-asym",
    "llm:latency",
]
MINILM_ROWS = [
    "minilm:rtn:int4-g32-sym",
    "minilm:gptq:int4-g32-sym",
    "minilm:awq:int4-g32-sym",
    "minilm:rtn:int4-g128-sym",
    "minilm:gptq:int4-g128-sym",
    "minilm:awq:int4-g128-sym",
    "minilm:ptq",
    "minilm:smoothquant+ptq",
]
ALL_ROWS = LLM_ROWS + MINILM_ROWS
PASS_NAMES = {"rtn": "wq", "gptq": "gptq", "awq": "awq"}

#: Row variants: extra pass options. ``keep-embed`` keeps the tied embedding/head table in
#: fp32 (what ONNX Runtime's quantizer does); ``tied-rtn`` rounds that table to nearest
#: inside ``gptq`` instead of GPTQ-ing it for the head's inputs.
VARIANTS: dict[str, str] = {
    "keep-embed": "exclude=[model.embed_tokens.weight]",
    "tied-rtn": "tied=rtn",
}


@dataclass
class Bench:
    """Shared state of one run: data, the float model paths, reusable Hessians."""

    windows: int
    results: Path
    threads: int = 2
    _hessians: dict[str, Any] | None = None

    # ------------------------------------------------------------------ storage
    def path(self, row: str) -> Path:
        return self.results / (row.replace(":", "__").replace("+", "_") + ".json")

    def has(self, row: str) -> bool:
        return self.path(row).exists()

    def store(self, row: str, data: Mapping[str, Any]) -> None:
        self.results.mkdir(parents=True, exist_ok=True)
        tmp = self.path(row).with_suffix(".tmp")
        tmp.write_text(json.dumps({"row": row, **data}, indent=1, default=float))
        tmp.replace(self.path(row))
        logger.info("%s: %s", row, {k: v for k, v in data.items() if k != "stats"})

    def load(self, row: str) -> dict[str, Any] | None:
        p = self.path(row)
        return json.loads(p.read_text()) if p.exists() else None

    # ------------------------------------------------------------------ graphopt passes
    def run_pass(
        self, model: ir.Model, text: str, calib: list[dict[str, np.ndarray]] | None, reuse_key: str
    ) -> tuple[dict[str, Any], float]:
        """Runs pipeline ``text`` on ``model`` in place; returns (stats, seconds).

        Input Hessians are computed once per (model file, calibration) and reused by later
        rows of this process: only the float model's activations enter them.
        """
        ctx = PassContext(target="ort", calibration=(lambda: iter(calib)) if calib is not None else None)
        am = AnalysisManager(ctx)
        cached = (self._hessians or {}).get(reuse_key)
        if cached is not None:
            analysis, result = cached
            am._cache[analysis.key()] = _Entry(analysis, result, id(model))
        pm = default_registry().build(text)
        # A single pass runs bare, so the analysis cache survives it (a pass manager drops
        # what the pass did not preserve) and its Hessians can serve the next rows.
        runner = pm.passes[0] if len(pm.passes) == 1 else pm
        started = time.perf_counter()
        result = runner.run_with(model, ctx, am)
        seconds = time.perf_counter() - started
        for entry in am._cache.values():
            if entry.analysis.name == "input-hessian":
                self._hessians = {reuse_key: (entry.analysis, entry.result)}
        stats = {key.split(".", 1)[-1] if runner is pm else key: value for key, value in result.stats.items()}
        return stats, seconds


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def _pipeline(method: str, setting: str, variant: str = "") -> str:
    opts = dict(SETTINGS[setting])
    inner = ",".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in opts.items())
    if variant:
        inner += "," + VARIANTS[variant]
    return f"{PASS_NAMES[method]}({inner})"


# ----------------------------------------------------------------------------- SmolLM2


def _llm_fp32(bench: Bench, row: str) -> None:
    from models import smollm2

    path = smollm2.build("no-cache")
    ppl, seconds = _timed(lambda: smollm2.perplexity(path, threads=bench.threads))
    bench.store(row, {"ppl": ppl, "size": os.path.getsize(path), "eval_s": seconds})


def _llm_graphopt(bench: Bench, row: str, method: str, setting: str, variant: str = "") -> None:
    from models import smollm2

    path = smollm2.build("no-cache")
    calib = smollm2.calibration_windows(bench.windows, 256, seed=0)
    model = ir.load(path)
    text = _pipeline(method, setting, variant)
    stats, seconds = bench.run_pass(model, text, calib if method != "rtn" else None, f"llm:{bench.windows}")
    with tempfile.TemporaryDirectory(prefix="bench-wq-") as tmp:
        out = Path(tmp) / "model.onnx"
        ir.save(model, out)
        del model
        gc.collect()
        size = os.path.getsize(out)
        ppl = smollm2.perplexity(out, threads=bench.threads)
    keep = ("gptq_layers", "gptq_seconds", "hessian_seconds", "gptq_error_vs_rtn_median", "awq_groups",
            "awq_seconds", "awq_error_vs_rtn_median", "awq_muls_inserted", "weights_quantized")
    bench.store(row, {
        "ppl": ppl, "size": size, "tool_s": seconds, "pipeline": text, "windows": bench.windows,
        "stats": {k: stats[k] for k in keep if k in stats},
    })


class _Reader:
    """ONNX Runtime CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = feeds
        self._it: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self.feeds)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.feeds)

    def __deepcopy__(self, memo: dict[int, Any]) -> _Reader:
        return _Reader(self.feeds)


def _ort_quantize(src: Path, dst: Path, algo: str, setting: str, calib: list[dict[str, np.ndarray]] | None) -> None:
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq
    from onnxruntime.quantization.calibrate import CalibrationDataReader

    opts = SETTINGS[setting]
    if algo == "gptq":
        assert calib is not None

        class Reader(_Reader, CalibrationDataReader):
            pass

        algo_config: Any = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader(calib), block_size=opts["group"])
    else:
        algo_config = None
    quantizer = mnq.MatMulNBitsQuantizer(
        str(src), bits=opts["bits"], block_size=opts["group"], is_symmetric=opts["sym"], algo_config=algo_config
    )
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)


def _llm_ort(bench: Bench, row: str, algo: str, setting: str) -> None:
    from models import smollm2

    path = smollm2.build("no-cache")
    calib = smollm2.calibration_windows(bench.windows, 256, seed=0) if algo == "gptq" else None
    with tempfile.TemporaryDirectory(prefix="bench-ort-wq-") as tmp:
        out = Path(tmp) / "model.onnx"
        try:
            _, seconds = _timed(lambda: _ort_quantize(path, out, algo, setting, calib))
        except Exception as e:  # noqa: BLE001 - a baseline may crash; the table says how
            bench.store(row, {"error": " ".join(str(e).split())[:200] or type(e).__name__})
            return
        size = os.path.getsize(out)
        ppl = smollm2.perplexity(out, threads=bench.threads)
    bench.store(row, {"ppl": ppl, "size": size, "tool_s": seconds, "windows": bench.windows})


def _llm_latency(bench: Bench, row: str) -> None:
    import onnxruntime as ort

    from models import smollm2

    kv = smollm2.build("kv-cache")
    model = ir.load(kv)
    _, seconds = bench.run_pass(model, _pipeline("rtn", "int4-g128-sym"), None, "none")
    with tempfile.TemporaryDirectory(prefix="bench-wq-kv-") as tmp:
        q_path = Path(tmp) / "kv-int4.onnx"
        ir.save(model, q_path)
        del model
        gc.collect()

        def options() -> ort.SessionOptions:
            so = ort.SessionOptions()
            so.intra_op_num_threads = bench.threads
            so.inter_op_num_threads = 1
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.add_session_config_entry("session.inter_op.allow_spinning", "0")
            return so

        runs: dict[str, list[dict[str, float]]] = {"fp32": [], "int4": []}
        for _ in range(3):  # alternated: the machine's load drifts
            for name, p in (("fp32", kv), ("int4", q_path)):
                runs[name].append(smollm2.decode_latency(p, session_options=options(), repeats=1))
        size_kv = os.path.getsize(q_path)
    med = {k: float(np.median([r["decode_ms"] for r in v])) for k, v in runs.items()}
    pre = {k: float(np.median([r["prefill_ms"] for r in v])) for k, v in runs.items()}
    bench.store(row, {
        "decode_ms": med, "prefill_ms": pre, "ratio": med["int4"] / med["fp32"],
        "size_int4": size_kv, "size_fp32": os.path.getsize(kv), "quantize_s": seconds,
    })


# ----------------------------------------------------------------------------- MiniLM


def _minilm_ref() -> tuple[Path, list[str], np.ndarray]:
    from models import minilm

    path = minilm.build("dynamo") if hasattr(minilm, "build") else ROOT / ".cache/models/minilm-l6-dynamo.onnx"
    sentences = minilm.evaluation_sentences()
    return Path(path), sentences, minilm.embed(path, sentences)


def _minilm_row(bench: Bench, row: str, text: str, calibrated: bool) -> None:
    from models import minilm

    path, sentences, ref = _minilm_ref()
    calib = minilm.calibration_feeds(64) if calibrated else None
    model = ir.load(path)
    _, seconds = bench.run_pass(model, text, calib, "minilm")
    with tempfile.TemporaryDirectory(prefix="bench-wq-minilm-") as tmp:
        out = Path(tmp) / "model.onnx"
        ir.save(model, out)
        size = os.path.getsize(out)
        cos = minilm.embedding_cosine(ref, minilm.embed(out, sentences))
    bench.store(row, {"cos": cos, "size": size, "size_fp32": os.path.getsize(path), "tool_s": seconds,
                      "pipeline": text})


# ----------------------------------------------------------------------------- dispatch


def run_row(bench: Bench, row: str) -> None:
    """Computes one row and stores it."""
    parts = row.split(":")
    if row == "llm:fp32":
        _llm_fp32(bench, row)
    elif row == "llm:latency":
        _llm_latency(bench, row)
    elif parts[0] == "llm" and parts[1] in PASS_NAMES:
        _llm_graphopt(bench, row, parts[1], parts[2], parts[3] if len(parts) > 3 else "")
    elif parts[0] == "llm" and parts[1] in ("ort-rtn", "ort-gptq"):
        _llm_ort(bench, row, parts[1].removeprefix("ort-"), parts[2])
    elif row == "minilm:ptq":
        _minilm_row(bench, row, "ptq", True)
    elif row == "minilm:smoothquant+ptq":
        _minilm_row(bench, row, "smoothquant,ptq", True)
    elif parts[0] == "minilm" and parts[1] in PASS_NAMES:
        _minilm_row(bench, row, _pipeline(parts[1], parts[2]), parts[1] != "rtn")
    else:
        raise SystemExit(f"unknown row {row!r}; see --list")


# ----------------------------------------------------------------------------- report


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def report(bench: Bench) -> str:
    """The markdown section from the stored rows."""
    fp32 = bench.load("llm:fp32")
    lines = [
        "## Weight-only low-bit quantization (RTN, GPTQ, AWQ)",
        "",
        ("Regenerate: `.venv/bin/python tools/bench_weight_only.py --rows all` (rows are cached "
        "under `.cache/bench/weight_only/`; `--force` recomputes), then `--report-only`."),
        (f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, shared with other jobs (times are "
        "wall times under that load)."),
        "",
        "### SmolLM2-135M: perplexity on the evaluation prose (8,160 tokens)",
        "",
    ]
    if fp32 is None:
        lines.append("(run the llm:fp32 row first)")
    else:
        lines += _llm_table(bench, fp32)
    lines += _minilm_table(bench)
    lines += ["", f"_Generated {datetime.date.today().isoformat()}._", ""]
    return "\n".join(lines)


def _llm_table(bench: Bench, fp32: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    base = fp32["ppl"]
    windows = {bench.load(r).get("windows") for r in LLM_ROWS if bench.load(r) and bench.load(r).get("windows")}
    lines += [
        (f"Calibration: {', '.join(str(w) for w in sorted(windows)) or '-'} windows x 256 tokens "
        "from the calibration part of the prose (the same feeds for graphopt and ONNX Runtime). "
        "graphopt quantizes the tied embedding/head table too (once, for both uses); ONNX "
        "Runtime's quantizer leaves it in fp32. Variants: `keep-embed` keeps that table in fp32 "
        "(like for like with ONNX Runtime); `tied-rtn` rounds it to nearest inside `gptq`. "
        "Sizes are files as lowered for `--target ort` (MatMulNBits holds 3-bit codes in 4-bit "
        "slots, so int3 files are as large as int4)."),
        "",
        "| method | setting | perplexity | change vs fp32 | size vs fp32 | tool time |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| fp32 | - | {base:.3f} | - | 1.00 ({_mb(fp32['size'])}) | - |",
    ]
    labels = {"rtn": "graphopt wq (RTN)", "gptq": "graphopt gptq", "awq": "graphopt awq",
              "ort-rtn": "ORT MatMulNBitsQuantizer (default RTN)", "ort-gptq": "ORT MatMulNBitsQuantizer GPTQ"}
    for row in LLM_ROWS:
        if row in ("llm:fp32", "llm:latency"):
            continue
        data = bench.load(row)
        if data is None:
            continue
        _, method, setting, *variant = row.split(":")
        if variant:
            setting += f" ({variant[0]})"
        if "error" in data:
            lines.append(f"| {labels[method]} | {setting} | n/a: {data['error']} | | | |")
            continue
        change = (data["ppl"] / base - 1) * 100
        lines.append(
            f"| {labels[method]} | {setting} | {data['ppl']:.3f} | {change:+.1f}% | "
            f"{data['size'] / fp32['size']:.2f} | {data['tool_s']:.0f} s |"
        )
    g = bench.load("llm:gptq:int4-g128-sym")
    r = bench.load("llm:rtn:int4-g128-sym")
    o = bench.load("llm:ort-gptq:int4-g128-sym")
    lines.append("")
    if g and r and "ppl" in g and "ppl" in r:
        ratio = (g["ppl"] - base) / (r["ppl"] - base)
        lines.append(
            f"int4 g128 sym: GPTQ's perplexity increase is {ratio:.2f}x RTN's "
            f"({g['ppl'] - base:+.2f} vs {r['ppl'] - base:+.2f})"
            + (f"; ONNX Runtime's GPTQ: {o['ppl'] - base:+.2f}." if o and "ppl" in o else ".")
        )
        st = g.get("stats", {})
        parts = []
        if "hessian_seconds" in st and "gptq_seconds" in st:
            parts.append(
                f"Hessians over the calibration feeds {st['hessian_seconds']:.0f} s, "
                f"rounding {st['gptq_seconds'] - st['hessian_seconds']:.0f} s"
            )
        if "gptq_layers" in st:
            parts.append(f"layers {st['gptq_layers']}")
        if "gptq_error_vs_rtn_median" in st:
            parts.append(f"median layer error vs RTN {st['gptq_error_vs_rtn_median']}")
        lines.append(
            f"GPTQ wall time for the whole model: {g['tool_s']:.0f} s"
            + (f" ({'; '.join(parts)})." if parts else ".")
        )
    lines += _llm_notes(bench, base)
    lat = bench.load("llm:latency")
    if lat:
        lines += [
            "",
            "### SmolLM2-135M decode latency (kv-cache, batch 1, 32-token prompt, 32 new tokens)",
            "",
            "| variant | decode ms/token | prefill ms | file size |",
            "| --- | --- | --- | --- |",
            f"| fp32 | {lat['decode_ms']['fp32']:.1f} | {lat['prefill_ms']['fp32']:.0f} | {_mb(lat['size_fp32'])} |",
            (f"| int4 g128 (MatMulNBits + GatherBlockQuantized) | {lat['decode_ms']['int4']:.1f} "
            f"({lat['ratio']:.2f}x) | {lat['prefill_ms']['int4']:.0f} | {_mb(lat['size_int4'])} "
            f"({lat['size_int4'] / lat['size_fp32']:.2f}x) |"),
        ]
    return lines


def _ppl(bench: Bench, row: str) -> float | None:
    data = bench.load(row)
    return float(data["ppl"]) if data and "ppl" in data else None


def _llm_notes(bench: Bench, base: float) -> list[str]:
    """Sentences read off the stored rows (each only when its rows exist)."""
    notes: list[str] = []
    rtn, gptq = _ppl(bench, "llm:rtn:int4-g128-sym"), _ppl(bench, "llm:gptq:int4-g128-sym")
    rtn_k, gptq_k = _ppl(bench, "llm:rtn:int4-g128-sym:keep-embed"), _ppl(bench, "llm:gptq:int4-g128-sym:keep-embed")
    ort = _ppl(bench, "llm:ort-rtn:int4-g128-sym")
    tied = _ppl(bench, "llm:gptq:int4-g128-sym:tied-rtn")
    awq = _ppl(bench, "llm:awq:int4-g128-sym")
    if rtn and rtn_k:
        notes.append(
            f"- The tied 49152x576 embedding/head table carries most of RTN's int4 loss: RTN with "
            f"it kept in fp32 gives {rtn_k:.2f} against {rtn:.2f} with it quantized."
        )
    if gptq and gptq_k and ort:
        notes.append(
            f"- Like for like with ONNX Runtime's quantizer (table in fp32), GPTQ reaches {gptq_k:.2f} "
            f"({(gptq_k / base - 1) * 100:+.1f}%) against ORT's RTN {ort:.2f} ({(ort / base - 1) * 100:+.1f}%); "
            f"with the table quantized too (0.18x the size instead of 0.33x) GPTQ still gives {gptq:.2f}."
        )
    if tied and gptq:
        notes.append(
            f"- Rounding the tied table to nearest inside gptq (`tied=rtn`) gives {tied:.2f} vs {gptq:.2f} "
            "when GPTQ rounds it for the head's inputs (the Gather then reads GPTQ-compensated rows)."
        )
    if awq and rtn:
        notes.append(
            f"- AWQ ({awq:.2f}) improves on RTN ({rtn:.2f}) but not to GPTQ's level: it cannot scale "
            "the tied table (its Gather use would change), and o_proj's input (after the attention "
            "reshape) gets an inserted Mul."
        )
    return ["", *notes] if notes else []


def _minilm_table(bench: Bench) -> list[str]:
    lines: list[str] = []
    mini = [(row, bench.load(row)) for row in MINILM_ROWS]
    if any(d for _, d in mini):
        lines += [
            "",
            "### MiniLM-L6: embedding cosine vs fp32 (held-out sentences)",
            "",
            "| pipeline | cosine | size vs fp32 | tool time |",
            "| --- | --- | --- | --- |",
        ]
        for row, data in mini:
            if data is None:
                continue
            lines.append(
                f"| `{data['pipeline']}` | {data['cos']:.4f} | {data['size'] / data['size_fp32']:.2f} | "
                f"{data['tool_s']:.0f} s |"
            )
        ptq, smooth = bench.load("minilm:ptq"), bench.load("minilm:smoothquant+ptq")
        if ptq and smooth:
            lines += [
                "",
                (f"SmoothQuant before int8 `ptq` gives {smooth['cos']:.4f} against {ptq['cos']:.4f} without: "
                "graphopt's `ptq` already keeps this model's outlier-prone paths in range (MSE ranges, "
                "mask path in float), and BERT's post-LayerNorm activations also feed the residual, so "
                "the scales go into inserted Muls rather than the LayerNorm. On a synthetic "
                "LayerNorm->MatMul block with 40x gamma outliers it adds 9 dB output SQNR "
                "(tests/passes/weight_only/test_smoothquant_pass.py)."),
            ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="", help="comma-separated row ids, 'all', 'llm' or 'minilm'")
    parser.add_argument("--list", action="store_true", help="list the row ids and exit")
    parser.add_argument("--force", action="store_true", help="recompute rows that already exist")
    parser.add_argument("--windows", type=int, default=8, help="SmolLM2 calibration windows (x256 tokens)")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="markdown output ('-' prints)")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    logger.setLevel(logging.INFO)
    if args.list:
        print("\n".join(ALL_ROWS))
        return 0
    bench = Bench(args.windows, args.results)
    if not args.report_only:
        wanted = {"all": ALL_ROWS, "llm": LLM_ROWS, "minilm": MINILM_ROWS}.get(args.rows)
        rows = wanted if wanted is not None else [r for r in args.rows.split(",") if r]
        for row in rows:
            if bench.has(row) and not args.force:
                logger.info("%s: cached", row)
                continue
            started = time.perf_counter()
            run_row(bench, row)
            logger.info("%s: done in %.0fs", row, time.perf_counter() - started)
    text = report(bench)
    if args.out == "-":
        print(text)
    else:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
