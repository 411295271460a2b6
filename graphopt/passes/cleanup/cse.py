"""Common-subexpression elimination: identical nodes and identical small initializers.

onnx-ir ships ``CommonSubexpressionEliminationPass``; it is not used here because it
compares float attributes by ``==`` (so ``Constant<value_float=-0.0>`` merges with
``0.0``, which is not bit-exact), raises on TENSORS attributes (unhashable lists), merges
custom-domain nodes (whose semantics are unknown), does not visit If/Loop/Scan bodies, and
misses ``Bernoulli`` among the non-deterministic ops.
"""

from __future__ import annotations

import dataclasses
import logging
import struct
from collections.abc import Hashable

import onnx_ir as ir

from graphopt.infra.analysis import AnalysisManager, Aspect, PreservedAnalyses
from graphopt.infra.context import PassContext
from graphopt.infra.options import Options
from graphopt.infra.pass_base import Pass, PassInfo, PassResult
from graphopt.passes.cleanup import _util

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EliminateCommonSubexpressionsOptions(Options):
    """Options of ``eliminate-common-subexpressions``.

    Attributes:
        max_constant_bytes: Tensor attributes (Constant nodes) and initializers larger than
            this are not compared (hashing every weight would read the whole model).
    """

    max_constant_bytes: int = 4096

    def __post_init__(self) -> None:
        if self.max_constant_bytes < 0:
            raise ValueError("max_constant_bytes must be >= 0")


class EliminateCommonSubexpressionsPass(Pass[EliminateCommonSubexpressionsOptions]):
    """Merges nodes that compute the same thing, and duplicate small initializers.

    Matches: two standard-domain nodes with the same op, domain, overload, opset,
    attributes (floats compared bit for bit; tensors up to ``max_constant_bytes`` by dtype,
    shape and bytes) and the very same input values, in the same graph (each If/Loop/Scan
    body on its own). Never merges non-deterministic nodes (Random*, Multinomial,
    Bernoulli, Dropout), control-flow nodes or custom-domain nodes. Also matches
    initializers of one graph with equal dtype, shape and bytes (up to
    ``max_constant_bytes``) that are neither graph inputs nor graph outputs.

    Changes: the later node is removed and its users read the earlier node's outputs; a
    later output that is a graph output keeps its name (the earlier value is renamed to
    it, or, when that value is itself a graph output, an ``Identity`` feeds the output).
    Duplicate initializers are replaced by the first one and dropped.

    Preserves: WEIGHTS (remaining initializers are untouched) and SHAPES.

    Example::

        before: a = Relu(x); b = Relu(x); y = Add(a, b)
        after:  a = Relu(x); y = Add(a, a)
    """

    info = PassInfo(
        name="eliminate-common-subexpressions",
        summary="merge identical nodes and identical small initializers",
        tolerance="exact",
    )
    Options = EliminateCommonSubexpressionsOptions

    def run(self, model: ir.Model, ctx: PassContext, am: AnalysisManager) -> PassResult:
        """Deduplicates initializers, then nodes, in every graph."""
        limit = self.options.max_constant_bytes
        inits = 0
        merged = 0
        for graph in list(_util.iter_graphs(model.graph)):
            inits += _dedup_initializers(graph, limit)
            merged += _merge_nodes(graph, limit)
        if merged or inits:
            logger.info(
                "eliminate-common-subexpressions: merged %d node(s), %d initializer(s)",
                merged,
                inits,
            )
        return PassResult(
            model,
            merged + inits > 0,
            preserved=PreservedAnalyses.only(Aspect.WEIGHTS, Aspect.SHAPES),
            stats={"nodes_merged": merged, "initializers_merged": inits},
        )


# -- initializers ------------------------------------------------------------------------


def _dedup_initializers(graph: ir.Graph, limit: int) -> int:
    first: dict[Hashable, ir.Value] = {}
    removed = 0
    for name, value in list(graph.initializers.items()):
        if value.is_graph_input() or value.is_graph_output():
            continue
        tensor = value.const_value
        if tensor is None or tensor.nbytes > limit:
            continue
        try:
            key: Hashable = (tensor.dtype, tuple(tensor.shape), tensor.tobytes())
        except Exception as e:  # noqa: BLE001 - an unreadable tensor is left alone
            logger.debug("initializer %r not compared: %s", name, e)
            continue
        kept = first.get(key)
        if kept is None:
            first[key] = value
            continue
        value.replace_all_uses_with(kept)
        graph.initializers.pop(name)
        removed += 1
        logger.debug("initializer %r merged into %r", name, kept.name)
    return removed


