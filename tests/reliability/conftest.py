"""Fixtures of the reliability suite (helpers live in ``reliability_support.py``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from reliability_support import CliResult, FileSpy, TreeGuard, run_in_process


@pytest.fixture
def spy() -> Iterator[FileSpy]:
    """Records file opens and unpickling by this process during the test."""
    recorder = FileSpy()
    recorder.start()
    try:
        yield recorder
    finally:
        recorder.freeze()


# ----------------------------------------------------------------------- CLI and files


@pytest.fixture
def cli(capfd: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """Runs ``graphopt`` in process: ``cli("optimize", path, "-o", out)``."""

    def run(*argv: str | os.PathLike[str]) -> CliResult:
        return run_in_process(list(argv), capfd)

    return run


@pytest.fixture
def guard(tmp_path: Path) -> TreeGuard:
    """A :class:`TreeGuard` over the test's ``tmp_path`` (call ``freeze()`` when ready)."""
    return TreeGuard(tmp_path)


@pytest.fixture
def running_as_root() -> bool:
    """Whether file permissions are bypassed (root, or CAP_DAC_OVERRIDE)."""
    return hasattr(os, "geteuid") and os.geteuid() == 0
