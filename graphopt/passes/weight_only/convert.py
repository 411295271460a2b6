"""Reading a :class:`GroupQuantized` back from any lowered node.

Every lowering stores the codes and scales of one representation exactly; these readers
invert them, so a weight lowered for one target can be re-lowered for another without
re-rounding (``read_back(node)`` then any ``lower_*``). The ``graphopt.wq.bits`` and
``graphopt.wq.group_size`` node metadata restore the true width of codes stored in a
wider container and the group size of repeated per-block scales; without it the
container's width and the block size are taken.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt.passes.weight_only.lower import META_BITS, META_GROUP, META_K
from graphopt.quant.groupwise import GroupQuantized, unpack_codes

_SIGNED = {ir.DataType.INT4: 4, ir.DataType.INT8: 8}
_UNSIGNED = {ir.DataType.UINT4: 4, ir.DataType.UINT8: 8}


class NotLoweredError(ValueError):
    """The node is not a weight-only lowering this module can read."""


def _const(value: ir.Value | None, what: str, node: ir.Node) -> np.ndarray:
    if value is None or value.const_value is None:
        raise NotLoweredError(f"{node.op_type} {node.name!r}: {what} is not a constant")
    return value.const_value.numpy()


def _attr(node: ir.Node, name: str, default: int | None = None) -> int:
    attr = node.attributes.get(name)
    if attr is None:
        if default is None:
            raise NotLoweredError(f"{node.op_type} {node.name!r}: attribute {name} missing")
        return default
    return int(attr.value)


def _restore(q: GroupQuantized, node: ir.Node) -> GroupQuantized:
    """Applies the node's metadata: the true bit width and group size."""
    bits = int(node.metadata_props.get(META_BITS, q.bits))
    group = int(node.metadata_props.get(META_GROUP, q.group_size))
    codes, zps, scales = q.codes, q.zero_points, q.scales
    if bits != q.bits:
        if zps is None:
            codes = (codes.astype(np.int16) - (1 << (q.bits - 1)) + (1 << (bits - 1))).astype(
                np.int16
            )
        if codes.size and (codes.min() < 0 or codes.max() >= 1 << bits):
            raise NotLoweredError(
                f"{node.op_type} {node.name!r}: codes exceed the recorded {bits} bits"
            )
        codes = codes.astype(np.uint8)
    group = min(group, q.k)
    if group != q.group_size:
        if group % q.group_size != 0 and group != q.k:
            raise NotLoweredError(
                f"{node.op_type} {node.name!r}: group {group} is not whole blocks"
            )
        first_block = (np.arange(-(-q.k // group)) * group) // q.group_size
        block_group = (np.arange(q.groups) * q.group_size) // group
        coarse = scales[:, first_block]
        if not np.array_equal(coarse[:, block_group], scales):
            raise NotLoweredError(
                f"{node.op_type} {node.name!r}: scales differ within a group of {group}"
            )
        scales = np.ascontiguousarray(coarse)
        zps = None if zps is None else np.ascontiguousarray(zps[:, first_block])
    return GroupQuantized(codes, scales, zps, bits, group)


def _from_blocks(
    codes: np.ndarray,
    scales: np.ndarray,
    zp_packed: np.ndarray | None,
    bits: int,
    block: int,
    n: int,
    k: int,
    node: ir.Node,
) -> GroupQuantized:
    k_blocks = -(-k // block)
    scales = np.asarray(scales, dtype=np.float32).reshape(n, k_blocks)
    zps = None
    if zp_packed is not None:
        zp_rows = np.asarray(zp_packed, dtype=np.uint8).reshape(n, -1)
        zps = unpack_codes(zp_rows, bits, k_blocks)
    return _restore(
        GroupQuantized(np.ascontiguousarray(codes[:, :k]), scales, zps, bits, min(block, k)), node
    )


def _matmul_nbits(node: ir.Node) -> GroupQuantized:
    k, n, bits, block = (
        _attr(node, "K"),
        _attr(node, "N"),
        _attr(node, "bits", 4),
        _attr(node, "block_size"),
    )
    packed = _const(node.inputs[1], "B", node)
    k_blocks = -(-k // block)
    codes = unpack_codes(packed.reshape(n, k_blocks, -1), bits, block).reshape(n, k_blocks * block)
    zp = node.inputs[3] if len(node.inputs) > 3 else None
    zp_arr = None if zp is None else _const(zp, "zero_points", node)
    if zp_arr is not None and zp_arr.dtype != np.uint8:
        raise NotLoweredError(f"MatMulNBits {node.name!r}: float zero points are not supported")
    return _from_blocks(
        codes, _const(node.inputs[2], "scales", node), zp_arr, bits, block, n, k, node
    )


def _gather_block_quantized(node: ir.Node) -> GroupQuantized:
    if _attr(node, "gather_axis", 0) != 0 or _attr(node, "quantize_axis", 1) != 1:
        raise NotLoweredError(
            f"GatherBlockQuantized {node.name!r}: only gather_axis=0, quantize_axis=1"
        )
    data_value = node.inputs[0]
    if data_value is None or data_value.dtype != ir.DataType.UINT8:
        raise NotLoweredError(f"GatherBlockQuantized {node.name!r}: only uint8 packed data is read")
    bits, block = _attr(node, "bits", 4), _attr(node, "block_size", 128)
    data = _const(data_value, "data", node)
    scales = _const(node.inputs[2], "scales", node)
    n, k_blocks = scales.shape
    k = int(node.metadata_props.get(META_K, data.shape[1] * 8 // bits))
    k = min(k, k_blocks * block)
    codes = unpack_codes(data, bits, k)
    zp = node.inputs[3] if len(node.inputs) > 3 else None
    zp_arr = None if zp is None else _const(zp, "zero_points", node)
    return _from_blocks(codes, scales, zp_arr, bits, block, n, k, node)


def _dequantize_linear(node: ir.Node) -> GroupQuantized:
    x = node.inputs[0]
    if x is None or x.dtype not in _SIGNED and x.dtype not in _UNSIGNED:
        raise NotLoweredError(f"DequantizeLinear {node.name!r}: not an integer weight")
    values = _const(x, "x", node).astype(np.int16)
    if values.ndim != 2:
        raise NotLoweredError(f"DequantizeLinear {node.name!r}: weight is not 2-D")
    scales = _const(node.inputs[1], "scale", node).astype(np.float32)
    zp_value = node.inputs[2] if len(node.inputs) > 2 else None
    zp = None if zp_value is None else _const(zp_value, "zero_point", node).astype(np.int16)
    axis = _attr(node, "axis", 1)
    axis = axis + 2 if axis < 0 else axis
    block = node.attributes.get("block_size")
    blocked = block is not None and int(block.value) > 0
    if blocked:
        kn = axis == 0  # the blocked axis is K
    else:
        if scales.ndim != 1 or scales.size == 1 and values.shape[axis] != 1:
            raise NotLoweredError(
                f"DequantizeLinear {node.name!r}: per-tensor scales are not weight-only"
            )
        kn = axis == 1  # the per-axis axis is N
        scales = scales.reshape(-1, 1) if not kn else scales.reshape(1, -1)
        zp = None if zp is None else (zp.reshape(-1, 1) if not kn else zp.reshape(1, -1))
    if kn:
        values, scales = values.T, scales.T
        zp = None if zp is None else zp.T
    k = int(values.shape[1])
    group = int(block.value) if block is not None and blocked else k
    signed = x.dtype in _SIGNED
    container = _SIGNED.get(x.dtype) or _UNSIGNED[x.dtype]
    if signed:
        if zp is not None and np.any(zp != 0):
            raise NotLoweredError(
                f"DequantizeLinear {node.name!r}: signed weights with zero points"
            )
        codes = values + (1 << (container - 1))
        zps = None
    else:
        codes = values
        zps = np.zeros(scales.shape, np.uint8) if zp is None else zp.astype(np.uint8)
    q = GroupQuantized(
        codes.astype(np.uint8),
        np.ascontiguousarray(scales),
        None if zps is None else np.ascontiguousarray(zps),
        container,
        group,
    )
    return _restore(q, node)


def _matmul_low_bit(node: ir.Node) -> GroupQuantized:
    from graphopt.backends.ext.format import ExtWeights, from_ext

    zp = node.inputs[3] if len(node.inputs) > 3 else None
    weights = ExtWeights(
        packed=_const(node.inputs[1], "packed", node),
        scales=_const(node.inputs[2], "scales", node),
        zero_points=None if zp is None else _const(zp, "zero_points", node),
        attributes={
            name: int(attr.value)
            for name, attr in node.attributes.items()
            if attr.type == ir.AttributeType.INT
        },
    )
    try:
        return from_ext(weights)
    except ValueError as e:
        raise NotLoweredError(f"MatMulLowBit {node.name!r}: {e}") from None


def read_back(node: ir.Node) -> GroupQuantized:
    """The representation a lowered node holds.

    Args:
        node: ``MatMulNBits`` / ``GatherBlockQuantized`` (com.microsoft), a weight
            ``DequantizeLinear``, or graphopt ``MatMulLowBit``.

    Raises:
        NotLoweredError: Any other node, or one whose weights are not constants.
    """
    key = (node.domain, node.op_type)
    if key == ("com.microsoft", "MatMulNBits"):
        return _matmul_nbits(node)
    if key == ("com.microsoft", "GatherBlockQuantized"):
        return _gather_block_quantized(node)
    if node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx"):
        return _dequantize_linear(node)
    if key == ("graphopt", "MatMulLowBit"):
        return _matmul_low_bit(node)
    raise NotLoweredError(
        f"{node.domain or 'ai.onnx'}::{node.op_type} {node.name!r} is not a weight-only lowering"
    )


# ----------------------------------------------------------------------------- re-lowering

_LOWERED = {
    ("com.microsoft", "MatMulNBits"),
    ("com.microsoft", "GatherBlockQuantized"),
    ("", "DequantizeLinear"),
    ("graphopt", "MatMulLowBit"),
}


def _is_lowered(node: ir.Node) -> bool:
    key = ("" if node.domain == "ai.onnx" else node.domain, node.op_type)
    if key not in _LOWERED:
        return False
    if node.op_type == "DequantizeLinear":  # only weight DQs written by a weight-only pass
        from graphopt.passes.weight_only.lower import META_BITS as bits_key

        return bits_key in node.metadata_props
    return True


def _fingerprint(q: GroupQuantized) -> tuple[object, ...]:
    import hashlib

    digest = hashlib.sha1()
    for part in (q.codes, q.scales, q.zero_point_matrix()):
        digest.update(np.ascontiguousarray(part).tobytes())
    return (q.n, q.k, q.bits, q.group_size, q.symmetric, digest.hexdigest())


def relower(model: ir.Model, lowering: str, accuracy_level: int | None = None) -> dict[str, object]:
    """Re-lowers every weight-only node of ``model`` for ``lowering`` without re-rounding.

    Each lowered node's :class:`GroupQuantized` is read back and the node replaced by its
    float equivalent reading the exact dequantized weight (``MatMul`` / ``Gather`` / the
    weight itself); equal codes read by a ``Gather`` and a head become one table read
    through ``Transpose``, as a tied export has it. Then the weights are lowered again from
    the read-back representations, so nothing is rounded twice.

    Args:
        model: A model produced by a weight-only pass (modified in place).
        lowering: ``nbits``, ``dq`` or ``ext``.
        accuracy_level: For ``nbits``: MatMulNBits ``accuracy_level`` (None: the default).

    Returns:
        The lowering statistics (nodes created, fallbacks, opset changes), plus
        ``nodes_restored``.
    """
    from graphopt.passes.weight_only.base import WeightOnlyOptions
    from graphopt.passes.weight_only.lower import Names, lower_weights
    from graphopt.passes.weight_only.selection import select_sites

    graph = model.graph
    names = Names(graph)
    lowered = [(node, read_back(node)) for node in graph if _is_lowered(node)]
    # Codes read in [N, K] orientation (embedding gathers, DQs stored output-major).
    nk_keys = {
        _fingerprint(q)
        for node, q in lowered
        if node.op_type == "GatherBlockQuantized"
        or (node.op_type == "DequantizeLinear" and not _dq_is_kn(node))
    }
    tables: dict[tuple[object, ...], ir.Value] = {}
    quantized: dict[str, GroupQuantized] = {}
    old_inputs: set[ir.Value] = set()

    def table(q: GroupQuantized, base: str, layout: str) -> ir.Value:
        key = (*_fingerprint(q), layout)
        if key not in tables:
            array = q.dequantize() if layout == "nk" else q.dequantize_matmul_weight()
            tensor = ir.Tensor(array, name=names(f"{base}_restored"))
            value = ir.Value(
                name=tensor.name,
                shape=ir.Shape(array.shape),
                type=ir.TensorType(ir.DataType.FLOAT),
                const_value=tensor,
            )
            graph.register_initializer(value)
            tables[key] = value
            quantized[value.name or ""] = q
        return tables[key]

    def transposed(value: ir.Value, base: str) -> ir.Node:
        return ir.Node(
            "",
            "Transpose",
            [value],
            [ir.AttrInt64s("perm", [1, 0])],
            name=names(f"{base}_restored_T"),
            num_outputs=1,
        )

    for node, q in lowered:
        old_inputs.update(v for v in node.inputs if v is not None and v.is_initializer())
        base = node.name or node.op_type
        if node.op_type == "DequantizeLinear":
            w = table(q, base, "kn" if _dq_is_kn(node) else "nk")
            ir.convenience.replace_all_uses_with(node.outputs[0], w)
            graph.remove(node, safe=True)
        elif node.op_type == "GatherBlockQuantized":
            g = ir.Node(
                "",
                "Gather",
                [table(q, base, "nk"), node.inputs[1]],
                name=names(f"{base}_restored"),
                num_outputs=1,
            )
            ir.convenience.replace_nodes_and_values(
                graph, node, [node], [g], [node.outputs[0]], [g.outputs[0]]
            )
        else:  # MatMulNBits / MatMulLowBit: A @ W (+ bias)
            bias_index = 5 if node.op_type == "MatMulNBits" else 4
            bias = node.inputs[bias_index] if len(node.inputs) > bias_index else None
            new: list[ir.Node] = []
            if _fingerprint(q) in nk_keys:  # tied to a table read output-major
                t = transposed(table(q, base, "nk"), base)
                new.append(t)
                weight = t.outputs[0]
            else:
                weight = table(q, base, "kn")
            mm = ir.Node(
                "",
                "MatMul",
                [node.inputs[0], weight],
                name=names(f"{base}_restored"),
                num_outputs=1,
            )
            new.append(mm)
            out = mm.outputs[0]
            if bias is not None:
                out.name = names(f"{base}_restored_out")
                add = ir.Node(
                    "", "Add", [out, bias], name=names(f"{base}_restored_bias"), num_outputs=1
                )
                new.append(add)
                out = add.outputs[0]
            ir.convenience.replace_nodes_and_values(
                graph, node, [node], new, [node.outputs[0]], [out]
            )
    for value in old_inputs:
        name = value.name
        if (
            name is not None
            and name in graph.initializers
            and not value.uses()
            and not value.is_graph_output()
        ):
            graph.initializers.pop(name)
    sites, _ = select_sites(model, WeightOnlyOptions(min_dim=1, embeddings=True))
    sites = [s for s in sites if s.name in quantized]
    chosen = {s.name: quantized[s.name] for s in sites}
    stats = lower_weights(
        model, sites, chosen, lowering, WeightOnlyOptions(accuracy_level=accuracy_level)
    )
    stats["nodes_restored"] = len(lowered)
    return stats


def _dq_is_kn(node: ir.Node) -> bool:
    """Whether a weight DequantizeLinear produces ``[K, N]`` (MatMul ``B`` orientation)."""
    axis = _attr(node, "axis", 1)
    blocked = "block_size" in node.attributes and int(node.attributes["block_size"].value) > 0
    return axis == 0 if blocked else axis == 1
