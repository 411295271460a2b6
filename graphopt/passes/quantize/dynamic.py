"""Dynamic int8 quantization: weights stored as int8, activations quantized at run time.

Matches: MatMul (constant 2-D weight ``[K, N]``) and Gemm (``transA=0``, constant 2-D
weight) nodes the target's quantizer policy annotates (the same walk as static ``ptq``:
activation x activation MatMuls, excluded nodes, nodes inside control-flow bodies and
already quantized nodes stay float), plus large embedding tables (``Gather``) stored int8.
Conv is left to static mode.

Changes: each matched node becomes the standard-op pattern ONNX Runtime fuses into its
integer kernels (``DynamicQuantizeMatMul`` for an input read by one projection,
``MatMulIntegerToFloat`` for an input shared by several, the bias Add folded in)::

    before: y = MatMul(x, W)                               # W float32 [K, N]
    after:  xq, xs, xz = DynamicQuantizeLinear(x)          # u8, per tensor, per run
            acc = MatMulInteger(xq, W_quantized, xz)        # s8 [K, N], int32 out
            y   = Mul(Cast(acc, float), Mul(xs, W_scale))   # W_scale [N] per column

The activation of an input read by several projections (Q, K and V) is quantized once.
Gemm's ``alpha`` is folded into the weight scale, ``beta * C`` becomes an ``Add``.

Preserves: graph inputs and outputs (names, order, types), the names of the replaced
nodes' outputs, every other node. Needs default-domain opset >= 11.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from graphopt.errors import InvalidModelError
from graphopt.infra.analysis import AnalysisManager, PreservedAnalyses
from graphopt.infra.context import PassContext
from graphopt.infra.options import NoOptions
from graphopt.infra.pass_base import Pass, PassInfo, PassResult
from graphopt.passes.quantize.insert import _Names, model_opset, remove_unused, weight_qparams
from graphopt.passes.quantize.plan import (
    Edge,
    QuantConfig,
    QuantPlan,
    Skip,
    constant_array,
    node_label,
)
from graphopt.passes.quantize.quantizer import Quantizer
from graphopt.quant.qparams import quantize

logger = logging.getLogger(__name__)

#: Lowest default-domain opset with DynamicQuantizeLinear and MatMulInteger.
DYNAMIC_MIN_OPSET = 11


@dataclasses.dataclass(eq=False)
class DynamicLayer:
    """One MatMul/Gemm quantized dynamically.

    Attributes:
        node: The float node (replaced by :class:`InsertDynamicQuantPass`).
        weight: Its constant weight edge (per-channel spec along the output axis).
        transposed: The stored weight is ``[N, K]`` (Gemm ``transB=1``).
        live: False once returned to float.
    """

    node: ir.Node
    weight: Edge
    transposed: bool = False
    live: bool = True

    @property
    def label(self) -> str:
        return node_label(self.node)


@dataclasses.dataclass(eq=False)
class DynamicPlan:
    """What :class:`InsertDynamicQuantPass` materialises.

    Attributes:
        target: The backend's name.
        layers: Nodes to quantize.
        skipped: What stays float, and why.
        gathers: Embedding tables stored as int8 (weight-only).
        share_inputs: Quantize an input read by several layers once.
    """

    target: str
    layers: list[DynamicLayer] = dataclasses.field(default_factory=list)
    skipped: list[Skip] = dataclasses.field(default_factory=list)
    gathers: list[Edge] = dataclasses.field(default_factory=list)
    share_inputs: bool = True

    def live_layers(self) -> list[DynamicLayer]:
        return [layer for layer in self.layers if layer.live]

    def drop(self, layer: DynamicLayer, reason: str, category: str) -> None:
        if layer.live:
            layer.live = False
            self.skipped.append(Skip(layer.label, reason, category))

    def summary(self) -> dict[str, Any]:
        by_category: dict[str, int] = {}
        for s in self.skipped:
            by_category[s.category] = by_category.get(s.category, 0) + 1
        by_op: dict[str, int] = {}
        for layer in self.live_layers():
            by_op[layer.node.op_type] = by_op.get(layer.node.op_type, 0) + 1
        return {
            "nodes_quantized": len(self.live_layers()),
            "nodes_by_op": dict(sorted(by_op.items())),
            "skipped": by_category,
        }


def plan_dynamic(model: ir.Model, quantizer: Quantizer, config: QuantConfig) -> DynamicPlan:
    """Selects the MatMul/Gemm nodes to quantize dynamically with ``quantizer``'s policy.

    Args:
        model: The model (not changed).
        quantizer: The target's policy (weight specs, embedding tables, what is skipped).
        config: The user's choices (per-channel, reduce_range, exclusions).

    Returns:
        The plan; its ``skipped`` lists every candidate left in float with the reason.
    """
    static: QuantPlan = quantizer.annotate(model, config)
    plan = DynamicPlan(target=quantizer.name, share_inputs=quantizer.dynamic_share_inputs)
    plan.skipped.extend(static.skipped)
    plan.gathers.extend(static.gathers)
    for unit in static.units:
        node = unit.node
        label = node_label(node)
        op = node.op_type
        if op not in ("MatMul", "Gemm"):
            if op != "Add":  # residual Adds only exist for static targets
                plan.skipped.append(Skip(
                    label, f"{label}: {op} is quantized in static mode only (ptq with --calib)",
                    "static-only"))
            continue
        w = unit.weight
        array = constant_array(w.value) if w is not None else None
        if w is None or array is None:
            plan.skipped.append(Skip(
                label, f"{label}: weight is not a constant (dynamic mode stores weights as int8)",
                "unsupported-weight"))
            continue
        if array.ndim != 2:
            plan.skipped.append(Skip(
                label, f"{label}: weight of rank {array.ndim} (dynamic mode needs a 2-D weight)",
                "unsupported-weight"))
            continue
        transposed = False
        if op == "Gemm":
            why = _gemm_problem(node)
            if why is not None:
                plan.skipped.append(Skip(label, f"{label}: {why}", "unsupported-gemm"))
                continue
            trans_b = node.attributes.get("transB")
            transposed = bool(trans_b.as_int()) if trans_b is not None else False
        plan.layers.append(DynamicLayer(node, w, transposed))
    return plan


def _gemm_problem(node: ir.Node) -> str | None:
    """Why a Gemm cannot become MatMulInteger + scale (+ Add), or None."""
    trans_a = node.attributes.get("transA")
    if trans_a is not None and trans_a.as_int():
        return "Gemm with transA=1 kept in float"
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        beta = node.attributes.get("beta")
        c = node.inputs[2]
        if constant_array(c) is None and beta is not None and beta.as_float() != 1.0:
            return "Gemm with a computed C and beta != 1 kept in float"
        if c.dtype != ir.DataType.FLOAT:
            return "Gemm's C is not float32"
    return None


def check_dynamic_opset(model: ir.Model, who: str) -> None:
    """Raises InvalidModelError when the opset lacks DynamicQuantizeLinear/MatMulInteger."""
    opset = model_opset(model)
    if opset is None or opset < DYNAMIC_MIN_OPSET:
        raise InvalidModelError(
            f"{who}: the model's default-domain opset is {opset}; dynamic int8 "
            f"(DynamicQuantizeLinear, MatMulInteger) needs opset >= {DYNAMIC_MIN_OPSET}. "
            "Upgrade it with ptq(upgrade_opset=true) or re-export at a newer opset"
        )


class InsertDynamicQuantPass(Pass[NoOptions]):
    """Rewrites a :class:`DynamicPlan`'s nodes as run-time-quantized integer products.

    Args:
        plan: The plan (:func:`plan_dynamic`).
        ctx: Context for runs outside a graphopt pass manager.
    """

    info = PassInfo(
        name="insert-dynamic-quant",
        summary="MatMul/Gemm -> DynamicQuantizeLinear + MatMulInteger with int8 weights",
        tolerance="quantized",
    )

    def __init__(self, plan: DynamicPlan, ctx: PassContext | None = None) -> None:
        super().__init__(None, ctx)
        self.plan = plan

    def check_requires(self, model: ir.Model, ctx: PassContext) -> None:
        check_dynamic_opset(model, self.info.name)

    def run(self, model: ir.Model, ctx: PassContext, am: AnalysisManager) -> PassResult:
        graph = model.graph
        names = _Names(graph)
        first_node = next(iter(graph), None)
        # Activation quantizers, by input value (shared) or by consumer node.
        quantized_inputs: dict[int, tuple[ir.Value, ir.Value, ir.Value]] = {}
        weights: dict[tuple[int, bool], tuple[ir.Value, np.ndarray]] = {}
        originals: list[ir.Value] = []
        float_bytes = int_bytes = nodes_added = 0

        def initializer(base: str, array: np.ndarray) -> ir.Value:
            name = names(base)
            value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
            value.type = ir.TensorType(ir.DataType(ir.tensor(array).dtype))
            value.shape = ir.Shape(array.shape)
            graph.register_initializer(value)
            return value

        for layer in self.plan.live_layers():
            node = layer.node
            x = node.inputs[0]
            w = layer.weight.value
            if x is None:  # pragma: no cover - the planner only takes float inputs
                continue
            base = node.name or (node.outputs[0].name or node.op_type)
            # -- weight: int8 [K, N] codes and one float scale per output column --------
            key = (id(w), layer.transposed)
            if key not in weights:
                array = np.asarray(constant_array(w), dtype=np.float32)
                spec = layer.weight.spec
                qp = weight_qparams(array, spec, w.name or "weight")
                codes = quantize(array, qp, spec, spec.axis, value_name=w.name or "weight")
                if layer.transposed:
                    codes = np.ascontiguousarray(codes.T)
                n_out = codes.shape[1]
                scale = np.broadcast_to(qp.scale.astype(np.float32).reshape(-1), (n_out,))
                if np.any(qp.zero_point != 0):
                    raise InvalidModelError(
                        f"{self.info.name}: weight '{w.name}' needs a symmetric spec "
                        f"(zero point 0), got {layer.weight.spec.to_text()}"
                    )
                wname = w.name or "weight"
                q_init = initializer(f"{wname}_quantized", codes)
                weights[key] = (q_init, np.ascontiguousarray(scale))
                originals.append(w)
                float_bytes += array.nbytes
                int_bytes += codes.nbytes
            q_w, w_scale = weights[key]
            alpha = 1.0
            if node.op_type == "Gemm" and node.attributes.get("alpha") is not None:
                alpha = node.attributes["alpha"].as_float()
            scale_init = initializer(f"{base}_weight_scale", (w_scale * np.float32(alpha)).astype(np.float32))

            # -- activation: quantized per run (one quantizer per value or per layer) ---
            xkey = id(x) if self.plan.share_inputs else id(node)
            if xkey not in quantized_inputs:
                xbase = x.name or "x"
                xq = ir.Value(name=names(f"{xbase}_quantized"),
                              type=ir.TensorType(ir.DataType.UINT8),
                              shape=ir.Shape(x.shape) if x.shape is not None else None)
                xs = ir.Value(name=names(f"{xbase}_scale"), type=ir.TensorType(ir.DataType.FLOAT),
                              shape=ir.Shape([]))
                xz = ir.Value(name=names(f"{xbase}_zero_point"),
                              type=ir.TensorType(ir.DataType.UINT8), shape=ir.Shape([]))
                dql = ir.node("DynamicQuantizeLinear", [x], outputs=[xq, xs, xz],
                              name=names(f"{xbase}_DynamicQuantizeLinear"))
                graph.insert_before(node, dql)
                nodes_added += 1
                quantized_inputs[xkey] = (xq, xs, xz)
            xq, xs, xz = quantized_inputs[xkey]

            # -- product ------------------------------------------------------------
            old_out = node.outputs[0]
            shape = ir.Shape(old_out.shape) if old_out.shape is not None else None
            acc = ir.Value(name=names(f"{base}_int32"), type=ir.TensorType(ir.DataType.INT32),
                           shape=shape)
            mmi = ir.node("MatMulInteger", [xq, q_w, xz], outputs=[acc],
                          name=names(f"{base}_MatMulInteger"))
            acc_f = ir.Value(name=names(f"{base}_int32_float"),
                             type=ir.TensorType(ir.DataType.FLOAT), shape=shape)
            cast = ir.node("Cast", [acc], {"to": int(ir.DataType.FLOAT)}, outputs=[acc_f],
                           name=names(f"{base}_Cast"))
            scales = ir.Value(name=names(f"{base}_scales"), type=ir.TensorType(ir.DataType.FLOAT),
                              shape=ir.Shape([int(w_scale.shape[0])]))
            mul_s = ir.node("Mul", [xs, scale_init], outputs=[scales], name=names(f"{base}_scales_Mul"))
            y = ir.Value(name=names(f"{base}_output"), type=ir.TensorType(ir.DataType.FLOAT),
                         shape=shape)
            mul = ir.node("Mul", [acc_f, scales], outputs=[y], name=names(f"{base}_Mul"))
            new_nodes: list[ir.Node] = [mmi, cast, mul_s, mul]
            result = y
            if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
                result = self._gemm_bias(node, y, shape, names, initializer, new_nodes, originals)
            nodes_added += len(new_nodes)
            name = node.name
            ir.convenience.replace_nodes_and_values(
                graph, node, [node], new_nodes, [old_out], [result]
            )
            if name:  # the integer product keeps the float node's name
                names.used.discard(mmi.name or "")
                mmi.name = name
        del first_node
        removed = remove_unused(graph, originals)
        stats: dict[str, Any] = {
            "activations_quantized": len(quantized_inputs),
            "weights_quantized": len(weights),
            "nodes_added": nodes_added,
            "float_tensors_removed": removed,
            "weight_bytes": {"float": float_bytes, "int8": int_bytes},
        }
        return PassResult(model, bool(nodes_added), preserved=PreservedAnalyses.none(), stats=stats)

    @staticmethod
    def _gemm_bias(
        node: ir.Node,
        y: ir.Value,
        shape: ir.Shape | None,
        names: _Names,
        initializer: Any,
        new_nodes: list[ir.Node],
        originals: list[ir.Value],
    ) -> ir.Value:
        """``y + beta * C`` after the integer product of a Gemm."""
        c = node.inputs[2]
        assert c is not None
        beta_attr = node.attributes.get("beta")
        beta = beta_attr.as_float() if beta_attr is not None else 1.0
        array = constant_array(c)
        if array is not None and beta != 1.0:
            c = initializer(f"{c.name or 'C'}_scaled", (np.float32(beta) * array).astype(np.float32))
            originals.append(node.inputs[2])  # type: ignore[arg-type]
        out = ir.Value(name=names(f"{node.name or 'Gemm'}_biased"),
                       type=ir.TensorType(ir.DataType.FLOAT), shape=shape)
        new_nodes.append(ir.node("Add", [y, c], outputs=[out], name=names(f"{node.name or 'Gemm'}_Add")))
        return out


def layer_rows(plan: DynamicPlan) -> list[tuple[str, str, str]]:
    """(label, input value, output value) of each live layer with named float values."""
    rows = []
    for layer in plan.live_layers():
        x = layer.node.inputs[0]
        y = layer.node.outputs[0]
        if x is not None and x.name and y.name:
            rows.append((layer.label, x.name, y.name))
    return rows


def drop_layers(plan: DynamicPlan, labels: Sequence[str], reason: str, category: str) -> None:
    """Returns the named layers to float."""
    wanted = set(labels)
    for layer in plan.layers:
        if layer.label in wanted:
            plan.drop(layer, f"{layer.label}: {reason}", category)


__all__ = [
    "DYNAMIC_MIN_OPSET",
    "DynamicLayer",
    "DynamicPlan",
    "InsertDynamicQuantPass",
    "check_dynamic_opset",
    "drop_layers",
    "layer_rows",
    "plan_dynamic",
]
