"""Conv channel dependency groups: :class:`ConvChannelGroupsAnalysis`.

Removing output channel *c* of a convolution touches every tensor coupled to it: the
conv's weight row and bias entry, the following BatchNormalization's parameters, per-channel
constants of elementwise ops, the input-channel slice of every consuming convolution, the
rows of a Gemm/MatMul after a Flatten (one block of ``H*W`` rows per channel), the channels
of every other producer summed with it in a residual ``Add``, the matching channels after a
``Concat`` (shifted by the offset of its input) and, through depthwise and grouped
convolutions, their output channels and ``group`` attribute.

The analysis walks the main graph once in topological order and gives every value whose
axis 1 carries conv channels a *layout*: one unit id per position along axis 1. Each output
channel of a prunable Conv (``group=1``, constant weight and bias) is a fresh unit; ops
that keep channels pass layouts on (Relu, Clip, pooling, Resize by spatial scales, Pad
without channel padding, BatchNormalization, elementwise ops with constants), ``Concat``
concatenates them, ``Flatten`` (or a flattening ``Reshape``) repeats each unit ``H*W``
times, residual ``Add``/``Sum``/``Mul`` couple the units at each position, and grouped
convolutions couple the units of each group. The couplings are edges of a networkx graph
over units; a connected component of units is removed together, or not at all.

ONNX Runtime's ``com.microsoft`` FusedConv (with its summand ``Z`` coupled like a residual
``Add``) and FusedGemm are modelled like Conv and Gemm, so pruning also works after
``fuse``.

A component is *blocked*, with a reason, when one of its units reaches a graph output, a
Shape or an op the analysis does not model (Transpose, Split, ConvTranspose, custom
domains...), a Reshape whose constant is not a flatten of the channel axis, a Resize with
``sizes``, a non-constant weight or normalization parameter, or a subgraph; positions that
no prunable conv produces (a graph input in a Concat) are blocked too.

A :class:`ChannelGroup` is a connected set of convs whose channels are coupled (one conv,
or every conv feeding one residual stream); pruning ratios and "never prune to zero" apply
per group.

The analysis reads the model only; :mod:`graphopt.passes.pruning.channels` removes the
chosen components through the :class:`TensorSlice` / :class:`GroupAttr` /
:class:`ShapeRewrite` records.

Example::

    groups = am.get(ConvChannelGroupsAnalysis(), model)
    for g in groups.groups:
        print(g.sources, len(g.components), g.skip_reason)
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
import onnx
import onnx_ir as ir

from graphopt.infra.analysis import Analysis, AnalysisManager, Aspect
from graphopt.infra.context import PassContext

logger = logging.getLogger(__name__)

IntArray = np.ndarray[Any, np.dtype[np.int64]]

#: Ops that keep every position of axis 1 where it was (input 0 to every output).
_PASSTHROUGH = frozenset(
    {
        "Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu",
        "Selu", "Celu", "Softplus", "Softsign", "ThresholdedRelu", "Gelu", "Mish", "Erf",
        "Identity", "Dropout", "Clip", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal",
        "Floor", "Ceil", "Round", "Sign", "Cast", "MaxPool", "AveragePool", "LpPool",
        "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool",
    }
)  # fmt: skip
#: Elementwise ops with broadcasting: layouts of activation inputs are coupled.
_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Sum", "Max", "Min", "Mean", "Pow"})
_REDUCE = frozenset({"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL2", "ReduceL1"})
#: ONNX Runtime's fused ops (``com.microsoft``) with Conv's / Gemm's inputs and weights.
_FUSED = frozenset({"FusedConv", "FusedGemm"})
_NORM_PARAMS = {"BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2)}


# ----------------------------------------------------------------------------- records


@dataclass(eq=False)
class TensorSlice:
    """A constant whose indices along ``axis`` belong to channel units.

    Attributes:
        node: The node that reads the constant.
        input_index: Which input of ``node`` it is.
        axis: The axis whose indices are owned.
        owners: Unit id of every index along ``axis``.
        role: ``producer`` (a conv's output rows and bias), ``consumer`` (a conv's input
            channels, a Gemm/MatMul's input rows), ``norm`` (BatchNormalization) or
            ``elementwise`` (a per-channel constant of an elementwise op).
    """

    node: ir.Node
    input_index: int
    axis: int
    owners: IntArray
    role: str

    @property
    def value(self) -> ir.Value:
        """The constant (an initializer)."""
        value = self.node.inputs[self.input_index]
        assert value is not None
        return value

    @property
    def activation(self) -> ir.Value | None:
        """For a consumer: the activation whose channels the slice multiplies."""
        return self.node.inputs[0] if self.role == "consumer" else None


@dataclass(eq=False)
class GroupAttr:
    """A grouped or depthwise conv whose ``group`` follows its kept input channels.

    Attributes:
        node: The Conv.
        in_owners: Layout of its input.
        per_group: Input channels per group (``C_in / group``), unchanged by pruning.
    """

    node: ir.Node
    in_owners: IntArray
    per_group: int


@dataclass(eq=False)
class ShapeRewrite:
    """A Reshape constant whose entry ``index`` counts flattened channel positions.

    Attributes:
        node: The Reshape.
        index: Position in the shape constant.
        owners: Layout of the Reshape's output axis 1.
    """

    node: ir.Node
    index: int
    owners: IntArray


@dataclass
class ChannelGroup:
    """Convs whose output channels are coupled, and what may be removed from them.

    Attributes:
        id: Index in :attr:`ConvGroups.groups`.
        sources: Names of the convs (and pinned inputs) producing the group's channels.
        components: Units that go together; each is removed whole or kept.
        blocked: For each blocked component (by index), why it cannot be removed.
    """

    id: int
    sources: list[str]
    components: list[tuple[int, ...]]
    blocked: dict[int, str] = field(default_factory=dict)

    @property
    def free(self) -> list[int]:
        """Indices of the components that may be removed."""
        return [i for i in range(len(self.components)) if i not in self.blocked]

    @property
    def skip_reason(self) -> str | None:
        """Why nothing in the group can be pruned, or None."""
        if self.free:
            return None
        reasons = sorted(set(self.blocked.values()))
        return "; ".join(reasons[:3]) + (f" (+{len(reasons) - 3} more)" if len(reasons) > 3 else "")


@dataclass
class ConvGroups:
    """What :class:`ConvChannelGroupsAnalysis` returns.

    Attributes:
        groups: The channel groups, in graph order of their first conv.
        layouts: Unit ids along axis 1 of every value carrying conv channels.
        slices: Every constant slice owned by units.
        group_attrs: Grouped/depthwise convs to update.
        shape_rewrites: Reshape constants to update.
        unit_source: Name of the conv producing each unit.
        unit_channel: Output channel of that conv for each unit.
        shapes: Static shapes known for the model's values (batch dims as None).
    """

    groups: list[ChannelGroup]
    layouts: dict[ir.Value, IntArray]
    slices: list[TensorSlice]
    group_attrs: list[GroupAttr]
    shape_rewrites: list[ShapeRewrite]
    unit_source: list[str]
    unit_channel: list[int]
    shapes: dict[str, tuple[int | None, ...]]

    def component_of_units(self) -> dict[int, tuple[int, int]]:
        """``unit -> (group id, component index)``."""
        out: dict[int, tuple[int, int]] = {}
        for g in self.groups:
            for ci, comp in enumerate(g.components):
                for u in comp:
                    out[u] = (g.id, ci)
        return out

    def summary(self) -> dict[str, Any]:
        """Counts and skip reasons, for reports."""
        skipped = [g for g in self.groups if g.skip_reason]
        return {
            "groups": len(self.groups),
            "groups_prunable": len(self.groups) - len(skipped),
            "skipped": {", ".join(g.sources[:3]): g.skip_reason for g in skipped},
        }


# ----------------------------------------------------------------------------- helpers


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's array when it is a true constant (an initializer that is not a graph
    input, or a ``Constant`` node's tensor); None otherwise."""
    if value is None:
        return None
    if value.is_initializer() and not value.is_graph_input() and value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if (
        producer is not None
        and producer.op_type == "Constant"
        and producer.domain in ("", "ai.onnx")
        and "value" in producer.attributes
    ):
        return producer.attributes["value"].as_tensor().numpy()
    return None


def _is_initializer_constant(value: ir.Value | None) -> bool:
    return (
        value is not None
        and value.is_initializer()
        and not value.is_graph_input()
        and value.const_value is not None
    )


def _without_large_constants(proto: onnx.ModelProto, limit: int = 4096) -> onnx.ModelProto:
    """The proto with every initializer over ``limit`` elements turned into a typed graph
    input: shape inference then reads shapes without copying weights."""
    graph = proto.graph
    large = [t for t in graph.initializer if math.prod(t.dims) > limit]
    if not large:
        return proto
    inputs = {i.name for i in graph.input}
    for t in large:
        if t.name not in inputs:
            graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        graph.initializer.remove(t)
    return proto


def static_shapes(model: ir.Model) -> dict[str, tuple[int | None, ...]]:
    """Shapes of the main graph's values (ONNX shape inference on a copy; None for
    symbolic dims). Best effort: values inference cannot type are absent."""
    out: dict[str, tuple[int | None, ...]] = {}

    def put(name: str | None, dims: Sequence[Any]) -> None:
        if name:
            out[name] = tuple(int(d) if isinstance(d, int) else None for d in dims)

    for v in (*model.graph.inputs, *model.graph.initializers.values()):
        if v.shape is not None:
            put(v.name, list(v.shape))
    try:
        proto = _without_large_constants(ir.serde.serialize_model(model))
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    except Exception as e:  # noqa: BLE001 - inference is a best effort
        logger.debug("shape inference failed: %s", e)
        inferred = None
    if inferred is not None:
        for vi in (*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input):
            t = vi.type.tensor_type
            if t.HasField("shape"):
                put(vi.name, [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim])
    for node in model.graph:
        for v in node.outputs:
            if v.name and v.name not in out and v.shape is not None:
                put(v.name, [d if isinstance(d, int) else None for d in v.shape])
    return out


def _attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return int(attr.value) if attr is not None else default


def _attr_ints(node: ir.Node, name: str) -> list[int] | None:
    attr = node.attributes.get(name)
    return [int(v) for v in attr.value] if attr is not None else None


def _label(node: ir.Node) -> str:
    return f"{node.op_type} '{node.name or '?'}'"


# ----------------------------------------------------------------------------- builder


class _Builder:
    """Forward layout propagation over the main graph."""

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.graph = model.graph
        self.shapes = static_shapes(model)
        self.layouts: dict[ir.Value, IntArray] = {}
        self.slices: list[TensorSlice] = []
        self.group_attrs: list[GroupAttr] = []
        self.shape_rewrites: list[ShapeRewrite] = []
        self.unit_source: list[str] = []
        self.unit_channel: list[int] = []
        self.units = nx.Graph()

    # -- units -------------------------------------------------------------------------
    def new_units(self, source: str, count: int) -> IntArray:
        start = len(self.unit_source)
        self.unit_source.extend([source] * count)
        self.unit_channel.extend(range(count))
        ids = np.arange(start, start + count, dtype=np.int64)
        self.units.add_nodes_from(ids.tolist())
        return ids

    def block(self, owners: IntArray | None, reason: str) -> None:
        if owners is None or len(owners) == 0:
            return
        key = ("block", reason)
        self.units.add_edges_from((int(u), key) for u in np.unique(owners))

    def join(self, a: IntArray, b: IntArray) -> None:
        self.units.add_edges_from(
            (int(x), int(y)) for x, y in zip(a.tolist(), b.tolist(), strict=True) if x != y
        )

    def rank(self, value: ir.Value | None) -> int | None:
        if value is None:
            return None
        shape = self.shapes.get(value.name or "")
        return len(shape) if shape is not None else None

    def shape(self, value: ir.Value | None) -> tuple[int | None, ...] | None:
        return None if value is None else self.shapes.get(value.name or "")

    def add_slice(self, node: ir.Node, index: int, axis: int, owners: IntArray, role: str) -> bool:
        """Records a constant slice; blocks ``owners`` and returns False when the input is
        not an initializer constant of the right size."""
        value = node.inputs[index]
        if not _is_initializer_constant(value):
            self.block(owners, f"{_label(node)}: input {index} is not a constant initializer")
            return False
        assert value is not None and value.const_value is not None
        shape = value.const_value.shape.numpy()
        if axis >= len(shape) or shape[axis] != len(owners):
            self.block(owners, f"{_label(node)}: input {index} has shape {list(shape)}, "
                       f"expected {len(owners)} along axis {axis}")  # fmt: skip
            return False
        self.slices.append(TensorSlice(node, index, axis, owners, role))
        return True

    # -- walk --------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.graph:
            ins = [self.layouts.get(v) if v is not None else None for v in node.inputs]
            if node.domain == "com.microsoft" and node.op_type in _FUSED:
                # ORT's fused forms keep Conv/Gemm's inputs and weight layout.
                if node.op_type == "FusedConv":
                    self.conv(node, ins)
                elif any(lay is not None for lay in ins):
                    self.op_Gemm(node, ins)
                continue
            if node.domain not in ("", "ai.onnx"):
                for lay in ins:
                    self.block(lay, f"{_label(node)} of domain '{node.domain}' is not modelled")
                continue
            if node.op_type == "Conv":
                self.conv(node, ins)
                continue
            if all(lay is None for lay in ins):
                continue
            handler = getattr(self, f"op_{node.op_type}", None)
            if handler is not None:
                handler(node, ins)
            elif node.op_type in _PASSTHROUGH:
                self.passthrough(node, ins)
            elif node.op_type in _ELEMENTWISE:
                self.elementwise(node, ins)
            elif node.op_type in _REDUCE:
                self.reduce(node, ins)
            else:
                for lay in ins:
                    self.block(lay, f"consumed by {_label(node)}, which is not modelled")
        for value in self.graph.outputs:
            self.block(self.layouts.get(value), f"reaches graph output '{value.name}'")
        for value, lay in self.layouts.items():
            for user, _ in value.uses():
                if user.graph is not self.graph:
                    self.block(lay, f"used inside a subgraph by {_label(user)}")

    def only_input0(self, node: ir.Node, ins: list[IntArray | None]) -> IntArray | None:
        for i, lay in enumerate(ins[1:], start=1):
            if lay is not None:
                self.block(lay, f"{_label(node)}: channels reach input {i}")
                self.block(ins[0], f"{_label(node)}: channels reach input {i}")
                return None
        return ins[0]

    def passthrough(self, node: ir.Node, ins: list[IntArray | None]) -> None:
        lay = self.only_input0(node, ins)
        if lay is None:
            return
        slope = node.op_type == "PRelu" and len(node.inputs) > 1
        if slope and not self.per_channel_constant(node, 1, node.outputs[0], lay):
            return
        for out in node.outputs:
            self.layouts[out] = lay

    # -- convolutions ------------------------------------------------------------------
    def conv(self, node: ir.Node, ins: list[IntArray | None]) -> None:
        lx = ins[0]
        for i, lay in enumerate(ins[1:3], start=1):
            if lay is not None:
                self.block(lay, f"{_label(node)}: channels reach input {i}")
                self.block(lx, f"{_label(node)}: channels reach input {i}")
                return
        weight = node.inputs[1]
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if not _is_initializer_constant(weight) or (
            bias is not None and not _is_initializer_constant(bias)
        ):
            self.block(lx, f"{_label(node)}: weight or bias is not a constant initializer")
            return
        assert weight is not None and weight.const_value is not None
        w_shape = list(weight.const_value.shape.numpy())
        c_out, c_in_per_group = w_shape[0], w_shape[1]
        group = _attr_int(node, "group", 1)
        name = node.name or f"conv{len(self.unit_source)}"
        if group == 1:
            if lx is not None:
                if len(lx) != c_in_per_group:
                    self.block(lx, f"{_label(node)}: {len(lx)} input channels, weight has {c_in_per_group}")
                else:
                    self.add_slice(node, 1, 1, lx, "consumer")
            out = self.new_units(name, c_out)
        else:
            if lx is None:
                return  # its channels cannot be removed without its input channels
            if len(lx) != group * c_in_per_group or c_out % group:
                self.block(lx, f"{_label(node)}: group={group} does not match the weight {w_shape}")
                return
            k, m = c_in_per_group, c_out // group
            for q in range(group):
                block = lx[q * k : (q + 1) * k]
                self.join(block[:-1], block[1:])
            out = np.repeat(lx[::k], m)
            self.group_attrs.append(GroupAttr(node, lx, k))
        self.add_slice(node, 1, 0, out, "producer")
        if bias is not None:
            self.add_slice(node, 2, 0, out, "producer")
        if len(node.inputs) > 3 and node.inputs[3] is not None:  # FusedConv's summand Z
            z = ins[3]
            if z is None or len(z) != len(out):
                self.block(out, f"{_label(node)}: its summand Z is not produced by a prunable conv")
                self.block(z, f"{_label(node)}: its summand Z does not match its channels")
            else:
                self.join(out, z)
        self.layouts[node.outputs[0]] = out

    # -- per-op handlers ---------------------------------------------------------------
    def op_BatchNormalization(self, node: ir.Node, ins: list[IntArray | None]) -> None:
        self.normalization(node, ins)

    def op_InstanceNormalization(self, node: ir.Node, ins: list[IntArray | None]) -> None:
        self.normalization(node, ins)

    def normalization(self, node: ir.Node, ins: list[IntArray | None]) -> None:
        lay = self.only_input0(node, ins)
        if lay is None:
            return
        if any(out.uses() or out.is_graph_output() for out in node.outputs[1:]):
            self.block(lay, f"{_label(node)}: training-mode outputs are used")
            return
        for index in _NORM_PARAMS[node.op_type]:
            if not self.add_slice(node, index, 0, lay, "norm"):
                return
        self.layouts[node.outputs[0]] = lay

    def op_Resize(self, node: ir.Node, ins: list[IntArray | None]) -> None:
        lay = self.only_input0(node, ins)
        if lay is None:
            return
        sizes = node.inputs[3] if len(node.inputs) > 3 else None
        sizes_arr = constant_array(sizes)
        if sizes is not None and (sizes_arr is None or sizes_arr.size != 0):
            self.block(lay, f"{_label(node)} resizes to 'sizes'")
            return
        scales_index = 2 if node.op_type == "Resize" and len(node.inputs) > 2 else 1
        scales_value = node.inputs[scales_index] if len(node.inputs) > scales_index else None
        scales = constant_array(scales_value)
        if scales is None and node.op_type == "Upsample":
            scales = np.asarray(node.attributes["scales"].value) if "scales" in node.attributes else None
        if scales is None or scales.size < 2 or scales.reshape(-1)[0] != 1 or scales.reshape(-1)[1] != 1:
            self.block(lay, f"{_label(node)}: scales are unknown or scale the channel axis")
            return
        self.layouts[node.outputs[0]] = lay

    op_Upsample = op_Resize

    def op_Pad(self, node: ir.Node, ins: list[IntArray | None]) -> None:
        lay = self.only_input0(node, ins)
        if lay is None:
            return
        if len(node.inputs) > 3 and node.inputs[3] is not None:
            self.block(lay, f"{_label(node)}: 'axes' input is not modelled")
            return
        pads_arr = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
        pads = pads_arr.reshape(-1).tolist() if pads_arr is not None else _attr_ints(node, "pads")
        if pads is None or len(pads) < 4 or pads[1] != 0 or pads[1 + len(pads) // 2] != 0:
            self.block(lay, f"{_label(node)}: pads are unknown or pad the channel axis")
            return
        self.layouts[node.outputs[0]] = lay

    def reduce(self, node: ir.Node, ins: list[IntArray | None]) -> None:
        lay = self.only_input0(node, ins)
        if lay is None:
            return
        rank = self.rank(node.inputs[0])
        axes_arr = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
        axes = axes_arr.reshape(-1).tolist() if axes_arr is not None else _attr_ints(node, "axes")
        if rank is None or not axes:
            self.block(lay, f"{_label(node)}: reduced axes unknown or all axes")
            return
        axes = [a % rank for a in axes]
        if 0 in axes or 1 in axes:
            self.block(lay, f"{_label(node)} reduces the batch or channel axis")
            return
        self.layouts[node.outputs[0]] = lay

    def per_channel_constant(
        self, node: ir.Node, index: int, out: ir.Value, lay: IntArray
    ) -> bool:
        """Checks a constant operand broadcast against a channel layout; records a slice
        when it holds one value per channel. Blocks and returns False otherwise."""
        value = node.inputs[index]
        assert value is not None
        arr = constant_array(value)
        shape = arr.shape if arr is not None else self.shape(value)
        rank = self.rank(out)
        if shape is None or rank is None or any(d is None for d in shape):
            self.block(lay, f"{_label(node)}: shape of input {index} or the output is unknown")
            return False
        axis = len(shape) - rank + 1
        if axis < 0 or shape[axis] == 1:
            return True
        if shape[axis] == len(lay) and arr is not None:
            return self.add_slice(node, index, axis, lay, "elementwise")
        self.block(lay, f"{_label(node)}: input {index} of shape {list(shape)} varies along channels")
        return False

    def elementwise(self, node: ir.Node, ins: list[IntArray | None]) -> None:
        out = node.outputs[0]
        with_layout = [lay for lay in ins if lay is not None]
        first = with_layout[0]
        for lay in with_layout[1:]:
            if len(lay) != len(first):
                for other in with_layout:
                    self.block(other, f"{_label(node)}: inputs broadcast along the channel axis")
                return
            self.join(first, lay)
        rank_out = self.rank(out)
        if rank_out is None or rank_out < 2:
            for lay in with_layout:
                self.block(lay, f"{_label(node)}: output rank unknown")
            return
        for index, maybe in enumerate(ins):
            operand = maybe is None and node.inputs[index] is not None
            if operand and not self.per_channel_constant(node, index, out, first):
                return
        self.layouts[out] = first

    def op_Concat(self, node: ir.Node, ins: list[IntArray | None]) -> None:
        rank = self.rank(node.outputs[0])
        axis = _attr_int(node, "axis", 1)
        if rank is None or axis % rank != 1:
            for lay in ins:
                self.block(lay, f"{_label(node)} concatenates along an axis other than channels")
            return
        parts: list[IntArray] = []
        for index, lay in enumerate(ins):
            if lay is not None:
                parts.append(lay)
                continue
            shape = self.shape(node.inputs[index])
            if shape is None or len(shape) < 2 or shape[1] is None:
                for other in ins:
                    self.block(other, f"{_label(node)}: channel count of input {index} unknown")
                return
            value = node.inputs[index]
            pinned = self.new_units(f"pinned:{value.name if value else index}", int(shape[1]))
            self.block(pinned, f"{_label(node)}: input {index} is not produced by a prunable conv")
            parts.append(pinned)
        self.layouts[node.outputs[0]] = np.concatenate(parts)

    def flattened(self, node: ir.Node, lay: IntArray) -> IntArray | None:
        shape = self.shape(node.inputs[0])
        if shape is None or len(shape) < 2 or any(d is None for d in shape[2:]):
            self.block(lay, f"{_label(node)}: spatial size of its input is unknown")
            return None
        block = math.prod(int(d) for d in shape[2:] if d is not None)
        return np.repeat(lay, block)

    def op_Flatten(self, node: ir.Node, ins: list[IntArray | None]) -> None:
        lay = self.only_input0(node, ins)
        if lay is None:
            return
        rank = self.rank(node.inputs[0])
        if rank is None or _attr_int(node, "axis", 1) % rank != 1:
            self.block(lay, f"{_label(node)} does not flatten from the channel axis")
            return
        out = self.flattened(node, lay)
        if out is not None:
            self.layouts[node.outputs[0]] = out

    def op_Reshape(self, node: ir.Node, ins: list[IntArray | None]) -> None:
        lay = self.only_input0(node, ins)
        if lay is None:
            return
        target = constant_array(node.inputs[1])
        shape_in = self.shape(node.inputs[0])
        reason = f"{_label(node)}: target shape is not a flatten of the channel axis"
        if target is None or target.ndim != 1 or len(target) != 2 or shape_in is None:
            self.block(lay, reason)
            return
        a, b = (int(v) for v in target)
        per_channel = math.prod(int(d) for d in shape_in[1:] if d is not None)
        if any(d is None for d in shape_in[1:]):
            self.block(lay, reason)
            return
        batch = shape_in[0]
        first_ok = a == 0 or (batch is not None and a == batch) or (a == -1 and b != -1)
        if not first_ok or b not in (-1, per_channel):
            self.block(lay, reason)
            return
        out = self.flattened(node, lay)
        if out is None:
            return
        if b != -1:
            if not _is_initializer_constant(node.inputs[1]):
                self.block(lay, f"{_label(node)}: shape is not a constant initializer")
                return
            self.shape_rewrites.append(ShapeRewrite(node, 1, out))
        self.layouts[node.outputs[0]] = out

    def op_Gemm(self, node: ir.Node, ins: list[IntArray | None]) -> None:
        lay = self.only_input0(node, ins)
        if lay is None:
            return
        if _attr_int(node, "transA", 0):
            self.block(lay, f"{_label(node)}: transA=1 is not modelled")
            return
        axis = 1 if _attr_int(node, "transB", 0) else 0
        self.add_slice(node, 1, axis, lay, "consumer")

    def op_MatMul(self, node: ir.Node, ins: list[IntArray | None]) -> None:
        lay = self.only_input0(node, ins)
        if lay is None:
            return
        weight = constant_array(node.inputs[1])
        if self.rank(node.inputs[0]) != 2 or weight is None or weight.ndim != 2:
            self.block(lay, f"{_label(node)}: only 2-D input times a constant matrix is modelled")
            return
        self.add_slice(node, 1, 0, lay, "consumer")

    # -- result ------------------------------------------------------------------------
    def result(self) -> ConvGroups:
        comp_of: dict[int, int] = {}
        components: list[tuple[int, ...]] = []
        reasons: dict[int, str] = {}
        for nodes in nx.connected_components(self.units):
            units = tuple(sorted(n for n in nodes if isinstance(n, int)))
            if not units:
                continue
            index = len(components)
            components.append(units)
            blocks = sorted(n[1] for n in nodes if isinstance(n, tuple))
            if blocks:
                reasons[index] = blocks[0]
            for u in units:
                comp_of[u] = index
        sources = nx.Graph()
        for u, src in enumerate(self.unit_source):
            sources.add_node(src)
        for comp in components:
            names = sorted({self.unit_source[u] for u in comp})
            sources.add_edges_from(itertools.pairwise(names))
        order = {name: i for i, name in enumerate(dict.fromkeys(self.unit_source))}
        groups: list[ChannelGroup] = []
        for names in sorted(nx.connected_components(sources), key=lambda s: min(order[n] for n in s)):
            member = sorted(names, key=order.__getitem__)
            comp_ids = sorted(
                {comp_of[u] for u, src in enumerate(self.unit_source) if src in names},
                key=lambda c: components[c][0],
            )
            group = ChannelGroup(len(groups), member, [components[c] for c in comp_ids])
            group.blocked = {i: reasons[c] for i, c in enumerate(comp_ids) if c in reasons}
            groups.append(group)
        return ConvGroups(
            groups=groups,
            layouts=self.layouts,
            slices=self.slices,
            group_attrs=self.group_attrs,
            shape_rewrites=self.shape_rewrites,
            unit_source=self.unit_source,
            unit_channel=self.unit_channel,
            shapes=self.shapes,
        )


def conv_channel_groups(model: ir.Model) -> ConvGroups:
    """Computes the channel dependency groups of ``model``'s main graph (read only)."""
    builder = _Builder(model)
    builder.run()
    result = builder.result()
    logger.debug("conv channel groups: %s", result.summary())
    return result


class ConvChannelGroupsAnalysis(Analysis[ConvGroups]):
    """Channel dependency groups of convolutions (see the module docstring)."""

    name = "conv-channel-groups"
    depends_on = Aspect.STRUCTURE | Aspect.WEIGHTS | Aspect.SHAPES

    def run(self, model: ir.Model, am: AnalysisManager, ctx: PassContext) -> ConvGroups:
        return conv_channel_groups(model)
