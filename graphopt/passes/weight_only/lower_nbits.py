"""ONNX Runtime lowering: com.microsoft ``MatMulNBits`` and ``GatherBlockQuantized``.

``MatMulNBits(A, B, scales, zero_points, g_idx, bias)``, attributes ``K``, ``N``, ``bits``,
``block_size``, ``accuracy_level``:

* ``B``: ``uint8[N, k_blocks, block_size * bits / 8]``, codes packed little-endian along
  ``K`` (:func:`~graphopt.quant.groupwise.pack_codes`), the last block padded with the zero
  code.
* ``scales``: ``float32[N, k_blocks]``; ``zero_points``: ``uint8[N, ceil(k_blocks * bits / 8)]``
  packed the same way, omitted when symmetric (ORT's default is ``2**(bits - 1)``, as ours).

ORT 1.32's CPU kernel runs 2, 4 and 8 bits, ``block_size`` a power of two >= 16 (<= 256 at
2 bits). Mapping a :class:`GroupQuantized` onto that is exact:

* 3-bit codes go into the 4-bit container (symmetric codes shifted by ``8 - 4`` so the
  implicit zero point still matches; asymmetric codes and zero points unchanged);
* a group size that is not a power of two uses the largest power-of-two block dividing it,
  each group's scale repeated over its blocks (per-channel: one scale repeated over every
  block). A group size with no power-of-two divisor >= 16 falls back to the portable
  blocked ``DequantizeLinear`` lowering for that weight, with a warning.

``accuracy_level``: :data:`DEFAULT_ACCURACY_LEVEL` = 4 (activations rounded to int8, integer
kernels). Measured on this project's AVX512-VNNI CPU, SmolLM2-135M int4 group 128, batch 1
with KV cache, 2 threads: 25-28 ms per decoded token at level 4, 45-48 ms at level 0
(fp32 model: 88-104 ms); 32-token prefill 177 ms vs 289-313 ms. The cost: +1.5% perplexity
at int4, and ~5 dB of logits SQNR at int8 weights (31 -> 26 dB); pass ``accuracy_level=0``
when that matters.

Embeddings use ``GatherBlockQuantized(data uint8[N, ceil(K * bits / 8)], indices, scales[N, G],
zero_points)`` with ``gather_axis=0``, ``quantize_axis=1`` (ORT: 2, 4, 8 bits; ragged last
block allowed). A table tied to a head is stored once per layout (the two ops' packings
differ) but quantized once: both read the same codes and scales.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphopt.passes.weight_only.base import WeightSite
from graphopt.passes.weight_only.lower import MS_DOMAIN, LoweringContext, mark
from graphopt.quant.groupwise import GroupQuantized, num_groups, pack_codes

logger = logging.getLogger(__name__)

#: Bit widths ORT's CPU MatMulNBits / GatherBlockQuantized kernels run.
ORT_BITS = (2, 4, 8)
#: Smallest and largest block sizes ORT accepts (the largest at 2 bits).
MIN_BLOCK = 16
MAX_BLOCK_2BIT = 256
#: Largest block chosen for per-channel weights (any power of two works; 128 is ORT's
#: most tuned size).
PER_CHANNEL_BLOCK = 128
#: Chosen by measurement on the project CPU; see the module docstring.
DEFAULT_ACCURACY_LEVEL = 4


@dataclass(frozen=True)
class OrtBlocks:
    """A :class:`GroupQuantized` re-expressed in ORT's block terms (exactly)."""

    codes: np.ndarray  # uint8[N, K] at ``bits``
    scales: np.ndarray  # float32[N, k_blocks]
    zero_points: np.ndarray | None  # uint8[N, k_blocks] or None (implicit middle)
    bits: int
    block_size: int

    @property
    def k_blocks(self) -> int:
        return int(self.scales.shape[1])


def _largest_pow2_divisor(n: int, cap: int) -> int:
    b = 1
    while n % (b * 2) == 0 and b * 2 <= cap:
        b *= 2
    return b


