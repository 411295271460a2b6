"""Removal of attention heads: Q/K/V columns, output-projection rows, shape constants.

Query head ``h`` reads KV head ``h // group`` (the ``repeat_interleave`` layout of grouped
query attention). Kept query heads must leave the same number of heads in every kept KV
group, so the grouped layout stays valid: either whole KV groups go (with their query
heads), or the same number of query heads goes from every group.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphopt.analysis.structure.transformer import AttentionBlock
from graphopt.passes.cleanup import _util
from graphopt.passes.pruning.slicing import (
    SkipBlock,
    drop_if_unused,
    remap_shape,
    slice_input_rows,
    slice_output_columns,
    unique_mapping,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadPlan:
    """The heads a block keeps.

    Attributes:
        heads: Kept query heads (sorted).
        kv_heads: Kept KV heads (sorted).
        group: Query heads per kept KV head.
    """

    heads: np.ndarray
    kv_heads: np.ndarray
    group: int


def plan_heads(block: AttentionBlock, keep: np.ndarray) -> HeadPlan:
    """Checks that ``keep`` (query heads) fits the grouped layout.

    Raises:
        SkipBlock: Nothing kept, or kept heads unevenly spread over KV groups.
    """
    heads = np.unique(np.asarray(keep, dtype=np.int64))
    if heads.size == 0:
        raise SkipBlock(f"{block.name}: would remove every head")
    if heads.min() < 0 or heads.max() >= block.num_heads:
        raise SkipBlock(f"{block.name}: head index out of range")
    g = block.group_size
    groups = heads // g
    kv, counts = np.unique(groups, return_counts=True)
    if len(set(counts.tolist())) != 1:
        raise SkipBlock(
            f"{block.name}: kept query heads {heads.tolist()} leave KV groups uneven "
            f"({counts.tolist()} of {g})"
        )
    return HeadPlan(heads, kv, int(counts[0]))


def _columns(units: np.ndarray, size: int) -> np.ndarray:
    return (units[:, None] * size + np.arange(size)[None, :]).reshape(-1)


def prune_heads(model: ir.Model, block: AttentionBlock, plan: HeadPlan, namer: _util.NameGenerator) -> None:
    """Removes the heads not in ``plan`` from ``block`` (in place).

    Raises:
        SkipBlock: A shape constant whose entries cannot be told apart; nothing changed.
    """
    hd = block.head_dim
    h0, kv0, g0 = block.num_heads, block.num_kv_heads, block.group_size
    h1, kv1, g1 = int(plan.heads.size), int(plan.kv_heads.size), plan.group
    roles = {
        "heads": (h0, h1),
        "kv": (kv0, kv1),
        "group": (g0, g1),
        "width": (h0 * hd, h1 * hd),
        "kv_width": (kv0 * hd, kv1 * hd),
    }
    rewrites = _plan_shape_rewrites(block, roles)
    graph = model.graph
    as_init = _util.uses_initializers(model)
    for node, index, pieces in rewrites:
        _apply_rewrite(graph, node, index, pieces, namer, as_init)
    q_cols = _columns(plan.heads, hd)
    kv_cols = _columns(plan.kv_heads, hd)
    slice_output_columns(block.q, q_cols)
    slice_output_columns(block.k, kv_cols)
    slice_output_columns(block.v, kv_cols)
    slice_input_rows(block.o, q_cols)
    mapping, ambiguous = unique_mapping(list(roles.values()), {hd})
    for node in block.region:
        for out in node.outputs:
            remap_shape(out, mapping, ambiguous)
    block.num_heads, block.num_kv_heads = h1, kv1


# A shape vector as pieces: (concat input index or None, constant array or None, length).
_Piece = tuple[int | None, np.ndarray | None, int]


def _pieces(value: ir.Value) -> tuple[ir.Node | None, list[_Piece]] | None:
    arr = _util.constant_array(value)
    if arr is not None:
        return None, [(None, arr.reshape(-1).astype(np.int64), int(arr.size))]
    producer = value.producer()
    if producer is None or producer.op_type != "Concat":
        return None
    pieces: list[_Piece] = []
    for i, inp in enumerate(producer.inputs):
        if inp is None:
            return None
        part = _util.constant_array(inp)
        if part is not None:
            pieces.append((i, part.reshape(-1).astype(np.int64), int(part.size)))
            continue
        if inp.shape is None or len(inp.shape) != 1 or not isinstance(inp.shape[0], int):
            return None
        pieces.append((i, None, int(inp.shape[0])))
    return producer, pieces


def _resolve(entry: int, candidates: list[tuple[int, int]], hd: int, where: str) -> int:
    news = {new for old, new in candidates if old == entry}
    if not news:
        return entry
    if entry == hd or len(news) > 1:
        raise SkipBlock(f"{where}: shape entry {entry} is ambiguous (head count or size)")
    return next(iter(news))


def _plan_shape_rewrites(
    block: AttentionBlock, roles: dict[str, tuple[int, int]]
) -> list[tuple[ir.Node, int, tuple[ir.Node | None, list[_Piece], list[np.ndarray | None]]]]:
    hd = block.head_dim
    plans = []
    for node in block.region:
        if node.op_type not in ("Reshape", "Expand") or len(node.inputs) < 2:
            continue
        target = node.inputs[1]
        if target is None:
            continue
        found = _pieces(target)
        if found is None:
            continue  # computed at run time from Shape: follows the new sizes by itself
        concat, pieces = found
        total = sum(p[2] for p in pieces)
        in_dims = node.inputs[0].shape if node.inputs[0] is not None else None
        where = f"{block.name}: {node.op_type} '{node.name}'"
        changed: list[np.ndarray | None] = []
        any_change = False
        pos = 0
        for _, arr, length in pieces:
            if arr is None:
                changed.append(None)
                pos += length
                continue
            new = arr.copy()
            for j, entry in enumerate(arr.tolist()):
                if entry in (0, -1, 1):
                    continue
                cands = [roles["heads"], roles["kv"], roles["width"], roles["kv_width"]]
                if node.op_type == "Expand":
                    i = (pos + j) - (total - (len(in_dims) if in_dims is not None else total))
                    d = in_dims[i] if in_dims is not None and 0 <= i < len(in_dims) else None
                    if d == 1:
                        cands = [roles["group"], roles["heads"]]
                    elif d is None:
                        cands = [*cands, roles["group"]]
                new[j] = _resolve(int(entry), cands, hd, where)
            pos += length
            if not np.array_equal(new, arr):
                any_change = True
                changed.append(new)
            else:
                changed.append(None)
        if any_change:
            plans.append((node, 1, (concat, pieces, changed)))
    return plans


def _apply_rewrite(
    graph: ir.Graph,
    node: ir.Node,
    index: int,
    rewrite: tuple[ir.Node | None, list[_Piece], list[np.ndarray | None]],
    namer: _util.NameGenerator,
    as_init: bool,
) -> None:
    concat, pieces, changed = rewrite
    old = node.inputs[index]
    assert old is not None
    if concat is None:
        (new,) = changed
        assert new is not None
        value = _util.new_constant_value(
            graph, new, namer.new(f"{old.name or 'shape'}_pruned"), as_initializer=as_init, before=node
        )
        node.replace_input_with(index, value)
        drop_if_unused(graph, old)
        return
    inputs: list[ir.Value | None] = []
    for (i, _, _), new in zip(pieces, changed, strict=True):
        original = concat.inputs[i] if i is not None else None
        if new is None:
            inputs.append(original)
            continue
        inputs.append(
            _util.new_constant_value(
                graph, new, namer.new(f"{(original.name if original else None) or 'dims'}_pruned"),
                as_initializer=as_init, before=node,
            )
        )
    clone = ir.Node(
        concat.domain, "Concat", inputs=inputs,
        attributes=list(concat.attributes.values()), name=namer.new(f"{concat.name or 'Concat'}_pruned"),
    )
    out = clone.outputs[0]
    out.name = namer.new(f"{old.name or 'shape'}_pruned")
    out.type = old.type
    out.shape = old.shape
    graph.insert_before(node, clone)
    node.replace_input_with(index, out)
    drop_if_unused(graph, old)
