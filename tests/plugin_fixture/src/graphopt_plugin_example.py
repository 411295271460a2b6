"""An example third-party plugin: one pass that clears node doc strings."""

from __future__ import annotations

import onnx_ir as ir

from graphopt.infra import (
    Aspect,
    NoOptions,
    Pass,
    PassContext,
    PassInfo,
    PassRegistry,
    PassResult,
    PreservedAnalyses,
)
from graphopt.infra.analysis import AnalysisManager

GRAPHOPT_API_VERSION = 1


class ClearNodeDocStringsPass(Pass[NoOptions]):
    """Matches every node with a doc string; clears it; preserves everything else."""

    info = PassInfo(name="clear-node-doc-strings", summary="remove node doc strings")

    def run(self, model: ir.Model, ctx: PassContext, am: AnalysisManager) -> PassResult:
        cleared = 0
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if node.doc_string:
                node.doc_string = None
                cleared += 1
        preserved = PreservedAnalyses.only(Aspect.STRUCTURE, Aspect.WEIGHTS, Aspect.SHAPES)
        return PassResult(model, cleared > 0, preserved=preserved, stats={"cleared": cleared})


def register(registry: PassRegistry) -> None:
    """Entry point of the ``graphopt.plugins`` group."""
    registry.register_pass(ClearNodeDocStringsPass)