def ort_blocks(q: GroupQuantized) -> OrtBlocks | None:
    """``q`` in ORT's terms, or None when no exact power-of-two blocking exists."""
    bits = q.bits if q.bits in ORT_BITS else 4
    codes, zps = q.codes, q.zero_points
    if bits != q.bits and zps is None:  # keep the implicit middle zero point's meaning
        codes = (codes.astype(np.int16) + (1 << (bits - 1)) - (1 << (q.bits - 1))).astype(np.uint8)
    cap = MAX_BLOCK_2BIT if bits == 2 else 1 << 30
    if q.groups == 1:
        block = 1
        while block * 2 <= min(q.k, PER_CHANNEL_BLOCK, cap):
            block *= 2
    else:
        block = _largest_pow2_divisor(q.group_size, cap)
    if block < MIN_BLOCK:
        return None
    k_blocks = num_groups(q.k, block)
    group_of_block = (np.arange(k_blocks) * block) // q.group_size
    scales = np.ascontiguousarray(q.scales[:, group_of_block])
    zp = None if zps is None else np.ascontiguousarray(zps[:, group_of_block])
    return OrtBlocks(codes, scales, zp, bits, block)


def _pad_code(blocks: OrtBlocks) -> int:
    return 1 << (blocks.bits - 1)


def matmul_nbits_weights(
    lc: LoweringContext, base: str, blocks: OrtBlocks
) -> list[ir.Value | None]:
    """Initializers ``[B, scales, zero_points or None]`` for MatMulNBits."""
    n, k = blocks.codes.shape
    padded_k = blocks.k_blocks * blocks.block_size
    codes = blocks.codes
    if padded_k != k:
        codes = np.pad(codes, ((0, 0), (0, padded_k - k)), constant_values=_pad_code(blocks))
    packed = pack_codes(codes.reshape(n, blocks.k_blocks, blocks.block_size), blocks.bits)
    out: list[ir.Value | None] = [
        lc.initializer(f"{base}_nbits", packed),
        lc.initializer(f"{base}_nbits_scales", blocks.scales.astype(np.float32)),
    ]
    if blocks.zero_points is not None:
        zp = blocks.zero_points if blocks.bits == 8 else pack_codes(blocks.zero_points, blocks.bits)
        out.append(lc.initializer(f"{base}_nbits_zero_points", zp))
    else:
        out.append(None)
    return out


def _trim(inputs: list[ir.Value | None]) -> list[ir.Value | None]:
    while inputs and inputs[-1] is None:
        inputs.pop()
    return inputs


def _bias(site: WeightSite, n: int) -> tuple[ir.Value | None, ir.Value | None]:
    """(bias for the op's bias input, addend for a following Add) of a Gemm site."""
    if site.kind != "gemm" or len(site.node.inputs) < 3 or site.node.inputs[2] is None:
        return None, None
    c = site.node.inputs[2]
    if (
        c.shape is not None
        and len(c.shape) == 1
        and c.shape[0] == n
        and c.dtype == ir.DataType.FLOAT
    ):
        return c, None
    return None, c


def replace_matmul(
    lc: LoweringContext,
    site: WeightSite,
    q: GroupQuantized,
    op: tuple[str, str],
    weights: Sequence[ir.Value | None],
    attrs: Sequence[ir.Attr],
) -> None:
    """Replaces a MatMul/Gemm site by ``op(A, *weights, bias)`` (+ ``Add`` for a 2-D C)."""
    bias, addend = _bias(site, q.n)
    domain, op_type = op
    label = site.node.name or site.name
    if op_type == "MatMulNBits":
        inputs = [site.activation, *weights, None, bias]
    else:
        inputs = [site.activation, *weights, bias]
    new = ir.Node(
        domain,
        op_type,
        _trim(list(inputs)),
        list(attrs),
        name=lc.names(f"{label}_{op_type}"),
        num_outputs=1,
    )
    mark(new, q)
    nodes = [new]
    result = new.outputs[0]
    if addend is not None:
        result.name = lc.names(f"{label}_{op_type}_out")
        add = ir.Node("", "Add", [result, addend], name=lc.names(f"{label}_bias"), num_outputs=1)
        nodes.append(add)
        result = add.outputs[0]
    lc.replace(site.node, nodes, result)


