"""Quantization annotations: what a quantizer policy decides, before any Q/DQ is inserted.

Annotate-then-insert (as in PT2E): a backend's :class:`Quantizer` looks at the graph and
says, per *edge* (a node's input), which :class:`~graphopt.quant.spec.QuantSpec` the value
arriving there should have; :class:`~graphopt.passes.quantize.insert.InsertQDQPass` then
materialises the annotations. Annotating edges rather than values keeps the other
consumers of a value in float: a LayerNorm output that feeds both a quantized MatMul and
the float residual Add is quantized for the MatMul only.

Units and groups
----------------
* A :class:`QuantUnit` is one compute node (Conv, Gemm, MatMul, a residual Add) with its
  activation edges, its weight edge and its bias edge. A unit is quantized as a whole or
  not at all: a node whose activation cannot be quantized keeps its weight in float too.
* An :class:`ActGroup` is a set of activation values that share one scale and zero point
  (``SharedQuantizationSpec``): the input and output of pass-through ops (Transpose,
  Reshape, Flatten, Squeeze, Unsqueeze, Slice, Split, MaxPool, Identity), every input and
  the output of a Concat, both inputs of a shared residual Add. Pass-through chains are
  followed backwards from a quantized input only while every use of the chain's values is
  itself quantized in the group, so no float consumer sees quantized values. The group's
  range is the union of its values' ranges; DQ -> pass-through -> Q with equal parameters
  is then exact and lets the runtime run the op on integers.

Calibration decides the rest (:func:`finalize_plan`): a group whose exact calibrated range
is huge or degenerate (an attention-mask fill of -3.4e38, any value beyond
``huge_factor`` x the typical range) is dropped with its reason, and every unit that needs
it stays in float.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from graphopt.quant.qparams import QParams, compute_qparams
from graphopt.quant.spec import QuantSpec

logger = logging.getLogger(__name__)

Role = Literal["activation", "weight", "bias"]

#: Ops whose output holds exactly (a subset of) the values of their data input.
PASS_THROUGH_OPS = frozenset(
    {"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Slice", "Split",
     "MaxPool", "Concat"}
)
#: |value| beyond this is a dtype-minimum fill (mask paths), never a real activation.
FILL_MAGNITUDE = 1e30


@dataclass(frozen=True)
class QuantConfig:
    """Policy-independent choices the user makes (``ptq`` options).

    Attributes:
        per_channel: Per-output-channel weight scales (per-tensor when False).
        reduce_range: 7-bit weight codes (see :mod:`graphopt.quant.dtypes`); None lets
            the policy decide.
        exclude: Node names or op types that stay in float.
        act_matmul: Also quantize activation x activation MatMuls (attention Q.K^T, P.V).
        huge_factor: A value whose exact calibrated magnitude exceeds this many times the
            typical (median) magnitude of the candidates is not quantized.
    """

    per_channel: bool = True
    reduce_range: bool | None = None
    exclude: tuple[str, ...] = ()
    act_matmul: bool = False
    huge_factor: float = 1e4


@dataclass(eq=False)
class Edge:
    """One quantized input of a node.

    Attributes:
        node: The consumer.
        index: The input index.
        role: ``activation`` (calibrated, Q/DQ inserted), ``weight`` (constant, stored as
            integers), ``bias`` (constant, int32 with scale input x weight).
        spec: How it is quantized (weights carry their channel axis).
        group: The activation group id (activations only).
    """

    node: ir.Node
    index: int
    role: Role
    spec: QuantSpec
    group: int | None = None

    @property
    def value(self) -> ir.Value:
        v = self.node.inputs[self.index]
        assert v is not None
        return v


@dataclass(eq=False)
class QuantUnit:
    """A compute node quantized as a whole.

    Attributes:
        node: The node.
        activations: Its activation edges.
        weight: Its constant weight edge, if any.
        bias: Its bias edge, if any (needs ``activations[0]`` and ``weight``).
        live: False once the unit was dropped (it stays in float).
    """

    node: ir.Node
    activations: list[Edge]
    weight: Edge | None = None
    bias: Edge | None = None
    live: bool = True

    def edges(self) -> list[Edge]:
        out = list(self.activations)
        if self.weight is not None:
            out.append(self.weight)
        if self.bias is not None:
            out.append(self.bias)
        return out


@dataclass(eq=False)
class ActGroup:
    """Activation values sharing one scale and zero point.

    Attributes:
        id: Its id.
        spec: The shared spec.
        edges: Activation edges of units (the reason the group exists).
        passthrough: Edges added to share parameters across pass-through ops / Concat.
        qparams: Set by :func:`finalize_plan`.
        range: The union range used, set by :func:`finalize_plan`.
    """

    id: int
    spec: QuantSpec
    edges: list[Edge] = field(default_factory=list)
    passthrough: list[Edge] = field(default_factory=list)
    qparams: QParams | None = None
    range: tuple[float, float] | None = None

    def values(self) -> list[ir.Value]:
        seen: dict[int, ir.Value] = {}
        for e in (*self.edges, *self.passthrough):
            seen.setdefault(id(e.value), e.value)
        return list(seen.values())

    def value_names(self) -> list[str]:
        return [v.name or "" for v in self.values()]


@dataclass(frozen=True)
class Skip:
    """Something left in float, and why.

    Attributes:
        what: A value or node name.
        reason: One line (``mask path: range [-3.4e+38, 0]``).
        category: A short key for counting (``mask-path``, ``act-x-act``, ``excluded``...).
    """

    what: str
    reason: str
    category: str


@dataclass(eq=False)
class QuantPlan:
    """Everything :class:`~graphopt.passes.quantize.insert.InsertQDQPass` needs.

    Attributes:
        target: The backend the plan was made for.
        units: Compute nodes to quantize.
        groups: Activation groups by id.
        skipped: What stays in float and why.
        calibration: The analysis whose result gave the ranges (cached by the manager).
        shared: Sets of activation edges that must share one group.
        gathers: Embedding tables (``Gather`` data inputs) stored as int8 and gathered
            before dequantization (weight-only; no calibration needed).
    """

    target: str
    units: list[QuantUnit] = field(default_factory=list)
    groups: dict[int, ActGroup] = field(default_factory=dict)
    skipped: list[Skip] = field(default_factory=list)
    calibration: Any = None
    shared: list[list[Edge]] = field(default_factory=list)
    gathers: list[Edge] = field(default_factory=list)

    def live_units(self) -> list[QuantUnit]:
        return [u for u in self.units if u.live]

    def activation_values(self) -> list[str]:
        """Names of every value a group needs calibrated, in a stable order."""
        names: dict[str, None] = {}
        for g in self.groups.values():
            for n in g.value_names():
                names[n] = None
        return list(names)

    def drop_unit(self, unit: QuantUnit, reason: str, category: str) -> None:
        if unit.live:
            unit.live = False
            self.skipped.append(Skip(node_label(unit.node), reason, category))

    def summary(self) -> dict[str, Any]:
        """Counts for pass statistics."""
        by_category: dict[str, int] = {}
        for s in self.skipped:
            by_category[s.category] = by_category.get(s.category, 0) + 1
        live = self.live_units()
        out: dict[str, Any] = {
            "nodes_quantized": len(live),
            "nodes_by_op": _count(u.node.op_type for u in live),
            "skipped": by_category,
        }
        return out


def _count(items: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in items:
        out[i] = out.get(i, 0) + 1
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------- helpers


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant array: an initializer that is not a graph input, or the output
    of a ``Constant`` node with a tensor ``value``; None otherwise."""
    if value is None:
        return None
    if value.is_graph_input():
        return None
    if value.is_initializer() and value.const_value is not None:
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


