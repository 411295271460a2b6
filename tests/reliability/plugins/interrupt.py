"""Test plugin: ``interrupt``, a pass that raises KeyboardInterrupt (Ctrl-C in a pass)."""

from __future__ import annotations

import onnx_ir as ir

from graphopt.infra import Pass, PassContext, PassInfo, PassRegistry, PassResult
from graphopt.infra.analysis import AnalysisManager
from graphopt.infra.options import NoOptions

GRAPHOPT_API_VERSION = 1


class InterruptPass(Pass[NoOptions]):
    """Behaves as if the user pressed Ctrl-C while it ran."""

    info = PassInfo(name="interrupt", summary="raise KeyboardInterrupt (tests)")

    def run(self, model: ir.Model, ctx: PassContext, am: AnalysisManager) -> PassResult:
        raise KeyboardInterrupt


def register(registry: PassRegistry) -> None:
    """Registers ``interrupt``."""
    registry.register_pass(InterruptPass)