def gather_block_quantized(
    lc: LoweringContext,
    site: WeightSite,
    q: GroupQuantized,
    cache: dict[str, list[ir.Value | None]],
) -> bool:
    """Replaces a Gather site by ``GatherBlockQuantized``; False when ORT cannot hold it."""
    blocks = ort_blocks(q)
    if blocks is None:
        return False
    base = site.name or "table"
    if "gather" not in cache:
        zp_value: ir.Value | None = None
        if blocks.zero_points is not None:
            zp_value = lc.initializer(
                f"{base}_gbq_zero_points",
                blocks.zero_points
                if blocks.bits == 8
                else pack_codes(blocks.zero_points, blocks.bits),
            )
        cache["gather"] = [
            lc.initializer(f"{base}_gbq", pack_codes(blocks.codes, blocks.bits)),
            lc.initializer(f"{base}_gbq_scales", blocks.scales.astype(np.float32)),
            zp_value,
        ]
    data, scales, zp = cache["gather"]
    indices = site.node.inputs[1]
    attrs = [
        ir.AttrInt64("bits", blocks.bits),
        ir.AttrInt64("block_size", blocks.block_size),
        ir.AttrInt64("gather_axis", 0),
        ir.AttrInt64("quantize_axis", 1),
    ]
    new = ir.Node(
        MS_DOMAIN,
        "GatherBlockQuantized",
        _trim([data, indices, scales, zp]),
        attrs,
        name=lc.names(f"{site.node.name or base}_GatherBlockQuantized"),
        num_outputs=1,
    )
    mark(new, q)
    lc.replace(site.node, [new], new.outputs[0])
    lc.need_opset(MS_DOMAIN, 1)
    return True


def fallback_dq(
    lc: LoweringContext, sites: Sequence[WeightSite], q: GroupQuantized, why: str
) -> None:
    """Lowers ``sites`` with the portable blocked DequantizeLinear instead."""
    from graphopt.passes.weight_only import lower_dq

    msg = f"{sites[0].name}: {why}; lowered as blocked DequantizeLinear"
    logger.warning("weight-only: %s", msg)
    lc.fallbacks.append(msg)
    lower_dq.lower(lc, sites, q)


def lower(lc: LoweringContext, sites: Sequence[WeightSite], q: GroupQuantized) -> None:
    """MatMulNBits for the MatMul/Gemm sites, GatherBlockQuantized for the Gather sites."""
    blocks = ort_blocks(q)
    if blocks is None:
        fallback_dq(
            lc, sites, q, f"group size {q.group_size} has no power-of-two block >= {MIN_BLOCK}"
        )
        return
    level = lc.options.accuracy_level
    level = DEFAULT_ACCURACY_LEVEL if level is None else level
    base = sites[0].name or "weight"
    weights: list[ir.Value | None] | None = None
    cache: dict[str, list[ir.Value | None]] = {}
    for site in sites:
        if site.kind == "gather":
            gather_block_quantized(lc, site, q, cache)
            continue
        if weights is None:
            weights = matmul_nbits_weights(lc, base, blocks)
        attrs = [
            ir.AttrInt64("K", q.k),
            ir.AttrInt64("N", q.n),
            ir.AttrInt64("bits", blocks.bits),
            ir.AttrInt64("block_size", blocks.block_size),
            ir.AttrInt64("accuracy_level", level),
        ]
        replace_matmul(lc, site, q, (MS_DOMAIN, "MatMulNBits"), weights, attrs)
        lc.need_opset(MS_DOMAIN, 1)
