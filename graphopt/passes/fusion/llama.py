"""Llama-style fusions: SiLU, rotary embedding and grouped-query attention.

Written for the dynamo export of Hugging Face Llama models (SmolLM2 with and without a KV
cache), whose decoder layer reads, per head group::

    cos, sin = Cos/Sin(Concat(f, f)),  f = Mul(Cast(Unsqueeze(position_ids)), inv_freq)
    q = Transpose(Reshape(MatMul(h, Wq)))              [B, H, S, Dh]   (k, v: Hkv heads)
    q = q·Unsqueeze(cos, 1) + Concat(-q[..., Dh/2:], q[..., :Dh/2])·Unsqueeze(sin, 1)
    k = Concat(past_k, k) ;  v = Concat(past_v, v)     (KV-cache graph only: present.*)
    k = Reshape(Expand(Unsqueeze(k, 2), [B, Hkv, G, T, Dh]))          (repeat KV heads)
    o = Reshape(Transpose(Softmax(q·kᵀ·scale + mask)·v))               [B, S, H·Dh]
    mlp: Mul(g, Sigmoid(g)) · up

RMSNorm and Add+RMSNorm are fused by normalization.py (onnxscript's rules). The rules here,
in catalog order (before onnxscript's attention chain, which then finds nothing left to do):

1. ``llama-silu`` (ORT): float32 ``x·Sigmoid(x)`` -> ``QuickGelu(x, alpha=1)`` (ORT's SiLU
   kernel, bit-identical here; ORT's own optimizer does the same at session load, so this
   mainly serves graphs run without it. ORT has no fused SiLU·up gating op on CPU: the
   gating Mul stays).
2. ``llama-rotary`` (ORT): the rotate-half rotary embedding with cos/sin computed from
   position ids -> ``RotaryEmbedding(x, position_ids, cos_cache, sin_cache)``. The caches
   are built once per graph from the same ``inv_freq`` and positions
   ``0..max(position_ids)`` (same fp32 products, so the same angles). Position ids that are
   ``Range(0, S, 1)`` become the start offset ``[0]``; other 1-D ids are broadcast to
   ``[B, S]``.
3. ``llama-gqa`` (ORT): the attention above (after ``llama-rotary``), with or without a
   past-KV ``Concat`` -> ``GroupQueryAttention`` fed with the un-repeated K/V, rotary applied
   outside it (``RotaryEmbedding`` on the ``[B, S, D]`` projections, so arbitrary
   ``position_ids`` stay exact), the graph's additive mask passed as ``attention_bias``
   (padding masks keep their meaning), ``seqlens_k = T - 1`` for every row,
   ``total_sequence_length = T`` and, with a past, ``query_seqlens = S`` (so batched
   multi-token steps with a past are accepted). GQA's own causal mask coincides with the
   export's causal part (query i sits at position P + i). The only difference: a query row
   whose keys are *all* masked (left padding) averages V over every key in the export and
   over the causally visible keys in GQA; no unmasked position ever reads such a row.

For targets without contrib ops nothing here applies to opset-20 exports: RMSNormalization,
RotaryEmbedding and Attention are opset 23, Swish opset 24. ``llama-rotary-onnx`` turns the
same rotary pattern into the standard ``RotaryEmbedding`` (opset 23) for models at opset 23+.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import _ir_utils, pattern
from onnxscript.rewriter._basics import MatchResult

from graphopt.rewrite import ORT_TARGETS, STANDARD_TARGETS, Rule

_MS = "com.microsoft"
_FLOAT = ir.DataType.FLOAT


# --------------------------------------------------------------------------- helpers


def _ints(value: ir.Value | None) -> list[int] | None:
    """Elements of a constant integer tensor, flattened; None if not one."""
    array = _ir_utils.get_numpy_value(value)
    if array is None or array.dtype.kind not in "iu":
        return None
    return [int(v) for v in array.reshape(-1)]


def _rank(value: ir.Value | None) -> int | None:
    if value is None or value.shape is None:
        return None
    return len(value.shape)


def _dims(value: ir.Value | None) -> tuple[object, ...] | None:
    if value is None or value.shape is None:
        return None
    return tuple(value.shape.dims)


def _known(dim: object) -> bool:
    """A static size or a named symbolic dim (an unnamed one equals every other unnamed one
    in onnx_ir, so it proves nothing)."""
    return isinstance(dim, int) or (isinstance(dim, ir.SymbolicDim) and dim.value is not None)


def _same(a: object, b: object) -> bool:
    """Two dims known to be equal."""
    return _known(a) and _known(b) and a == b


def _fits(bindings: dict[str, object], value: ir.Value | None, names: Sequence[str]) -> bool:
    """Binds ``value``'s dims to ``names`` (``check_shape_bool`` that refuses unknown dims)."""
    dims = _dims(value)
    if dims is None or len(dims) != len(names):
        return False
    for dim, name in zip(dims, names):
        if not _known(dim):
            return False
        if name in bindings and not _same(bindings[name], dim):
            return False
        bindings.setdefault(name, dim)
    return True


