"""Test plugin: ``noop``, a pass that changes nothing (a no-op pipeline for round trips)."""

from __future__ import annotations

import onnx_ir as ir

from graphopt.infra import Pass, PassContext, PassInfo, PassRegistry, PassResult
from graphopt.infra.analysis import AnalysisManager
from graphopt.infra.options import NoOptions

GRAPHOPT_API_VERSION = 1


class NoOpPass(Pass[NoOptions]):
    """Matches nothing; changes nothing; preserves everything."""

    info = PassInfo(name="noop", summary="change nothing (tests)")

    def run(self, model: ir.Model, ctx: PassContext, am: AnalysisManager) -> PassResult:
        return PassResult(model, False)


def register(registry: PassRegistry) -> None:
    """Registers ``noop``."""
    registry.register_pass(NoOpPass)
