"""Portable lowering: opset-21 blocked ``DequantizeLinear`` feeding the original nodes.

One ``DequantizeLinear`` per weight, stored in the initializer's own layout, replaces the
float weight for every selected use (a tied table feeds both its ``Gather`` and its head's
``Transpose`` from the same node), so the MatMul/Gemm/Gather nodes themselves are unchanged::

    before: y = MatMul(x, W[K, N])
    after:  y = MatMul(x, DequantizeLinear(W_q[K, N] int4, scale[K/g, N], axis=0, block_size=g))

Containers: symmetric codes are stored signed (``int4`` for 2-4 bits, ``int8`` for 8) with
no zero point; asymmetric ones unsigned (``uint4`` / ``uint8``) with a zero point of the same
type. 2- and 3-bit codes have no standard type, so they are stored in the 4-bit containers
(every value representable, no re-rounding); the node's ``graphopt.wq.bits`` metadata keeps
the true width for read-back and size reports. One group per row (per-channel) uses the
per-axis form (1-D scale, no ``block_size``), which more runtimes accept.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from graphopt.passes.weight_only.base import WeightSite
from graphopt.passes.weight_only.lower import DQ_OPSET, LoweringContext, mark
from graphopt.quant.groupwise import GroupQuantized


def container(q: GroupQuantized) -> tuple[ir.DataType, np.ndarray, np.ndarray | None]:
    """(storage type, stored values ``[N, K]``, zero points ``[N, G]`` or None)."""
    if q.symmetric:
        mid = 1 << (q.bits - 1)
        values = q.codes.astype(np.int16) - mid
        dtype = ir.DataType.INT8 if q.bits == 8 else ir.DataType.INT4
        return dtype, values.astype(np.int8), None
    dtype = ir.DataType.UINT8 if q.bits == 8 else ir.DataType.UINT4
    return dtype, q.codes, q.zero_point_matrix()


def dequantize_node(lc: LoweringContext, base: str, q: GroupQuantized, layout: str) -> ir.Node:
    """A ``DequantizeLinear`` producing the float weight in ``layout`` (``kn`` or ``nk``)."""
    dtype, values, zp = container(q)
    per_axis = q.groups == 1
    if layout == "kn":
        values, scales = values.T, q.scales.T
        zp = None if zp is None else zp.T
        axis = 1 if per_axis else 0
    else:
        scales = q.scales
        axis = 0 if per_axis else 1
    if per_axis:
        scales = scales.reshape(-1)
        zp = None if zp is None else zp.reshape(-1)
    inputs = [
        lc.initializer(f"{base}_q", values, dtype),
        lc.initializer(f"{base}_scale", np.ascontiguousarray(scales, dtype=np.float32)),
    ]
    if zp is not None:
        inputs.append(lc.initializer(f"{base}_zero_point", zp.astype(values.dtype), dtype))
    attrs = [ir.AttrInt64("axis", axis)]
    if not per_axis:
        attrs.append(ir.AttrInt64("block_size", q.group_size))
    node = ir.Node(
        "",
        "DequantizeLinear",
        inputs,
        attrs,
        name=lc.names(f"{base}_DequantizeLinear"),
        num_outputs=1,
    )
    out = node.outputs[0]
    out.name = lc.names(f"{base}_dequantized")
    out.dtype = ir.DataType.FLOAT
    out.shape = ir.Shape(values.shape)
    mark(node, q)
    return node


def lower(lc: LoweringContext, sites: Sequence[WeightSite], q: GroupQuantized) -> None:
    """Feeds every site of one weight from a single blocked ``DequantizeLinear``."""
    weight = sites[0].weight
    base = weight.name or "weight"
    node = dequantize_node(lc, base, q, sites[0].layout)
    lc.prepend(node)
    lc.need_opset("", DQ_OPSET)
    consumers = {id(s.transpose if s.transpose is not None else s.node) for s in sites}
    for user, index in list(weight.uses()):
        if id(user) in consumers:
            user.replace_input_with(index, node.outputs[0])
