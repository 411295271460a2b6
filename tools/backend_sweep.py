"""Runs the onnx backend-model sweep and writes ``docs/backend_sweep.md``.

Usage::

    .venv/bin/python tools/backend_sweep.py            # writes docs/backend_sweep.md
    .venv/bin/python tools/backend_sweep.py --out -    # prints the report instead

The logic is :mod:`graphopt.testing.backend_models`, shared with
``tests/e2e/test_backend_models.py``. Exits with 1 when a case failed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from graphopt.testing.backend_models import FAILED, KINDS, discover, sweep

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    """Runs the sweep; returns the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "backend_sweep.md"),
                        help="Markdown report path, or - for stdout.")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS,
                        help="Backend test-data folders to sweep.")
    parser.add_argument("--threads", type=int, default=1,
                        help="ONNX Runtime threads for graphopt's verification.")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="graphopt-sweep-") as work:
        summary = sweep(discover(args.kinds), Path(work), threads=args.threads)
    print(summary.text(), file=sys.stderr)
    if args.out == "-":
        sys.stdout.write(summary.markdown())
    else:
        Path(args.out).write_text(summary.markdown())
        print(f"wrote {args.out}", file=sys.stderr)
    return 1 if summary.counts[FAILED] else 0


if __name__ == "__main__":
    raise SystemExit(main())
