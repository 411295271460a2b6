"""``InsertQDQPass``: materialises a :class:`~graphopt.passes.quantize.plan.QuantPlan`.

Matches: the live units and activation groups of the plan (made by a backend's
:class:`~graphopt.passes.quantize.quantizer.Quantizer` and finalized with calibration
ranges).

Changes:

* activations: ``x -> QuantizeLinear -> DequantizeLinear -> consumer`` on each annotated
  edge, one Q/DQ pair per value and group (scale and zero point shared by the group);
  other consumers of ``x`` keep reading the float value;
* weights: stored pre-quantized as an integer initializer ``<w>_quantized`` with its
  scales and zero points, read through one ``DequantizeLinear`` (``axis`` = the output
  channel axis for per-channel weights); shared weights are quantized once;
* biases of Conv/Gemm: int32 with ``scale = input_scale x weight_scale`` (per channel),
  zero point 0, through a ``DequantizeLinear``; a bias that would overflow int32 stays
  float;
* float weights and biases no longer used are removed.

Preserves: graph inputs and outputs (names, order, types), every node's name, values not
annotated. Needs default-domain opset >= 13 (per-channel DequantizeLinear).

Example::

    before: y = MatMul(x, W)                          # W float32 [K, N]
    after:  xq = QuantizeLinear(x, s_x, zp_x)         # u8
            xd = DequantizeLinear(xq, s_x, zp_x)
            Wd = DequantizeLinear(W_quantized, s_W, zp_W, axis=1)   # s8 [K, N], s_W [N]
            y  = MatMul(xd, Wd)
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx_ir as ir

from graphopt.errors import InvalidModelError
from graphopt.infra.analysis import AnalysisManager, PreservedAnalyses
from graphopt.infra.context import PassContext
from graphopt.infra.options import NoOptions
from graphopt.infra.pass_base import Pass, PassInfo, PassResult
from graphopt.passes.quantize.plan import (
    Edge,
    QuantPlan,
    QuantUnit,
    Skip,
    constant_array,
    node_label,
)
from graphopt.quant.qparams import QParams, bias_qparams, compute_qparams, quantize

logger = logging.getLogger(__name__)

#: Lowest default-domain opset the inserted Q/DQ nodes need (per-channel axis, int8).
MIN_OPSET = 13
#: Metadata key of the plan when it is handed over on the model (``model.meta``).
PLAN_META_KEY = "graphopt.quant.plan"
_ONNX_DOMAINS = ("", "ai.onnx")


def model_opset(model: ir.Model) -> int | None:
    """The default-domain opset of the model (None when it imports none)."""
    for domain in _ONNX_DOMAINS:
        if domain in model.opset_imports:
            return model.opset_imports[domain]
    return None


def check_opset(model: ir.Model, who: str) -> None:
    """Raises InvalidModelError when the model's opset is below :data:`MIN_OPSET`."""
    opset = model_opset(model)
    if opset is None or opset < MIN_OPSET:
        raise InvalidModelError(
            f"{who}: the model's default-domain opset is {opset}; int8 QDQ with per-channel "
            f"weights needs opset >= {MIN_OPSET}. Upgrade it with ptq(upgrade_opset=true) "
            "(--upgrade-opset) or re-export at a newer opset"
        )