def _is_arange_from_zero(value: ir.Value) -> bool:
    """Whether ``value`` is ``Range(0, n, 1)``."""
    node = value.producer()
    if node is None or node.op_type != "Range" or node.domain not in ("", "ai.onnx"):
        return False
    return _ir_utils.is_singleton_value(node.inputs[0], 0) and _ir_utils.is_singleton_value(
        node.inputs[2], 1
    )


def _attr_int(node: ir.Node, name: str, default: int) -> int | None:
    attr = node.attributes.get(name)
    if attr is None:
        return default
    if attr.is_ref():
        return None
    return int(attr.value)


def _rotate_half(op, x, start1, end1, start2, end2, axes1, axes2):
    x1 = op.Slice(x, start1, end1, axes1, _allow_other_inputs=True)
    x2 = op.Slice(x, start2, end2, axes2, _allow_other_inputs=True)
    return op.Concat(op.Neg(x2), x1, axis=-1)


def _check_rotate_half(x: ir.Value, start1, end1, start2, end2, axes1, axes2) -> str | None:
    """Why the Slice/Neg/Concat is not rotate_half over the last axis (None if it is)."""
    dims = _dims(x)
    if dims is None or len(dims) != 4:
        return "x is not known to be 4-D"
    head = dims[3]
    if not isinstance(head, int) or head % 2:
        return "head size is not a static even number"
    for axes in (axes1, axes2):
        if _ints(axes) not in ([3], [-1]):
            return "the slices are not along the last axis"
    half = head // 2
    if not (
        _ir_utils.is_singleton_value(start1, 0)
        and _ir_utils.is_singleton_value(end1, half)
        and _ir_utils.is_singleton_value(start2, half)
        and _ir_utils.is_singleton_value(end2, lambda e: e >= head)
    ):
        return "x is not split into its two halves"
    return None


def _slice_steps_ok(rotated: ir.Value) -> bool:
    """The two Slices under rotate_half's Concat have unit steps (or none)."""
    concat = rotated.producer()
    if concat is None:
        return False
    neg = concat.inputs[0].producer() if concat.inputs[0] is not None else None
    slices = [concat.inputs[1].producer() if concat.inputs[1] is not None else None]
    if neg is not None and neg.inputs[0] is not None:
        slices.append(neg.inputs[0].producer())
    for node in slices:
        if node is None:
            return False
        if len(node.inputs) > 4 and node.inputs[4] is not None and _ints(node.inputs[4]) != [1]:
            return False
    return True


