"""BERT-style fusions for exports that onnxscript's attention chain does not take as they are.

onnxscript's chain (``sdpa`` -> ``mha`` -> ``mha-bias`` -> ``attention``, attention.py)
already fuses the dynamo export of a BERT encoder. The TorchScript exporter writes the same
attention in forms the chain misses. Each rule here removes one obstacle by rewriting the
graph into an equivalent, simpler form; the chain then fuses the result unchanged (there is
no monolithic attention pattern here). In catalog order (all run before the chain):

1. ``bert-softmax-guard`` (ORT): ``Where(IsNaN(p), 0, p)`` with
   ``p = Softmax(scores + Where(m, 0, -inf))`` zeroes rows whose keys are all masked. ORT's
   fused attention has no such guard, so the mask's ``-inf`` becomes the lowest finite
   float and the guard goes. Rows with at least one valid key get the same weights (every
   masked weight is exactly 0 either way); a fully masked row (an all-zero
   ``attention_mask`` row, i.e. an empty input) averages V instead of giving 0 — as the
   dynamo export does — instead of turning into NaN inside ``Attention``.
2. ``bert-padding-mask``: Hugging Face's SDPA padding mask, traced into index arithmetic::

       Expand(And(q >= 0, Reshape(Gather(Flatten(bool(mask)), b·T + k))), [B, -1, S, T])

   is ``bool(mask)[:, None, None, :]`` broadcast along the query axis. Each layer's
   ``Add(scores, Where(that, 0, neg))`` becomes
   ``Add(scores, Where(Unsqueeze(bool(mask), [1, 2]), 0, neg))`` (one shared bias).
3. ``bert-head-reshape``: a ``Reshape`` whose target is a ``Concat`` of dims read with
   Shape/Gather/Unsqueeze gets a constant target: the head split
   ``Reshape(q, Concat(B, S, [-1], [Dh]))`` becomes ``Reshape(q, [0, 0, H, Dh])`` (a
   static head count for the MHA rule) and the TorchScript SDPA's no-op
   ``Reshape(o, Concat(B, [-1], S, Dh))`` after attention disappears (it sits between
   the attention and its head merge, where the MHA pattern expects nothing).
4. ``bert-mask-broadcast`` (ORT): ``Add(scores, bias[B, 1, 1, T])`` ->
   ``Add(scores, Expand(bias, [1, 1, S, 1]))`` with S read off the layer input. ORT's
   MHA/Attention want the query axis in the bias; left to onnxscript's MHA rule, the
   Expand would read the query projection, and that extra use blocks the bias and QKV
   packing rules.
5. ``bert-bias-add-order`` (ORT): ``Add(bias, MatMul(x, W))`` ->
   ``Add(MatMul(x, W), bias)``: the MHA-bias rule only takes the projection-first order.
6. ``bert-skip-norm-bias`` (ORT): ``SkipLayerNormalization(Add(bias, x), skip, ...)`` ->
   ``SkipLayerNormalization(x, skip, ..., bias)``; onnxscript's skip-norm rules only
   absorb a bias written ``Add(x, bias)``.

For targets without contrib ops, ``gelu-onnx`` turns the erf- and tanh-form GELU into the
standard ``Gelu`` op (opset 20).

The checks ask small read-only questions about values (is this ``[y.shape[i]]``, is that
``arange(n)`` on axis k, which input dim is this output dim a copy of); matching and
replacement are onnxscript's.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import _ir_utils, pattern
from onnxscript.rewriter._basics import MatchResult
from onnxscript.rewriter.ort_fusions import erfgelu
from onnxscript.rewriter.ort_fusions import gelu as ort_gelu

from graphopt.rewrite import ORT_TARGETS, STANDARD_TARGETS, Rule

# --------------------------------------------------------------------------- helpers
# Read-only questions the rules' checks ask about a value: what it is in terms of the one
# or two nodes that produced it. Matching itself is onnxscript's.


def _is_op(node: ir.Node | None, op_type: str) -> bool:
    return node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx")


def _constant(value: ir.Value | None) -> np.ndarray | None:
    """The value of a constant, or None (a graph input with a default is no constant)."""
    if value is None or value.is_graph_input():
        return None
    return _ir_utils.get_numpy_value(value)


def _ints(value: ir.Value | None) -> list[int] | None:
    """The elements of a constant integer tensor, flattened; None if not one."""
    array = _constant(value)
    if array is None or array.dtype.kind not in "iu":
        return None
    return [int(v) for v in array.reshape(-1)]


def _int_attr(node: ir.Node | None, name: str, default: int | None) -> int | None:
    if node is None:
        return None
    attr = node.attributes.get(name)
    if attr is None:
        return default
    if attr.is_ref():
        return None
    return int(attr.value)


def _shape_of(value: ir.Value | None) -> tuple[ir.Value, int, int | None] | None:
    """``(y, start, end)`` when ``value = Shape(y, start, end)`` (end None: to the last)."""
    node = value.producer() if value is not None else None
    if not _is_op(node, "Shape") or node is None or node.inputs[0] is None:
        return None
    start = _int_attr(node, "start", 0)
    end = _int_attr(node, "end", None)
    if start is None or start < 0 or (end is not None and end < 0):
        return None
    return node.inputs[0], start, end


def _scalar_dim(value: ir.Value | None) -> tuple[ir.Value, int] | None:
    """``(y, i)`` when the scalar ``value`` is ``Gather(Shape(y), i)``, i.e. ``y.shape[i]``."""
    node = value.producer() if value is not None else None
    if not _is_op(node, "Gather") or node is None or _int_attr(node, "axis", 0) != 0:
        return None
    shape = _shape_of(node.inputs[0])
    index = _constant(node.inputs[1])
    if shape is None or index is None or index.ndim != 0 or int(index) < 0:
        return None
    y, start, end = shape
    if end is not None:
        return None
    return y, start + int(index)


def _dim(value: ir.Value | None) -> tuple[ir.Value, int] | None:
    """``(y, i)`` when the 1-element ``value`` is ``[y.shape[i]]``.

    Recognised: ``Unsqueeze(Gather(Shape(y), i), [0])``, ``Gather(Shape(y), [i])`` and
    ``Shape(y, start=i, end=i + 1)``.
    """
    node = value.producer() if value is not None else None
    if _is_op(node, "Unsqueeze") and node is not None:
        return _scalar_dim(node.inputs[0]) if _ints(node.inputs[1]) == [0] else None
    shape = _shape_of(value)
    if shape is not None:
        y, start, end = shape
        return (y, start) if end == start + 1 else None
    if not _is_op(node, "Gather") or node is None or _int_attr(node, "axis", 0) != 0:
        return None
    shape = _shape_of(node.inputs[0])
    index = _constant(node.inputs[1])
    if shape is None or index is None or index.shape != (1,) or int(index[0]) < 0:
        return None
    y, start, end = shape
    return (y, start + int(index[0])) if end is None else None


#: Ops whose output has the shape of their (first) input.
_SHAPE_KEEPING = frozenset(
    {"Softmax", "LogSoftmax", "IsNaN", "IsInf", "Erf", "Cast", "Identity", "Relu", "Neg",
     "Not", "Sqrt", "Exp", "Tanh", "Sigmoid", "Gelu", "Abs", "Reciprocal", "Dropout"}
)
#: Ops that broadcast their inputs against each other (multidirectional broadcasting).
_BROADCASTING = frozenset(
    {"Add", "Sub", "Mul", "Div", "Pow", "Where", "And", "Or", "Xor", "Equal", "Less",
     "Greater", "LessOrEqual", "GreaterOrEqual", "Max", "Min"}
)


def _rank(value: ir.Value | None) -> int | None:
    return value.shape.rank() if value is not None and value.shape is not None else None


def _broadcast_source(
    operands: list[ir.Value | None], axis: int, rank: int
) -> tuple[ir.Value, int] | None:
    """The one operand (and its axis) that decides output ``axis`` of a broadcast."""
    found: list[tuple[ir.Value, int]] = []
    for operand in operands:
        operand_rank = _rank(operand)
        if operand is None or operand_rank is None:
            return None
        aligned = axis - (rank - operand_rank)
        if aligned < 0 or _ir_utils.get_dim(operand, aligned) == 1:
            continue  # missing or a static 1: this operand does not decide the dim
        found.append((operand, aligned))
    if not found:
        return None
    first = _ir_utils.get_dim(*found[0])
    if len(found) > 1 and not all(
        first is not None and _ir_utils.same_dim(first, _ir_utils.get_dim(*other))
        for other in found[1:]
    ):
        return None  # several operands may decide it: no single source
    return found[0]


def _dim_step(value: ir.Value, axis: int) -> tuple[ir.Value, int] | None:
    """The input dim that output dim ``axis`` of ``value``'s producer is a copy of.

    Knows elementwise and broadcasting ops (when only one operand can decide the dim),
    Transpose, MatMul and Reshape with a constant target that copies (0) the dim.
    """
    node = value.producer()
    rank = _rank(value)
    if node is None or rank is None or node.domain not in ("", "ai.onnx"):
        return None
    axis = axis + rank if axis < 0 else axis
    inputs = list(node.inputs)
    if node.op_type in _SHAPE_KEEPING and inputs and inputs[0] is not None:
        return (inputs[0], axis) if _rank(inputs[0]) == rank else None
    if node.op_type in _BROADCASTING:
        return _broadcast_source(inputs, axis, rank)
    if node.op_type == "Transpose" and inputs[0] is not None:
        perm = node.attributes.get("perm")
        if perm is None or perm.is_ref() or len(perm.value) != rank:
            return None
        return inputs[0], int(perm.value[axis])
    if node.op_type == "MatMul" and len(inputs) == 2 and rank >= 2:
        a, b = inputs
        rank_a, rank_b = _rank(a), _rank(b)
        if a is None or b is None or rank_a is None or rank_b is None:
            return None
        if rank_a < 2 or rank_b < 2:
            return None
        if axis == rank - 1:
            return b, rank_b - 1
        if axis == rank - 2:
            return a, rank_a - 2
        # A batch axis broadcasts like an elementwise op over the operands' batch axes.
        found = []
        for operand, operand_rank in ((a, rank_a), (b, rank_b)):
            aligned = axis - (rank - operand_rank)
            if aligned >= 0 and _ir_utils.get_dim(operand, aligned) != 1:
                found.append((operand, aligned))
        return found[0] if len(found) == 1 else None
    if node.op_type == "Reshape" and _int_attr(node, "allowzero", 0) == 0:
        target = _ints(inputs[1])
        if target is not None and len(target) == rank and target[axis] == 0:
            return (inputs[0], axis) if inputs[0] is not None else None
    return None


def _dim_chain(value: ir.Value, axis: int) -> list[tuple[ir.Value, int]]:
    chain = [(value, axis)]
    for _ in range(32):
        step = _dim_step(*chain[-1])
        if step is None:
            break
        chain.append(step)
    return chain


def _same_dim(a: tuple[ir.Value, int] | None, b: ir.Value, j: int) -> bool:
    """Whether dim ``a = (y, i)`` provably equals ``b.shape[j]`` at run time.

    True when the two are the same dim of the same value after following copies
    (:func:`_dim_step`), or when shape inference gave them the same static size or the
    same named symbolic dim anywhere along those copies.
    """
    if a is None:
        return False
    chain_a, chain_b = _dim_chain(*a), _dim_chain(b, j)

    def key(v: ir.Value, i: int) -> tuple[int, int]:
        rank = _rank(v)
        return id(v), (i + rank if i < 0 and rank is not None else i)

    if {key(*x) for x in chain_a} & {key(*x) for x in chain_b}:
        return True
    dims_a = [_ir_utils.get_dim(v, i) for v, i in chain_a]
    dims_b = [_ir_utils.get_dim(v, i) for v, i in chain_b]
    return any(
        da is not None and db is not None and _ir_utils.same_dim(da, db)
        for da in dims_a
        for db in dims_b
    )


def _arange(value: ir.Value | None, rank: int) -> tuple[ir.Value, int] | None:
    """``(n, axis)`` when ``value`` is ``Range(0, n, 1)`` unsqueezed to ``rank`` dims, the
    range running along ``axis``."""
    unsqueezes: list[list[int]] = []
    node = value.producer() if value is not None else None
    while _is_op(node, "Unsqueeze") and node is not None:
        axes = _ints(node.inputs[1])
        if axes is None or node.inputs[0] is None:
            return None
        unsqueezes.append(axes)
        node = node.inputs[0].producer()
    if not _is_op(node, "Range") or node is None:
        return None
    start, limit, delta = node.inputs
    if _ints(start) != [0] or _ints(delta) != [1] or limit is None:
        return None
    current, axis = 1, 0
    for axes in reversed(unsqueezes):  # the innermost Unsqueeze first
        new_rank = current + len(axes)
        inserted = {a + new_rank if a < 0 else a for a in axes}
        if len(inserted) != len(axes) or not all(0 <= a < new_rank for a in inserted):
            return None
        axis = [p for p in range(new_rank) if p not in inserted][axis]
        current = new_rank
    return (limit, axis) if current == rank else None


def _true_ranges(value: ir.Value | None, depth: int = 0) -> list[tuple[ir.Value, int]] | None:
    """The aranges a provably all-True boolean tensor is made of, or None if not provable.

    All-True: a constant True, ``ConstantOfShape`` of True, ``And`` of all-True values, or
    ``GreaterOrEqual(arange, c)`` with ``c <= 0``. Returns ``(n, axis)`` of each arange
    (they decide the tensor's shape).
    """
    if value is None or depth > 6:
        return None
    array = _constant(value)
    if array is not None:
        return [] if array.dtype == np.bool_ and bool(array.all()) else None
    node = value.producer()
    if node is None:
        return None
    if _is_op(node, "ConstantOfShape"):
        attr = node.attributes.get("value")
        if attr is None or attr.is_ref() or not bool(attr.as_tensor().numpy().all()):
            return None
        return [] if _ints(node.inputs[0]) is not None else None
    if _is_op(node, "And"):
        found: list[tuple[ir.Value, int]] = []
        for operand in node.inputs:
            part = _true_ranges(operand, depth + 1)
            if part is None:
                return None
            found.extend(part)
        return found
    if _is_op(node, "GreaterOrEqual"):
        lhs, rhs = node.inputs
        bound = _ints(rhs)
        rank = lhs.shape.rank() if lhs is not None and lhs.shape is not None else None
        if bound is None or len(bound) != 1 or bound[0] > 0 or rank is None:
            return None
        found_range = _arange(lhs, rank)
        return None if found_range is None else [found_range]
    return None


def _all_equal(value: ir.Value | None, number: int) -> bool:
    """Whether ``value`` is a constant (or ``ConstantOfShape``) with every element ``number``."""
    ints = _ints(value)
    if ints is not None:
        return all(v == number for v in ints)
    node = value.producer() if value is not None else None
    if not _is_op(node, "ConstantOfShape") or node is None:
        return False
    attr = node.attributes.get("value")
    if attr is None:
        return number == 0
    return not attr.is_ref() and bool(np.all(attr.as_tensor().numpy() == number))


def _expand_entries(shape: ir.Value | None) -> list[ir.Value] | None:
    """The entries of an ``Expand`` target that is a ``Concat`` of 1-element tensors.

    Also sees through what torch writes for ``expand`` (where -1 keeps a dim)::

        s = Reshape(Concat(e0, e1, ...), [-1])          # the Reshape is optional
        target = Where(Equal(s, Mul(ones, -1)), ones, s)

    An entry -1 then means "keep that dim" (it becomes 1, which Expand keeps).
    """
    node = shape.producer() if shape is not None else None
    if _is_op(node, "Where") and node is not None:
        cond, ones, flat = node.inputs
        equal = cond.producer() if cond is not None else None
        if not _is_op(equal, "Equal") or equal is None or flat is None or ones is None:
            return None
        if equal.inputs[0] is not flat or not _all_equal(ones, 1):
            return None
        if not _all_equal(equal.inputs[1], -1):  # folded, or Mul(ones, -1) as torch writes
            minus = equal.inputs[1].producer() if equal.inputs[1] is not None else None
            if not _is_op(minus, "Mul") or minus is None or ones not in minus.inputs:
                return None
            factors = list(minus.inputs)
            factors.remove(ones)
            if _ints(factors[0]) != [-1]:
                return None
        node = flat.producer()
    if _is_op(node, "Reshape") and node is not None:
        if _ints(node.inputs[1]) != [-1] or node.inputs[0] is None:
            return None
        node = node.inputs[0].producer()
    if not _is_op(node, "Concat") or node is None or _int_attr(node, "axis", None) != 0:
        return None
    entries = list(node.inputs)
    if any(e is None or e.shape is None or e.shape.dims != (1,) for e in entries):
        return None
    return entries  # type: ignore[return-value]


def _single(value: ir.Value | None) -> float | None:
    """The element of a 1-element float or int constant, else None."""
    array = _constant(value)
    if array is None or array.size != 1:
        return None
    return float(array.reshape(-1)[0])


# --------------------------------------------------------------------------- attention


class PaddingMaskRule(pattern.RewriteRuleClassBase):
    """Hugging Face's traced SDPA padding mask -> ``Unsqueeze(bool(mask), [1, 2])``.

    Matches, at each attention layer's addition of the mask to the scores::

        flat = Flatten(m, axis=2)                   # m: bool [B, T] -> [B·T, 1]
        idx  = Add(k, Mul(b, T))                    # b = arange(B) on axis 0 of 4,
                                                    # k = arange(T) on axis 3 of 4
        kv   = Reshape(Reshape(Gather(flat, idx), [-1]), Shape(idx))     # [B, 1, 1, T]
        y    = Add(scores, Where(Expand(And(q, kv), target), zero, neg))

    where ``T`` is ``m.shape[1]``, ``q`` is provably all True and spans the query axis
    only (``[1, 1, S, 1]``), and every ``target`` entry keeps (-1), does not broadcast (1)
    or equals the scores' dim on its axis. So ``Where(Expand(...))[b, h, q, k]`` is
    ``zero if m[b, k] else neg`` and never enlarges the sum.

    Rewrites to ``Add(scores, Where(Unsqueeze(m, [1, 2]), zero, neg))``, the same sum
    element for element. Assumes, as the model does, that ``m`` has the scores' batch.
    The shared mask nodes are left to dead-code elimination (``remove_nodes=False``); the
    new ``Unsqueeze``/``Where`` is made once per mask and shared by every layer.

    Before/after (one layer)::

        before: y = Add(s, Where(Expand(And(...q>=0..., Reshape(Gather(Flatten(m), ...))),
                                        Where(Equal(...), ...)), 0, -inf))
        after:  y = Add(s, Where(Unsqueeze(m, [1, 2]), 0, -inf))
    """

    def __init__(self) -> None:
        super().__init__("BertPaddingMask", remove_nodes=False)
        self._made: dict[tuple[object, ...], ir.Value] = {}

    def setup(self) -> None:
        self._made = {}

    def pattern(self, op, scores, mask, b_idx, k_idx, stride, q_true, target, zero, neg):
        flat = op.Flatten(mask, _outputs=["flat"])
        index = op.Add(k_idx, op.Mul(b_idx, stride))
        kv = op.Reshape(op.Reshape(op.Gather(flat, index, axis=0), [-1]), op.Shape(index))
        full = op.Expand(op.And(q_true, kv), target)
        return op.Add(scores, op.Where(full, zero, neg))

    def check(
        self, context, scores, mask, b_idx, k_idx, stride, q_true, target, zero, neg, flat, **_
    ) -> MatchResult:
        result = MatchResult()
        if mask.dtype != ir.DataType.BOOL or not _ir_utils.has_rank(mask, 2):
            return result.fail("the mask is not a 2-D bool tensor", mask)
        if _int_attr(flat.producer(), "axis", 1) != 2:
            return result.fail("Flatten does not flatten the whole mask", flat)
        if not _ir_utils.has_rank(scores, 4):
            return result.fail("the scores are not 4-D", scores)
        if _single(zero) is None or _single(neg) is None:
            return result.fail("Where's branches are not 1-element constants", zero)
        batch = _arange(b_idx, 4)
        if batch is None or batch[1] != 0:
            return result.fail("the batch index is not arange(B) on axis 0 of 4", b_idx)
        if not _same_dim(_scalar_dim(batch[0]), scores, 0):
            return result.fail("the batch index does not run over the scores' batch", b_idx)
        keys = _arange(k_idx, 4)
        if keys is None or keys[1] != 3:
            return result.fail("the key index is not arange(T) on axis 3 of 4", k_idx)
        if not _same_dim(_scalar_dim(keys[0]), mask, 1):
            return result.fail("the key index does not run over the mask's length", k_idx)
        if not _same_dim(_dim(stride), mask, 1):
            return result.fail("the row stride is not the mask's length", stride)
        ranges = _true_ranges(q_true)
        if ranges is None:
            return result.fail("the query-side mask is not provably all True", q_true)
        q_shape = q_true.shape
        if q_shape is None or q_shape.rank() != 4 or any(q_shape[i] != 1 for i in (0, 1, 3)):
            return result.fail("the query-side mask is not [1, 1, S, 1]", q_true)
        for limit, axis in ranges:
            if axis != 2 or not _same_dim(_scalar_dim(limit), scores, 2):
                return result.fail("the query-side mask's length is not the query's", q_true)
        if not ranges and q_shape[2] != 1 and not _same_dim((q_true, 2), scores, 2):
            return result.fail("the query-side mask's length is not the query's", q_true)
        entries = _expand_entries(target)
        if entries is None or len(entries) != 4:
            return result.fail("Expand's target is not 4 known entries", target)
        for axis, entry in enumerate(entries):
            if _ints(entry) in ([-1], [1]) or _same_dim(_dim(entry), scores, axis):
                continue
            if axis == 3 and _same_dim(_dim(entry), mask, 1):
                continue
            return result.fail(f"Expand's target entry {axis} may enlarge the mask", entry)
        return result

    def rewrite(self, op, scores, mask, zero, neg, **_):
        key = (id(mask), zero.const_value.tobytes(), neg.const_value.tobytes())
        bias = self._made.get(key)
        if bias is None:
            unsqueezed = op.Unsqueeze(mask, op.Constant(value_ints=[1, 2]))
            bias = op.Where(unsqueezed, zero, neg)
            self._made[key] = bias
        return op.Add(scores, bias)


class SoftmaxGuardRule(pattern.RewriteRuleClassBase):
    """Drops the NaN guard of a ``-inf``-masked softmax; the mask uses the lowest float.

    Matches::

        p = Softmax(Add(scores, Where(m, zero, -inf)))
        y = Where(IsNaN(p), 0, p)

    Rewrites to ``Softmax(Add(scores, Where(m, zero, lowest)))`` (``lowest`` = the most
    negative finite value of the dtype). With at least one unmasked key in a row both give
    the same weights (``exp(lowest + s - max)`` is 0 like ``exp(-inf)``); a row with every
    key masked gives uniform weights instead of 0. ORT's fused attention has no guard: with
    ``-inf`` such a row would be NaN.
    """

    def __init__(self) -> None:
        super().__init__("BertSoftmaxGuard", remove_nodes=False)
        self._made: dict[tuple[int, int, int], ir.Value] = {}

    def setup(self) -> None:
        self._made = {}

    def pattern(self, op, scores, m, zero, neg, guard):
        probs = op.Softmax(op.Add(scores, op.Where(m, zero, neg)), _outputs=["probs"])
        return op.Where(op.IsNaN(probs), guard, probs)

    def check(self, context, scores, zero, neg, guard, probs, **_) -> MatchResult:
        result = MatchResult()
        rank = _rank(scores)
        opset = context.model.opset_imports.get("", 0)
        axis = _int_attr(probs.producer(), "axis", -1 if opset >= 13 else 1)
        if rank is None or axis is None or axis not in (-1, rank - 1):
            return result.fail("the softmax is not over the last axis", probs)
        guard_rank = _rank(guard)
        if guard_rank is None or guard_rank > rank:
            return result.fail("the guard's constant would broadcast the result", guard)
        value = _single(neg)
        if value is None or value != -np.inf:
            return result.fail("the mask's fill value is not -inf", neg)
        if _single(zero) is None or not np.isfinite(_single(zero)):
            return result.fail("the mask's pass value is not a finite constant", zero)
        if _single(guard) != 0.0:
            return result.fail("the guard does not replace NaN by 0", guard)
        if neg.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE):
            return result.fail("the mask's dtype has no finite lowest value here", neg)
        return result

    def rewrite(self, op, scores, m, zero, neg, probs, **_):
        key = (id(m), id(zero), id(neg))
        bias = self._made.get(key)
        if bias is None:
            array = neg.const_value.numpy()
            lowest = np.full_like(array, np.finfo(array.dtype).min)
            bias = op.Where(m, zero, op.Constant(value=ir.tensor(lowest)))
            self._made[key] = bias
        return op.Softmax(op.Add(scores, bias), axis=-1)


class MaskQueryBroadcastRule(pattern.RewriteRuleClassBase):
    """A ``[B, 1, 1, T]`` attention bias -> expanded along the query axis, ``[B, 1, S, T]``.

    Matches ``Add(scores, bias)`` with 4-D ``scores`` and a 4-D ``bias`` whose query axis
    (2) is a static 1. Rewrites to ``Add(scores, Expand(bias, [1, 1, S, 1]))`` with ``S``
    read by ``Shape`` off the tensor the scores' query length is copied from (followed
    back through the attention: MatMul, Transpose, Reshape, projections; see
    :func:`_dim_chain`), so the sum is unchanged. ORT's MultiHeadAttention/Attention take
    a bias with the query axis; onnxscript's MHA rule would otherwise insert a per-layer
    Expand that reads the query projection, and that extra use blocks its Q/K/V-bias and
    QKV-packing rules. One Expand is shared by every layer whose query length is the same
    named dim.
    """

    def __init__(self) -> None:
        super().__init__("BertMaskQueryBroadcast", remove_nodes=False)
        self._made: dict[tuple[object, ...], ir.Value] = {}

    def setup(self) -> None:
        self._made = {}

    def pattern(self, op, scores, bias):
        return op.Add(scores, bias, _outputs=["summed"])

    def check(self, context, scores, bias, summed, **_) -> MatchResult:
        result = MatchResult()
        uses = list(summed.uses())
        if not uses or any(not _is_op(use.node, "Softmax") for use in uses):
            return result.fail("the sum does not feed a softmax (not attention scores)", summed)
        if not _ir_utils.has_rank(scores, 4) or not _ir_utils.has_rank(bias, 4):
            return result.fail("scores and bias are not both 4-D", scores)
        if _ir_utils.get_dim(bias, 2) != 1 or _ir_utils.get_dim(bias, 3) == 1:
            return result.fail("the bias is not [., ., 1, T]", bias)
        if _ir_utils.get_dim(scores, 2) == 1 or _constant(bias) is not None:
            return result.fail("nothing to broadcast, or a constant bias", bias)
        if bias.dtype != scores.dtype or scores.dtype not in (
            ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16
        ):
            return result.fail("not a floating-point attention bias", bias)
        chain = _dim_chain(scores, 2)
        if len(chain) < 2:
            return result.fail("the scores' query length has no source to read", scores)
        self._source = chain[-1]
        return result

    def rewrite(self, op, scores, bias, **_):
        source, axis = self._source
        dim = _ir_utils.get_dim(source, axis)
        named = isinstance(dim, ir.SymbolicDim) and dim.value is not None
        key = (id(bias), dim.value if named else (id(source), axis))  # type: ignore[union-attr]
        expanded = self._made.get(key)
        if expanded is None:
            one = op.Constant(value_ints=[1])
            length = op.Shape(source, start=axis, end=axis + 1)
            expanded = op.Expand(bias, op.Concat(one, one, length, one, axis=0))
            self._made[key] = expanded
        return op.Add(scores, expanded)


class HeadReshapeRule(pattern.RewriteRuleClassBase):
    """A ``Reshape`` whose target is computed from shapes -> a constant target, or nothing.

    Matches ``Reshape(x, Concat(e0, e1, ...))`` (``allowzero=0``) where each entry is a
    1-element constant or ``[y.shape[j]]`` (read by Shape/Gather/Unsqueeze) that provably
    equals ``x.shape[i]`` for its position ``i`` (see :func:`_same_dim`) or is a static
    size. Such an entry becomes 0 ("copy that dim"), and a -1 entry is computed from the
    static dims of ``x`` that are not copied. A target that copies every dim of ``x`` is
    an identity: the Reshape is removed.

    Examples (BERT's head split and the no-op reshape after attention)::

        before: Reshape(q, Concat(Unsqueeze(Gather(Shape(h), 0)), ..., [-1], [32]))
        after:  Reshape(q, [0, 0, 12, 32])                       # q: [B, S, 384]

        before: Reshape(o, Concat(Unsqueeze(Gather(Shape(o), 0)), [-1], ...S..., ...32...))
        after:  o                                                # o: [B, 12, S, 32]

    A -1 that stands for dynamic dims stays (``Reshape(x, [0, 0, -1])``).
    """

    def pattern(self, op, x, target):
        return op.Reshape(x, target, _outputs=["reshaped"])

    def check(self, context, x, target, reshaped, **_) -> MatchResult:
        result = MatchResult()
        if _int_attr(reshaped.producer(), "allowzero", 0) != 0:
            return result.fail("allowzero=1 Reshape", reshaped)
        concat = target.producer()
        if not _is_op(concat, "Concat") or _int_attr(concat, "axis", None) != 0:
            return result.fail("the target is not a Concat", target)
        if x.shape is None:
            return result.fail("the input's shape is unknown", x)
        dims = list(x.shape.dims)
        new: list[int] = []
        dynamic = False
        for i, entry in enumerate(concat.inputs):
            if entry is None or entry.shape is None or entry.shape.dims != (1,):
                return result.fail(f"target entry {i} is not a 1-element tensor", entry)
            ints = _ints(entry)
            if ints is not None:
                new.append(ints[0])
                continue
            dynamic = True
            source = _dim(entry)
            if i < len(dims) and _same_dim(source, x, i):
                new.append(0)
                continue
            size = _ir_utils.get_dim(*source) if source is not None else None
            if isinstance(size, int):
                new.append(size)
                continue
            return result.fail(f"target entry {i} is not a known dim of the input", entry)
        if not dynamic:
            return result.fail("the target is already constant (constant folding's job)")
        if new.count(-1) > 1 or any(v < -1 for v in new):
            return result.fail("the target is not a valid Reshape target", target)
        copied = {i for i, v in enumerate(new) if v == 0}
        if -1 in new and len(new) == len(dims) and len(copied) == len(dims) - 1:
            new[new.index(-1)] = 0  # every other dim is copied: -1 is the one left over
            copied = set(range(len(dims)))
        if -1 in new:  # compute it when the dims it stands for are static
            rest = [d for i, d in enumerate(dims) if i not in copied]
            known = int(np.prod([v for v in new if v > 0], dtype=np.int64))
            if all(isinstance(d, int) for d in rest) and known > 0:
                total = int(np.prod(rest, dtype=np.int64))
                if total % known == 0:
                    new[new.index(-1)] = total // known
        self._target = new
        self._identity = (
            len(new) == len(dims)
            and all(v == 0 or v == d for v, d in zip(new, dims))
            and not x.is_graph_input()
            and not x.is_graph_output()
            and not x.is_initializer()
            and not reshaped.is_graph_output()
        )
        return result

    def rewrite(self, op, x, **_):
        if self._identity:
            return x
        return op.Reshape(x, op.Constant(value_ints=self._target))


class BiasAddOrderRule(pattern.RewriteRuleClassBase):
    """``Add(bias, MatMul(x, W))`` -> ``Add(MatMul(x, W), bias)`` for a constant 1-D bias."""

    def pattern(self, op, bias, x, w):
        return op.Add(bias, op.MatMul(x, w, _outputs=["projected"]))

    def check(self, context, bias, projected, **_) -> MatchResult:
        result = MatchResult()
        if _constant(bias) is None or not _ir_utils.has_rank(bias, 1):
            return result.fail("the first operand is not a constant 1-D bias", bias)
        return result

    def rewrite(self, op, bias, x, w, **_):
        return op.Add(op.MatMul(x, w), bias)


class SkipNormBiasRule(pattern.RewriteRuleClassBase):
    """A bias Add feeding ``SkipLayerNormalization`` -> its ``bias`` input.

    Matches ``SkipLayerNormalization(Add(x, bias), skip, gamma, beta)`` (the Add on either
    of the first two inputs, its operands in either order) with a constant 1-D ``bias``
    and no bias input yet; rewrites to ``SkipLayerNormalization(x, skip, gamma, beta,
    bias)``. All four outputs keep their meaning (the fourth is ``x + skip + bias``).
    onnxscript's skip-norm rules take the bias only as ``Add(x, bias)``; the TorchScript
    exporter writes ``Add(bias, x)``.
    """

    def __init__(self, name: str, *, biased_input: int) -> None:
        super().__init__(name)
        self._biased_input = biased_input

    def pattern(self, op, x, bias, other, gamma, beta):
        biased = op.Add(x, bias)
        inputs = (biased, other) if self._biased_input == 0 else (other, biased)
        return op.SkipLayerNormalization(
            *inputs,
            gamma,
            beta,
            _domain="com.microsoft",
            _allow_other_inputs=True,  # onnxscript's own fusion writes a None bias slot
            _outputs=["normalized", "mean", "inv_std", "sum"],
        )

    def check(self, context, x, bias, normalized, **_) -> MatchResult:
        result = MatchResult()
        if _constant(bias) is None or not _ir_utils.has_rank(bias, 1):
            return result.fail("the added operand is not a constant 1-D bias", bias)
        hidden = _ir_utils.get_dim(x, -1)
        if not isinstance(hidden, int) or bias.shape[0] != hidden:
            return result.fail("the bias does not match the hidden size", bias)
        extra = normalized.producer().inputs[4:]
        if any(v is not None for v in extra):
            return result.fail("the node already has a bias input", normalized)
        return result

    def rewrite(self, op, x, bias, other, gamma, beta, normalized, **_):
        epsilon = normalized.producer().attributes.get_float("epsilon", None)
        return op.SkipLayerNormalization(
            x,
            other,
            gamma,
            beta,
            bias,
            epsilon=epsilon,
            _domain="com.microsoft",
            _outputs=4,
        )


# --------------------------------------------------------------------------- GELU


class OnnxGeluErf(ort_gelu.GeluErfFusion):
    """onnxscript's erf-form GELU pattern, rewritten to the standard ``Gelu`` (opset 20)."""

    def rewrite(self, op, x):
        return op.Gelu(x)


class OnnxGeluTanh(ort_gelu.GeluTanhFusion):
    """onnxscript's tanh-form GELU pattern -> ``Gelu(approximate="tanh")`` (opset 20)."""

    def rewrite(self, op, x):
        return op.Gelu(x, approximate="tanh")


def _onnx_gelu(op, x):
    return op.Gelu(x)


def _gelu_rules() -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet(
        [
            pattern.RewriteRule(erfgelu.erf_gelu_pattern_1, _onnx_gelu, name="OnnxGeluErf1"),
            pattern.RewriteRule(erfgelu.erf_gelu_pattern_2, _onnx_gelu, name="OnnxGeluErf2"),
            OnnxGeluErf.rule(),
            OnnxGeluTanh.rule(),
        ]
    )


#: Targets with standard ONNX ops only.
_STANDARD_ONLY = STANDARD_TARGETS - ORT_TARGETS

#: Rules of this module, in application order (see catalog.py for where they run).
RULES: list[Rule] = [
    Rule(
        "bert-softmax-guard",
        "Where(IsNaN(softmax of -inf-masked scores), 0, .) -> softmax with the lowest float",
        lambda: pattern.RewriteRuleSet([SoftmaxGuardRule.rule()], commute=True),
        ORT_TARGETS,
        group="attention",
    ),
    Rule(
        "bert-padding-mask",
        "traced Hugging Face SDPA padding mask (index Gather) -> Unsqueeze(mask, [1, 2])",
        lambda: pattern.RewriteRuleSet([PaddingMaskRule.rule()], commute=True),
        STANDARD_TARGETS,
        group="attention",
        shape_inference=True,
    ),
    Rule(
        "bert-head-reshape",
        "Reshape to a Concat of input dims and [-1, Dh] -> Reshape(x, [0, 0, H, Dh])",
        lambda: [HeadReshapeRule.rule()],
        STANDARD_TARGETS,
        group="attention",
        shape_inference=True,
    ),
    Rule(
        "bert-mask-broadcast",
        "Add(scores, bias [B,1,1,T]) -> Add(scores, Expand(bias, [1,1,S,1])) (ORT's bias form)",
        lambda: pattern.RewriteRuleSet([MaskQueryBroadcastRule.rule()], commute=True),
        ORT_TARGETS,
        group="attention",
        shape_inference=True,
    ),
    Rule(
        "bert-bias-add-order",
        "Add(bias, MatMul(x, W)) -> Add(MatMul(x, W), bias) (the attention rules' order)",
        lambda: [BiasAddOrderRule.rule()],
        ORT_TARGETS,
        group="attention",
    ),
    Rule(
        "bert-skip-norm-bias",
        "SkipLayerNormalization(Add(bias, x), skip, ...) -> SkipLayerNormalization(x, skip, ..., bias)",
        lambda: pattern.RewriteRuleSet(
            [
                SkipNormBiasRule.rule("SkipNormBiasOnInput", biased_input=0),
                SkipNormBiasRule.rule("SkipNormBiasOnSkip", biased_input=1),
            ],
            commute=True,
        ),
        ORT_TARGETS,
        group="normalization",
    ),
    Rule(
        "gelu-onnx",
        "erf- and tanh-form GELU -> standard Gelu (opset 20)",
        _gelu_rules,
        _STANDARD_ONLY,
        group="activation",
        min_opset=20,
    ),
]
