"""Test plugin: ``boom``, a pass with a bug (it always raises), for the crash reproducer."""

from __future__ import annotations

import onnx_ir as ir

from graphopt.infra import Pass, PassContext, PassInfo, PassRegistry, PassResult
from graphopt.infra.analysis import AnalysisManager
from graphopt.infra.options import NoOptions

GRAPHOPT_API_VERSION = 1


class BoomPass(Pass[NoOptions]):
    """Raises an ordinary exception, as a buggy pass would."""

    info = PassInfo(name="boom", summary="always fails (tests)")

    def run(self, model: ir.Model, ctx: PassContext, am: AnalysisManager) -> PassResult:
        raise RuntimeError("boom pass exploded\nwith a second line")


def register(registry: PassRegistry) -> None:
    """Registers ``boom``."""
    registry.register_pass(BoomPass)
