"""Removal of nodes that pass their input through unchanged."""

from __future__ import annotations

import logging

import onnx_ir as ir

from graphopt.infra.analysis import AnalysisManager, Aspect, PreservedAnalyses
from graphopt.infra.context import PassContext
from graphopt.infra.options import NoOptions
from graphopt.infra.pass_base import Pass, PassInfo, PassResult
from graphopt.passes.cleanup import _util

logger = logging.getLogger(__name__)


class RemoveIdentityPass(Pass[NoOptions]):
    """Removes no-op nodes, wiring their users to the node's input.

    Matches (standard domain, main graph and every subgraph):

    * ``Identity``;
    * ``Dropout`` in inference: opset >= 12 without a ``training_mode`` input or with a
      constant false one; opset 7-11 always; opset < 7 with ``is_test=1``; and its ``mask``
      output unused;
    * ``Cast`` to the input's own (known) dtype;
    * ``Reshape`` whose target provably equals the input shape: same rank and each entry is
      the matching static dim, a 0 (copy, without ``allowzero``) or the one ``-1``;
    * ``Transpose`` with the identity ``perm`` (or no perm on rank <= 1).

    Changes: users of the output read the input instead; the node is removed. When the
    output is a graph output, the input value takes the output's name, dtype and shape
    (dim_params included). Never renames graph inputs, initializers, outer-scope values or
    other graph outputs: ``y = Identity(x)`` with ``x`` a graph input (input wired to an
    output) or two outputs fed from one value stay as they are.

    Preserves: WEIGHTS.

    Example::

        before: a = Relu(x); b = Identity(a); c = Cast<to=FLOAT>(b); y = Neg(c)
        after:  a = Relu(x); y = Neg(a)
    """

    info = PassInfo(
        name="remove-identity",
        summary="remove Identity, inference Dropout, same-type Cast, no-op Reshape/Transpose",
        tolerance="exact",
    )

    def run(self, model: ir.Model, ctx: PassContext, am: AnalysisManager) -> PassResult:
        """Bypasses every matching node in every graph."""
        opset = _util.onnx_opset(model)
        removed: dict[str, int] = {}
        for graph in list(_util.iter_graphs(model.graph)):
            for node in list(graph):
                source = _passthrough_source(node, opset)
                if source is None or not _bypass(graph, node, source):
                    continue
                removed[node.op_type] = removed.get(node.op_type, 0) + 1
        total = sum(removed.values())
        if total:
            logger.info("remove-identity: removed %d node(s) %s", total, removed)
        stats: dict[str, int] = {"nodes_removed": total}
        stats.update({f"removed_{op}": n for op, n in sorted(removed.items())})
        return PassResult(
            model, total > 0, preserved=PreservedAnalyses.only(Aspect.WEIGHTS), stats=stats
        )


def _passthrough_source(node: ir.Node, opset: int) -> ir.Value | None:
    """The input that ``node``'s first output always equals, or None."""
    if not _util.is_standard(node) or not node.inputs or node.inputs[0] is None:
        return None
    if not node.outputs or _util.has_attr_refs(node):
        return None
    x = node.inputs[0]
    op = node.op_type
    if op == "Identity":
        return x if len(node.outputs) == 1 else None
    if op == "Dropout":
        return x if _is_inference_dropout(node, _util.node_opset(node, opset)) else None
    if len(node.outputs) != 1:
        return None
    if op == "Cast":
        to = node.attributes.get("to")
        if to is None or x.dtype is None:
            return None
        return x if to.as_int() == x.dtype.value else None
    if op == "Reshape":
        return x if _is_noop_reshape(node) else None
    if op == "Transpose":
        return x if _is_noop_transpose(node) else None
    return None


def _is_inference_dropout(node: ir.Node, opset: int) -> bool:
    if len(node.outputs) > 1:
        mask = node.outputs[1]
        if mask.uses() or mask.is_graph_output():
            return False
    if opset < 7:
        is_test = node.attributes.get("is_test")
        return is_test is not None and is_test.as_int() == 1
    if opset >= 12 and len(node.inputs) > 2 and node.inputs[2] is not None:
        flag = _util.constant_array(node.inputs[2])
        return flag is not None and flag.size == 1 and not bool(flag.reshape(-1)[0])
    return True


def _is_noop_reshape(node: ir.Node) -> bool:
    if len(node.inputs) < 2:
        return False
    x = node.inputs[0]
    assert x is not None
    target = _util.small_int_vector(node.inputs[1])
    if target is None or x.shape is None or len(target) != len(x.shape):
        return False
    allowzero_attr = node.attributes.get("allowzero")
    allowzero = allowzero_attr is not None and allowzero_attr.as_int() != 0
    if -1 in target and any(dim == 0 for dim in x.shape):
        return False  # -1 cannot be inferred next to a zero-sized dim: keep ORT's error
    unmatched = 0
    for want, dim in zip(target, x.shape):
        if want == 0 and not allowzero:
            continue  # copies the input dim
        if isinstance(dim, int) and want == dim:
            continue
        if want == -1:
            unmatched += 1  # inferred: equals dim when every other entry matched
            continue
        return False
    return unmatched <= 1


def _is_noop_transpose(node: ir.Node) -> bool:
    perm = node.attributes.get("perm")
    if perm is None:
        x = node.inputs[0]
        assert x is not None
        return x.shape is not None and len(x.shape) <= 1
    values = list(perm.as_ints())
    return values == list(range(len(values)))


def _bypass(graph: ir.Graph, node: ir.Node, source: ir.Value) -> bool:
    """Removes ``node``, its users reading ``source`` instead; False when it must stay."""
    out = node.outputs[0]
    if any(extra.uses() or extra.is_graph_output() for extra in node.outputs[1:]):
        return False
    if out.is_graph_output():
        if not _util.can_take_output_name(source, graph):
            return False
        name = out.name
        _util.adopt_declared_type(source, out)
        out.replace_all_uses_with(source, replace_graph_outputs=True)
        source.name = name
    else:
        out.replace_all_uses_with(source)
    graph.remove(node, safe=True)
    logger.debug("bypassed %s", _util.node_path(node))
    return True