# -- nodes -------------------------------------------------------------------------------


class _Unmergeable(Exception):
    """An attribute that cannot (or must not) be compared."""


def _tensor_key(tensor: ir.TensorProtocol, limit: int) -> Hashable:
    if tensor.nbytes > limit:
        raise _Unmergeable("large tensor")
    return (tensor.dtype, tuple(tensor.shape), tensor.tobytes())


def _float_bits(value: float) -> bytes:
    return struct.pack("<f", value)


def _attr_key(attr: ir.Attr, limit: int) -> Hashable:
    if attr.is_ref():
        raise _Unmergeable("attribute reference")
    kind = attr.type
    if kind == ir.AttributeType.FLOAT:
        return (kind.value, _float_bits(attr.as_float()))
    if kind == ir.AttributeType.FLOATS:
        return (kind.value, tuple(_float_bits(f) for f in attr.as_floats()))
    if kind == ir.AttributeType.INT:
        return (kind.value, attr.as_int())
    if kind == ir.AttributeType.INTS:
        return (kind.value, tuple(attr.as_ints()))
    if kind == ir.AttributeType.STRING:
        return (kind.value, attr.as_string())
    if kind == ir.AttributeType.STRINGS:
        return (kind.value, tuple(attr.as_strings()))
    if kind == ir.AttributeType.TENSOR:
        return (kind.value, _tensor_key(attr.as_tensor(), limit))
    if kind == ir.AttributeType.TENSORS:
        return (kind.value, tuple(_tensor_key(t, limit) for t in attr.as_tensors()))
    if kind in (ir.AttributeType.TYPE_PROTO, ir.AttributeType.TYPE_PROTOS):
        return (kind.value, repr(attr.value))
    raise _Unmergeable(f"attribute type {kind.name}")


def _node_key(node: ir.Node, limit: int) -> Hashable | None:
    if (
        not _util.is_standard(node)
        or _util.is_nondeterministic(node)
        or _util.has_subgraphs(node)
        or not node.outputs
    ):
        return None
    try:
        attrs = tuple(sorted((name, _attr_key(a, limit)) for name, a in node.attributes.items()))
    except _Unmergeable:
        return None
    inputs = tuple(id(v) if v is not None else None for v in node.inputs)
    return (node.op_identifier(), node.version, len(node.outputs), inputs, attrs)


def _merge_nodes(graph: ir.Graph, limit: int) -> int:
    seen: dict[Hashable, ir.Node] = {}
    merged = 0
    for node in list(graph):
        key = _node_key(node, limit)
        if key is None:
            continue
        kept = seen.get(key)
        if kept is None:
            seen[key] = node
            continue
        _replace_node(graph, node, kept)
        merged += 1
    return merged


def _replace_node(graph: ir.Graph, dup: ir.Node, kept: ir.Node) -> None:
    for old, new in zip(dup.outputs, kept.outputs):
        if old.is_graph_output():
            if _util.can_take_output_name(new, graph):
                name = old.name
                _util.adopt_declared_type(new, old)
                old.replace_all_uses_with(new, replace_graph_outputs=True)
                new.name = name
                continue
            # ``new`` already is a graph output (or cannot be renamed): keep ``old``'s name
            # on an Identity of ``new``.
            identity = ir.Node("", "Identity", [new], num_outputs=1, name=dup.name or None)
            alias = identity.outputs[0]
            alias.name = old.name
            _util.adopt_declared_type(alias, old)
            graph.insert_before(dup, identity)
            for user, index in old.uses():
                user.replace_input_with(index, new)
            old.replace_all_uses_with(alias, replace_graph_outputs=True)
            continue
        old.replace_all_uses_with(new)
    graph.remove(dup, safe=True)
    logger.debug("merged %s into %s", _util.node_path(dup), _util.node_path(kept))
