"""The sentence corpus used to calibrate and evaluate text models.

``data/sentences.txt`` holds hand-written English sentences, one per line, in a fixed
shuffled order. The first :data:`CALIBRATION_SIZE` lines are the calibration split; the
rest are the evaluation split, held apart so that quantization scales are never fitted on
the sentences used to measure the result.
"""

from __future__ import annotations

import functools
from pathlib import Path

CORPUS_PATH = Path(__file__).resolve().parent / "data" / "sentences.txt"
"""The corpus file, read relative to this module."""

CALIBRATION_SIZE = 300
"""Number of leading sentences that form the calibration split."""


@functools.lru_cache(maxsize=1)
def _load(path: Path) -> tuple[str, ...]:
    with open(path, encoding="utf-8") as f:
        lines = tuple(line.strip() for line in f)
    return tuple(line for line in lines if line)


def load_sentences() -> list[str]:
    """Return every corpus sentence in file order (blank lines skipped).

    Returns:
        A fresh list; callers may modify it.
    """
    return list(_load(CORPUS_PATH))


def calibration_split() -> list[str]:
    """Return the calibration sentences: the first :data:`CALIBRATION_SIZE` lines."""
    return load_sentences()[:CALIBRATION_SIZE]


def evaluation_split() -> list[str]:
    """Return the evaluation sentences: every line after the calibration split."""
    return load_sentences()[CALIBRATION_SIZE:]
