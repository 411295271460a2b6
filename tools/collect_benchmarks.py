"""Assembles docs/benchmarks.md from the tables the benchmark scripts write.

Each ``tools/bench_*.py`` writes its own markdown file under ``docs/bench/``; this script
puts them together in a fixed order under one header, so the committed page always shows
the latest measured tables side by side with the commands that reproduce them.

Usage::

    python tools/collect_benchmarks.py
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "docs" / "bench"
OUTPUT = ROOT / "docs" / "benchmarks.md"

#: Sections in page order: (file under docs/bench, heading).
SECTIONS: list[tuple[str, str]] = [
    ("fusion_transformers.md", "Fusion: MiniLM-L6 vs ONNX Runtime's transformers optimizer"),
    ("fusion_llm.md", "Fusion: SmolLM2-135M"),
    ("fusion.md", "Fusion: CNNs and the onnx package's models"),
    ("ptq.md", "int8 post-training quantization"),
    ("calibration_memory.md", "Calibration memory"),
    ("weight_only.md", "Weight-only low-bit quantization (RTN, GPTQ, AWQ)"),
    ("kernels.md", "runtime_ext kernels: low-bit GEMV"),
    ("pruning.md", "Structured pruning and sparsity"),
]

HEADER = """# Benchmarks

Measured on the project's machine kind: 2-core x86-64 (lscpu on the measuring machine
reports AVX2 and AVX-512 VNNI, although the brief describes it as AVX2-only), ONNX
Runtime 1.32 on the CPU, `intra_op_num_threads=2`, spinning off. Latencies are **ratios**
measured interleaved in one process (the machines are noisy: treat ratios within ±10% as
equal). Each section names the command that regenerates it; `python
tools/collect_benchmarks.py` reassembles this page from `docs/bench/*.md`.
"""


def main() -> None:
    """Writes docs/benchmarks.md."""
    parts = [HEADER]
    for name, heading in SECTIONS:
        path = BENCH_DIR / name
        if not path.exists():
            continue
        body = path.read_text().strip()
        lines = body.splitlines()
        if lines and lines[0].startswith("#"):
            lines = lines[1:]
        parts.append(f"## {heading}\n\n" + "\n".join(lines).strip() + "\n")
    OUTPUT.write_text("\n".join(parts))
    logger.info("wrote %s", OUTPUT)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
