"""Test plugin: ``sleepy``, a pass that signals it started and then waits (for Ctrl-C and
kill tests). It touches the file named by ``GRAPHOPT_TEST_MARKER`` and sleeps 60 s."""

from __future__ import annotations

import os
import time
from pathlib import Path

import onnx_ir as ir

from graphopt.infra import Pass, PassContext, PassInfo, PassRegistry, PassResult
from graphopt.infra.analysis import AnalysisManager
from graphopt.infra.options import NoOptions

GRAPHOPT_API_VERSION = 1


class SleepyPass(Pass[NoOptions]):
    """Changes nothing, slowly."""

    info = PassInfo(name="sleepy", summary="wait 60 s (tests)")

    def run(self, model: ir.Model, ctx: PassContext, am: AnalysisManager) -> PassResult:
        marker = os.environ.get("GRAPHOPT_TEST_MARKER")
        if marker:
            Path(marker).touch()
        time.sleep(60)
        return PassResult(model, False)


def register(registry: PassRegistry) -> None:
    """Registers ``sleepy``."""
    registry.register_pass(SleepyPass)