def _check_repeat(
    expanded: ir.Value, repeated: ir.Value, kv_heads: int, group: int, head: int
) -> str | None:
    """Why ``Reshape(Expand(Unsqueeze(kv, 2), s), t)`` is not the repetition of each of
    ``kv_heads`` heads ``group`` times (None if it is).

    ``kv`` is known to be ``[B, Hkv, T, Dh]``. Read from the inferred shapes
    (``[B, Hkv, G, T, Dh]`` then ``[B, Hkv·G, T, Dh]``) or, where those are unknown, from
    constant targets (``s = [1|B, 1|Hkv, G, 1|T, 1|Dh]``, ``t = [0|B, Hkv·G, -1|T, Dh]``).
    """
    expand, reshape = expanded.producer(), repeated.producer()
    if expand is None or reshape is None:
        return "no Expand/Reshape"
    source = _dims(expand.inputs[0])
    if source is None or len(source) != 5:
        return "the unsqueezed KV is not 5-D"
    want = (source[0], kv_heads, group, source[3], head)
    dims = _dims(expanded)
    if not (dims is not None and len(dims) == 5 and all(map(_same, dims, want))):
        target = _ints(expand.inputs[1])
        if target is None or len(target) != 5 or target[2] != group:
            return f"KV heads are not expanded to [B, {kv_heads}, {group}, T, Dh]"
        # each other entry broadcasts (1) or repeats the source size
        if any(t != 1 and not _same(t, w) for t, w in zip(target, want)):
            return f"KV heads are not expanded to [B, {kv_heads}, {group}, T, Dh]"
    heads = kv_heads * group
    rdims = _dims(repeated)
    merged = (source[0], heads, source[3], head)
    if rdims is not None and len(rdims) == 4 and all(map(_same, rdims, merged)):
        return None
    target = _ints(reshape.inputs[1])
    if target is None or len(target) != 4 or _attr_int(reshape, "allowzero", 0) != 0:
        return f"repeated KV is not [B, {heads}, T, Dh]"
    if target[1] != heads or target[3] != head:
        return f"repeated KV is not [B, {heads}, T, Dh]"
    if not (target[0] == 0 or _same(target[0], source[0])):
        return f"repeated KV is not [B, {heads}, T, Dh]"
    if not (target[2] == -1 or _same(target[2], source[3])):
        return f"repeated KV is not [B, {heads}, T, Dh]"
    return None


def _merges_heads(out: ir.Value, batch: object, width: int) -> bool:
    """Whether ``out = Reshape([B, S, H, Dh])`` is ``[B, S, H·Dh]``: by its inferred shape
    (rank 3, ``B`` first, ``H·Dh`` last, so the middle is S) or a constant target
    ``[0|B, 0, H·Dh|-1]``."""
    dims = _dims(out)
    if dims is not None and len(dims) == 3 and dims[2] == width and _same(dims[0], batch):
        return True
    reshape = out.producer()
    if reshape is None:
        return False
    target = _ints(reshape.inputs[1])
    if target is None or len(target) != 3 or _attr_int(reshape, "allowzero", 0) != 0:
        return False
    return (
        (target[0] == 0 or _same(target[0], batch)) and target[1] == 0 and target[2] in (width, -1)
    )


# --------------------------------------------------------------------------- SiLU


class SiluRule(pattern.RewriteRuleClassBase):
    """``Mul(x, Sigmoid(x))`` -> ``QuickGelu(x, alpha=1)`` (ORT contrib; the same values)."""

    def pattern(self, op, x):
        return op.Mul(x, op.Sigmoid(x))

    def check(self, context, x, **_) -> MatchResult:
        result = MatchResult()
        if x.dtype != _FLOAT:  # ORT's CPU QuickGelu is float32 only
            return result.fail("x is not known to be float32", x)
        return result

    def rewrite(self, op, x, **_):
        return op.QuickGelu(x, alpha=1.0, _domain=_MS)


# --------------------------------------------------------------------------- rotary