def is_float(value: ir.Value | None) -> bool:
    """Whether the value is float32 (the only type quantized)."""
    return value is not None and value.dtype == ir.DataType.FLOAT


def excluded(node: ir.Node, config: QuantConfig) -> bool:
    """Whether the user excluded the node by name or op type."""
    return bool(config.exclude) and (node.name in config.exclude or node.op_type in config.exclude)


def node_label(node: ir.Node) -> str:
    return node.name or f"<{node.op_type}>"


# --------------------------------------------------------------------------- groups


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, a: int) -> int:
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def build_groups(plan: QuantPlan, config: QuantConfig, extend: bool = True) -> None:
    """Groups the live units' activation edges and extends them through pass-through ops.

    Edges in one of ``plan.shared``'s sets (e.g. both inputs of a residual Add) share a
    group. Existing groups are discarded.

    Args:
        plan: The plan.
        config: For exclusions.
        extend: Follow pass-through ops backwards.
    """
    live_nodes = {id(u.node) for u in plan.units if u.live}
    edges: list[Edge] = [e for u in plan.units if u.live for e in u.activations]
    for e in edges:
        e.group = None
    shared = [
        [e for e in edge_set if id(e.node) in live_nodes] for edge_set in plan.shared
    ]
    # One group per (value, spec) to start with.
    key_of: dict[tuple[int, QuantSpec], int] = {}
    uf = _UnionFind()
    members: dict[int, list[Edge]] = {}
    specs: dict[int, QuantSpec] = {}
    passthrough: dict[int, list[Edge]] = {}

    def group_for(value: ir.Value, spec: QuantSpec) -> int:
        key = (id(value), spec)
        if key not in key_of:
            gid = len(key_of)
            key_of[key] = gid
            specs[gid] = spec
            uf.find(gid)
        return key_of[key]

    for e in edges:
        gid = group_for(e.value, e.spec)
        members.setdefault(gid, []).append(e)
    for edge_set in shared:
        if len(edge_set) < 2:
            continue
        ids = [group_for(e.value, e.spec) for e in edge_set]
        for other in ids[1:]:
            if specs[other] == specs[ids[0]]:
                uf.union(ids[0], other)

    if extend:
        # Uses of a value that are annotated, by spec.
        annotated: dict[tuple[int, QuantSpec], set[tuple[int, int]]] = {}
        for e in edges:
            annotated.setdefault((id(e.value), e.spec), set()).add((id(e.node), e.index))
        work = list(key_of.items())
        seen_values: set[tuple[int, QuantSpec]] = set()
        values_by_id: dict[int, ir.Value] = {id(e.value): e.value for e in edges}
        while work:
            (vid, spec), gid = work.pop()
            if (vid, spec) in seen_values:
                continue
            seen_values.add((vid, spec))
            value = values_by_id[vid]
            producer = value.producer()
            if producer is None or value.is_graph_output():
                continue
            if producer.op_type not in PASS_THROUGH_OPS or producer.domain not in ("", "ai.onnx"):
                continue
            if excluded(producer, config):
                continue
            # Every use of every output must be annotated with this spec.
            ok = True
            for out in producer.outputs:
                if out.is_graph_output():
                    ok = False
                    break
                uses = {(id(u.node), u.idx) for u in out.uses()}
                if not uses or not uses <= annotated.get((id(out), spec), set()):
                    ok = False
                    break
            if not ok:
                continue
            data_inputs = (
                list(range(len(producer.inputs))) if producer.op_type == "Concat" else [0]
            )
            new_edges = []
            for i in data_inputs:
                x = producer.inputs[i]
                if x is None or not is_float(x) or constant_array(x) is not None:
                    ok = False
                    break
                new_edges.append(Edge(producer, i, "activation", spec))
            if not ok:
                continue
            for ne in new_edges:
                x = ne.value
                values_by_id[id(x)] = x
                xgid = group_for(x, spec)
                uf.union(gid, xgid)
                passthrough.setdefault(xgid, []).append(ne)
                annotated.setdefault((id(x), spec), set()).add((id(producer), ne.index))
                for out in producer.outputs:
                    uf.union(gid, group_for(out, spec))
                work.append(((id(x), spec), xgid))
                # A value reached again through another path is re-examined.
                seen_values.discard((id(x), spec))

    plan.groups.clear()
    for gid in list(specs):
        root = uf.find(gid)
        group = plan.groups.get(root)
        if group is None:
            group = plan.groups[root] = ActGroup(root, specs[root])
        for e in members.get(gid, []):
            e.group = root
            group.edges.append(e)
        for e in passthrough.get(gid, []):
            e.group = root
            group.passthrough.append(e)
    for gid in [g for g, grp in plan.groups.items() if not grp.edges and not grp.passthrough]:
        del plan.groups[gid]