class _Names:
    """Unique value/node names for what the pass creates."""

    def __init__(self, graph: ir.Graph) -> None:
        self.used: set[str] = set()
        for node in ir.traversal.RecursiveGraphIterator(graph):
            if node.name:
                self.used.add(node.name)
            for v in (*node.inputs, *node.outputs):
                if v is not None and v.name:
                    self.used.add(v.name)
        for v in (*graph.inputs, *graph.outputs, *graph.initializers.values()):
            if v.name:
                self.used.add(v.name)

    def __call__(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            name = f"{base}_{k}"
            k += 1
        self.used.add(name)
        return name


@dataclasses.dataclass
class _Counters:
    activations: int = 0
    weights: int = 0
    biases: int = 0
    nodes: int = 0
    float_bytes: int = 0
    int_bytes: int = 0


class InsertQDQPass(Pass[NoOptions]):
    """Inserts QuantizeLinear/DequantizeLinear as a quantization plan says.

    Args:
        plan: The finalized plan; when None, ``model.meta["graphopt.quant.plan"]`` is used.
        ctx: Context for runs outside a graphopt pass manager.
    """

    info = PassInfo(
        name="insert-qdq",
        summary="materialise quantization annotations as QuantizeLinear/DequantizeLinear",
        tolerance="quantized",
    )

    def __init__(self, plan: QuantPlan | None = None, ctx: PassContext | None = None) -> None:
        super().__init__(None, ctx)
        self.plan = plan

    def check_requires(self, model: ir.Model, ctx: PassContext) -> None:
        check_opset(model, self.info.name)

    def run(self, model: ir.Model, ctx: PassContext, am: AnalysisManager) -> PassResult:
        plan = self.plan if self.plan is not None else model.meta.get(PLAN_META_KEY)
        if plan is None:
            raise InvalidModelError(
                "insert-qdq: the model carries no quantization plan; run ptq (or a "
                "quantizer's annotate + finalize_plan) first"
            )
        graph = model.graph
        names = _Names(graph)
        order = {id(n): i for i, n in enumerate(graph)}
        counters = _Counters()
        created: list[ir.Node] = []

        def insert_before_first(node: ir.Node, consumers: Iterable[ir.Node]) -> None:
            first = min(consumers, key=lambda n: order.get(id(n), 0))
            graph.insert_before(first, node)
            created.append(node)

        def initializer(base: str, array: np.ndarray) -> ir.Value:
            name = names(base)
            value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
            value.type = ir.TensorType(ir.DataType(ir.tensor(array).dtype))
            value.shape = ir.Shape(array.shape)
            graph.register_initializer(value)
            return value

        # -- activations -------------------------------------------------------------
        live = {id(u.node) for u in plan.units if u.live}
        for group in plan.groups.values():
            if group.qparams is None:
                raise InvalidModelError(
                    f"insert-qdq: activation group {group.value_names()} has no calibrated "
                    "parameters (finalize the plan first)"
                )
            edges = [e for e in group.edges if id(e.node) in live] + list(group.passthrough)
            if not edges:
                continue
            first_name = edges[0].value.name or "x"
            scale = initializer(f"{first_name}_scale", group.qparams.scale.reshape(()))
            zero = initializer(
                f"{first_name}_zero_point", group.qparams.zero_point.reshape(())
            )
            by_value: dict[int, list[Edge]] = {}
            for e in edges:
                by_value.setdefault(id(e.value), []).append(e)
            for value_edges in by_value.values():
                x = value_edges[0].value
                base = x.name or "x"
                q_out = ir.Value(
                    name=names(f"{base}_quantized"),
                    type=ir.TensorType(ir.DataType(group.spec.dtype.onnx_type)),
                    shape=ir.Shape(x.shape) if x.shape is not None else None,
                )
                q = ir.node(
                    "QuantizeLinear", [x, scale, zero], outputs=[q_out],
                    name=names(f"{base}_QuantizeLinear"),
                )
                dq_out = ir.Value(
                    name=names(f"{base}_dequantized"),
                    type=ir.TensorType(ir.DataType.FLOAT),
                    shape=ir.Shape(x.shape) if x.shape is not None else None,
                )
                dq = ir.node(
                    "DequantizeLinear", [q_out, scale, zero], outputs=[dq_out],
                    name=names(f"{base}_DequantizeLinear"),
                )
                consumers = [e.node for e in value_edges]
                insert_before_first(q, consumers)
                graph.insert_after(q, dq)
                created.append(dq)
                for e in value_edges:
                    e.node.replace_input_with(e.index, dq_out)
                counters.activations += 1
                counters.nodes += 2

        # -- weights -----------------------------------------------------------------
        first_node = next(iter(graph), None)
        unit_weight_qp: dict[int, QParams] = {}
        done: dict[tuple[int, Any], tuple[ir.Value, QParams]] = {}
        originals: list[ir.Value] = []
        for unit in plan.units:
            if not unit.live or unit.weight is None:
                continue
            w_edge = unit.weight
            w = w_edge.value
            key = (id(w), w_edge.spec)
            if key not in done:
                array = constant_array(w)
                assert array is not None
                array = np.asarray(array, dtype=np.float32)
                spec = w_edge.spec
                qp = weight_qparams(array, spec, w.name or "weight")
                codes = quantize(array, qp, spec, spec.axis, value_name=w.name or "weight")
                base = w.name or "weight"
                q_init = initializer(f"{base}_quantized", codes)
                s_init = initializer(f"{base}_scale", qp.scale)
                z_init = initializer(f"{base}_zero_point", qp.zero_point)
                attrs = {"axis": int(spec.axis)} if spec.axis is not None else {}
                out = ir.Value(
                    name=names(f"{base}_dequantized"),
                    type=ir.TensorType(ir.DataType.FLOAT),
                    shape=ir.Shape(array.shape),
                )
                dq = ir.node(
                    "DequantizeLinear", [q_init, s_init, z_init], attrs, outputs=[out],
                    name=names(f"{base}_DequantizeLinear"),
                )
                if first_node is not None:
                    graph.insert_before(first_node, dq)
                else:  # pragma: no cover - a plan has nodes
                    graph.append(dq)
                created.append(dq)
                done[key] = (out, qp)
                originals.append(w)
                counters.weights += 1
                counters.nodes += 1
                counters.float_bytes += array.nbytes
                counters.int_bytes += codes.nbytes
            out, qp = done[key]
            unit.node.replace_input_with(w_edge.index, out)
            unit_weight_qp[id(unit.node)] = qp

        # -- biases ------------------------------------------------------------------
        for unit in plan.units:
            if not unit.live or unit.bias is None:
                continue
            original = unit.bias.value
            skip = self._insert_bias(
                unit, plan, unit_weight_qp, initializer, names, graph, first_node, created
            )
            if skip is not None:
                plan.skipped.append(skip)
                continue
            originals.append(original)
            counters.biases += 1
            counters.nodes += 1

        # -- embedding tables: Gather(int8) -> DequantizeLinear(axis=-1) ---------------
        tables: dict[tuple[int, Any], tuple[ir.Value, ir.Value, ir.Value]] = {}
        for edge in plan.gathers:
            gather = edge.node
            table = edge.value
            key = (id(table), edge.spec)
            if key not in tables:
                array = np.asarray(constant_array(table), dtype=np.float32)
                qp = weight_qparams(array, edge.spec, table.name or "table")
                codes = quantize(array, qp, edge.spec, edge.spec.axis, value_name=table.name or "table")
                base = table.name or "table"
                tables[key] = (
                    initializer(f"{base}_quantized", codes),
                    initializer(f"{base}_scale", qp.scale),
                    initializer(f"{base}_zero_point", qp.zero_point),
                )
                originals.append(table)
                counters.weights += 1
                counters.float_bytes += array.nbytes
                counters.int_bytes += codes.nbytes
            q_table, scale, zero = tables[key]
            old_out = gather.outputs[0]
            name = gather.name
            indices = gather.inputs[1]
            codes_out = ir.Value(
                name=names(f"{old_out.name or 'gather'}_quantized"),
                type=ir.TensorType(ir.DataType.INT8),
                shape=ir.Shape(old_out.shape) if old_out.shape is not None else None,
            )
            new_gather = ir.node(
                "Gather", [q_table, indices], {"axis": 0}, outputs=[codes_out],
                name=names(f"{name or 'Gather'}_int8"),
            )
            dq_out = ir.Value(
                name=names(f"{old_out.name or 'gather'}_dequantized"),
                type=ir.TensorType(ir.DataType.FLOAT),
                shape=ir.Shape(old_out.shape) if old_out.shape is not None else None,
            )
            dq = ir.node(
                "DequantizeLinear", [codes_out, scale, zero], {"axis": -1}, outputs=[dq_out],
                name=names(f"{name or 'Gather'}_DequantizeLinear"),
            )
            graph.insert_after(gather, [new_gather, dq])
            old_out.replace_all_uses_with(dq_out)
            graph.remove(gather, safe=True)
            # The lookup keeps its node name and its output's name.
            if name:
                names.used.discard(new_gather.name or "")
                new_gather.name = name
            if old_out.name:
                dq_out.name = old_out.name
            counters.nodes += 2

        removed = remove_unused(graph, originals)
        stats: dict[str, Any] = {
            "activations_quantized": counters.activations,
            "weights_quantized": counters.weights,
            "biases_int32": counters.biases,
            "qdq_nodes": counters.nodes,
            "float_tensors_removed": removed,
            "weight_bytes": {"float": counters.float_bytes, "int8": counters.int_bytes},
        }
        if tables:
            stats["embedding_tables_quantized"] = len(tables)
        model.meta.pop(PLAN_META_KEY, None)
        modified = counters.nodes > 0
        return PassResult(model, modified, preserved=PreservedAnalyses.none(), stats=stats)

    def _insert_bias(
        self,
        unit: QuantUnit,
        plan: QuantPlan,
        unit_weight_qp: dict[int, QParams],
        initializer: Any,
        names: _Names,
        graph: ir.Graph,
        first_node: ir.Node | None,
        created: list[ir.Node],
    ) -> Skip | None:
        assert unit.bias is not None
        label = node_label(unit.node)
        gid = unit.activations[0].group
        x_group = plan.groups.get(gid) if gid is not None else None
        if unit.weight is not None:
            w_qp = unit_weight_qp.get(id(unit.node))
        elif len(unit.activations) > 1:
            wid = unit.activations[1].group
            g = plan.groups.get(wid) if wid is not None else None
            w_qp = g.qparams if g is not None else None
        else:
            w_qp = None
        if x_group is None or x_group.qparams is None or w_qp is None:
            return Skip(label, f"{label}: bias kept in float (input or weight not quantized)",
                        "float-bias")
        bias = unit.bias.value
        array = constant_array(bias)
        assert array is not None
        array = np.asarray(array, dtype=np.float32)
        qp = bias_qparams(x_group.qparams.scale, w_qp.scale)
        spec = unit.bias.spec
        if qp.per_channel != spec.per_channel:
            spec = dataclasses.replace(
                spec, per_channel=qp.per_channel, axis=0 if qp.per_channel else None
            )
        ratio = np.abs(array.astype(np.float64)) / qp.scale.astype(np.float64)
        if np.any(ratio > 2**31 - 2):
            return Skip(
                label,
                f"{label}: bias kept in float (|bias|/scale {float(ratio.max()):.3g} "
                "overflows int32)",
                "float-bias",
            )
        codes = quantize(array, qp, spec, 0 if qp.per_channel else None, value_name=bias.name or "bias")
        base = bias.name or "bias"
        q_init = initializer(f"{base}_quantized", codes)
        s_init = initializer(f"{base}_scale", qp.scale)
        z_init = initializer(f"{base}_zero_point", qp.zero_point)
        attrs = {"axis": 0} if qp.per_channel else {}
        out = ir.Value(
            name=names(f"{base}_dequantized"),
            type=ir.TensorType(ir.DataType.FLOAT),
            shape=ir.Shape(array.shape),
        )
        dq = ir.node(
            "DequantizeLinear", [q_init, s_init, z_init], attrs, outputs=[out],
            name=names(f"{base}_DequantizeLinear"),
        )
        if first_node is not None:
            graph.insert_before(first_node, dq)
        else:  # pragma: no cover
            graph.append(dq)
        created.append(dq)
        unit.bias.node.replace_input_with(unit.bias.index, out)
        return None


def weight_qparams(array: np.ndarray, spec: Any, name: str) -> QParams:
    """Per-channel (along ``spec.axis``) or per-tensor min/max parameters of a weight."""
    if spec.per_channel:
        axis = spec.axis % array.ndim
        others = tuple(i for i in range(array.ndim) if i != axis)
        lo = array.min(axis=others) if others else array.copy()
        hi = array.max(axis=others) if others else array.copy()
        return compute_qparams(lo, hi, spec, value_name=name)
    return compute_qparams(float(array.min()), float(array.max()), spec, value_name=name)


def remove_unused(graph: ir.Graph, values: Iterable[ir.Value]) -> int:
    """Removes float constants (initializers, Constant nodes) nothing reads any more."""
    removed = 0
    seen: set[int] = set()
    for v in values:
        if id(v) in seen:
            continue
        seen.add(id(v))
        if list(v.uses()) or v.is_graph_output() or v.is_graph_input():
            continue
        if v.is_initializer() and v.name is not None and v.name in graph.initializers:
            graph.initializers.pop(v.name)
            removed += 1
            continue
        producer = v.producer()
        if producer is not None and producer.op_type == "Constant" and producer.graph is graph:
            graph.remove(producer, safe=True)
            removed += 1
    return removed


__all__ = [
    "MIN_OPSET",
    "PLAN_META_KEY",
    "InsertQDQPass",
    "check_opset",
    "model_opset",
    "remove_unused",
    "weight_qparams",
]
