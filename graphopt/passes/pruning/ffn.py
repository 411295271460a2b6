"""Removal of FFN neurons: up/gate columns, per-neuron constants, down-projection rows."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt.analysis.structure.transformer import FFNBlock
from graphopt.passes.cleanup import _util
from graphopt.passes.pruning.slicing import (
    SkipBlock,
    drop_if_unused,
    resize_last_dim,
    slice_input_rows,
    slice_output_columns,
)


def prune_neurons(model: ir.Model, block: FFNBlock, keep: np.ndarray, namer: _util.NameGenerator) -> None:
    """Keeps the intermediate neurons ``keep`` of ``block`` (in place).

    Raises:
        SkipBlock: Nothing would be kept.
    """
    keep = np.unique(np.asarray(keep, dtype=np.int64))
    width = block.intermediate
    if keep.size == 0:
        raise SkipBlock(f"{block.name}: would remove every neuron")
    as_init = _util.uses_initializers(model)
    for node in block.region:
        for index, value in enumerate(node.inputs):
            arr = _util.constant_array(value)
            if value is None or arr is None or arr.size == 1:
                continue
            sliced = arr.reshape(arr.shape)[..., keep]
            new = _util.new_constant_value(
                model.graph, sliced, namer.new(f"{value.name or 'c'}_pruned"),
                as_initializer=as_init, before=node,
            )
            node.replace_input_with(index, new)
            drop_if_unused(model.graph, value)
    for proj in block.inputs:
        slice_output_columns(proj, keep)
    slice_input_rows(block.down, keep)
    for node in block.region:
        for out in node.outputs:
            if out.shape is not None and len(out.shape) and out.shape[-1] == width:
                resize_last_dim(out, int(keep.size))
