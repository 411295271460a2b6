"""Convolution and Gemm fusions.

Four families, applied after :data:`graphopt.passes.fusion.generic.RULES` (BatchNorm into
Conv/Gemm, MatMul + Add -> Gemm, Pad into Conv), in this order:

1. ``conv-scale-bias-folding`` / ``gemm-scale-bias-folding`` / ``matmul-scale-folding``
   (every target): a constant Mul or Add that acts per output channel is folded into the
   weights and bias of the Conv/Gemm/MatMul before it; a constant per-input-feature Mul
   before a MatMul/Gemm with constant weights scales the weight rows::

       before: y = Add(Mul(Conv(x, W, b), s), t)       # s, t: [1, M, 1, 1] constants
       after:  y = Conv(x, W·s, b·s + t)

2. ``matmul-batchnorm-folding`` (every target): BatchNormalization after a MatMul with a
   constant 2-D weight (2-D activations, a 1x1-conv-like ``MatMul(W, x)`` on 3-D
   activations, or a ``Transpose`` that moves the features to axis 1) -> MatMul with
   scaled weights + Add of the folded bias.
3. ``conv-activation`` (ORT): Conv followed by Relu, Clip, Sigmoid, HardSigmoid,
   LeakyRelu, Tanh or HardSwish -> ``com.microsoft::FusedConv`` with ``activation`` and
   ``activation_params`` (LeakyRelu: alpha; HardSigmoid: alpha, beta; Clip: min, max).
4. ``gemm-activation`` (ORT): Gemm followed by Relu, Sigmoid, Tanh, LeakyRelu,
   HardSigmoid, Elu, Selu, Softplus, Softsign or ThresholdedRelu ->
   ``com.microsoft::FusedGemm`` with ``activation`` and ``activation_alpha`` /
   ``activation_beta`` / ``activation_gamma`` (ORT's CPU kernel has no Clip).

Safety rules every folding obeys (each failure is a ``MatchResult`` reason that
``fuse(explain=true)`` reports as the closest miss):

- weights, biases and the folded constants must be constants (initializers or
  ``Constant`` outputs) that are not graph inputs (a graph input can be overridden);
- the constant must provably act per channel: after right-aligning its shape with the
  output's, every axis but the channel axis is 1 and its rank does not exceed the output's
  (so broadcasting cannot change the output's shape);
- floating-point element types only, and the same type on both sides;
- new weights are always *new* initializers with fresh names: a weight shared with other
  nodes is never changed for them (onnxscript replaces an initializer of the same name).

ONNX Runtime's CPU ``FusedConv`` and ``FusedGemm`` kernels are registered for float32
only, so the ORT rules require float32. Both activation fusions need the Conv/Gemm output
to have this one consumer (the matcher refuses otherwise).

What they buy (ORT 1.32 CPU, 2 threads, measured with ``tools/bench_fusion.py`` and a
Gemm micro-benchmark): ONNX Runtime's own optimizer (``ORT_ENABLE_EXTENDED`` and up) does
the same Conv/Gemm + activation fusions at session creation, so with its default
optimizations the fused and unfused models run at the same speed (ratios 0.97-1.03, and
``FusedConv`` still goes through ORT's NCHWc layout transformer). With ORT's optimizations
off the fused model is faster by the saved activation passes (ResNet-50 with BatchNorm
folded and FusedConv: 0.94; a 64x512x512 Gemm + Relu -> FusedGemm: 0.98, i.e. within
noise). The rules stay: they make the graph smaller, keep the speed for sessions that run
with basic or no optimizations, and move the work out of every session's start-up.

Scale folding keeps numerics within ``fusion`` tolerance: the new weights are computed in
float64 and rounded once to the weight's type. When several nodes share a weight and each
folds a different scale, each gets its own copy (the model grows by those copies).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any, NoReturn

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter._basics import MatchFailureError

from graphopt.rewrite import ORT_TARGETS, STANDARD_TARGETS, Rule

_MS_DOMAIN = "com.microsoft"
_FLOAT_TYPES = frozenset(
    {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
)
_FLOAT32_LOWEST = float(np.finfo(np.float32).min)
_FLOAT32_MAX = float(np.finfo(np.float32).max)
#: Suffix of names this module gives new initializers (not repeated on a second fold).
_FUSED_SUFFIX = re.compile(r"_fused(_\d+)?$")


# --------------------------------------------------------------------------- helpers


def _fail(reason: str, *sources: ir.Node | ir.Value) -> NoReturn:
    """Rejects the match with ``reason`` (caught by onnxscript's matcher)."""
    raise MatchFailureError(reason, *sources)


def _producer(value: ir.Value) -> ir.Node:
    node = value.producer()
    assert node is not None, f"value {value.name!r} bound to a pattern node has no producer"
    return node


def _constant(value: ir.Value | None, role: str) -> np.ndarray:
    """The constant array behind ``value``; rejects the match when there is none.

    Graph inputs are never constants here, even when they also have an initializer (the
    caller may feed another value).
    """
    if value is None:
        _fail(f"{role} is missing")
    if value.is_graph_input():
        _fail(f"{role} '{value.name}' is a graph input (it may be overridden at run time)", value)
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is None:
        _fail(f"{role} '{value.name}' is not a constant", value)
    return tensor.numpy()


def _name_of(value: ir.Value | None) -> str | None:
    return value.name if value is not None else None


def _optional_input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def _check_float(array: np.ndarray, role: str, like: np.ndarray | None = None) -> None:
    dtype = ir.DataType.from_numpy(array.dtype)
    if dtype not in _FLOAT_TYPES:
        _fail(f"{role} has element type {dtype.name}; only floating-point weights are folded")
    if like is not None and array.dtype != like.dtype:
        _fail(f"{role} is {array.dtype}, the weight is {like.dtype}")


def _known_rank(value: ir.Value | None) -> int | None:
    """The value's rank when shape inference recorded it, else None."""
    if value is None or value.shape is None:
        return None
    return len(value.shape)


def _channel_vector(
    c: np.ndarray, out_rank: int, axis: int, channels: int, role: str
) -> np.ndarray:
    """``c`` as a ``[channels]`` vector, if it provably acts per channel.

    ``c`` broadcasts against an output of rank ``out_rank`` (or more) whose channel axis is
    ``axis`` (negative: from the end) and has ``channels`` entries. It acts per channel
    when, right-aligned with the output, every axis except the channel axis is 1, the
    channel axis is 1 or ``channels``, and its rank is at most ``out_rank`` (so
    broadcasting cannot change the output's shape).
    """
    if c.ndim > out_rank:
        _fail(
            f"{role} has rank {c.ndim} but the output has rank {out_rank}: broadcasting "
            "would change the output's shape"
        )
    axis = axis % out_rank
    full = (1,) * (out_rank - c.ndim) + tuple(c.shape)
    for i, d in enumerate(full):
        if i == axis:
            if d not in (1, channels):
                _fail(
                    f"{role} of shape {list(c.shape)} has {d} entries on the channel axis; "
                    f"expected 1 or {channels}"
                )
        elif d != 1:
            _fail(
                f"{role} of shape {list(c.shape)} varies along output axis {i}, not only "
                f"along the channel axis {axis}: it is not per-channel"
            )
    return np.broadcast_to(c.reshape(-1), (channels,)).copy()


def _scaled(weight: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """``weight * factor`` computed in float64 and rounded once to the weight's type."""
    return (weight.astype(np.float64) * factor.astype(np.float64)).astype(weight.dtype)


def _fresh_initializer(op: Any, anchor: ir.Node, array: np.ndarray, base: str | None) -> ir.Value:
    """A new initializer holding ``array`` under a name no initializer of the graph has.

    onnxscript's rewriter *replaces* an existing initializer of the same name, which would
    change a shared weight for its other users; a fresh name keeps the original intact
    (it is removed later if nothing uses it any more).
    """
    graph = anchor.graph
    taken = set(graph.initializers) if isinstance(graph, ir.Graph) else set()
    taken.update(v.name for v in op.initializers)
    stem = _FUSED_SUFFIX.sub("", base or "weight") + "_fused"
    name = stem
    k = 1
    while name in taken:
        name = f"{stem}_{k}"
        k += 1
    return op.initializer(ir.tensor(np.ascontiguousarray(array)), name=name)


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def _float_attr(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_float()


def _scalar(value: ir.Value | None, role: str) -> float | None:
    """A constant scalar input as a float (None when the optional input is absent)."""
    if value is None:
        return None
    array = _constant(value, role)
    if array.size != 1:
        _fail(f"{role} has shape {list(array.shape)}; expected a scalar", value)
    return float(array.reshape(()))


def _gemm_weight_axes(gemm: ir.Node, b: np.ndarray) -> tuple[int, int]:
    """(axis of B along the output columns N, axis of B along the reduction K)."""
    if b.ndim != 2:
        _fail(f"Gemm's B has rank {b.ndim}; expected 2")
    return (0, 1) if _int_attr(gemm, "transB", 0) else (1, 0)


def _check_gemm(gemm: ir.Node) -> None:
    if "broadcast" in gemm.attributes:
        _fail("Gemm uses the legacy 'broadcast' attribute (opset < 7)", gemm)


def _broadcast_along(vector: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return vector.reshape(shape)


# --------------------------------------------------------------------------- Conv Mul/Add


class _ConvChannelFold(pattern.RewriteRuleClassBase):
    """``Conv(x, W, b) ⊙ c`` with ``c`` a per-output-channel constant -> ``Conv``."""

    _op = "Mul"

    def pattern(self, op: Any, x: ir.Value, c: ir.Value) -> Any:
        conv = op.Conv(x, _allow_other_inputs=True, _outputs=["conv_out"])
        return getattr(op, self._op)(conv, c)

    def _parts(
        self, c: ir.Value, conv_out: ir.Value
    ) -> tuple[ir.Node, np.ndarray, np.ndarray | None, np.ndarray]:
        conv = _producer(conv_out)
        w = _constant(conv.inputs[1], "Conv weight")
        _check_float(w, "Conv weight")
        bias_value = _optional_input(conv, 2)
        bias = _constant(bias_value, "Conv bias") if bias_value is not None else None
        cval = _constant(c, f"{self._op} operand")
        _check_float(cval, f"{self._op} operand", like=w)
        vector = _channel_vector(cval, w.ndim, 1, w.shape[0], f"{self._op} operand")
        return conv, w, bias, vector

    def check(self, context: Any, x: ir.Value, c: ir.Value, conv_out: ir.Value, **_: Any) -> Any:
        del context, x
        self._parts(c, conv_out)
        return pattern.MatchResult()

    def rewrite(self, op: Any, x: ir.Value, c: ir.Value, conv_out: ir.Value, **_: Any) -> Any:
        conv, w, bias, vector = self._parts(c, conv_out)
        w_name = _name_of(conv.inputs[1])
        b_value = _optional_input(conv, 2)
        b_name = b_value.name if b_value is not None else f"{w_name}_bias"
        if self._op == "Mul":
            new_w = _scaled(w, _broadcast_along(vector, 0, w.ndim))
            w_in = _fresh_initializer(op, conv, new_w, w_name)
            if bias is None:
                return op.Conv(x, w_in, **conv.attributes)
            b_in = _fresh_initializer(op, conv, _scaled(bias, vector), b_name)
            return op.Conv(x, w_in, b_in, **conv.attributes)
        base = bias if bias is not None else np.zeros(w.shape[0], dtype=w.dtype)
        new_b = (base.astype(np.float64) + vector.astype(np.float64)).astype(w.dtype)
        b_in = _fresh_initializer(op, conv, new_b, b_name)
        return op.Conv(x, conv.inputs[1], b_in, **conv.attributes)


class ConvMulFold(_ConvChannelFold):
    """``Mul(Conv(x, W, b), s)`` -> ``Conv(x, W·s, b·s)`` for a per-output-channel ``s``."""

    _op = "Mul"


class ConvAddFold(_ConvChannelFold):
    """``Add(Conv(x, W, b), t)`` -> ``Conv(x, W, b + t)`` for a per-output-channel ``t``."""

    _op = "Add"


# --------------------------------------------------------------------------- Gemm Mul/Add


class _GemmColumnFold(pattern.RewriteRuleClassBase):
    """``Gemm(a, B, C) ⊙ c`` with ``c`` a per-output-column constant -> ``Gemm``."""

    _op = "Mul"

    def pattern(self, op: Any, a: ir.Value, c: ir.Value) -> Any:
        gemm = op.Gemm(a, _allow_other_inputs=True, _outputs=["gemm_out"])
        return getattr(op, self._op)(gemm, c)

    def _parts(
        self, c: ir.Value, gemm_out: ir.Value
    ) -> tuple[ir.Node, np.ndarray, np.ndarray | None, np.ndarray, int]:
        gemm = _producer(gemm_out)
        _check_gemm(gemm)
        b = _constant(gemm.inputs[1], "Gemm weight B")
        _check_float(b, "Gemm weight B")
        n_axis, _ = _gemm_weight_axes(gemm, b)
        c_value = _optional_input(gemm, 2)
        bias = _constant(c_value, "Gemm bias C") if c_value is not None else None
        cval = _constant(c, f"{self._op} operand")
        _check_float(cval, f"{self._op} operand", like=b)
        vector = _channel_vector(cval, 2, 1, b.shape[n_axis], f"{self._op} operand")
        return gemm, b, bias, vector, n_axis

    def check(self, context: Any, a: ir.Value, c: ir.Value, gemm_out: ir.Value, **_: Any) -> Any:
        del context, a
        self._parts(c, gemm_out)
        return pattern.MatchResult()

    def rewrite(self, op: Any, a: ir.Value, c: ir.Value, gemm_out: ir.Value, **_: Any) -> Any:
        gemm, b, bias, vector, n_axis = self._parts(c, gemm_out)
        attrs = dict(gemm.attributes)
        b_name = _name_of(gemm.inputs[1])
        c_value = _optional_input(gemm, 2)
        c_name = c_value.name if c_value is not None else f"{b_name}_bias"
        if self._op == "Mul":
            b_in = _fresh_initializer(
                op, gemm, _scaled(b, _broadcast_along(vector, n_axis, 2)), b_name
            )
            if bias is None:
                return op.Gemm(a, b_in, **attrs)
            c_in = _fresh_initializer(op, gemm, _scaled(bias, vector), c_name)
            return op.Gemm(a, b_in, c_in, **attrs)
        beta = _float_attr(gemm, "beta", 1.0)
        base = np.zeros((), np.float64) if bias is None else beta * bias.astype(np.float64)
        new_c = (base + vector.astype(np.float64)).astype(b.dtype)
        attrs.pop("beta", None)
        c_in = _fresh_initializer(op, gemm, new_c, c_name)
        return op.Gemm(a, gemm.inputs[1], c_in, **attrs)


class GemmMulFold(_GemmColumnFold):
    """``Mul(Gemm(a, B, C), s)`` -> ``Gemm(a, B·s, C·s)`` for a per-column ``s``."""

    _op = "Mul"


class GemmAddFold(_GemmColumnFold):
    """``Add(Gemm(a, B, C), t)`` -> ``Gemm(a, B, β·C + t, beta=1)`` for a per-column ``t``."""

    _op = "Add"


# --------------------------------------------------------------------------- MatMul scales


def _matmul_weight(value: ir.Value, role: str = "MatMul weight") -> np.ndarray:
    w = _constant(value, role)
    _check_float(w, role)
    if w.ndim != 2:
        _fail(f"{role} has rank {w.ndim}; only 2-D weights are folded", value)
    return w


def _matmul_out_rank(x: ir.Value, out: ir.Value | None) -> int:
    """A lower bound of ``MatMul(x, W2d)``'s rank (exact when shapes are known)."""
    known = _known_rank(out)
    if known is not None:
        return known
    x_rank = _known_rank(x)
    return max(1, x_rank) if x_rank is not None else 1


class MatMulMulFold(pattern.RewriteRuleClassBase):
    """``Mul(MatMul(x, W), s)`` -> ``MatMul(x, W·s)`` for ``s`` per output column."""

    def pattern(self, op: Any, x: ir.Value, w: ir.Value, c: ir.Value) -> Any:
        return op.Mul(op.MatMul(x, w, _outputs=["mm_out"]), c)

    def _vector(self, x: ir.Value, w: ir.Value, c: ir.Value, mm_out: ir.Value) -> np.ndarray:
        wval = _matmul_weight(w)
        cval = _constant(c, "Mul operand")
        _check_float(cval, "Mul operand", like=wval)
        rank = _matmul_out_rank(x, mm_out)
        return _channel_vector(cval, rank, -1, wval.shape[1], "Mul operand")

    def check(
        self, context: Any, x: ir.Value, w: ir.Value, c: ir.Value, mm_out: ir.Value, **_: Any
    ) -> Any:
        del context
        self._vector(x, w, c, mm_out)
        return pattern.MatchResult()

    def rewrite(
        self, op: Any, x: ir.Value, w: ir.Value, c: ir.Value, mm_out: ir.Value, **_: Any
    ) -> Any:
        vector = self._vector(x, w, c, mm_out)
        wval = _constant(w, "MatMul weight")
        w_in = _fresh_initializer(op, _producer(mm_out), _scaled(wval, vector[None, :]), w.name)
        return op.MatMul(x, w_in)


class MatMulAddMulFold(pattern.RewriteRuleClassBase):
    """``Mul(Add(MatMul(x, W), b), s)`` -> ``Add(MatMul(x, W·s), b·s)``, ``s`` per column."""

    def pattern(self, op: Any, x: ir.Value, w: ir.Value, b: ir.Value, c: ir.Value) -> Any:
        return op.Mul(op.Add(op.MatMul(x, w, _outputs=["mm_out"]), b, _outputs=["add_out"]), c)

    def _parts(
        self,
        x: ir.Value,
        w: ir.Value,
        b: ir.Value,
        c: ir.Value,
        mm_out: ir.Value,
        add_out: ir.Value,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        wval = _matmul_weight(w)
        bval = _constant(b, "Add operand")
        _check_float(bval, "Add operand", like=wval)
        cval = _constant(c, "Mul operand")
        _check_float(cval, "Mul operand", like=wval)
        rank = _known_rank(add_out)
        if rank is None:
            rank = max(_matmul_out_rank(x, mm_out), bval.ndim)
        vector = _channel_vector(cval, rank, -1, wval.shape[1], "Mul operand")
        return wval, bval, vector

    def check(
        self,
        context: Any,
        x: ir.Value,
        w: ir.Value,
        b: ir.Value,
        c: ir.Value,
        mm_out: ir.Value,
        add_out: ir.Value,
        **_: Any,
    ) -> Any:
        del context
        self._parts(x, w, b, c, mm_out, add_out)
        return pattern.MatchResult()

    def rewrite(
        self,
        op: Any,
        x: ir.Value,
        w: ir.Value,
        b: ir.Value,
        c: ir.Value,
        mm_out: ir.Value,
        add_out: ir.Value,
        **_: Any,
    ) -> Any:
        wval, bval, vector = self._parts(x, w, b, c, mm_out, add_out)
        anchor = _producer(mm_out)
        w_in = _fresh_initializer(op, anchor, _scaled(wval, vector[None, :]), w.name)
        b_in = _fresh_initializer(op, anchor, _scaled(bval, vector), b.name)
        return op.Add(op.MatMul(x, w_in), b_in)


class MulMatMulFold(pattern.RewriteRuleClassBase):
    """``MatMul(Mul(x, s), W)`` -> ``MatMul(x, s·W)`` for ``s`` per input feature (rows of W)."""

    def pattern(self, op: Any, x: ir.Value, c: ir.Value, w: ir.Value) -> Any:
        return op.MatMul(op.Mul(x, c), w, _outputs=["mm_out"])

    def _vector(self, x: ir.Value, c: ir.Value, w: ir.Value) -> tuple[np.ndarray, np.ndarray]:
        wval = _matmul_weight(w)
        cval = _constant(c, "Mul operand")
        _check_float(cval, "Mul operand", like=wval)
        x_rank = _known_rank(x)
        return wval, _channel_vector(cval, x_rank or 1, -1, wval.shape[0], "Mul operand")

    def check(self, context: Any, x: ir.Value, c: ir.Value, w: ir.Value, **_: Any) -> Any:
        del context
        self._vector(x, c, w)
        return pattern.MatchResult()

    def rewrite(
        self, op: Any, x: ir.Value, c: ir.Value, w: ir.Value, mm_out: ir.Value, **_: Any
    ) -> Any:
        wval, vector = self._vector(x, c, w)
        w_in = _fresh_initializer(op, _producer(mm_out), _scaled(wval, vector[:, None]), w.name)
        return op.MatMul(x, w_in)


class MulGemmFold(pattern.RewriteRuleClassBase):
    """``Gemm(Mul(a, s), B, C)`` (transA=0) -> ``Gemm(a, s·B, C)`` for ``s`` per input feature."""

    def pattern(self, op: Any, x: ir.Value, c: ir.Value) -> Any:
        return op.Gemm(op.Mul(x, c), _allow_other_inputs=True, _outputs=["gemm_out"])

    def _parts(
        self, c: ir.Value, gemm_out: ir.Value
    ) -> tuple[ir.Node, np.ndarray, np.ndarray, int]:
        gemm = _producer(gemm_out)
        _check_gemm(gemm)
        if _int_attr(gemm, "transA", 0):
            _fail("Gemm has transA=1: the Mul scales output rows, not weight rows", gemm)
        b = _constant(gemm.inputs[1], "Gemm weight B")
        _check_float(b, "Gemm weight B")
        _, k_axis = _gemm_weight_axes(gemm, b)
        cval = _constant(c, "Mul operand")
        _check_float(cval, "Mul operand", like=b)
        vector = _channel_vector(cval, 2, 1, b.shape[k_axis], "Mul operand")
        return gemm, b, vector, k_axis

    def check(self, context: Any, x: ir.Value, c: ir.Value, gemm_out: ir.Value, **_: Any) -> Any:
        del context, x
        self._parts(c, gemm_out)
        return pattern.MatchResult()

    def rewrite(self, op: Any, x: ir.Value, c: ir.Value, gemm_out: ir.Value, **_: Any) -> Any:
        gemm, b, vector, k_axis = self._parts(c, gemm_out)
        new_b = _scaled(b, _broadcast_along(vector, k_axis, 2))
        b_in = _fresh_initializer(op, gemm, new_b, _name_of(gemm.inputs[1]))
        return op.Gemm(x, b_in, *gemm.inputs[2:], **gemm.attributes)


# --------------------------------------------------------------------------- BatchNorm


def _batchnorm_affine(bn: ir.Node) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) in float64 so that ``BN(y) = y·scale + shift`` per channel."""
    if _int_attr(bn, "training_mode", 0):
        _fail("BatchNormalization runs in training mode", bn)
    if len(bn.inputs) < 5:
        _fail("BatchNormalization lacks scale/bias/mean/var inputs", bn)
    gamma, beta, mean, var = (
        _constant(v, f"BatchNormalization {role}")
        for v, role in zip(bn.inputs[1:5], ("scale", "bias", "mean", "variance"))
    )
    for array, role in ((gamma, "scale"), (beta, "bias"), (mean, "mean"), (var, "variance")):
        _check_float(array, f"BatchNormalization {role}")
        if array.ndim != 1:
            _fail(f"BatchNormalization {role} has rank {array.ndim}; expected 1", bn)
    eps = _float_attr(bn, "epsilon", 1e-5)
    scale = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)
    shift = beta.astype(np.float64) - mean.astype(np.float64) * scale
    return scale, shift


class MatMulBatchNormFold(pattern.RewriteRuleClassBase):
    """``BatchNormalization(MatMul(a, b))`` -> ``Add(MatMul(a', b'), shift)``.

    BatchNormalization normalizes axis 1. That is the MatMul's output-feature axis when the
    weight is ``b`` (2-D, ``[K, N]``) and the output is 2-D, or when the weight is ``a``
    (2-D, ``[M, K]``) and ``b`` is 3-D (a 1x1 convolution written as a MatMul).
    """

    def pattern(self, op: Any, a: ir.Value, b: ir.Value) -> Any:
        mm = op.MatMul(a, b, _outputs=["mm_out"])
        return op.BatchNormalization(mm, _allow_other_inputs=True, _outputs=["bn_out"])

    def _plan(
        self, a: ir.Value, b: ir.Value, mm_out: ir.Value, bn_out: ir.Value, **_: Any
    ) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
        bn = _producer(bn_out)
        scale, shift = _batchnorm_affine(bn)
        out_rank = _known_rank(mm_out)
        if out_rank is None:
            out_rank = _known_rank(bn_out)
        b_const = not b.is_graph_input() and ir.convenience.get_const_tensor(b) is not None
        a_const = not a.is_graph_input() and ir.convenience.get_const_tensor(a) is not None
        if b_const:
            w = _matmul_weight(b)
            if out_rank != 2:
                _fail(
                    f"MatMul output rank is {out_rank if out_rank is not None else 'unknown'}; "
                    "BatchNormalization's channel axis 1 is the weight's column axis only "
                    "for 2-D outputs"
                )
            side = "b"
            channels = w.shape[1]
        elif a_const:
            w = _matmul_weight(a)
            if _known_rank(b) != 3:
                _fail(
                    "constant left MatMul operand: folded only for a 3-D right operand "
                    "(BatchNormalization's axis 1 is then the weight's row axis)"
                )
            side = "a"
            channels = w.shape[0]
        else:
            _fail("neither MatMul operand is a constant (non graph-input) weight")
        if scale.shape[0] != channels:
            _fail(f"BatchNormalization has {scale.shape[0]} channels, the weight {channels}")
        return side, w, scale, shift

    def check(
        self, context: Any, a: ir.Value, b: ir.Value, mm_out: ir.Value, bn_out: ir.Value, **_: Any
    ) -> Any:
        del context
        self._plan(a, b, mm_out, bn_out)
        return pattern.MatchResult()

    def rewrite(
        self, op: Any, a: ir.Value, b: ir.Value, mm_out: ir.Value, bn_out: ir.Value, **_: Any
    ) -> Any:
        side, w, scale, shift = self._plan(a, b, mm_out, bn_out)
        anchor = _producer(mm_out)
        if side == "b":
            w_in = _fresh_initializer(op, anchor, _scaled(w, scale[None, :]), b.name)
            bias = _fresh_initializer(op, anchor, shift.astype(w.dtype), f"{b.name}_bn_bias")
            return op.Add(op.MatMul(a, w_in), bias)
        w_in = _fresh_initializer(op, anchor, _scaled(w, scale[:, None]), a.name)
        bias = _fresh_initializer(op, anchor, shift.astype(w.dtype)[:, None], f"{a.name}_bn_bias")
        return op.Add(op.MatMul(w_in, b), bias)


class MatMulTransposeBatchNormFold(pattern.RewriteRuleClassBase):
    """``BN(Transpose(MatMul(x, W)))`` with the features moved to axis 1 (``perm[1]`` is the
    last axis, e.g. ``[0, 2, 1]`` for ``[batch, seq, features]``) ->
    ``Transpose(Add(MatMul(x, W·s), shift))``."""

    def pattern(self, op: Any, x: ir.Value, w: ir.Value) -> Any:
        mm = op.MatMul(x, w, _outputs=["mm_out"])
        t = op.Transpose(mm, _outputs=["t_out"])
        return op.BatchNormalization(t, _allow_other_inputs=True, _outputs=["bn_out"])

    def _plan(
        self, x: ir.Value, w: ir.Value, t_out: ir.Value, bn_out: ir.Value, **_: Any
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, ir.Node]:
        bn = _producer(bn_out)
        scale, shift = _batchnorm_affine(bn)
        wval = _matmul_weight(w)
        transpose = _producer(t_out)
        perm_attr = transpose.attributes.get("perm")
        rank = _known_rank(t_out) or _known_rank(bn_out)
        if perm_attr is None:
            if rank is None:
                _fail("Transpose without perm and an unknown rank", transpose)
            perm = list(reversed(range(rank)))
        else:
            perm = list(perm_attr.as_ints())
        if len(perm) < 2 or perm[1] != len(perm) - 1:
            _fail(
                f"Transpose perm {perm} does not move the MatMul's feature axis to axis 1",
                transpose,
            )
        if scale.shape[0] != wval.shape[1]:
            _fail(f"BatchNormalization has {scale.shape[0]} channels, the weight {wval.shape[1]}")
        return wval, scale, shift, transpose

    def check(
        self, context: Any, x: ir.Value, w: ir.Value, t_out: ir.Value, bn_out: ir.Value, **_: Any
    ) -> Any:
        del context
        self._plan(x, w, t_out, bn_out)
        return pattern.MatchResult()

    def rewrite(
        self, op: Any, x: ir.Value, w: ir.Value, t_out: ir.Value, bn_out: ir.Value, **_: Any
    ) -> Any:
        wval, scale, shift, transpose = self._plan(x, w, t_out, bn_out)
        anchor = _producer(t_out)
        w_in = _fresh_initializer(op, anchor, _scaled(wval, scale[None, :]), w.name)
        bias = _fresh_initializer(op, anchor, shift.astype(wval.dtype), f"{w.name}_bn_bias")
        return op.Transpose(op.Add(op.MatMul(x, w_in), bias), **transpose.attributes)


# --------------------------------------------------------------------------- activations


def _dtype_of(*values: ir.Value | None) -> ir.DataType | None:
    for value in values:
        if value is None:
            continue
        if value.dtype is not None:
            return value.dtype
        tensor = ir.convenience.get_const_tensor(value) if not value.is_graph_input() else None
        if tensor is not None:
            return tensor.dtype
    return None


def _require_float32(kernel: str, node: ir.Node, *values: ir.Value | None) -> None:
    dtype = _dtype_of(*values)
    if dtype is None:
        _fail(f"element type unknown; ORT's CPU {kernel} runs float32 only", node)
    if dtype != ir.DataType.FLOAT:
        _fail(f"element type is {dtype.name}; ORT's CPU {kernel} runs float32 only", node)


def _clip_bounds(clip: ir.Node) -> tuple[float, float]:
    """Clip's (min, max) from attributes (opset < 11) or constant inputs (opset >= 11)."""
    low = _scalar(_optional_input(clip, 1), "Clip min")
    high = _scalar(_optional_input(clip, 2), "Clip max")
    if low is None:
        low = _float_attr(clip, "min", _FLOAT32_LOWEST)
    if high is None:
        high = _float_attr(clip, "max", _FLOAT32_MAX)
    if math.isnan(low) or math.isnan(high):
        _fail("Clip bound is NaN", clip)
    return low, high


#: Conv activations ORT's FusedConv runs (MLAS activation kinds), with their parameters.
CONV_ACTIVATIONS: tuple[str, ...] = (
    "Relu",
    "Clip",
    "Sigmoid",
    "HardSigmoid",
    "LeakyRelu",
    "Tanh",
    "HardSwish",
)


def _conv_activation_params(act: ir.Node) -> list[float]:
    kind = act.op_type
    if kind == "LeakyRelu":
        return [_float_attr(act, "alpha", 0.01)]
    if kind == "HardSigmoid":
        return [_float_attr(act, "alpha", 0.2), _float_attr(act, "beta", 0.5)]
    if kind == "Clip":
        return list(_clip_bounds(act))
    return []


class ConvActivationFusion(pattern.RewriteRuleClassBase):
    """``Act(Conv(x, W, b))`` -> ``com.microsoft::FusedConv(x, W, b, activation=Act)``."""

    def __init__(self, activation: str) -> None:
        super().__init__(name=f"Conv{activation}ToFusedConv")
        self._activation = activation

    def pattern(self, op: Any, x: ir.Value) -> Any:
        conv = op.Conv(x, _allow_other_inputs=True, _outputs=["conv_out"])
        return getattr(op, self._activation)(conv, _allow_other_inputs=True, _outputs=["act_out"])

    def check(
        self, context: Any, x: ir.Value, conv_out: ir.Value, act_out: ir.Value, **_: Any
    ) -> Any:
        del context
        conv = _producer(conv_out)
        _require_float32("FusedConv", conv, conv_out, x, conv.inputs[1])
        _conv_activation_params(_producer(act_out))
        return pattern.MatchResult()

    def rewrite(self, op: Any, x: ir.Value, conv_out: ir.Value, act_out: ir.Value, **_: Any) -> Any:
        conv = _producer(conv_out)
        params = _conv_activation_params(_producer(act_out))
        extra: dict[str, Any] = {"activation": self._activation}
        if params:
            extra["activation_params"] = params
        inputs = _trim(conv.inputs)
        return op.FusedConv(*inputs, _domain=_MS_DOMAIN, **conv.attributes, **extra)


def _trim(inputs: Sequence[ir.Value | None]) -> list[ir.Value | None]:
    out = list(inputs)
    while out and out[-1] is None:
        out.pop()
    return out


#: Gemm activations ORT's CPU FusedGemm runs, with their ONNX attribute defaults (ORT
#: requires every parameter to be present as ``activation_<name>``).
GEMM_ACTIVATIONS: dict[str, dict[str, float]] = {
    "Relu": {},
    "Sigmoid": {},
    "Tanh": {},
    "LeakyRelu": {"alpha": 0.01},
    "HardSigmoid": {"alpha": 0.2, "beta": 0.5},
    "Elu": {"alpha": 1.0},
    "Selu": {"alpha": 1.67326319217681884765625, "gamma": 1.05070102214813232421875},
    "Softplus": {},
    "Softsign": {},
    "ThresholdedRelu": {"alpha": 1.0},
}


class GemmActivationFusion(pattern.RewriteRuleClassBase):
    """``Act(Gemm(a, B, C))`` -> ``com.microsoft::FusedGemm(a, B, C, activation=Act)``."""

    def __init__(self, activation: str) -> None:
        super().__init__(name=f"Gemm{activation}ToFusedGemm")
        self._activation = activation

    def pattern(self, op: Any, a: ir.Value) -> Any:
        gemm = op.Gemm(a, _allow_other_inputs=True, _outputs=["gemm_out"])
        return getattr(op, self._activation)(gemm, _outputs=["act_out"])

    def check(
        self, context: Any, a: ir.Value, gemm_out: ir.Value, act_out: ir.Value, **_: Any
    ) -> Any:
        del context, act_out
        gemm = _producer(gemm_out)
        _check_gemm(gemm)
        _require_float32("FusedGemm", gemm, gemm_out, a, gemm.inputs[1])
        return pattern.MatchResult()

    def rewrite(self, op: Any, a: ir.Value, gemm_out: ir.Value, act_out: ir.Value, **_: Any) -> Any:
        gemm = _producer(gemm_out)
        act = _producer(act_out)
        extra: dict[str, Any] = {"activation": self._activation}
        for param, default in GEMM_ACTIVATIONS[self._activation].items():
            extra[f"activation_{param}"] = _float_attr(act, param, default)
        return op.FusedGemm(*_trim(gemm.inputs), _domain=_MS_DOMAIN, **gemm.attributes, **extra)


# --------------------------------------------------------------------------- catalog


def _commuted(*rules: pattern.RewriteRule) -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet(list(rules), commute=True)


#: Rules of this module, in application order (see catalog.py for where they run).
RULES: list[Rule] = [
    Rule(
        "conv-scale-bias-folding",
        "Conv followed by Mul/Add of a per-output-channel constant -> Conv with scaled "
        "weights and bias",
        lambda: _commuted(ConvMulFold.rule(), ConvAddFold.rule()),
        STANDARD_TARGETS,
    ),
    Rule(
        "gemm-scale-bias-folding",
        "Gemm followed by Mul/Add of a per-column constant, or a per-feature Mul before it "
        "-> Gemm with scaled B and C",
        lambda: _commuted(GemmMulFold.rule(), GemmAddFold.rule(), MulGemmFold.rule()),
        STANDARD_TARGETS,
    ),
    Rule(
        "matmul-scale-folding",
        "MatMul with a constant 2-D weight and a per-column Mul after it (through an Add) "
        "or a per-row Mul before it -> MatMul with scaled weights",
        lambda: _commuted(MatMulMulFold.rule(), MatMulAddMulFold.rule(), MulMatMulFold.rule()),
        STANDARD_TARGETS,
    ),
    Rule(
        "matmul-batchnorm-folding",
        "BatchNormalization after a MatMul with a constant 2-D weight -> MatMul with scaled "
        "weights + Add",
        lambda: [MatMulBatchNormFold.rule(), MatMulTransposeBatchNormFold.rule()],
        STANDARD_TARGETS,
    ),
    Rule(
        "conv-activation",
        "Conv + Relu/Clip/Sigmoid/HardSigmoid/LeakyRelu/Tanh/HardSwish -> FusedConv (ORT)",
        lambda: [ConvActivationFusion.rule(a) for a in CONV_ACTIVATIONS],
        ORT_TARGETS,
        group="activation",
    ),
    Rule(
        "gemm-activation",
        "Gemm + Relu/Sigmoid/Tanh/LeakyRelu/HardSigmoid/Elu/Selu/Softplus/Softsign/"
        "ThresholdedRelu -> FusedGemm (ORT)",
        lambda: [GemmActivationFusion.rule(a) for a in GEMM_ACTIVATIONS],
        ORT_TARGETS,
        group="activation",
    ),
]
