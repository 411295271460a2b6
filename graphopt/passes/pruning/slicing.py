"""Physical slicing helpers shared by head and neuron removal: weights, biases, shapes."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from graphopt.analysis.structure.transformer import Projection


class SkipBlock(Exception):
    """A block that cannot be pruned safely; the message is the reason (for reports)."""


def set_constant(value: ir.Value, array: np.ndarray) -> None:
    """Replaces the tensor of initializer ``value`` (only read by the block being pruned)."""
    value.const_value = ir.tensor(np.ascontiguousarray(array), name=value.name)
    value.shape = ir.Shape(array.shape)


def weight_array(value: ir.Value) -> np.ndarray:
    """The numpy array of a constant weight."""
    tensor = value.const_value
    assert tensor is not None, value.name
    return tensor.numpy()


def slice_output_columns(proj: Projection, keep: np.ndarray) -> None:
    """Keeps the output columns ``keep`` of a projection (weight ``[:, keep]``, bias ``[keep]``)."""
    set_constant(proj.weight, weight_array(proj.weight)[:, keep])
    if proj.bias is not None:
        set_constant(proj.bias, weight_array(proj.bias)[keep])
    width = int(keep.size)
    for node in proj.nodes:
        resize_last_dim(node.outputs[0], width)


def slice_input_rows(proj: Projection, keep: np.ndarray) -> None:
    """Keeps the input rows ``keep`` of a projection's weight (``W[keep, :]``)."""
    set_constant(proj.weight, weight_array(proj.weight)[keep, :])


def resize_last_dim(value: ir.Value, width: int) -> None:
    """Sets the static last dim of ``value`` (when it has a shape)."""
    if value.shape is None or len(value.shape) == 0:
        return
    dims = list(value.shape)
    dims[-1] = width
    value.shape = ir.Shape(dims)


def remap_shape(value: ir.Value, mapping: Mapping[int, int], ambiguous: frozenset[int]) -> None:
    """Rewrites the static dims of ``value`` by ``mapping``; drops the shape when a dim is
    one of the ``ambiguous`` sizes (it could stand for two different quantities)."""
    if value.shape is None:
        return
    dims = list(value.shape)
    if any(isinstance(d, int) and d in ambiguous for d in dims):
        value.shape = None
        return
    value.shape = ir.Shape([mapping.get(d, d) if isinstance(d, int) else d for d in dims])


def unique_mapping(pairs: list[tuple[int, int]], fixed: set[int]) -> tuple[dict[int, int], frozenset[int]]:
    """``old -> new`` for sizes that change, and the sizes that are ambiguous.

    Args:
        pairs: ``(old, new)`` for each quantity (heads, KV heads, group, widths).
        fixed: Sizes that must not change (head size).
    """
    seen: dict[int, set[int]] = {}
    for old, new in pairs:
        seen.setdefault(old, set()).add(new)
    for old in fixed:
        seen.setdefault(old, set()).add(old)
    mapping = {old: next(iter(news)) for old, news in seen.items() if len(news) == 1}
    ambiguous = frozenset(old for old, news in seen.items() if len(news) > 1)
    return {k: v for k, v in mapping.items() if k != v}, ambiguous


def drop_if_unused(graph: ir.Graph, value: ir.Value | None) -> None:
    """Removes a replaced constant (initializer, Constant node) or shape ``Concat`` that
    nothing reads any more, and, for a Concat, its constant inputs that became unused."""
    if value is None or value.uses() or value.is_graph_output() or value.is_graph_input():
        return
    if value.is_initializer():
        if value.name is not None and value.name in graph.initializers:
            graph.initializers.pop(value.name)
        return
    producer = value.producer()
    if producer is None or producer.graph is not graph or producer.op_type not in ("Constant", "Concat"):
        return
    if any(out.uses() or out.is_graph_output() for out in producer.outputs):
        return
    inputs = list(producer.inputs)
    graph.remove(producer, safe=True)
    for inp in inputs:
        drop_if_unused(graph, inp)