# --------------------------------------------------------------------------- finalize


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def finalize_plan(plan: QuantPlan, stats: Any, config: QuantConfig) -> None:
    """Drops groups whose calibrated range is unusable, then computes each live group's
    scale and zero point from the union of its values' ranges.

    A value is unusable when its exact calibrated extreme is a fill (``|x| > 1e30``, e.g.
    the attention mask's -3.4e38), or when some of its entries lie ``huge_factor`` times
    or more above its bulk with nothing in between (a -1e9 mask fill, whatever fraction
    of positions it holds; :meth:`ActivationStats.outlier_gap`). Quantizing either would
    round every real value to zero. Every unit that reads a dropped group stays in float,
    with the reason recorded.

    Args:
        plan: A plan with groups (:func:`build_groups`).
        stats: :class:`~graphopt.analysis.calibration.ActivationStats` over
            ``plan.activation_values()``.
        config: For ``huge_factor``.
    """
    min_gap = max(1, math.floor(math.log2(config.huge_factor)))
    has_octaves = bool(getattr(stats, "octaves", None))
    magnitudes: dict[str, float] = {}
    for name in plan.activation_values():
        lo, hi = stats.extremes(name)
        magnitudes[name] = max(abs(lo), abs(hi))
    finite = [m for m in magnitudes.values() if FILL_MAGNITUDE >= m > 0]
    typical = float(np.median(finite)) if finite else 1.0
    dead_groups: dict[int, str] = {}
    for gid, group in plan.groups.items():
        for name in group.value_names():
            m = magnitudes[name]
            lo, hi = stats.extremes(name)
            reason = None
            if m > FILL_MAGNITUDE:
                reason, kind = f"mask path: '{name}' range [{_fmt(lo)}, {_fmt(hi)}]", "mask-path"
            elif has_octaves:
                gap = stats.outlier_gap(name, min_gap)
                if gap is not None:
                    reason = (
                        f"huge range: '{name}' range [{_fmt(lo)}, {_fmt(hi)}] has values "
                        f">= {_fmt(gap[1])} far above its bulk (|x| <= {_fmt(gap[0])})"
                    )
                    kind = "huge-range"
            elif m > config.huge_factor * typical:
                reason = (
                    f"huge range: '{name}' range [{_fmt(lo)}, {_fmt(hi)}] "
                    f"(typical |x| {_fmt(typical)})"
                )
                kind = "huge-range"
            if reason is not None:
                dead_groups[gid] = reason
                plan.skipped.append(Skip(name, reason, kind))
                break
    for unit in plan.units:
        for e in unit.activations:
            if e.group in dead_groups:
                plan.drop_unit(
                    unit,
                    f"{node_label(unit.node)}: input {dead_groups[e.group]}",
                    "needs-unquantizable-input",
                )
                break
    # Regroup without the dropped units: pass-through chains that served them only are
    # no longer followed (their float consumers must not see quantized values).
    build_groups(plan, config)
    compute_group_qparams(plan, stats)


def compute_group_qparams(plan: QuantPlan, stats: Any) -> None:
    """Sets each group's range (the union of its values' ranges) and parameters."""
    for group in plan.groups.values():
        lo = math.inf
        hi = -math.inf
        for name in group.value_names():
            rlo, rhi = stats.range(name)
            lo = min(lo, float(np.min(rlo)))
            hi = max(hi, float(np.max(rhi)))
        group.range = (lo, hi)
        group.qparams = compute_qparams(
            lo, hi, group.spec, value_name=",".join(group.value_names()[:3])
        )

