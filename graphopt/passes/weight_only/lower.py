"""Lowering dispatch: one :class:`GroupQuantized` per weight -> nodes for the target.

* ``nbits`` (:mod:`~graphopt.passes.weight_only.lower_nbits`): com.microsoft
  ``MatMulNBits`` for MatMul/Gemm uses, ``GatherBlockQuantized`` for embeddings.
* ``dq`` (:mod:`~graphopt.passes.weight_only.lower_dq`): one opset-21 blocked
  ``DequantizeLinear`` per weight feeding every selected use (portable, TensorRT).
* ``ext`` (:mod:`~graphopt.passes.weight_only.lower_ext`): graphopt ``MatMulLowBit``;
  embeddings as ``GatherBlockQuantized`` (the ext target runs on ONNX Runtime).

Every lowered node carries ``graphopt.wq.bits`` / ``graphopt.wq.group_size`` metadata so
:mod:`~graphopt.passes.weight_only.convert` reads the exact representation back.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from graphopt.errors import InvalidModelError
from graphopt.passes.weight_only.base import WeightOnlyOptions, WeightSite, group_sites
from graphopt.quant.groupwise import GroupQuantized

logger = logging.getLogger(__name__)

#: Node metadata keys recording the representation a lowered node was built from.
META_BITS = "graphopt.wq.bits"
META_GROUP = "graphopt.wq.group_size"
META_K = "graphopt.wq.k"

#: Default-domain opset blocked DequantizeLinear and int4/uint4 need.
DQ_OPSET = 21
MS_DOMAIN = "com.microsoft"
EXT_DOMAIN = "graphopt"


class Names:
    """Unique value/node names for what a lowering creates."""

    def __init__(self, graph: ir.Graph) -> None:
        self.used: set[str] = set(graph.initializers)
        for node in ir.traversal.RecursiveGraphIterator(graph):
            if node.name:
                self.used.add(node.name)
            for v in node.outputs:
                if v.name:
                    self.used.add(v.name)
        for v in (*graph.inputs, *graph.outputs):
            if v.name:
                self.used.add(v.name)

    def __call__(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            name = f"{base}_{k}"
            k += 1
        self.used.add(name)
        return name


class LoweringContext:
    """What every lowering needs: the graph, names, the opsets it must import."""

    def __init__(self, model: ir.Model, options: WeightOnlyOptions) -> None:
        self.model = model
        self.graph = model.graph
        self.names = Names(model.graph)
        self.options = options
        self.opsets: dict[str, int] = {}
        self.created: Counter[str] = Counter()
        self.fallbacks: list[str] = []
        self._first = next(iter(model.graph), None)

    def initializer(
        self, base: str, array: np.ndarray, dtype: ir.DataType | None = None
    ) -> ir.Value:
        """Adds a constant initializer named after ``base``."""
        tensor = ir.Tensor(np.ascontiguousarray(array), dtype=dtype, name=self.names(base))
        value = ir.Value(
            name=tensor.name,
            shape=ir.Shape(array.shape),
            type=ir.TensorType(tensor.dtype),
            const_value=tensor,
        )
        self.graph.register_initializer(value)
        return value

    def prepend(self, node: ir.Node) -> None:
        """Inserts a node reading only initializers at the top of the graph."""
        if self._first is None:
            self.graph.append(node)
        else:
            self.graph.insert_before(self._first, node)
        self.created[node.op_type] += 1

    def replace(self, old: ir.Node, new_nodes: Sequence[ir.Node], output: ir.Value) -> None:
        """Replaces ``old`` (one output) by ``new_nodes`` whose result is ``output``."""
        ir.convenience.replace_nodes_and_values(
            self.graph, old, [old], list(new_nodes), [old.outputs[0]], [output]
        )
        for n in new_nodes:
            self.created[n.op_type] += 1

    def need_opset(self, domain: str, version: int) -> None:
        self.opsets[domain] = max(self.opsets.get(domain, 0), version)


def mark(node: ir.Node, q: GroupQuantized) -> None:
    """Records the representation's bits and group size on a lowered node."""
    node.metadata_props[META_BITS] = str(q.bits)
    node.metadata_props[META_GROUP] = str(q.group_size)
    node.metadata_props[META_K] = str(q.k)


def _remove_dead(graph: ir.Graph, sites: Iterable[WeightSite]) -> int:
    removed = 0
    for site in sites:
        t = site.transpose
        if (
            t is not None
            and t.graph is graph
            and not t.outputs[0].uses()
            and not t.outputs[0].is_graph_output()
        ):
            graph.remove(t, safe=True)
            removed += 1
    for site in sites:
        w = site.weight
        if (
            w.name is not None
            and w.name in graph.initializers
            and not w.uses()
            and not w.is_graph_output()
        ):
            graph.initializers.pop(w.name)
    return removed


def _set_opsets(model: ir.Model, opsets: Mapping[str, int]) -> dict[str, Any]:
    from graphopt.passes.weight_only.opset import ensure_default_opset

    changes: dict[str, Any] = {}
    for domain, version in opsets.items():
        if domain == "":
            before = model.opset_imports.get("", None)
            if ensure_default_opset(model, version):
                changes["opset_upgraded"] = f"{before} -> {version}"
        elif model.opset_imports.get(domain, 0) < version:
            model.opset_imports[domain] = version
    return changes


def lower_weights(
    model: ir.Model,
    sites: Sequence[WeightSite],
    quantized: Mapping[str, GroupQuantized],
    lowering: str,
    options: WeightOnlyOptions,
) -> dict[str, Any]:
    """Replaces every quantized weight's selected uses with the lowering's nodes.

    Returns:
        Statistics: nodes created by op type, fallbacks, opset changes, bytes stored.
    """
    from graphopt.passes.weight_only import lower_dq, lower_ext, lower_nbits

    lowerers = {"nbits": lower_nbits.lower, "dq": lower_dq.lower, "ext": lower_ext.lower}
    if lowering not in lowerers:
        raise ValueError(f"unknown lowering {lowering!r}")
    lc = LoweringContext(model, options)
    by_weight = group_sites(sites)
    before = sum(
        v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None
    )
    for name, q in quantized.items():
        group = by_weight.get(name)
        if not group:
            raise InvalidModelError(f"weight-only lowering: no selected use of weight {name!r}")
        n, k = group[0].shape_nk
        if (q.n, q.k) != (n, k):
            raise InvalidModelError(
                f"weight-only lowering: {name!r} is [{n}x{k}] but its codes are [{q.n}x{q.k}]"
            )
        lowerers[lowering](lc, group, q)
        _remove_dead(model.graph, group)
    stats: dict[str, Any] = {"nodes_created": dict(lc.created)}
    if lc.fallbacks:
        stats["fallbacks"] = lc.fallbacks[:50]
    stats.update(_set_opsets(model, lc.opsets))
    after = sum(
        v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None
    )
    stats["initializer_bytes"] = {"before": before, "after": after}
    return stats