class RotaryRule(pattern.RewriteRuleClassBase):
    """Rotate-half RoPE with cos/sin from position ids -> ORT ``RotaryEmbedding``.

    Before::

        f = Mul(Cast(Unsqueeze(pos, axes), float), inv_freq)        # [B|1, S, Dh/2]
        c = Unsqueeze(Cos(Concat(f, f, axis=-1)), [1]);  s = ... Sin ...
        y = x·c + Concat(-x[..., Dh/2:], x[..., :Dh/2], axis=-1)·s  # x: [B, H, S, Dh]

    After::

        y = com.microsoft.RotaryEmbedding(x, pos2, cos_cache, sin_cache)

    with ``cos_cache = Cos(arange(max(pos) + 1)[:, None] · inv_freq)`` (built once and
    shared) and ``pos2`` = ``[0]`` (start offset) for ``pos = Range(0, S, 1)``, ``pos`` for
    ``[B, S]`` ids, else ``pos`` broadcast to ``[B, S]``.
    """

    def __init__(self) -> None:
        # cos/sin are shared by every layer: matched nodes stay, unused ones go at the end.
        super().__init__("LlamaRotary", remove_nodes=False)
        self._caches: dict[tuple[int, int], tuple[ir.Value, ir.Value]] = {}
        self._positions: dict[tuple[int, str], ir.Value] = {}

    def setup(self) -> None:
        self._caches.clear()
        self._positions.clear()

    def cleanup(self) -> None:
        self.setup()

    def pattern(
        self,
        op,
        x,
        pos,
        pos_axes,
        inv_freq,
        cos_axes,
        sin_axes,
        start1,
        end1,
        start2,
        end2,
        axes1,
        axes2,
    ):
        pos_f = op.Cast(op.Unsqueeze(pos, pos_axes, _outputs=["pos_3d"]), to=_FLOAT)
        freqs = op.Mul(pos_f, inv_freq)
        emb = op.Concat(freqs, freqs, axis=-1)
        cos = op.Unsqueeze(op.Cos(emb), cos_axes)
        sin = op.Unsqueeze(op.Sin(emb), sin_axes)
        rotated = _rotate_half(op, x, start1, end1, start2, end2, axes1, axes2)
        return op.Add(op.Mul(x, cos), op.Mul(rotated, sin, _outputs=["rotated_sin"]))

    def check(
        self,
        context,
        x,
        pos,
        pos_axes,
        pos_3d,
        inv_freq,
        cos_axes,
        sin_axes,
        start1,
        end1,
        start2,
        end2,
        axes1,
        axes2,
        rotated_sin,
        **_,
    ) -> MatchResult:
        result = MatchResult()
        why = _check_rotate_half(x, start1, end1, start2, end2, axes1, axes2)
        if why:
            return result.fail(why, x)
        rotated = rotated_sin.producer().inputs[0]
        if rotated is None or rotated.producer() is None or not _slice_steps_ok(rotated):
            return result.fail("rotate_half slices have non-unit steps", x)
        if not isinstance(x.shape[1], int):
            return result.fail("number of heads is not static", x)
        if x.dtype != _FLOAT:
            return result.fail("x is not known to be float32", x)
        half = x.shape[3] // 2
        freq = _ir_utils.get_numpy_value(inv_freq)
        if freq is None or freq.size != half or freq.shape[-1] != half:
            return result.fail(f"inv_freq is not a constant of {half} values", inv_freq)
        if pos.dtype not in (ir.DataType.INT64, ir.DataType.INT32):
            return result.fail("position ids are not integers", pos)
        if _ints(cos_axes) != [1] or _ints(sin_axes) != [1]:
            return result.fail("cos/sin are not unsqueezed on the head axis", cos_axes)
        pos_rank = _rank(pos)
        dims = _dims(pos_3d)
        if pos_rank not in (1, 2) or dims is None or len(dims) != 3 or dims[2] != 1:
            return result.fail("position ids do not become [., S, 1]", pos)
        axes = _ints(pos_axes)
        if pos_rank == 2 and axes not in ([2], [-1]):
            return result.fail("[B, S] position ids not unsqueezed on the last axis", pos)
        if pos_rank == 1 and axes not in ([0, 2], [0, -1]):
            return result.fail("[S] position ids not unsqueezed to [1, S, 1]", pos)
        return result

    def _cache(self, op, inv_freq: ir.Value, pos: ir.Value) -> tuple[ir.Value, ir.Value]:
        key = (id(inv_freq), id(pos))
        if key not in self._caches:
            freq = _ir_utils.get_numpy_value(inv_freq)
            assert freq is not None
            freq_row = op.Constant(value=ir.tensor(freq.astype(np.float32).reshape(1, -1)))
            arange = pos.producer() if _is_arange_from_zero(pos) else None
            if arange is not None:
                count = op.Cast(arange.inputs[1], to=ir.DataType.INT64)
            else:
                count = op.Add(
                    op.Cast(op.ReduceMax(pos, keepdims=0), to=ir.DataType.INT64),
                    op.Constant(value=ir.tensor(np.array(1, dtype=np.int64))),
                )
            rows = op.Range(
                op.Constant(value=ir.tensor(np.array(0, dtype=np.int64))),
                count,
                op.Constant(value=ir.tensor(np.array(1, dtype=np.int64))),
            )
            rows = op.Cast(
                op.Unsqueeze(rows, op.Constant(value=ir.tensor(np.array([1], np.int64)))),
                to=_FLOAT,
            )
            angles = op.Mul(rows, freq_row)
            self._caches[key] = (op.Cos(angles), op.Sin(angles))
        return self._caches[key]

    def _position_ids(self, op, x: ir.Value, pos: ir.Value) -> ir.Value:
        key = (id(pos), str(_dims(x)[0]))  # type: ignore[index]
        if key in self._positions:
            return self._positions[key]
        if _rank(pos) == 1 and _is_arange_from_zero(pos):
            ids = op.Constant(value=ir.tensor(np.array([0], dtype=np.int64)))
        else:
            ids = pos
            if pos.dtype != ir.DataType.INT64:
                ids = op.Cast(ids, to=ir.DataType.INT64)
            dims = _dims(pos)
            if dims is None or len(dims) != 2 or not _same(dims[0], _dims(x)[0]):  # type: ignore[index]
                if _rank(pos) == 1:
                    ids = op.Unsqueeze(ids, op.Constant(value=ir.tensor(np.array([0], np.int64))))
                # [1, S] (or [B, S] of unproven B) -> [B, S]; Expand broadcasts, never reshapes
                batch = op.Shape(x, start=0, end=1)
                seq = op.Shape(ids, start=-1)
                ids = op.Expand(ids, op.Concat(batch, seq, axis=0))
        self._positions[key] = ids
        return ids

    def rewrite(self, op, x, pos, inv_freq, **_):
        cos_cache, sin_cache = self._cache(op, inv_freq, pos)
        ids = self._position_ids(op, x, pos)
        return op.RotaryEmbedding(x, ids, cos_cache, sin_cache, interleaved=0, _domain=_MS)


