"""Which weights a weight-only pass quantizes.

A :class:`~graphopt.passes.weight_only.base.WeightSite` is one use of a constant 2-D
float32 initializer by:

* ``MatMul(A, W)`` with ``W[K, N]``, or ``MatMul(A, Transpose(E, perm=[1, 0]))`` (a head tied
  to an embedding table ``E[N, K]``);
* ``Gemm(A, W, C)`` with ``transA=0`` and ``alpha=1`` (``transB`` either way; ``C`` only
  with ``beta=1``);
* ``Gather(E, indices)`` with ``axis=0`` (an embedding table), when ``embeddings=true``.

Weights that are graph inputs (overridable initializers) are never chosen. Every skip of a
candidate is reported with its reason.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

import onnx_ir as ir

from graphopt.passes.weight_only.base import WeightOnlyOptions, WeightSite

CANDIDATE_OPS = ("MatMul", "Gemm", "Gather")


def _attr(node: ir.Node, name: str, default: Any) -> Any:
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _constant_2d(value: ir.Value | None, graph: ir.Graph) -> bool:
    if value is None or value.const_value is None or not value.is_initializer():
        return False
    if value in graph.inputs:
        return False
    return value.dtype == ir.DataType.FLOAT and len(value.const_value.shape) == 2


def excluded(node: ir.Node, weight: ir.Value | None, patterns: Sequence[str]) -> str | None:
    """The pattern that excludes ``node`` (by node name, weight name glob or op type)."""
    for pattern in patterns:
        if pattern == node.op_type:
            return pattern
        for name in (node.name, weight.name if weight is not None else None):
            if name and fnmatch.fnmatchcase(name, pattern):
                return pattern
    return None


def _site_for(node: ir.Node, graph: ir.Graph, embeddings: bool) -> WeightSite | str | None:
    """The site of ``node``, a skip reason, or None when ``node`` is no candidate at all."""
    if node.op_type == "MatMul" and node.domain == "":
        a, b = node.inputs[0], node.inputs[1]
        if _constant_2d(b, graph):
            assert b is not None
            return WeightSite(node, b, a, "matmul", "kn")
        producer = b.producer() if b is not None else None
        if (
            producer is not None
            and producer.op_type == "Transpose"
            and producer.domain == ""
            and _constant_2d(producer.inputs[0], graph)
            and list(_attr(producer, "perm", [1, 0])) == [1, 0]
        ):
            table = producer.inputs[0]
            assert table is not None
            return WeightSite(node, table, a, "matmul", "nk", transpose=producer)
        return None
    if node.op_type == "Gemm" and node.domain == "":
        b = node.inputs[1]
        if not _constant_2d(b, graph):
            return None
        assert b is not None
        if _attr(node, "transA", 0):
            return "Gemm with transA=1"
        if float(_attr(node, "alpha", 1.0)) != 1.0:
            return "Gemm with alpha != 1"
        has_c = len(node.inputs) > 2 and node.inputs[2] is not None
        if has_c and float(_attr(node, "beta", 1.0)) != 1.0:
            return "Gemm with beta != 1"
        if _attr(node, "transB", 0):
            return WeightSite(node, b, node.inputs[0], "gemm", "nk")
        return WeightSite(node, b, node.inputs[0], "gemm", "kn")
    if node.op_type == "Gather" and node.domain == "":
        table = node.inputs[0]
        if not _constant_2d(table, graph):
            return None
        if int(_attr(node, "axis", 0)) != 0:
            return "Gather with axis != 0"
        if not embeddings:
            return "embeddings=false"
        assert table is not None
        return WeightSite(node, table, None, "gather", "nk")
    return None


def select_sites(model: ir.Model, options: WeightOnlyOptions) -> tuple[list[WeightSite], list[str]]:
    """The weight sites of ``model``'s main graph and the reasons candidates were skipped.

    Returns:
        ``(sites in graph order, skip reasons)``.
    """
    graph = model.graph
    sites: list[WeightSite] = []
    skipped: list[str] = []
    for node in graph:
        if node.op_type not in CANDIDATE_OPS:
            continue
        found = _site_for(node, graph, options.embeddings)
        label = node.name or node.op_type
        if found is None:
            continue
        if isinstance(found, str):
            skipped.append(f"{label}: {found}")
            continue
        pattern = excluded(node, found.weight, options.exclude)
        if pattern is not None:
            skipped.append(f"{label}: excluded by {pattern!r}")
            continue
        n, k = found.shape_nk
        if n < options.min_dim or k < options.min_dim:
            skipped.append(
                f"{label}: weight {found.name} [{n}x{k}] below min_dim={options.min_dim}"
            )
            continue
        sites.append(found)
    return _consistent_layouts(sites, skipped), skipped


def _consistent_layouts(sites: list[WeightSite], skipped: list[str]) -> list[WeightSite]:
    """Drops uses that read a shared weight in the other orientation than its first use
    (they would need a different ``W[N, K]``); each drop is reported."""
    layout: dict[str, str] = {}
    kept: list[WeightSite] = []
    for site in sites:
        first = layout.setdefault(site.name, site.layout)
        if first != site.layout:
            skipped.append(
                f"{site.node.name or site.node.op_type}: reads shared weight {site.name} transposed "
                "relative to its other uses"
            )
            continue
        kept.append(site)
    return kept
