"""Shape-subgraph simplification: Shape/Size of static dims become constants.

Exported models compute reshape targets at run time: ``Shape -> Gather/Slice ->
Unsqueeze -> Concat -> Reshape``. This pass tracks, for every small int64 vector built
that way, where each element comes from (a static dim, or dim ``i`` of value ``x``), and

* replaces every such vector whose elements are all static by a constant (only at the
  frontier: the last value of a chain that something else reads), then removes its
  producer;
* rewrites the target of ``Reshape(x, t)`` when each dynamic element of ``t`` is dim ``i``
  of ``x`` itself at position ``i`` (becomes ``0``, "copy", unless ``allowzero``) and of
  ``Expand(x, t)`` when it is the right-aligned dim of ``x`` (becomes ``1``). With
  ``trust_dim_params=true`` a dim of another value with the same ``dim_param`` name counts
  too (the usual exported-transformer case: ``Reshape(q, [Shape(x)[0], ...])``).

Static dims come from the model's value types, completed, when some are missing, by ONNX
shape inference run on a detached copy of the graph (large initializers replaced by typed
inputs so no weight is copied). Inferred shapes are used for decisions only; nothing is
written back, so graph I/O types and value_info stay as they were.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence

import numpy as np
import onnx
import onnx.shape_inference
import onnx_ir as ir

from graphopt.infra.analysis import AnalysisManager, Aspect, PreservedAnalyses
from graphopt.infra.context import PassContext
from graphopt.infra.options import Options
from graphopt.infra.pass_base import Pass, PassInfo, PassResult
from graphopt.passes.cleanup import _util

logger = logging.getLogger(__name__)

#: Initializers above this size are replaced by typed graph inputs for shape inference.
_INFERENCE_INLINE_BYTES = 1024
#: Longest int vector tracked (shape vectors are short).
_MAX_TRACKED = 64


class _DimOf:
    """Dimension ``index`` of value ``value`` (not statically known), with its dim_param."""

    __slots__ = ("index", "symbol", "value")

    def __init__(self, value: ir.Value, index: int, symbol: str | None) -> None:
        self.value = value
        self.index = index
        self.symbol = symbol

    def __repr__(self) -> str:
        return f"{self.value.name}[{self.index}]"


#: An element of a tracked vector: a static int, a known dynamic dim, or unknown (None).
_Elem = int | _DimOf | None


@dataclasses.dataclass(frozen=True)
class _Vec:
    """A tracked int64 tensor of rank 0 (``scalar``) or 1."""

    elems: tuple[_Elem, ...]
    scalar: bool = False

    def static(self) -> list[int] | None:
        if all(isinstance(e, int) for e in self.elems):
            return [int(e) for e in self.elems]  # type: ignore[arg-type]
        return None

    def array(self, values: Sequence[int]) -> np.ndarray:
        arr = np.array(values, dtype=np.int64)
        return arr.reshape(()) if self.scalar else arr


@dataclasses.dataclass(frozen=True)
class SimplifyShapesOptions(Options):
    """Options of ``simplify-shapes``.

    Attributes:
        infer_shapes: Run ONNX shape inference (on a copy) when a Shape/Size/Reshape/Expand
            input has no complete shape in the model.
        trust_dim_params: Treat two dims with the same ``dim_param`` name (declared, or
            propagated by shape inference; never generated ``unk__`` names) as equal when
            rewriting Reshape/Expand targets. ONNX reads equal names as equal sizes, but
            ONNX Runtime does not check it across graph inputs, so a caller feeding, e.g.,
            ``x: [B, T]`` and ``mask: [B, T]`` with different ``B`` would see a different
            error or result; off by default to keep the rewrite exact unconditionally.
    """

    infer_shapes: bool = True
    trust_dim_params: bool = False


class SimplifyShapesPass(Pass[SimplifyShapesOptions]):
    """Turns run-time shape computations over static dims into constants.

    Matches: ``Shape`` (with ``start``/``end``) and ``Size`` of values whose used dims are
    static, and int64 vectors derived from them through Gather/Slice/Unsqueeze/Squeeze/
    Concat/Identity/Cast(int64) and constants; ``Reshape``/``Expand`` targets whose
    dynamic elements are the data's own dims. Runs in every graph (If/Loop/Scan bodies
    included); model-local functions are left alone.

    Changes: a fully static vector becomes an initializer of the same name (a ``Constant``
    node in subgraphs and IR<4 models) and its producer is removed (the rest of the chain
    is left to eliminate-dead-code); a Reshape/Expand gets a new constant target.

    Preserves: SHAPES (value types are not changed; inferred shapes are not written).

    Example::

        before: s = Shape(x: [B,128,768]); d = Gather(s, 1); u = Unsqueeze(d, [0])
                t = Concat(Unsqueeze(Gather(s, 0), [0]), u, [12], [64]); y = Reshape(x, t)
        after:  y = Reshape(x, [0, 128, 12, 64])
    """

    info = PassInfo(
        name="simplify-shapes",
        summary="fold Shape/Size of static dims and simplify Reshape/Expand shape chains",
        tolerance="exact",
    )
    Options = SimplifyShapesOptions

    def run(self, model: ir.Model, ctx: PassContext, am: AnalysisManager) -> PassResult:
        """Tracks shape vectors in every graph and rewrites the static ones."""
        inferred: dict[str, ir.Shape | None] = {}
        if self.options.infer_shapes and _needs_inference(model):
            inferred = _infer_shapes(model)
        simplifier = _Simplifier(model, inferred, self.options.trust_dim_params)
        is_main = True
        for graph in list(_util.iter_graphs(model.graph)):
            simplifier.simplify(graph, as_initializer=is_main and simplifier.as_initializer)
            is_main = False
        stats = {
            "values_folded": simplifier.folded,
            "targets_rewritten": simplifier.targets,
            "shape_inference_runs": int(bool(inferred)),
        }
        modified = simplifier.folded + simplifier.targets > 0
        if modified:
            logger.info(
                "simplify-shapes: %d shape value(s) folded, %d Reshape/Expand target(s) rewritten",
                simplifier.folded,
                simplifier.targets,
            )
        return PassResult(
            model, modified, preserved=PreservedAnalyses.only(Aspect.SHAPES), stats=stats
        )


# -- shape inference (side table only) ---------------------------------------------------

_SHAPE_CONSUMERS = {"Shape": 0, "Size": 0, "Reshape": 0, "Expand": 0}


def _needs_inference(model: ir.Model) -> bool:
    for graph in _util.iter_graphs(model.graph):
        for node in graph:
            index = _SHAPE_CONSUMERS.get(node.op_type)
            if index is None or not _util.is_standard(node) or len(node.inputs) <= index:
                continue
            value = node.inputs[index]
            if value is not None and (
                value.shape is None or any(not isinstance(d, int) for d in value.shape)
            ):
                return True
    return False


def _infer_shapes(model: ir.Model) -> dict[str, ir.Shape | None]:
    """Runs ONNX shape inference on a copy; returns value name -> shape (None: ambiguous)."""
    graph = model.graph
    small: list[ir.Value] = []
    extra_inputs: list[ir.Value] = []
    for value in graph.initializers.values():
        tensor = value.const_value
        if tensor is not None and tensor.nbytes <= _INFERENCE_INLINE_BYTES:
            small.append(value)
        elif not value.is_graph_input():
            # A typed stand-in input of the same name (the model itself is not touched).
            dtype = value.dtype if tensor is None else tensor.dtype
            shape = value.shape if tensor is None else ir.Shape(tensor.shape.numpy())
            extra_inputs.append(
                ir.Value(
                    name=value.name,
                    type=ir.TensorType(dtype) if dtype is not None else None,
                    shape=shape,
                )
            )
    view = ir.GraphView(
        [*graph.inputs, *extra_inputs],
        graph.outputs,
        nodes=list(graph),
        initializers=small,
        opset_imports=dict(graph.opset_imports),
        name=graph.name,
    )
    proto = onnx.ModelProto()
    proto.ir_version = model.ir_version
    for domain, version in model.opset_imports.items():
        proto.opset_import.add(domain=domain, version=version)
    try:
        # GraphView satisfies GraphViewProtocol at run time; onnx-ir's protocol typing
        # (settable meta/metadata_props) does not accept its read-only properties.
        ir.serde.serialize_graph_into(proto.graph, view)  # type: ignore[arg-type]
        for function in model.functions.values():
            proto.functions.append(ir.serde.serialize_function(function))
        result = onnx.shape_inference.infer_shapes(
            proto, check_type=False, strict_mode=False, data_prop=True
        )
    except Exception as e:  # noqa: BLE001 - inference is an optional aid; the pass works without it
        logger.info("simplify-shapes: shape inference failed (%s); using declared shapes", e)
        return {}
    table: dict[str, ir.Shape | None] = {}
    stack = [result.graph]
    while stack:
        g = stack.pop()
        for info in (*g.input, *g.value_info, *g.output):
            if not info.type.HasField("tensor_type"):
                continue
            shape = ir.serde.deserialize_type_proto_for_shape(info.type)
            if info.name in table and table[info.name] != shape:
                table[info.name] = None  # the same name in two scopes: do not guess
            else:
                table[info.name] = shape
        for node in g.node:
            for attr in node.attribute:
                if attr.HasField("g"):
                    stack.append(attr.g)
                stack.extend(attr.graphs)
    return table


# -- the simplifier ----------------------------------------------------------------------


class _Simplifier:
    def __init__(
        self, model: ir.Model, inferred: dict[str, ir.Shape | None], trust_dim_params: bool
    ) -> None:
        self.model = model
        self.inferred = inferred
        self.trust_dim_params = trust_dim_params
        self.opset = _util.onnx_opset(model)
        self.as_initializer = _util.uses_initializers(model)
        self._names: _util.NameGenerator | None = None
        self.folded = 0
        self.targets = 0

    # -- shapes --------------------------------------------------------------------------
    def dims(self, value: ir.Value) -> list[int | None] | None:
        """Per-dim static sizes of ``value`` (None where unknown); None if rank unknown."""
        declared = value.shape
        inferred = self.inferred.get(value.name) if value.name else None
        if declared is None and inferred is None:
            return None
        if declared is None or (inferred is not None and len(inferred) != len(declared)):
            base = inferred if declared is None else declared
            assert base is not None
            return [d if isinstance(d, int) else None for d in base]
        out: list[int | None] = []
        for i, d in enumerate(declared):
            if isinstance(d, int):
                out.append(d)
            elif inferred is not None and isinstance(inferred[i], int):
                out.append(int(inferred[i]))  # type: ignore[arg-type]
            else:
                out.append(None)
        return out

    def symbols(self, value: ir.Value) -> list[str | None] | None:
        """Per-dim dim_param names of ``value`` (None where static, unnamed or generated)."""
        shape = value.shape
        if shape is None and value.name:
            shape = self.inferred.get(value.name)
        if shape is None:
            return None
        out: list[str | None] = []
        for d in shape:
            name = d.value if isinstance(d, ir.SymbolicDim) else None
            out.append(name if name and not name.startswith("unk__") else None)
        return out

    def same_dim(self, elem: _DimOf, x: ir.Value, index: int) -> bool:
        """Whether ``elem`` is provably dim ``index`` of ``x``."""
        if index < 0:
            return False
        if elem.value is x and elem.index == index:
            return True
        if not self.trust_dim_params or elem.symbol is None:
            return False
        symbols = self.symbols(x)
        return symbols is not None and index < len(symbols) and symbols[index] == elem.symbol

    # -- tracking ------------------------------------------------------------------------
    def vec(self, value: ir.Value | None, table: dict[ir.Value, _Vec]) -> _Vec | None:
        if value is None:
            return None
        if value in table:
            return table[value]
        arr = _util.constant_array(value, max_bytes=8 * _MAX_TRACKED)
        if arr is None or arr.dtype != np.int64 or arr.ndim > 1:
            return None
        return _Vec(tuple(int(v) for v in arr.reshape(-1)), scalar=arr.ndim == 0)

    def track(self, node: ir.Node, table: dict[ir.Value, _Vec]) -> _Vec | None:
        """The tracked vector ``node``'s single output equals, or None."""
        if not _util.is_standard(node) or len(node.outputs) != 1 or _util.has_attr_refs(node):
            return None
        op = node.op_type
        opset = _util.node_opset(node, self.opset)
        ins = node.inputs
        if op == "Shape":
            return self._track_shape(node)
        if op == "Size":
            dims = self.dims(ins[0]) if ins and ins[0] is not None else None
            static = [d for d in dims if d is not None] if dims is not None else None
            if dims is None or static is None or len(static) != len(dims):
                return None
            return _Vec((math.prod(static),), scalar=True)
        if op == "Identity":
            return self.vec(ins[0], table) if ins else None
        if op == "Cast":
            to = node.attributes.get("to")
            src = self.vec(ins[0], table) if ins else None
            ok = to is not None and to.as_int() == ir.DataType.INT64.value
            return src if ok else None
        if op == "Gather":
            return self._track_gather(node, table)
        if op == "Slice":
            return self._track_slice(node, table, opset)
        if op == "Unsqueeze":
            src = self.vec(ins[0], table) if ins else None
            axes = self._axes(node, opset, input_since=13)
            if src is None or not src.scalar or axes not in ([0], [-1]):
                return None
            return _Vec(src.elems, scalar=False)
        if op == "Squeeze":
            src = self.vec(ins[0], table) if ins else None
            axes = self._axes(node, opset, input_since=13)
            if src is None or src.scalar or len(src.elems) != 1:
                return None
            if axes is not None and axes not in ([0], [-1]):
                return None
            return _Vec(src.elems, scalar=True)
        if op == "Concat":
            axis = node.attributes.get("axis")
            if axis is None or axis.as_int() not in (0, -1):
                return None
            parts = [self.vec(v, table) for v in ins]
            if any(p is None or p.scalar for p in parts):
                return None
            elems = tuple(e for p in parts for e in p.elems)  # type: ignore[union-attr]
            return _Vec(elems) if len(elems) <= _MAX_TRACKED else None
        return None

    def _track_shape(self, node: ir.Node) -> _Vec | None:
        x = node.inputs[0] if node.inputs else None
        if x is None:
            return None
        dims = self.dims(x)
        if dims is None:
            return None
        rank = len(dims)
        symbols = self.symbols(x) if self.trust_dim_params else None
        start_attr = node.attributes.get("start")
        end_attr = node.attributes.get("end")
        start = start_attr.as_int() if start_attr is not None else 0
        end = end_attr.as_int() if end_attr is not None else rank
        start = min(max(start + rank if start < 0 else start, 0), rank)
        end = min(max(end + rank if end < 0 else end, 0), rank)
        elems: list[_Elem] = []
        for i in range(start, end):
            d = dims[i]
            elems.append(d if d is not None else _DimOf(x, i, symbols[i] if symbols else None))
        return _Vec(tuple(elems))

    def _axes(self, node: ir.Node, opset: int, *, input_since: int) -> list[int] | None:
        if opset >= input_since:
            if len(node.inputs) > 1 and node.inputs[1] is not None:
                return _util.small_int_vector(node.inputs[1])
            return None
        attr = node.attributes.get("axes")
        return list(attr.as_ints()) if attr is not None else None

    def _track_gather(self, node: ir.Node, table: dict[ir.Value, _Vec]) -> _Vec | None:
        if len(node.inputs) != 2:
            return None
        src = self.vec(node.inputs[0], table)
        axis_attr = node.attributes.get("axis")
        axis = axis_attr.as_int() if axis_attr is not None else 0
        if src is None or src.scalar or axis not in (0, -1):
            return None
        indices = _util.constant_array(node.inputs[1], max_bytes=8 * _MAX_TRACKED)
        if indices is None or indices.dtype.kind not in "iu" or indices.ndim > 1:
            return None
        n = len(src.elems)
        picked: list[_Elem] = []
        for raw in indices.reshape(-1):
            i = int(raw)
            i = i + n if i < 0 else i
            if not 0 <= i < n:
                return None  # out of range: leave ORT's error in place
            picked.append(src.elems[i])
        return _Vec(tuple(picked), scalar=indices.ndim == 0)

    def _track_slice(self, node: ir.Node, table: dict[ir.Value, _Vec], opset: int) -> _Vec | None:
        src = self.vec(node.inputs[0], table) if node.inputs else None
        if src is None or src.scalar:
            return None
        if opset >= 10:
            args = [
                _util.small_int_vector(v) if v is not None else None
                for v in list(node.inputs[1:5]) + [None] * (5 - len(node.inputs))
            ]
            starts, ends, axes, steps = args[0], args[1], args[2], args[3]
            if starts is None or ends is None:
                return None
            if len(node.inputs) > 3 and node.inputs[3] is not None and axes is None:
                return None
            if len(node.inputs) > 4 and node.inputs[4] is not None and steps is None:
                return None
        else:
            starts = _ints_attr(node, "starts")
            ends = _ints_attr(node, "ends")
            axes = _ints_attr(node, "axes")
            steps = None
            if starts is None or ends is None:
                return None
        if len(starts) != 1 or len(ends) != 1:
            return None
        if axes is not None and axes not in ([0], [-1]):
            return None
        step = steps[0] if steps else 1
        if step == 0 or (steps is not None and len(steps) != 1):
            return None
        n = len(src.elems)
        start, end = starts[0], ends[0]
        start = start + n if start < 0 else start
        end = end + n if end < 0 else end
        if step > 0:
            start, end = min(max(start, 0), n), min(max(end, 0), n)
        else:
            start, end = min(max(start, 0), n - 1), min(max(end, -1), n - 1)
        return _Vec(tuple(src.elems[i] for i in range(start, end, step)))

    # -- rewriting -----------------------------------------------------------------------
    def simplify(self, graph: ir.Graph, *, as_initializer: bool) -> None:
        table: dict[ir.Value, _Vec] = {}
        for node in graph:
            vec = self.track(node, table)
            if vec is not None:
                table[node.outputs[0]] = vec
        static = {
            v
            for v, vec in table.items()
            if vec.static() is not None and not _util.is_constant_source(v)
        }
        # Rewrite Reshape/Expand targets with dynamic elements.
        for node in list(graph):
            if not _util.is_standard(node) or node.op_type not in ("Reshape", "Expand"):
                continue
            if len(node.inputs) < 2 or node.inputs[1] is None or node.inputs[0] is None:
                continue
            vec = table.get(node.inputs[1])
            if vec is None or vec.scalar or vec.static() is not None:
                continue
            new = (
                self._reshape_target(node, vec)
                if node.op_type == "Reshape"
                else self._expand_target(node, vec)
            )
            if new is None:
                continue
            if self._names is None:  # built on first use: it walks the whole model
                self._names = _util.NameGenerator(self.model)
            name = self._names.new(f"{node.inputs[1].name or 'shape'}_static")
            const = _util.new_constant_value(
                graph,
                np.array(new, dtype=np.int64),
                name,
                as_initializer=as_initializer,
                before=node,
            )
            node.replace_input_with(1, const)
            self.targets += 1
            logger.debug("%s target -> %s", _util.node_path(node), new)
        # Fold the frontier of fully static vectors.
        for node in list(graph):
            if len(node.outputs) != 1 or node.outputs[0] not in static:
                continue
            value = node.outputs[0]
            if not _read_outside(value, static, graph):
                continue
            vec = table[value]
            values = vec.static()
            assert values is not None
            self._fold(graph, node, value, vec.array(values), as_initializer)

    def _fold(
        self,
        graph: ir.Graph,
        node: ir.Node,
        value: ir.Value,
        array: np.ndarray,
        as_initializer: bool,
    ) -> None:
        assert value.name
        new = _util.new_constant_value(
            graph,
            array,
            value.name,
            as_initializer=as_initializer,
            before=node,
            node_name=node.name or None,
        )
        if value.is_graph_output():
            _util.adopt_declared_type(new, value)
        value.replace_all_uses_with(new, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        self.folded += 1
        logger.debug("%s -> constant %s", _util.node_path(node), array.tolist())

    def _reshape_target(self, node: ir.Node, vec: _Vec) -> list[int] | None:
        allowzero = node.attributes.get("allowzero")
        if allowzero is not None and allowzero.as_int() != 0:
            return None
        x = node.inputs[0]
        assert x is not None
        out: list[int] = []
        for position, e in enumerate(vec.elems):
            if isinstance(e, int):
                out.append(e)
            elif isinstance(e, _DimOf) and self.same_dim(e, x, position):
                out.append(0)  # "copy dim `position` of the input"
            else:
                return None
        return out

    def _expand_target(self, node: ir.Node, vec: _Vec) -> list[int] | None:
        x = node.inputs[0]
        assert x is not None
        dims = self.dims(x)
        if dims is None:
            return None
        offset = len(vec.elems) - len(dims)
        out: list[int] = []
        for position, e in enumerate(vec.elems):
            if isinstance(e, int):
                out.append(e)
            elif isinstance(e, _DimOf) and self.same_dim(e, x, position - offset):
                out.append(1)  # broadcasting keeps x's own dim
            else:
                return None
        return out


def _ints_attr(node: ir.Node, name: str) -> list[int] | None:
    attr = node.attributes.get(name)
    return list(attr.as_ints()) if attr is not None else None


def _read_outside(value: ir.Value, static: set[ir.Value], graph: ir.Graph) -> bool:
    """Whether ``value`` is read by something that will not itself be folded."""
    if value.is_graph_output():
        return True
    for user in value.consumers():
        if all(not o.uses() and not o.is_graph_output() for o in user.outputs):
            continue  # a dead reader (e.g. a Concat whose Reshape got a constant target)
        if user.graph is not graph or len(user.outputs) != 1 or user.outputs[0] not in static:
            return True
    return False