class RotaryOnnxRule(pattern.RewriteRuleClassBase):
    """The same rotary pattern -> standard ``RotaryEmbedding`` (opset 23).

    onnxscript's RotaryEmbedding23 rule with the rotate_half slices checked for unit steps
    and the Unsqueeze axes given as a constant; the per-token cos/sin ``[B, S, Dh/2]`` feed
    the op directly (no position ids). Frequencies computed once for all rows (``[1, S,
    Dh/2]``, the no-cache export) are expanded to the batch first: the op takes no
    broadcast caches (onnxscript's rule passes them as they are, which fails for B > 1).
    """

    def __init__(self) -> None:
        super().__init__("LlamaRotaryOnnx", remove_nodes=False)

    def pattern(self, op, x, freqs, cos_axes, sin_axes, start1, end1, start2, end2, axes1, axes2):
        emb = op.Concat(freqs, freqs, axis=-1)
        cos = op.Unsqueeze(op.Cos(emb), cos_axes)
        sin = op.Unsqueeze(op.Sin(emb), sin_axes)
        rotated = _rotate_half(op, x, start1, end1, start2, end2, axes1, axes2)
        return op.Add(op.Mul(x, cos), op.Mul(rotated, sin, _outputs=["rotated_sin"]))

    def check(
        self,
        context,
        x,
        freqs,
        cos_axes,
        sin_axes,
        start1,
        end1,
        start2,
        end2,
        axes1,
        axes2,
        rotated_sin,
        **_,
    ) -> MatchResult:
        result = MatchResult()
        why = _check_rotate_half(x, start1, end1, start2, end2, axes1, axes2)
        if why:
            return result.fail(why, x)
        rotated = rotated_sin.producer().inputs[0]
        if rotated is None or not _slice_steps_ok(rotated):
            return result.fail("rotate_half slices have non-unit steps", x)
        if not isinstance(x.shape[1], int):
            return result.fail("number of heads is not static", x)
        if _ints(cos_axes) != [1] or _ints(sin_axes) != [1]:
            return result.fail("cos/sin are not unsqueezed on the head axis", cos_axes)
        if _rank(freqs) != 3:
            return result.fail("freqs is not [B, S, Dh/2]", freqs)
        return result

    def rewrite(self, op, x, freqs, **_):
        # the op wants per-batch caches [B, S, Dh/2]; the export's freqs may be [1, S, Dh/2]
        if not _same(_dims(freqs)[0], x.shape[0]):
            shape = op.Concat(op.Shape(x, start=0, end=1), op.Shape(freqs, start=1), axis=0)
            freqs = op.Expand(freqs, shape)
        return op.RotaryEmbedding(
            x, op.Cos(freqs), op.Sin(freqs), interleaved=0, num_heads=x.shape[1]
        )


