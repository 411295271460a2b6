"""Attention and FFN blocks of transformer graphs, found over the IR with networkx.

A *projection* is a ``MatMul(x, W)`` with a constant 2-D weight ``W`` ``[K, N]``, optionally
followed by ``Add(·, b)`` with a constant bias ``[N]``. From there:

* **Attention block**: each ``Softmax`` whose input comes from a ``MatMul`` of two
  activations (the scores) is traced back to the query and key projections, forward to
  the ``probs @ V`` product (and back from it to the value projection), and forward to the
  output projection. Head size comes from the static shape of the scores' query operand
  (``[..., heads, seq, head_dim]``) or from the ``Reshape`` right after the query
  projection; head counts are the projections' widths over it. Grouped KV heads (GQA)
  follow: ``kv_heads = N_k / head_dim``, ``group = heads / kv_heads``.
* **FFN block**: a projection (``down``) whose input is computed from one or two
  projections (``up`` and, for gated MLPs such as SwiGLU, ``gate``) that read the same
  value, only through element-wise operations (GELU, ``silu(gate) * up``, ReLU, ...).

The *region* of a block is every node on a path from its input projections to its
output projection (``networkx`` descendants ∩ ancestors). A block is only reported when
its region is closed (no value escapes it other than into the output projection), so a
pass can slice heads or neurons out of it without touching anything else. What does not
qualify is listed in :attr:`TransformerStructure.skipped` with a reason; fused
``Attention``/``GroupQueryAttention``/``MultiHeadAttention`` nodes are reported as
``skipped: fused``.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import onnx_ir as ir

from graphopt.infra.analysis import Analysis, AnalysisManager, Aspect
from graphopt.infra.context import PassContext

logger = logging.getLogger(__name__)

#: Fused attention ops this analysis does not open up.
FUSED_ATTENTION = frozenset(
    {"Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention"}
)

#: Ops allowed inside an FFN region (element-wise along the intermediate axis).
ELEMENTWISE = frozenset(
    {
        "Gelu", "FastGelu", "Relu", "Sigmoid", "Tanh", "Erf", "Mul", "Add", "Sub", "Div",
        "Pow", "Sqrt", "Neg", "Abs", "Exp", "Softplus", "HardSigmoid", "HardSwish",
        "LeakyRelu", "Elu", "Selu", "Celu", "Mish", "Cast", "Identity", "QuickGelu",
        "BiasGelu", "Clip", "Min", "Max",
    }
)

#: Ops allowed inside an attention region (they keep heads on their own axis).
ATTENTION_OPS = frozenset(
    {
        "Reshape", "Transpose", "MatMul", "Mul", "Add", "Sub", "Div", "Softmax", "Where",
        "IsNaN", "Slice", "Concat", "Neg", "Expand", "Unsqueeze", "Squeeze", "Cast", "Shape",
        "Sqrt", "Identity", "Dropout", "Split", "Gather", "Equal", "Not", "And", "Or",
        "Max", "Min", "Reciprocal", "Tile", "Range", "ConstantOfShape", "Exp", "Sigmoid",
    }
)

#: How far (in nodes) the tracers walk from a Softmax before giving up.
MAX_WALK = 64


@dataclass(eq=False)
class Projection:
    """A ``MatMul`` with a constant weight, plus its bias ``Add`` when there is one.

    Attributes:
        matmul: The ``MatMul`` node.
        weight: The constant weight value ``[K, N]``.
        bias: The constant bias value ``[N]`` or None.
        add: The bias ``Add`` node or None.
    """

    matmul: ir.Node
    weight: ir.Value
    bias: ir.Value | None = None
    add: ir.Node | None = None

    @property
    def input(self) -> ir.Value:
        """The activation input ``x``."""
        value = self.matmul.inputs[0]
        assert value is not None
        return value

    @property
    def output(self) -> ir.Value:
        """The projection's result (after the bias when there is one)."""
        node = self.add if self.add is not None else self.matmul
        return node.outputs[0]

    @property
    def shape(self) -> tuple[int, int]:
        """``(K, N)`` of the weight."""
        tensor = self.weight.const_value
        assert tensor is not None
        k, n = (int(d) for d in tensor.shape.numpy())
        return k, n

    @property
    def name(self) -> str:
        """The weight's name (stable across exports), for reports."""
        return self.weight.name or self.matmul.name or "?"

    @property
    def nodes(self) -> tuple[ir.Node, ...]:
        """The MatMul and, when present, the bias Add."""
        return (self.matmul,) if self.add is None else (self.matmul, self.add)


