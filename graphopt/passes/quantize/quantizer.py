"""The quantizer-policy base: which edges of a graph get which spec (annotate).

A backend subclasses :class:`Quantizer` and sets what differs between targets: the
activation spec, weight specs, which ops are compute units, whether residual Adds are
quantized. :meth:`Quantizer.annotate` does the structural walk every policy shares and
returns a :class:`~graphopt.passes.quantize.plan.QuantPlan`; calibration and
:func:`~graphopt.passes.quantize.plan.finalize_plan` come after.

What is never quantized, by construction: anything that is not an input of a compute
unit or of a pass-through chain leading to one (Softmax, LayerNormalization, Gelu, the
attention mask arithmetic), integer values, nodes inside If/Loop/Scan bodies (listed in
the skips), and whatever the user excludes.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from graphopt.passes.quantize.plan import (
    Edge,
    QuantConfig,
    QuantPlan,
    QuantUnit,
    Skip,
    build_groups,
    constant_array,
    excluded,
    is_float,
    node_label,
)
from graphopt.quant.spec import (
    ACT_U8_ASYM,
    BIAS_S32,
    BIAS_S32_PER_CHANNEL,
    WEIGHT_S8_SYM,
    WEIGHT_S8_SYM_PER_CHANNEL,
    QuantSpec,
)

logger = logging.getLogger(__name__)

_ONNX_DOMAINS = ("", "ai.onnx")


class Quantizer:
    """A backend's quantization policy.

    Class attributes a backend overrides:
        name: The target name.
        activation_spec: Spec of activations (inputs of compute units).
        reduce_range: Default for 7-bit weight codes when the user does not choose
            (see :meth:`default_reduce_range`).
        compute_ops: Op types quantized as units.
        residual_adds: Quantize Adds of two activations where one of them is also used
            elsewhere (a skip connection) and the other comes from a convolution
            (``residual_producers``), with one shared spec for both inputs.
        matmul_add_bias: Treat the constant of an Add after a MatMul as its bias (int32).
        embedding_gathers: Store large constant ``Gather`` tables (embeddings) as int8
            with per-column scales, gathered first and dequantized after.
    """

    name: ClassVar[str] = "generic"
    activation_spec: ClassVar[QuantSpec] = ACT_U8_ASYM
    reduce_range: ClassVar[bool] = False
    compute_ops: ClassVar[frozenset[str]] = frozenset({"Conv", "MatMul", "Gemm"})
    residual_adds: ClassVar[bool] = False
    matmul_add_bias: ClassVar[bool] = False
    embedding_gathers: ClassVar[bool] = False
    #: A residual Add is quantized only when an input comes straight from one of these.
    residual_producers: ClassVar[frozenset[str]] = frozenset({"Conv", "BatchNormalization"})
    #: Smallest table (elements) worth storing as int8.
    min_embedding_size: ClassVar[int] = 16384
    #: Dynamic mode: quantize an activation read by several MatMuls once (True) or once
    #: per MatMul (False, which lets a runtime fuse each into one kernel).
    dynamic_share_inputs: ClassVar[bool] = True
    #: Whether the target runs dynamically quantized MatMuls (DynamicQuantizeLinear).
    supports_dynamic: ClassVar[bool] = True

    # ------------------------------------------------------------------ specs
    def weight_spec(self, axis: int | None, config: QuantConfig) -> QuantSpec:
        """Spec of a constant weight whose output channels lie along ``axis``."""
        reduce = self.default_reduce_range() if config.reduce_range is None else config.reduce_range
        if config.per_channel and axis is not None:
            spec = WEIGHT_S8_SYM_PER_CHANNEL.with_axis(axis)
        else:
            spec = WEIGHT_S8_SYM
        return dataclasses.replace(spec, reduce_range=reduce)

    def computed_weight_spec(self, config: QuantConfig) -> QuantSpec:
        """Spec of a weight input that is not a constant (calibrated like an activation)."""
        reduce = self.default_reduce_range() if config.reduce_range is None else config.reduce_range
        return dataclasses.replace(WEIGHT_S8_SYM, reduce_range=reduce)

    def default_reduce_range(self) -> bool:
        """Whether weights use 7-bit codes when the user does not say."""
        return self.reduce_range

    @staticmethod
    def bias_spec(weight: QuantSpec) -> QuantSpec:
        return BIAS_S32_PER_CHANNEL if weight.per_channel else BIAS_S32

    # ------------------------------------------------------------------ annotate
    def annotate(self, model: ir.Model, config: QuantConfig) -> QuantPlan:
        """Structural annotation: units, their specs, activation groups and skips."""
        plan = QuantPlan(target=self.name)
        for node in model.graph:
            for attr in node.attributes.values():
                if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
                    inner = sum(1 for _ in ir.traversal.RecursiveGraphIterator(
                        attr.as_graph() if attr.type == ir.AttributeType.GRAPH
                        else attr.as_graphs()[0]
                    ))
                    plan.skipped.append(Skip(
                        node_label(node),
                        f"{node.op_type} '{node_label(node)}': {inner} nodes in its body are "
                        "not quantized (control-flow bodies stay in float)",
                        "subgraph",
                    ))
                    break
            if node.domain not in _ONNX_DOMAINS:
                continue
            if node.op_type in self.compute_ops:
                if excluded(node, config):
                    plan.skipped.append(
                        Skip(node_label(node), f"{node_label(node)}: excluded by the user",
                             "excluded")
                    )
                    continue
                unit = self._unit(node, config, plan)
                if unit is not None:
                    plan.units.append(unit)
            elif self.embedding_gathers and node.op_type == "Gather":
                edge = self._gather_table(node, config)
                if edge is not None:
                    plan.gathers.append(edge)
            elif self.residual_adds and node.op_type == "Add" and not excluded(node, config):
                unit = self._residual_add(node)
                if unit is not None:
                    plan.units.append(unit)
                    plan.shared.append(list(unit.activations))
        build_groups(plan, config)
        return plan

    def _gather_table(self, node: ir.Node, config: QuantConfig) -> Edge | None:
        """An embedding lookup: a large constant 2-D float table gathered along axis 0."""
        if excluded(node, config) or len(node.inputs) != 2 or node.outputs[0].is_graph_output():
            return None
        axis = node.attributes.get("axis")
        if axis is not None and axis.as_int() != 0:
            return None
        table = constant_array(node.inputs[0])
        if table is None or table.dtype != np.float32 or table.ndim != 2:
            return None
        if table.size < self.min_embedding_size or constant_array(node.inputs[1]) is not None:
            return None
        # One scale per column (hidden unit): after the lookup the codes' last axis.
        spec = dataclasses.replace(WEIGHT_S8_SYM_PER_CHANNEL.with_axis(1), reduce_range=False)
        return Edge(node, 0, "weight", spec)

    def _activation_edge(self, node: ir.Node, index: int) -> Edge | None:
        value = node.inputs[index] if index < len(node.inputs) else None
        if value is None or not is_float(value) or constant_array(value) is not None:
            return None
        return Edge(node, index, "activation", self.activation_spec)

    def _weight_edge(
        self, node: ir.Node, index: int, axis: int | None, config: QuantConfig
    ) -> tuple[Edge | None, str | None]:
        """The weight edge, or None and why not."""
        value = node.inputs[index] if index < len(node.inputs) else None
        if value is None or not is_float(value):
            return None, "weight is missing or not float32"
        array = constant_array(value)
        if array is None:
            # Computed (or fed) weights are calibrated like activations, per tensor.
            return Edge(node, index, "activation", self.computed_weight_spec(config)), None
        if array.size == 0:
            return None, "weight is empty"
        rank = array.ndim
        if axis is not None and (rank == 0 or not -rank <= axis < rank):
            axis = None
        if axis is not None:
            axis %= rank
        return Edge(node, index, "weight", self.weight_spec(axis, config)), None

    def _bias_edge(self, node: ir.Node, index: int, weight: Edge, channels: int | None) -> Edge | None:
        value = node.inputs[index] if index < len(node.inputs) else None
        if value is None or not is_float(value):
            return None
        array = constant_array(value)
        if array is None or array.ndim != 1:
            return None
        if weight.role == "weight":
            w = constant_array(weight.value)
            assert w is not None
            if weight.spec.per_channel and w.shape[weight.spec.axis or 0] != array.shape[0]:
                return None
        if channels is not None and array.shape[0] != channels:
            return None
        spec = self.bias_spec(weight.spec)
        return Edge(node, index, "bias", spec)

    def _unit(self, node: ir.Node, config: QuantConfig, plan: QuantPlan) -> QuantUnit | None:
        label = node_label(node)
        op = node.op_type
        for v in node.inputs[:2]:
            producer = v.producer() if v is not None else None
            if producer is not None and producer.op_type == "DequantizeLinear":
                plan.skipped.append(Skip(label, f"{label}: already quantized", "already-quantized"))
                return None
        x = self._activation_edge(node, 0)
        if x is None:
            first = node.inputs[0] if node.inputs else None
            problem = (
                "input 0 is a constant" if constant_array(first) is not None
                else "input 0 is not float32"
            )
            plan.skipped.append(Skip(label, f"{label}: {problem}", "unsupported-input"))
            return None
        if op == "MatMul":
            b = node.inputs[1] if len(node.inputs) > 1 else None
            # A fed initializer (also a graph input) is a weight a caller may replace:
            # calibrated like an activation below, not an activation x activation product.
            if constant_array(b) is None and not (b is not None and b.is_initializer()):
                if not config.act_matmul:
                    plan.skipped.append(Skip(
                        label, f"{label}: activation x activation MatMul kept in float",
                        "act-x-act"))
                    return None
                y = self._activation_edge(node, 1)
                if y is None:
                    plan.skipped.append(Skip(label, f"{label}: input 1 not float32",
                                             "unsupported-input"))
                    return None
                return QuantUnit(node, [x, y])
            assert b is not None
            rank = len(b.shape) if b.shape is not None else None
            w, why = self._weight_edge(node, 1, -1 if rank == 2 else None, config)
            if w is None:
                plan.skipped.append(Skip(label, f"{label}: {why}", "unsupported-weight"))
                return None
            unit = self._with_weight(node, x, w)
            if self.matmul_add_bias and w.role == "weight":
                unit.bias = self._matmul_add_bias(node, w, config)
            return unit
        if op == "Conv":
            w, why = self._weight_edge(node, 1, 0, config)
            if w is None:
                plan.skipped.append(Skip(label, f"{label}: {why}", "unsupported-weight"))
                return None
            unit = self._with_weight(node, x, w)
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                unit.bias = self._bias_edge(node, 2, w, None)
            return unit
        if op == "Gemm":
            trans_b = node.attributes.get("transB")
            trans = bool(trans_b.as_int()) if trans_b is not None else False
            w, why = self._weight_edge(node, 1, 0 if trans else 1, config)
            if w is None:
                plan.skipped.append(Skip(label, f"{label}: {why}", "unsupported-weight"))
                return None
            unit = self._with_weight(node, x, w)
            if len(node.inputs) > 2 and node.inputs[2] is not None and w.role == "weight":
                wa = constant_array(w.value)
                assert wa is not None
                n_out = wa.shape[0] if trans else wa.shape[-1]
                unit.bias = self._bias_edge(node, 2, w, int(n_out))
            return unit
        return None

    def _matmul_add_bias(self, node: ir.Node, w: Edge, config: QuantConfig) -> Edge | None:
        """The constant of an ``Add`` that is the MatMul's only consumer, as its bias.

        Stored as int32 with the MatMul's input x weight scale, ONNX Runtime folds
        ``MatMul + Add`` over 2-D inputs into QGemm (float output) instead of a float Gemm
        on dequantized operands.
        """
        out = node.outputs[0]
        uses = list(out.uses())
        if out.is_graph_output() or len(uses) != 1:
            return None
        add, index = uses[0].node, uses[0].idx
        if add.op_type != "Add" or add.domain not in _ONNX_DOMAINS or excluded(add, config):
            return None
        wa = constant_array(w.value)
        assert wa is not None
        x = node.inputs[0]
        # Only 2-D products fold into QGemm; on [batch, seq, d] inputs ORT runs
        # MatMulIntegerToFloat and fuses a float bias Add into SkipLayerNormalization or
        # BiasGelu, which an int32 bias would block (MiniLM: 8% slower).
        if wa.ndim != 2 or x is None or x.shape is None or len(x.shape) != 2:
            return None
        return self._bias_edge(add, 1 - index, w, int(wa.shape[-1]))

    @staticmethod
    def _with_weight(node: ir.Node, x: Edge, w: Edge) -> QuantUnit:
        if w.role == "activation":
            return QuantUnit(node, [x, w])
        return QuantUnit(node, [x], weight=w)

    def _residual_add(self, node: ir.Node) -> QuantUnit | None:
        if len(node.inputs) != 2:
            return None
        a, b = node.inputs
        if a is None or b is None or a is b:
            return None
        ea, eb = self._activation_edge(node, 0), self._activation_edge(node, 1)
        if ea is None or eb is None:
            return None
        if a.shape is not None and b.shape is not None and a.shape != b.shape:
            return None
        if len(list(a.uses())) < 2 and len(list(b.uses())) < 2:
            return None
        # The convolution + skip-connection pattern the target fuses; a transformer's
        # residual stream (into LayerNorm) carries outlier channels a per-tensor scale
        # cannot hold (MiniLM: embedding cosine 0.68 with it quantized).
        producers = {v.producer().op_type for v in (a, b) if v.producer() is not None}  # type: ignore[union-attr]
        if not producers & self.residual_producers:
            return None
        return QuantUnit(node, [ea, eb])
