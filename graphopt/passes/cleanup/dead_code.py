"""Dead-code elimination: nodes and initializers nothing depends on."""

from __future__ import annotations

import logging

import onnx_ir as ir

from graphopt.infra.analysis import AnalysisManager, Aspect, PreservedAnalyses
from graphopt.infra.context import PassContext
from graphopt.infra.options import NoOptions
from graphopt.infra.pass_base import Pass, PassInfo, PassResult
from graphopt.passes.cleanup import _util

logger = logging.getLogger(__name__)


class EliminateDeadCodePass(Pass[NoOptions]):
    """Removes nodes whose outputs are unused and initializers nobody reads.

    Matches: a standard-domain node none of whose outputs is used by any node (in any
    nested graph) or is an output of its graph; an initializer with no users that is
    neither a graph input nor a graph output. Works bottom-up in one sweep, so chains and
    whole dead If/Loop/Scan nodes (with everything their bodies captured) go at once;
    bodies of live control-flow nodes are cleaned recursively.

    Leaves alone: graph inputs (used or not) and outputs, custom-domain nodes (including
    calls of model-local functions: they may have side effects), model-local functions
    themselves and opset imports (nothing lost).

    Preserves: WEIGHTS (remaining initializers are untouched), SHAPES and METADATA of the
    remaining values.

    Example::

        before: a = Relu(x); b = Neg(x); y = Abs(a)   # outputs: y; initializer w unused
        after:  a = Relu(x); y = Abs(a)
    """

    info = PassInfo(
        name="eliminate-dead-code",
        summary="remove unused nodes and initializers (keeps graph I/O and functions)",
        tolerance="exact",
    )

    def run(self, model: ir.Model, ctx: PassContext, am: AnalysisManager) -> PassResult:
        """Sweeps the main graph and, recursively, every subgraph."""
        counts = {"nodes_removed": 0, "initializers_removed": 0}
        _sweep(model.graph, counts)
        modified = counts["nodes_removed"] + counts["initializers_removed"] > 0
        if modified:
            logger.info(
                "eliminate-dead-code: removed %d node(s), %d initializer(s)",
                counts["nodes_removed"],
                counts["initializers_removed"],
            )
        return PassResult(
            model,
            modified,
            preserved=PreservedAnalyses.only(Aspect.WEIGHTS, Aspect.SHAPES, Aspect.METADATA),
            stats=counts,
        )


def _is_dead(node: ir.Node) -> bool:
    if not _util.is_standard(node):
        return False
    return all(not out.uses() and not out.is_graph_output() for out in node.outputs)


def _sweep(graph: ir.Graph, counts: dict[str, int]) -> None:
    # Reverse topological order: a node's users are visited (and possibly removed) before
    # the node itself, and a live node's bodies are cleaned before the outer values they
    # capture are examined.
    for node in reversed(list(graph)):
        if _is_dead(node):
            _detach_bodies(node)
            graph.remove(node, safe=True)
            counts["nodes_removed"] += 1
        else:
            for sub in _util.subgraphs(node):
                _sweep(sub, counts)
    for name, value in list(graph.initializers.items()):
        if value.uses() or value.is_graph_input() or value.is_graph_output():
            continue
        graph.initializers.pop(name)
        counts["initializers_removed"] += 1


def _detach_bodies(node: ir.Node) -> None:
    """Drops the uses that a removed node's bodies hold on outer-scope values."""
    for sub in _util.subgraphs(node):
        for inner in sub:
            _detach_bodies(inner)
            for i, value in enumerate(inner.inputs):
                if value is not None:
                    inner.replace_input_with(i, None)