# --------------------------------------------------------------------------- GQA


class GroupQueryAttentionRule(pattern.RewriteRuleClassBase):
    """Grouped-query attention with repeated KV heads -> ORT ``GroupQueryAttention``.

    Before (``has_past``: the two ``Concat`` with the cache, their outputs are ``present``)::

        q = RotaryEmbedding(Transpose(Reshape(q3)), pos, cos, sin)     # [B, H, S, Dh]
        k = Concat(past_k, RotaryEmbedding(Transpose(Reshape(k3)), pos, cos, sin), -2)
        v = Concat(past_v, Transpose(Reshape(v3)), -2)
        kr = Reshape(Expand(Unsqueeze(k, 2), .));  vr = Reshape(Expand(Unsqueeze(v, 2), .))
        o = Reshape(Transpose(MatMul(Softmax(MatMul(q, Transpose(kr))·scale + mask), vr)))

    After::

        o, k, v = GroupQueryAttention(RotaryEmbedding(q3), RotaryEmbedding(k3), v3,
                                      past_k, past_v, seqlens_k, T, attention_bias=mask,
                                      query_seqlens=S, scale=scale)
    """

    def __init__(self, name: str, *, has_past: bool) -> None:
        super().__init__(name)
        self._has_past = has_past
        self._shared: dict[int, tuple[ir.Value, ir.Value, ir.Value | None]] = {}

    def setup(self) -> None:
        self._shared.clear()

    def cleanup(self) -> None:
        self._shared.clear()

    def pattern(
        self,
        op,
        q3,
        k3,
        v3,
        past_k,
        past_v,
        pos,
        cos,
        sin,
        mask,
        scale,
        k_axes,
        v_axes,
    ):
        q = op.Transpose(op.Reshape(q3, pattern.ANY_VALUE, _outputs=["q4"]), perm=[0, 2, 1, 3])
        q = op.RotaryEmbedding(q, pos, cos, sin, _domain=_MS, _outputs=["q_rope"])
        k = op.Transpose(op.Reshape(k3, pattern.ANY_VALUE, _outputs=["k4"]), perm=[0, 2, 1, 3])
        k = op.RotaryEmbedding(k, pos, cos, sin, _domain=_MS, _outputs=["k_rope"])
        v = op.Transpose(op.Reshape(v3, pattern.ANY_VALUE, _outputs=["v4"]), perm=[0, 2, 1, 3])
        if self._has_past:
            k = op.Concat(past_k, k, axis=-2, _outputs=["present_k"])
            v = op.Concat(past_v, v, axis=-2, _outputs=["present_v"])
        k_rep = op.Reshape(
            op.Expand(op.Unsqueeze(k, k_axes), pattern.ANY_VALUE, _outputs=["k_expanded"]),
            pattern.ANY_VALUE,
            _outputs=["k_repeated"],
        )
        v_rep = op.Reshape(
            op.Expand(op.Unsqueeze(v, v_axes), pattern.ANY_VALUE, _outputs=["v_expanded"]),
            pattern.ANY_VALUE,
            _outputs=["v_repeated"],
        )
        scores = op.MatMul(q, op.Transpose(k_rep, perm=[0, 1, 3, 2]))
        probs = op.Softmax(op.Add(op.Mul(scores, scale), mask), _outputs=["probs"])
        out = op.Transpose(op.MatMul(probs, v_rep), perm=[0, 2, 1, 3])
        out = op.Reshape(out, pattern.ANY_VALUE, _outputs=["out"])
        if self._has_past:
            return out, k, v
        return out

    def check(
        self,
        context,
        q3,
        k3,
        v3,
        q4,
        k4,
        v4,
        mask,
        scale,
        k_axes,
        v_axes,
        q_rope,
        k_rope,
        k_expanded,
        v_expanded,
        k_repeated,
        v_repeated,
        probs,
        out,
        past_k=None,
        past_v=None,
        **_,
    ) -> MatchResult:
        result = MatchResult()
        b: dict[str, object] = {}

        def fits(value: ir.Value | None, dims: Sequence[str]) -> bool:
            return _fits(b, value, dims)

        if not fits(q3, ["B", "S", "D"]):
            return result.fail("query projection is not [B, S, D]", q3)
        if not fits(k3, ["B", "S", "Dkv"]) or not fits(v3, ["B", "S", "Dkv"]):
            return result.fail("key/value projections are not [B, S, Dkv]", [k3, v3])
        if not fits(q4, ["B", "S", "H", "Dh"]):
            return result.fail("query is not split into [B, S, H, Dh]", q4)
        if not fits(k4, ["B", "S", "Hkv", "Dh"]) or not fits(v4, ["B", "S", "Hkv", "Dh"]):
            return result.fail("key/value are not split into [B, S, Hkv, Dh]", [k4, v4])
        heads, kv_heads, head = b["H"], b["Hkv"], b["Dh"]
        if not all(isinstance(d, int) for d in (heads, kv_heads, head)):
            return result.fail("head counts / head size are not static", q4)
        assert isinstance(heads, int) and isinstance(kv_heads, int) and isinstance(head, int)
        if heads % kv_heads:
            return result.fail(f"{heads} query heads are not a multiple of {kv_heads}", q4)
        if b["D"] != heads * head or b["Dkv"] != kv_heads * head:
            return result.fail("projection widths are not heads × head size", [q3, k3])
        group = heads // kv_heads
        if self._has_past and not (
            fits(past_k, ["B", "Hkv", "P", "Dh"]) and fits(past_v, ["B", "Hkv", "P", "Dh"])
        ):
            return result.fail("past key/value are not [B, Hkv, P, Dh]", [past_k, past_v])
        if _ints(k_axes) != [2] or _ints(v_axes) != [2]:
            return result.fail("KV heads are not repeated on a new axis 2", [k_axes, v_axes])
        for expanded, repeated in ((k_expanded, k_repeated), (v_expanded, v_repeated)):
            why = _check_repeat(expanded, repeated, kv_heads, group, head)
            if why:
                return result.fail(why, expanded)
        if not _merges_heads(out, b["B"], heads * head):
            return result.fail("attention output is not merged back to [B, S, D]", out)
        softmax = probs.producer()
        if _attr_int(softmax, "axis", -1) not in (-1, 3):
            return result.fail("Softmax is not over the keys", probs)
        value = _ir_utils.get_singleton_value(scale)
        if not isinstance(value, float) or not value > 0:
            return result.fail("scale is not a positive float constant", scale)
        self._scale = value
        mdims = _dims(mask)
        if mdims is None or len(mdims) != 4 or mask.dtype != q3.dtype:
            return result.fail("mask is not a 4-D additive bias of the query dtype", mask)
        if mdims[1] not in (1, heads):
            return result.fail("mask's head axis is neither 1 nor H", mask)
        if not (mdims[0] == 1 or _same(mdims[0], b["B"])):
            return result.fail("mask's batch axis is neither 1 nor B", mask)
        for rope in (q_rope, k_rope):
            node = rope.producer()
            if _attr_int(node, "interleaved", 0) != 0 or _attr_int(node, "is_packed_batching", 0):
                return result.fail("rotary embedding is interleaved or packed", rope)
            if _attr_int(node, "rotary_embedding_dim", 0) not in (0, head):
                return result.fail("partial rotary embedding", rope)
            if "scale" in node.attributes:
                return result.fail("scaled rotary embedding", rope)
        self._heads, self._kv_heads = heads, kv_heads
        return result

    def _lengths(self, op, q3, past_k, mask) -> tuple[ir.Value, ir.Value, ir.Value | None]:
        """``seqlens_k`` [B], ``total_sequence_length`` and ``query_seqlens`` [B] (int32),
        shared by every layer reading the same mask."""
        key = id(mask)
        if key not in self._shared:
            batch = op.Shape(q3, start=0, end=1)
            seq = op.Shape(q3, start=1, end=2)
            total = seq if past_k is None else op.Add(op.Shape(past_k, start=2, end=3), seq)
            one = op.Constant(value=ir.tensor(np.array([1], dtype=np.int64)))
            seqlens_k = op.Cast(op.Expand(op.Sub(total, one), batch), to=ir.DataType.INT32)
            total_len = op.Cast(op.Squeeze(total), to=ir.DataType.INT32)
            query_lens = None
            if past_k is not None:
                query_lens = op.Cast(op.Expand(seq, batch), to=ir.DataType.INT32)
            self._shared[key] = (seqlens_k, total_len, query_lens)
        return self._shared[key]

    def rewrite(
        self,
        op,
        q3,
        k3,
        v3,
        pos,
        cos,
        sin,
        mask,
        past_k=None,
        past_v=None,
        **_,
    ):
        seqlens_k, total_len, query_lens = self._lengths(op, q3, past_k, mask)
        q = op.RotaryEmbedding(q3, pos, cos, sin, interleaved=0, _domain=_MS)
        k = op.RotaryEmbedding(k3, pos, cos, sin, interleaved=0, _domain=_MS)
        inputs: list[ir.Value | None] = [
            q,
            k,
            v3,
            past_k,
            past_v,
            seqlens_k,
            total_len,
            None,
            None,
            None,
            mask,
        ]
        if query_lens is not None:
            inputs += [None, None, None, None, None, query_lens]
        out, present_k, present_v = op.GroupQueryAttention(
            *inputs,
            num_heads=self._heads,
            kv_num_heads=self._kv_heads,
            scale=self._scale,
            _domain=_MS,
            _outputs=3,
        )
        if self._has_past:
            return out, present_k, present_v
        return out


