"""Collects the backend-model sweep's per-case results and prints the counts at the end.

Each case records its result with ``record_property("backend_sweep", ...)``; the record
travels with the test report, so the summary also works under pytest-xdist, where the
reports of every worker arrive at the controlling process.
"""

from __future__ import annotations

from typing import Any

import pytest

_RECORDS: dict[str, dict[str, Any]] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Keeps the sweep record of each finished case."""
    for name, value in report.user_properties:
        if name == "backend_sweep" and isinstance(value, dict):
            _RECORDS[str(value["id"])] = value


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Writes the sweep's counts (ran / matched / skipped with reasons) to the terminal."""
    if not _RECORDS:
        return
    from graphopt.testing.backend_models import Summary

    terminalreporter.write_sep("=", "onnx backend-model sweep")
    terminalreporter.write_line(Summary(_RECORDS.values()).text())
