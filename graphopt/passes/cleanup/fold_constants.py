"""Constant folding: nodes whose inputs are all constants become initializers.

Evaluation uses ONNX's reference implementation (``onnx.reference``, numpy) one node at a
time; which nodes are folded is decided here, by op and dtype, so that the default pass is
an *exact* rewrite (bit-identical to what ONNX Runtime computes for the unfolded node):

* data movement and indexing (Reshape, Transpose, Squeeze/Unsqueeze, Flatten, Concat,
  Split, Slice, Gather*, Expand, Tile, Pad, Where, NonZero, Shape, Size, ConstantOfShape)
  copy bits; comparisons and logic produce booleans;
* integer arithmetic is exact (division truncates toward zero as in ORT; a zero divisor
  or ``INT_MIN / -1`` is not folded), and so are integer ``Range``, ``CumSum``, ``Sum``
  and ``Reduce{Sum,Prod,Max,Min}``;
* float32/float64 ``Add Sub Mul Div Neg Abs Sign Floor Ceil Round Min Max Mod(fmod)`` are
  single IEEE-754 correctly-rounded operations, identical in numpy and ORT (Min/Max with
  a NaN or zero input are not folded: NaN propagation and the sign of a zero result
  differ);
* ``Cast`` between bool, integers, float16/32/64 is exact where both sides round the same
  way: float->int only when every value is finite and in range, int->float16 only for
  |x| <= 2048, never float64->float16 (ORT may round twice), never bfloat16/float8/string.

The exact set was checked bit for bit against ORT CPU (``tests/passes/
test_cleanup_fold_constants.py``, hypothesis for float32 arithmetic and float32->float16
casts). One residual caveat: a NaN *payload* produced from NaN constants may differ (both
sides give a NaN); NaN-aware comparisons are unaffected.

Sizes: a result is folded only if it is at most ``max_output_mb`` and, above 1 KiB, at
most ``max_growth`` (default 1) times the bytes of the node's constant inputs, so folding
never inflates a model (Expand/Tile/ConstantOfShape of small constants, widening Casts of
int8/fp16 weights stay); amplifying ops are sized before anything is computed.

Everything else that computes floating-point values (Exp, Tanh, Erf, Pow, Sqrt, Sigmoid,
Softmax, reductions, MatMul, fp16/bf16 arithmetic...) can differ from ORT by an ulp or
more (different libm, vectorised approximations, summation order), so it is folded only
with ``fold_float_math=true``; the pass then reports the ``fusion`` tolerance class
(rtol 1e-5, atol 1e-6) instead of ``exact``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import numpy as np
import onnx
import onnx.helper
import onnx.reference.ops
import onnx_ir as ir

from graphopt.infra.analysis import AnalysisManager, Aspect, PreservedAnalyses
from graphopt.infra.context import PassContext
from graphopt.infra.options import Options
from graphopt.infra.pass_base import Pass, PassInfo, PassResult
from graphopt.passes.cleanup import _util

logger = logging.getLogger(__name__)

#: Outputs up to this size are always allowed to grow relative to their inputs (shape
#: computations, small masks).
SMALL_OUTPUT_BYTES = 1024

_MOVEMENT_OPS = frozenset(
    {
        "Concat",
        "ConstantOfShape",
        "Expand",
        "Flatten",
        "Gather",
        "GatherElements",
        "GatherND",
        "NonZero",
        "Pad",
        "Reshape",
        "Shape",
        "Size",
        "Slice",
        "Split",
        "Squeeze",
        "Tile",
        "Transpose",
        "Unsqueeze",
        "Where",
    }
)
_LOGIC_OPS = frozenset(
    {
        "And",
        "BitShift",
        "BitwiseAnd",
        "BitwiseNot",
        "BitwiseOr",
        "BitwiseXor",
        "Equal",
        "Greater",
        "GreaterOrEqual",
        "IsInf",
        "IsNaN",
        "Less",
        "LessOrEqual",
        "Not",
        "Or",
        "Xor",
    }
)
#: Exact on integers, and on float32/float64 (single correctly-rounded IEEE operations).
_IEEE_OPS = frozenset(
    {
        "Abs",
        "Add",
        "Ceil",
        "Div",
        "Floor",
        "Max",
        "Min",
        "Mod",
        "Mul",
        "Neg",
        "Round",
        "Sign",
        "Sub",
    }
)
#: Exact on integers only (float versions accumulate or approximate).
_INT_ONLY_OPS = frozenset(
    {"CumSum", "Range", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceSum", "Sum"}
)
#: Never folded, even with fold_float_math: quantization ops carry the compression itself,
#: Identity is removed (not copied) by remove-identity, Constant is already a constant.
_NEVER_FOLD = frozenset(
    {"Constant", "DequantizeLinear", "DynamicQuantizeLinear", "Identity", "QuantizeLinear"}
)
_EXACT_CANDIDATES = _MOVEMENT_OPS | _LOGIC_OPS | _IEEE_OPS | _INT_ONLY_OPS | {"Cast", "CastLike"}
#: Ops whose output has as many elements as their first input.
_SAME_SIZE_OPS = frozenset(
    {
        "Abs",
        "BitwiseNot",
        "Cast",
        "CastLike",
        "Ceil",
        "Flatten",
        "Floor",
        "IsInf",
        "IsNaN",
        "Neg",
        "Not",
        "Reshape",
        "Round",
        "Sign",
        "Squeeze",
        "Transpose",
        "Unsqueeze",
    }
)
_EXACT_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_CAST_DTYPES = frozenset(
    np.dtype(t)
    for t in (
        np.bool_,
        np.int8,
        np.int16,
        np.int32,
        np.int64,
        np.uint8,
        np.uint16,
        np.uint32,
        np.uint64,
        np.float16,
        np.float32,
        np.float64,
    )
)


@dataclasses.dataclass(frozen=True)
class FoldConstantsOptions(Options):
    """Options of ``fold-constants``.

    Attributes:
        max_output_mb: Largest folded tensor (MiB); bigger results stay computed at run time.
        max_growth: A result over 1 KiB may be at most this many times the bytes of the
            node's constant inputs (so Expand/Tile/ConstantOfShape/widening Casts of
            weights never inflate the model).
        fold_float_math: Also fold float math that may differ from ORT by an ulp
            (transcendentals, reductions, MatMul, fp16 arithmetic). Not exact.
    """

    max_output_mb: float = 64.0
    max_growth: float = 1.0
    fold_float_math: bool = False

    def __post_init__(self) -> None:
        if self.max_output_mb < 0:
            raise ValueError("max_output_mb must be >= 0")
        if self.max_growth < 0:
            raise ValueError("max_growth must be >= 0")


class FoldConstantsPass(Pass[FoldConstantsOptions]):
    """Folds nodes whose inputs are all constants into initializers.

    Matches: a standard-domain, deterministic, non-control-flow node whose every input is
    an initializer that is not a graph input, or a ``Constant`` node output, and whose op
    and dtypes are in the exact set (module docstring), or any op with
    ``fold_float_math=true``. Nodes in If/Loop/Scan bodies are folded too (outer-scope
    constants count); model-local functions and custom-domain nodes are left alone.

    Changes: the node is removed; each used output becomes an initializer of the same name
    (a ``Constant`` node inside subgraphs and in IR<4 models, where initializers must be
    graph inputs). Graph outputs keep their names, dtypes and dim_params. Results larger
    than ``max_output_mb`` or growing beyond ``max_growth`` are skipped; so are dead nodes
    (left to eliminate-dead-code), Random*/Bernoulli/Multinomial/Dropout and quantization
    ops.

    Preserves: SHAPES (every remaining value keeps its type and shape).

    Example::

        before: c = Constant<value_ints=[2, 3]>(); s = Concat<axis=0>(c, c); y = Reshape(x, s)
        after:  initializer s = [2, 3, 2, 3];      y = Reshape(x, s)
    """

    info = PassInfo(
        name="fold-constants",
        summary="fold constant subexpressions into initializers (exact ops only by default)",
        tolerance="exact",
    )
    Options = FoldConstantsOptions

    def __init__(
        self, options: FoldConstantsOptions | None = None, ctx: PassContext | None = None
    ) -> None:
        super().__init__(options, ctx)
        if self.options.fold_float_math:
            # Instance-level: folding float math is verified with the fusion tolerance.
            self.info = dataclasses.replace(type(self).info, tolerance="fusion")  # type: ignore[misc]

    def run(self, model: ir.Model, ctx: PassContext, am: AnalysisManager) -> PassResult:
        """Folds every foldable node, in topological order, in every graph."""
        _util.warn_custom_nodes(model)
        folder = _Folder(model, self.options)
        folder.fold_graph(model.graph, is_main=True)
        stats = {
            "nodes_folded": folder.folded,
            "bytes_added": folder.bytes_added,
            "skipped_size": folder.skipped_size,
            "skipped_inexact": folder.skipped_inexact,
        }
        if folder.folded:
            logger.info(
                "fold-constants: folded %d node(s), +%d bytes", folder.folded, folder.bytes_added
            )
        return PassResult(
            model,
            folder.folded > 0,
            preserved=PreservedAnalyses.only(Aspect.SHAPES),
            stats=stats,
        )


class _Folder:
    """One run of constant folding over a model."""

    def __init__(self, model: ir.Model, options: FoldConstantsOptions) -> None:
        self.model = model
        self.options = options
        self.opset = _util.onnx_opset(model)
        self.as_initializer = _util.uses_initializers(model)
        self.max_bytes = int(options.max_output_mb * 1024 * 1024)
        self.folded = 0
        self.bytes_added = 0
        self.skipped_size = 0
        self.skipped_inexact = 0
        self._names: _util.NameGenerator | None = None

    # -- traversal -----------------------------------------------------------------------
    def fold_graph(self, graph: ir.Graph, *, is_main: bool) -> None:
        for node in list(graph):  # snapshot: folding removes nodes as it goes
            for sub in _util.subgraphs(node):
                self.fold_graph(sub, is_main=False)
            self._try_fold(graph, node, as_initializer=is_main and self.as_initializer)

    # -- one node ------------------------------------------------------------------------
    def _try_fold(self, graph: ir.Graph, node: ir.Node, *, as_initializer: bool) -> None:
        if (
            not _util.is_standard(node)
            or node.op_type in _NEVER_FOLD
            or _util.is_nondeterministic(node)
            or _util.has_subgraphs(node)
            or _util.has_attr_refs(node)
        ):
            return
        wanted = [o for o in node.outputs if o.uses() or o.is_graph_output()]
        if not wanted:
            return  # dead: eliminate-dead-code removes it without computing anything
        tensors: list[ir.TensorProtocol | None] = []
        for value in node.inputs:
            tensor = _util.constant_tensor(value) if value is not None else None
            if value is not None and tensor is None:
                return
            tensors.append(tensor)
        if not self.options.fold_float_math and node.op_type not in _EXACT_CANDIDATES:
            self.skipped_inexact += 1
            logger.debug(
                "not folding %s: float math (fold_float_math=false)", _util.node_path(node)
            )
            return
        unique = {id(v): t for v, t in zip(node.inputs, tensors) if t is not None}
        in_bytes = sum(t.nbytes for t in unique.values())
        limit = self._limit(in_bytes)
        early = _same_size_estimate(node, tensors)
        if early is not None and early > limit:
            self._skip_size(node, early, limit)
            return
        arrays: list[np.ndarray | None] = []
        for tensor in tensors:
            if tensor is None:
                arrays.append(None)
                continue
            try:
                arr = tensor.numpy()
            except Exception as e:  # noqa: BLE001 - unreadable data is simply not folded
                logger.debug("cannot read an input of %s: %s", _util.node_path(node), e)
                return
            if arr.dtype.kind in "OSUV":
                return
            arrays.append(arr)
        if not self.options.fold_float_math:
            reason = _exact_reason(node, arrays)
            if reason is not None:
                self.skipped_inexact += 1
                logger.debug("not folding %s: %s", _util.node_path(node), reason)
                return
        estimate = _estimate_output_bytes(node, arrays)
        if estimate is not None and estimate > limit:
            self._skip_size(node, estimate, limit)
            return
        version = _util.node_opset(node, self.opset)
        results = _evaluate(node, arrays, version)
        if results is None:
            return
        out_bytes = sum(r.nbytes for r, o in zip(results, node.outputs) if o in wanted)
        if out_bytes > limit:
            self._skip_size(node, out_bytes, limit)
            return
        expected = _expected_dtype(node, arrays)
        if expected is not None and any(r.dtype != expected for r in results):
            logger.debug(
                "not folding %s: evaluator returned %s, ONNX says %s",
                _util.node_path(node),
                [str(r.dtype) for r in results],
                expected,
            )
            return
        for result, out in zip(results, node.outputs):
            if out in wanted and not _matches_declared(out, result):
                logger.warning(
                    "fold-constants: %s computes %s%s but %r is declared %s%s; not folded",
                    _util.node_path(node),
                    result.dtype,
                    list(result.shape),
                    out.name,
                    out.dtype,
                    out.shape,
                )
                return
        self._replace(graph, node, results, wanted, as_initializer=as_initializer)

    def _skip_size(self, node: ir.Node, size: int, limit: int) -> None:
        self.skipped_size += 1
        logger.debug("not folding %s: %d bytes > limit %d", _util.node_path(node), size, limit)

    def _limit(self, in_bytes: int) -> int:
        growth = int(self.options.max_growth * in_bytes)
        return min(self.max_bytes, max(SMALL_OUTPUT_BYTES, growth))

    def _replace(
        self,
        graph: ir.Graph,
        node: ir.Node,
        results: list[np.ndarray],
        wanted: list[ir.Value],
        *,
        as_initializer: bool,
    ) -> None:
        for index, (result, out) in enumerate(zip(results, node.outputs)):
            if out not in wanted:
                continue
            if not out.name:  # nodes built in memory may have unnamed outputs
                if self._names is None:
                    self._names = _util.NameGenerator(self.model)
                out.name = self._names.new("folded")
            array = result if result.flags.c_contiguous else result.copy(order="C")
            new = _util.new_constant_value(
                graph,
                array,
                out.name,
                as_initializer=as_initializer,
                before=node,
                node_name=_constant_node_name(node, index),
            )
            if out.is_graph_output():
                _util.adopt_declared_type(new, out)
            out.replace_all_uses_with(new, replace_graph_outputs=True)
            self.bytes_added += array.nbytes
        graph.remove(node, safe=True)
        self.folded += 1
        logger.debug("folded %s", _util.node_path(node))


def _constant_node_name(node: ir.Node, index: int) -> str | None:
    """The folded node's name for its replacement (it is removed, so no clash); unnamed
    for the extra outputs of a multi-output node."""
    return (node.name or None) if index == 0 else None


def _unique_arrays(arrays: list[np.ndarray | None]) -> list[np.ndarray]:
    seen: dict[int, np.ndarray] = {}
    for a in arrays:
        if a is not None:
            seen.setdefault(id(a), a)
    return list(seen.values())


_BOOL_RESULT_OPS = frozenset(
    {
        "And",
        "Equal",
        "Greater",
        "GreaterOrEqual",
        "IsInf",
        "IsNaN",
        "Less",
        "LessOrEqual",
        "Not",
        "Or",
        "Xor",
    }
)


def _expected_dtype(node: ir.Node, arrays: list[np.ndarray | None]) -> np.dtype | None:
    """The output dtype the ONNX spec gives an exact-set op (None when not derived here).

    Guards against an evaluator returning, e.g., int64 for an int32 ``Range`` when the
    graph does not declare the output type.
    """
    op = node.op_type
    if op in ("Shape", "Size", "NonZero"):
        return np.dtype(np.int64)
    if op in _BOOL_RESULT_OPS:
        return np.dtype(np.bool_)
    if op == "Cast":
        to = node.attributes.get("to")
        try:
            return np.dtype(ir.DataType(to.as_int()).numpy()) if to is not None else None
        except (TypeError, ValueError):
            return None
    if op == "CastLike":
        return arrays[1].dtype if len(arrays) > 1 and arrays[1] is not None else None
    if op == "ConstantOfShape":
        value = node.attributes.get("value")
        return (
            np.dtype(value.as_tensor().dtype.numpy()) if value is not None else np.dtype(np.float32)
        )
    if op == "Where":
        return arrays[1].dtype if len(arrays) > 1 and arrays[1] is not None else None
    if op in _MOVEMENT_OPS or op in _LOGIC_OPS or op in _IEEE_OPS or op in _INT_ONLY_OPS:
        return arrays[0].dtype if arrays and arrays[0] is not None else None
    return None


def _matches_declared(value: ir.Value, array: np.ndarray) -> bool:
    """Whether a computed result agrees with what the graph declares for ``value``."""
    if value.dtype is not None:
        try:
            if ir.DataType.from_numpy(array.dtype) != value.dtype:
                return False
        except TypeError:
            return False
    shape = value.shape
    if shape is not None:
        if len(shape) != array.ndim:
            return False
        for dim, actual in zip(shape, array.shape):
            if isinstance(dim, int) and dim != actual:
                return False
    return True


# -- exactness rules ---------------------------------------------------------------------


def _exact_reason(node: ir.Node, arrays: list[np.ndarray | None]) -> str | None:
    """None when folding ``node`` is bit-exact w.r.t. ORT; otherwise why it is not."""
    op = node.op_type
    present = [a for a in arrays if a is not None]
    if op in _MOVEMENT_OPS or op in _LOGIC_OPS:
        return None
    if op in ("Cast", "CastLike"):
        if not present:
            return "no input"
        if op == "Cast":
            to_attr = node.attributes.get("to")
            if to_attr is None:
                return "Cast without 'to'"
            try:
                to = ir.DataType(to_attr.as_int()).numpy()
            except (TypeError, ValueError):
                return "unsupported Cast target"
        else:
            if len(present) < 2:
                return "CastLike without target"
            to = present[1].dtype
        return _cast_reason(present[0], np.dtype(to))
    all_int = all(a.dtype.kind in "iub" for a in present)
    if op in _INT_ONLY_OPS:
        return None if all_int else "float reduction/accumulation"
    if op in _IEEE_OPS:
        if all_int:
            if op in ("Div", "Mod") and len(present) == 2:
                return _int_division_reason(present[0], present[1])
            return None
        if all(a.dtype in _EXACT_FLOATS for a in present):
            if op in ("Min", "Max") and any(np.isnan(a).any() or (a == 0).any() for a in present):
                return "float Min/Max with NaN or a signed zero (ORT picks differently)"
            return None
        return "fp16/bf16 or mixed arithmetic"
    return "float math (fold_float_math=false)"


def _int_division_reason(a: np.ndarray, b: np.ndarray) -> str | None:
    if b.dtype.kind == "b" or (b == 0).any():
        return "integer division by zero"
    if a.dtype.kind == "i":
        lowest = np.iinfo(a.dtype).min
        if (a == lowest).any() and (b == -1).any():
            return "integer division overflow"
    return None


def _cast_reason(src: np.ndarray, to: np.dtype) -> str | None:
    if src.dtype not in _CAST_DTYPES or to not in _CAST_DTYPES:
        return f"Cast {src.dtype}->{to} not exact"
    if src.dtype.kind == "f" and to.kind in "iu":
        if src.size == 0:
            return None
        wide = src.astype(np.float64)
        if not np.isfinite(wide).all():
            return "Cast of inf/NaN to an integer"
        t = np.trunc(wide)
        bits = to.itemsize * 8
        low, high = (
            (0.0, 2.0**bits) if to.kind == "u" else (-(2.0 ** (bits - 1)), 2.0 ** (bits - 1))
        )
        if t.min() < low or t.max() >= high:
            return "Cast out of the integer range"
        return None
    if to == np.float16 and src.dtype == np.float64:
        return "Cast float64->float16 may round twice in ORT"
    if (
        to == np.float16
        and src.dtype.kind in "iu"
        and src.size
        and np.abs(src.astype(np.float64)).max() > 2048
    ):
        return "Cast of large integers to float16"
    return None


# -- sizes -------------------------------------------------------------------------------


def _same_size_estimate(node: ir.Node, tensors: list[ir.TensorProtocol | None]) -> int | None:
    """Output bytes of element-preserving ops, known before reading any tensor data."""
    if node.op_type not in _SAME_SIZE_OPS or not tensors or tensors[0] is None:
        return None
    first = tensors[0]
    itemsize = first.dtype.itemsize
    if node.op_type == "Cast":
        to = node.attributes.get("to")
        try:
            itemsize = ir.DataType(to.as_int()).itemsize if to is not None else itemsize
        except ValueError:
            return None
    elif node.op_type == "CastLike" and len(tensors) > 1 and tensors[1] is not None:
        itemsize = tensors[1].dtype.itemsize
    elif node.op_type in ("IsInf", "IsNaN", "Not"):
        itemsize = 1
    return math.ceil(first.size * itemsize)


def _estimate_output_bytes(node: ir.Node, arrays: list[np.ndarray | None]) -> int | None:
    """Output bytes of ops that can amplify their inputs, computed before evaluating."""
    op = node.op_type
    first = arrays[0] if arrays else None
    try:
        if op == "ConstantOfShape" and first is not None:
            value = node.attributes.get("value")
            itemsize = value.as_tensor().dtype.itemsize if value is not None else 4
            return int(math.prod(int(d) for d in first.reshape(-1))) * math.ceil(itemsize)
        if op == "Expand" and first is not None and len(arrays) > 1 and arrays[1] is not None:
            shape = np.broadcast_shapes(first.shape, tuple(int(d) for d in arrays[1]))
            return int(math.prod(shape)) * first.itemsize
        if op == "Tile" and first is not None and len(arrays) > 1 and arrays[1] is not None:
            reps = [int(r) for r in arrays[1].reshape(-1)]
            return int(math.prod(d * r for d, r in zip(first.shape, reps))) * first.itemsize
        if op == "Range" and len(arrays) == 3 and all(a is not None for a in arrays):
            start, limit, delta = (float(a) for a in arrays)  # type: ignore[arg-type]
            if delta == 0:
                return None
            count = max(math.ceil((limit - start) / delta), 0)
            return count * arrays[0].itemsize  # type: ignore[union-attr]
        if op == "Pad" and first is not None:
            pads = arrays[1] if len(arrays) > 1 else None
            if pads is None:
                attr = node.attributes.get("pads")
                pads = np.array(attr.as_ints()) if attr is not None else None
            if pads is None or pads.size != 2 * first.ndim:
                return None
            widths = [
                d + int(pads[i]) + int(pads[i + first.ndim]) for i, d in enumerate(first.shape)
            ]
            return int(math.prod(max(w, 0) for w in widths)) * first.itemsize
        if op in _IEEE_OPS or op in _LOGIC_OPS or op == "Where":
            shapes = [a.shape for a in arrays if a is not None]
            shape = np.broadcast_shapes(*shapes) if shapes else ()
            itemsize = max((a.itemsize for a in arrays if a is not None), default=1)
            return int(math.prod(shape)) * itemsize
    except (ValueError, TypeError, OverflowError):
        return None
    return None


# -- evaluation --------------------------------------------------------------------------


def _evaluate(
    node: ir.Node, arrays: list[np.ndarray | None], version: int
) -> list[np.ndarray] | None:
    """Runs ``node`` with ONNX's reference implementation; None when it cannot."""
    try:
        op_class = onnx.reference.ops.load_op(node.domain, node.op_type, version)
    except Exception as e:  # noqa: BLE001 - any loader failure means "cannot evaluate"
        logger.debug("no reference implementation for %s: %s", _util.node_path(node), e)
        return None
    proto = ir.serde.serialize_node(node)
    attrs: dict[str, Any] = {a.name: onnx.helper.get_attribute_value(a) for a in proto.attribute}
    inputs = list(arrays)
    while inputs and inputs[-1] is None:
        inputs.pop()
    try:
        with np.errstate(all="ignore"):
            outputs = op_class.eval(*inputs, n_outputs=len(node.outputs), **attrs)
    except Exception as e:  # noqa: BLE001 - the reference evaluator raises anything
        logger.debug("evaluating %s failed: %s", _util.node_path(node), e)
        return None
    if len(node.outputs) == 1 or not isinstance(outputs, (list, tuple)):
        outputs = [outputs]
    if len(outputs) != len(node.outputs):
        return None
    results = []
    for out in outputs:
        if isinstance(out, np.generic):
            out = np.asarray(out)
        if not isinstance(out, np.ndarray) or out.dtype.kind in "OSUV":
            return None
        results.append(out)
    return results