# --------------------------------------------------------------------------- catalog


def _gqa_rules() -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet(
        [
            GroupQueryAttentionRule.rule("LlamaGQAWithPast", has_past=True),
            GroupQueryAttentionRule.rule("LlamaGQA", has_past=False),
        ],
        commute=True,
    )


def _onnx_rotary_rules() -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet([RotaryOnnxRule.rule()], commute=True)


#: Rules of this module, in application order (see catalog.py for where they run).
RULES: list[Rule] = [
    Rule(
        "llama-silu",
        "x·Sigmoid(x) -> QuickGelu(x, alpha=1) (ORT's SiLU)",
        lambda: pattern.RewriteRuleSet([SiluRule.rule()], commute=True),
        ORT_TARGETS,
        group="activation",
    ),
    Rule(
        "llama-rotary",
        "x·cos + rotate_half(x)·sin, cos/sin from position ids -> RotaryEmbedding (ORT)",
        lambda: pattern.RewriteRuleSet([RotaryRule.rule()], commute=True),
        ORT_TARGETS,
        group="attention",
        shape_inference=True,
    ),
    Rule(
        "llama-rotary-onnx",
        "x·cos + rotate_half(x)·sin -> RotaryEmbedding (opset 23)",
        _onnx_rotary_rules,
        STANDARD_TARGETS - ORT_TARGETS,
        group="attention",
        min_opset=23,
        shape_inference=True,
    ),
    Rule(
        "llama-gqa",
        "rotary Q/K, repeated KV heads (+ past Concat), masked softmax attention "
        "-> GroupQueryAttention (ORT)",
        _gqa_rules,
        ORT_TARGETS,
        group="attention",
        shape_inference=True,
    ),
]