@dataclass(eq=False)
class AttentionBlock:
    """One self-attention block.

    Attributes:
        index: Position among the model's attention blocks (graph order).
        q: Query projection. k, v, o: key, value and output projections.
        num_heads: Query heads.
        num_kv_heads: Key/value heads (``num_heads`` unless grouped).
        head_dim: Size of each head.
        region: Nodes between the input projections and the output projection.
    """

    index: int
    q: Projection
    k: Projection
    v: Projection
    o: Projection
    num_heads: int
    num_kv_heads: int
    head_dim: int
    region: list[ir.Node] = field(default_factory=list)

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @property
    def name(self) -> str:
        """``attention[i]`` with the query weight's name."""
        return f"attention[{self.index}] ({self.q.name})"


@dataclass(eq=False)
class FFNBlock:
    """One feed-forward block ``down(act(up(x)) [* gate(x)])``.

    Attributes:
        index: Position among the model's FFN blocks (graph order).
        up: The up projection (the one not passed through the gate's activation).
        down: The down projection.
        gate: The gate projection of a gated MLP, or None.
        region: Element-wise nodes between ``up``/``gate`` and ``down``.
        activation: The first non-trivial activation op in the region (``Gelu``,
            ``Sigmoid``...), for reports.
    """

    index: int
    up: Projection
    down: Projection
    gate: Projection | None = None
    region: list[ir.Node] = field(default_factory=list)
    activation: str = ""

    @property
    def intermediate(self) -> int:
        """The intermediate width (neurons)."""
        return self.up.shape[1]

    @property
    def inputs(self) -> tuple[Projection, ...]:
        """The projections whose outputs are neurons (``up`` and ``gate``)."""
        return (self.up,) if self.gate is None else (self.up, self.gate)

    @property
    def name(self) -> str:
        """``ffn[i]`` with the down weight's name."""
        return f"ffn[{self.index}] ({self.down.name})"


@dataclass
class TransformerStructure:
    """The attention and FFN blocks of a model's main graph.

    Attributes:
        attention: Attention blocks in graph order.
        ffn: FFN blocks in graph order.
        skipped: ``(where, reason)`` for each candidate that did not qualify.
    """

    attention: list[AttentionBlock] = field(default_factory=list)
    ffn: list[FFNBlock] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        """Counts and shapes for reports."""
        return {
            "attention_blocks": len(self.attention),
            "ffn_blocks": len(self.ffn),
            "heads": [b.num_heads for b in self.attention],
            "kv_heads": [b.num_kv_heads for b in self.attention],
            "head_dim": sorted({b.head_dim for b in self.attention}),
            "ffn_intermediate": [b.intermediate for b in self.ffn],
            "skipped": [f"{w}: {r}" for w, r in self.skipped],
        }


# ----------------------------------------------------------------------------- helpers


def _const(value: ir.Value | None) -> np.ndarray | None:
    """The array of a constant (initializer that is not a graph input, or Constant node)."""
    from graphopt.passes.cleanup._util import constant_array

    return constant_array(value)


def _is_const(value: ir.Value | None) -> bool:
    from graphopt.passes.cleanup._util import constant_tensor

    return constant_tensor(value) is not None


def _consumers(value: ir.Value) -> list[ir.Node]:
    return [use.node for use in value.uses()]


