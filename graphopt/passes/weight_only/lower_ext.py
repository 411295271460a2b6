"""runtime_ext lowering: graphopt ``MatMulLowBit`` from the packed ext format.

``graphopt.MatMulLowBit(A, packed, scales, zero_points, bias)`` with the attributes and
packing defined by :func:`graphopt.backends.ext.format.to_ext` (imported lazily: the ext
backend is optional). Embedding ``Gather`` uses become ORT ``GatherBlockQuantized`` (the
ext target runs on ONNX Runtime with the runtime_ext library loaded).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import onnx_ir as ir

from graphopt.errors import LoweringError
from graphopt.passes.weight_only.base import WeightSite
from graphopt.passes.weight_only.lower import EXT_DOMAIN, LoweringContext
from graphopt.passes.weight_only.lower_nbits import (
    fallback_dq,
    gather_block_quantized,
    replace_matmul,
)
from graphopt.quant.groupwise import GroupQuantized

EXT_OP = "MatMulLowBit"


def _to_ext(q: GroupQuantized, where: str) -> Any:
    try:
        from graphopt.backends.ext.format import to_ext
    except ImportError as e:
        raise LoweringError(
            "ext", where, f"the runtime_ext format module is unavailable ({e})"
        ) from None
    return to_ext(q)


def _attr(name: str, value: Any) -> ir.Attr:
    if isinstance(value, (bool, int)):
        return ir.AttrInt64(name, int(value))
    if isinstance(value, float):
        return ir.AttrFloat32(name, value)
    if isinstance(value, str):
        return ir.AttrString(name, value)
    return ir.Attr(name, ir.AttributeType.INTS, [int(v) for v in value])


def lower(lc: LoweringContext, sites: Sequence[WeightSite], q: GroupQuantized) -> None:
    """MatMulLowBit for MatMul/Gemm sites; GatherBlockQuantized for Gather sites."""
    base = sites[0].name or "weight"
    weights: list[ir.Value | None] | None = None
    attrs: list[ir.Attr] = []
    cache: dict[str, list[ir.Value | None]] = {}
    for site in sites:
        if site.kind == "gather":
            if not gather_block_quantized(lc, site, q, cache):
                fallback_dq(lc, [site], q, "ORT GatherBlockQuantized cannot hold this grouping")
            continue
        if weights is None:
            ext = _to_ext(q, site.node.name or base)
            weights = [
                lc.initializer(f"{base}_ext", ext.packed),
                lc.initializer(f"{base}_ext_scales", ext.scales),
            ]
            weights.append(
                None
                if ext.zero_points is None
                else lc.initializer(f"{base}_ext_zero_points", ext.zero_points)
            )
            attrs = [_attr(k, v) for k, v in ext.attributes.items()]
        replace_matmul(lc, site, q, (EXT_DOMAIN, EXT_OP), weights, attrs)
        lc.need_opset(EXT_DOMAIN, 1)
