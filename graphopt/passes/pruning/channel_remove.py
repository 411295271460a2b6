"""Physical removal of channel units: slices constants, rewrites attributes and shapes.

Used by :mod:`graphopt.passes.pruning.channels` once it has chosen the units to remove
from the records of :class:`~graphopt.analysis.structure.conv_groups.ConvGroups`.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_ir as ir

from graphopt.analysis.structure.conv_groups import ConvGroups, TensorSlice


class Writer:
    """Writes new arrays for node inputs: in place when the constant has one use, as a
    fresh initializer otherwise (tied weights stay correct for their other users)."""

    def __init__(self, model: ir.Model) -> None:
        self.graph = model.graph
        self.names = set(self.graph.initializers)
        for node in self.graph:
            self.names.update(v.name for v in node.outputs if v.name)
        self.names.update(v.name for v in self.graph.inputs if v.name)
        self.orphans: list[ir.Value] = []

    def fresh_name(self, base: str) -> str:
        name, i = base, 0
        while name in self.names:
            i += 1
            name = f"{base}_{i}"
        self.names.add(name)
        return name

    def new_initializer(self, base: str, arr: np.ndarray) -> ir.Value:
        name = self.fresh_name(base)
        value = ir.Value(
            name=name,
            shape=ir.Shape(arr.shape),
            type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)),
            const_value=ir.tensor(arr, name=name),
        )
        self.graph.register_initializer(value)
        return value

    def write(self, node: ir.Node, index: int, arr: np.ndarray) -> None:
        value = node.inputs[index]
        assert value is not None
        arr = np.ascontiguousarray(arr)
        if len(value.uses()) == 1 and not value.is_graph_output():
            value.const_value = ir.tensor(arr, name=value.name)
            value.shape = ir.Shape(arr.shape)
            return
        new = self.new_initializer(f"{value.name or 'pruned'}_pruned", arr)
        node.replace_input_with(index, new)
        if not value.uses() and value.is_initializer() and not value.is_graph_output():
            self.orphans.append(value)

    def drop_orphans(self) -> None:
        for value in self.orphans:
            if value.name and not value.uses() and value.name in self.graph.initializers:
                del self.graph.initializers[value.name]


def remove_units(model: ir.Model, groups: ConvGroups, removed: np.ndarray) -> None:
    """Physically removes the units ``removed`` from every record of ``groups``."""
    writer = Writer(model)
    by_input: dict[tuple[int, int], list[TensorSlice]] = defaultdict(list)
    for sl in groups.slices:
        if np.isin(sl.owners, removed).any():
            by_input[(id(sl.node), sl.input_index)].append(sl)
    for slices in by_input.values():
        node, index = slices[0].node, slices[0].input_index
        arr = node.inputs[index].const_value.numpy()  # type: ignore[union-attr]
        for sl in slices:
            arr = np.compress(~np.isin(sl.owners, removed), arr, axis=sl.axis)
        writer.write(node, index, arr)
    for ga in groups.group_attrs:
        kept = int((~np.isin(ga.in_owners, removed)).sum())
        ga.node.attributes["group"] = ir.AttrInt64("group", kept // ga.per_group)
    for rw in groups.shape_rewrites:
        value = rw.node.inputs[1]
        assert value is not None and value.const_value is not None
        target = value.const_value.numpy().copy()
        target[rw.index] = int((~np.isin(rw.owners, removed)).sum())
        writer.write(rw.node, 1, target)
    for value, owners in groups.layouts.items():
        if value.shape is None or len(value.shape) < 2:
            continue
        dims = list(value.shape)
        dims[1] = int((~np.isin(owners, removed)).sum())
        value.shape = ir.Shape(dims)
    writer.drop_orphans()