def projection_of(node: ir.Node) -> Projection | None:
    """The projection rooted at ``node`` when it is a ``MatMul`` with a constant 2-D weight."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    x, w = node.inputs
    if x is None or w is None or _is_const(x) or not w.is_initializer() or w.is_graph_input():
        return None
    tensor = w.const_value
    if tensor is None or len(tensor.shape) != 2:
        return None
    if len(_consumers(w)) != 1:
        return None  # tied weights: slicing one use would change the other
    proj = Projection(node, w)
    users = _consumers(node.outputs[0])
    n = int(tensor.shape.numpy()[1])
    if len(users) == 1 and users[0].op_type == "Add" and not node.outputs[0].is_graph_output():
        add = users[0]
        other = add.inputs[1] if add.inputs[0] is node.outputs[0] else add.inputs[0]
        bias = _const(other)
        if (
            other is not None
            and bias is not None
            and bias.shape == (n,)
            and other.is_initializer()
            and len(_consumers(other)) == 1
        ):
            proj.bias, proj.add = other, add
    return proj


def data_graph(graph: ir.Graph) -> nx.DiGraph:
    """Producer -> consumer edges between the nodes of ``graph`` (constants left out)."""
    g: nx.DiGraph = nx.DiGraph()
    for node in graph:
        g.add_node(node)
        for value in node.inputs:
            if value is None:
                continue
            producer = value.producer()
            if producer is not None and producer.graph is graph:
                g.add_edge(producer, node)
    return g


def _walk(
    start: Iterable[ir.Node],
    step: Callable[[ir.Node], Iterable[ir.Node]],
    stop: Callable[[ir.Node], bool],
) -> tuple[list[ir.Node], list[ir.Node]]:
    """Breadth-first walk; returns (stopped-at nodes, visited nodes) up to MAX_WALK."""
    seen: set[int] = set()
    queue = deque(start)
    found: list[ir.Node] = []
    visited: list[ir.Node] = []
    while queue and len(visited) < MAX_WALK:
        node = queue.popleft()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if stop(node):
            found.append(node)
            continue
        visited.append(node)
        queue.extend(step(node))
    return found, visited


def _data_producers(node: ir.Node) -> list[ir.Node]:
    if node.op_type == "Shape":
        return []  # only the shape of its input flows on
    out = []
    for value in node.inputs:
        if value is None or _is_const(value):
            continue
        producer = value.producer()
        if producer is not None:
            out.append(producer)
    return out


def _static_dims(value: ir.Value) -> list[int | None] | None:
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else None for d in value.shape]


# ----------------------------------------------------------------------------- analysis


class TransformerStructureAnalysis(Analysis[TransformerStructure]):
    """Finds attention and FFN blocks in the main graph (see the module docstring)."""

    name = "transformer-structure"
    depends_on = Aspect.STRUCTURE | Aspect.SHAPES

    def key(self) -> tuple[str]:
        return (type(self).__qualname__,)

    def run(self, model: ir.Model, am: AnalysisManager, ctx: PassContext) -> TransformerStructure:
        return find_structure(model.graph)


def find_structure(graph: ir.Graph) -> TransformerStructure:
    """Attention and FFN blocks of ``graph`` (its top level; subgraphs are not searched)."""
    result = TransformerStructure()
    dag = data_graph(graph)
    projections: dict[int, Projection] = {}
    for node in graph:
        proj = projection_of(node)
        if proj is not None:
            projections[id(node)] = proj
        if node.op_type in FUSED_ATTENTION:
            result.skipped.append((node.name or node.op_type, "skipped: fused"))

    def is_proj(node: ir.Node) -> bool:
        return id(node) in projections

    claimed: set[int] = set()
    for node in graph:
        if node.op_type != "Softmax":
            continue
        block, reason = _attention_at(node, dag, projections, is_proj, len(result.attention))
        if block is None:
            result.skipped.append((node.name or "Softmax", reason))
            continue
        ids = {id(p.matmul) for p in (block.q, block.k, block.v, block.o)}
        if ids & claimed:
            result.skipped.append((node.name or "Softmax", "projections shared with another block"))
            continue
        claimed |= ids
        result.attention.append(block)

    for node in graph:
        if id(node) not in projections or id(node) in claimed:
            continue
        ffn, reason = _ffn_at(projections[id(node)], dag, projections, len(result.ffn))
        if ffn is None:
            if reason:
                result.skipped.append((node.name or "MatMul", reason))
            continue
        ids = {id(p.matmul) for p in (*ffn.inputs, ffn.down)}
        if ids & claimed:
            continue
        claimed |= ids
        result.ffn.append(ffn)
    logger.debug(
        "structure: %d attention blocks, %d FFN blocks, %d skipped",
        len(result.attention), len(result.ffn), len(result.skipped),
    )
    return result


def _region(dag: nx.DiGraph, sources: Iterable[ir.Node], sink: ir.Node) -> list[ir.Node]:
    """Nodes on a path from any source to ``sink`` (sources and sink excluded)."""
    below: set[ir.Node] = set()
    for s in sources:
        below |= nx.descendants(dag, s)
    above = nx.ancestors(dag, sink)
    return [n for n in nx.topological_sort(dag.subgraph(below & above))]


def _closed(region: list[ir.Node], allowed_consumers: set[int]) -> str:
    """'' when no value of ``region`` is read outside it (or by ``allowed_consumers``)."""
    inside = {id(n) for n in region} | allowed_consumers
    for node in region:
        for out in node.outputs:
            if out.is_graph_output():
                return f"value '{out.name}' of the block is a graph output"
            for user in _consumers(out):
                if id(user) not in inside:
                    return f"value '{out.name}' escapes the block into node '{user.name}'"
    return ""


def _attention_at(
    softmax: ir.Node,
    dag: nx.DiGraph,
    projections: dict[int, Projection],
    is_proj: Callable[[ir.Node], bool],
    index: int,
) -> tuple[AttentionBlock | None, str]:
    # Scores: the nearest MatMul of two activations above the Softmax.
    def is_act_matmul(n: ir.Node) -> bool:
        return n.op_type == "MatMul" and not is_proj(n) and not any(_is_const(v) for v in n.inputs)

    found, _ = _walk(_data_producers(softmax), _data_producers, is_act_matmul)
    if not found:
        return None, "no scores MatMul above the Softmax"
    scores = found[0]
    q_side = scores.inputs[0].producer() if scores.inputs[0] is not None else None
    k_side = scores.inputs[1].producer() if scores.inputs[1] is not None else None
    if q_side is None or k_side is None:
        return None, "scores MatMul reads a graph input"
    qs, _ = _walk([q_side], _data_producers, is_proj)
    ks, _ = _walk([k_side], _data_producers, is_proj)
    # Context: the MatMul that reads the (masked) probabilities.
    ctx_nodes, _ = _walk(
        _consumers(softmax.outputs[0]),
        lambda n: [u for o in n.outputs for u in _consumers(o)]
        if n.op_type in ("Where", "IsNaN", "Cast", "Dropout", "Identity", "Mul", "Not")
        else [],
        lambda n: n.op_type == "MatMul",
    )
    if len(ctx_nodes) != 1:
        return None, "no single probs @ V MatMul after the Softmax"
    context = ctx_nodes[0]
    v_side = context.inputs[1].producer() if context.inputs[1] is not None else None
    vs, _ = _walk([v_side], _data_producers, is_proj) if v_side is not None else ([], [])
    os_, _ = _walk(
        [u for u in _consumers(context.outputs[0])],
        lambda n: [u for o in n.outputs for u in _consumers(o)]
        if n.op_type in ("Transpose", "Reshape", "Identity", "Cast")
        else [],
        is_proj,
    )
    if len({id(n) for n in qs}) != 1 or len({id(n) for n in ks}) != 1 or len({id(n) for n in vs}) != 1:
        return None, "query/key/value do not each come from one constant-weight MatMul"
    if len(os_) != 1:
        return None, "no single output projection after the attention"
    q, k, v, o = (projections[id(n[0])] for n in (qs, ks, vs, os_))
    if len({id(q.matmul), id(k.matmul), id(v.matmul)}) != 3:
        return None, "query, key and value share a projection (fused QKV is not supported)"
    head_dim = _head_dim(scores, q)
    if head_dim is None:
        return None, "head size unknown (no static shape on the scores' query operand)"
    nq, nk, nv, ko = q.shape[1], k.shape[1], v.shape[1], o.shape[0]
    if nq % head_dim or nk % head_dim or nk != nv or ko != nq:
        return None, f"projection widths q={nq} k={nk} v={nv} o_in={ko} do not fit head size {head_dim}"
    heads, kv_heads = nq // head_dim, nk // head_dim
    if heads % kv_heads:
        return None, f"{heads} query heads are not a multiple of {kv_heads} KV heads"
    sources = [p.add or p.matmul for p in (q, k, v)]
    region = _region(dag, sources, o.matmul)
    for node in region:
        if node.op_type not in ATTENTION_OPS or node.domain not in ("", "ai.onnx"):
            return None, f"node '{node.name}' ({node.op_type}) inside the attention is not supported"
    reason = _closed(region, {id(o.matmul)})
    if reason:
        return None, reason
    return AttentionBlock(index, q, k, v, o, heads, kv_heads, head_dim, region), ""


def _head_dim(scores: ir.Node, q: Projection) -> int | None:
    """Head size from the scores' query operand ``[..., heads, seq, d]``, or the Reshape
    right after the query projection ``[..., heads, d]``."""
    nq = q.shape[1]
    value = scores.inputs[0]
    dims = _static_dims(value) if value is not None else None
    if dims and len(dims) >= 3 and dims[-1] and dims[-3] and dims[-1] * dims[-3] == nq:
        return dims[-1]
    for user in _consumers(q.output):
        if user.op_type == "Reshape":
            out = _static_dims(user.outputs[0])
            if out and len(out) >= 2 and out[-1] and out[-2] and out[-1] * out[-2] == nq:
                return out[-1]
            target = _const(user.inputs[1])
            ok = target is not None and target.ndim == 1 and target.size >= 2 and target[-1] > 0
            if ok and target is not None and nq % int(target[-1]) == 0:
                return int(target[-1])
    return None


def _ffn_at(
    down: Projection, dag: nx.DiGraph, projections: dict[int, Projection], index: int
) -> tuple[FFNBlock | None, str]:
    start = down.input.producer()
    if start is None or id(start) in projections:
        return None, ""
    k = down.shape[0]
    bad: list[ir.Node] = []

    def stop(n: ir.Node) -> bool:
        if id(n) in projections:
            return True
        if n.op_type not in ELEMENTWISE or n.domain not in ("", "ai.onnx", "com.microsoft"):
            bad.append(n)
            return True
        return False

    found, visited = _walk([start], _data_producers, stop)
    if bad or not found or not visited:
        return None, ""
    # Projections found may be bias Adds' MatMuls: map back.
    inputs = [projections[id(n)] for n in {id(n): n for n in found}.values()]
    if len(inputs) not in (1, 2):
        return None, ""
    if any(p.shape[1] != k for p in inputs):
        return None, ""
    if len({id(p.input) for p in inputs}) != 1:
        return None, ""
    region = _region(dag, [p.add or p.matmul for p in inputs], down.matmul)
    if not region:
        return None, ""  # two chained linear layers: no activation, not an MLP
    names = {id(n) for n in region} | {id(p.add) for p in inputs if p.add is not None}
    if {id(n) for n in visited} - names:
        return None, ""
    for node in region:
        for value in node.inputs:
            arr = _const(value)
            if arr is None or arr.size == 1:
                continue
            if arr.shape[-1] != k or arr.size != k:
                where = value.name if value is not None else "?"
                return None, f"FFN at '{down.name}': constant '{where}' is not per-neuron"
    reason = _closed(region, {id(down.matmul)})
    if reason:
        # Only worth reporting when the region looks like an MLP (has an activation).
        arithmetic = {"Mul", "Add", "Sub", "Div", "Cast", "Identity"}
        looks_like_mlp = any(n.op_type not in arithmetic for n in region)
        return None, f"FFN at '{down.name}': {reason}" if looks_like_mlp else ""
    gate: Projection | None = None
    up = inputs[0]
    if len(inputs) == 2:
        # The gate is the input that passes through the activation before the product.
        a, b = inputs
        up, gate = (a, b) if _activated(b, region) and not _activated(a, region) else (b, a)
    activation = next(
        (n.op_type for n in region if n.op_type not in ("Mul", "Add", "Sub", "Div", "Cast", "Identity")),
        "",
    )
    return FFNBlock(index, up, down, gate, region, activation), ""


def _activated(proj: Projection, region: list[ir.Node]) -> bool:
    """Whether an activation (non-arithmetic op) reads ``proj`` directly."""
    return any(
        u.op_type not in ("Mul", "Add", "Sub", "Div") for u in _consumers(proj.output) if u in region
    )
