"""Least-squares reconstruction of the consumers of pruned channels.

For each consumer that loses input positions (a Conv with ``group=1``, a Gemm, a 2-D
MatMul), the kept part of its weight and its bias are refit in closed form by ridge least
squares, ``min ||[A_K, 1] T - A W||^2 + lambda ||T||^2``: ``A`` are its input rows on the
*unpruned* model's calibration activations (im2col patches for a Conv), ``A W`` its
unpruned output. Only the kept rows of ``[A, 1]^T [A, 1]`` are accumulated
(:func:`~graphopt.passes.pruning.channel_calib.input_grams`), in batches that fit
:data:`GRAM_BUDGET_BYTES`, one calibration pass per batch; nothing is written before every
solve is done. A missing bias is added (and follows the conv's own output pruning).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from graphopt.analysis.structure.conv_groups import ConvGroups, TensorSlice
from graphopt.errors import UsageError
from graphopt.infra.context import PassContext
from graphopt.passes.pruning.channel_calib import ConvGeometry, GramRequest, input_grams
from graphopt.passes.pruning.channel_remove import Writer

if TYPE_CHECKING:
    from graphopt.passes.pruning.channels import ChannelPruneReport

_CONVS = ("Conv", "FusedConv")
_GEMMS = ("Gemm", "FusedGemm")
#: Largest Gram matrix side (consumer input width + 1) reconstruction accepts.
MAX_GRAM_SIDE = 8192
#: Gram matrices accumulated in one calibration pass, in bytes.
GRAM_BUDGET_BYTES = 512 * 2**20


@dataclass
class _Target:
    """A consumer to refit: its weight in ``Y = A @ theta`` form."""

    node: ir.Node
    slice: TensorSlice
    geometry: ConvGeometry | None
    keep: np.ndarray  # bool over the columns of A (bias column excluded)
    intercept: bool


def reconstruct_consumers(
    model: ir.Model,
    groups: ConvGroups,
    removed: np.ndarray,
    ctx: PassContext,
    ridge: float,
    max_rows: int,
    report: ChannelPruneReport,
) -> None:
    targets: list[_Target] = []
    for sl in groups.slices:
        if sl.role != "consumer" or not np.isin(sl.owners, removed).any():
            continue
        node = sl.node
        label = node.name or node.op_type
        keep_pos = ~np.isin(sl.owners, removed)
        weight = sl.value.const_value.numpy()  # type: ignore[union-attr]
        if node.op_type in _CONVS:
            try:
                geo = ConvGeometry.of(node, weight.shape)
            except UsageError as e:
                report.reconstruct_skipped[label] = str(e)
                continue
            keep = np.repeat(keep_pos, geo.kernel[0] * geo.kernel[1])
            targets.append(_Target(node, sl, geo, keep, True))
        else:
            intercept = node.op_type in _GEMMS and _gemm_bias_ok(node, weight, sl.axis)
            targets.append(_Target(node, sl, None, keep_pos, intercept))
    kept_targets = []
    for t in targets:
        if len(t.keep) + 1 > MAX_GRAM_SIDE:
            report.reconstruct_skipped[t.node.name or t.node.op_type] = (
                f"input width {len(t.keep)} exceeds {MAX_GRAM_SIDE - 1}"
            )
        else:
            kept_targets.append(t)
    if not kept_targets:
        return
    # One calibration pass per batch of consumers whose Gram matrices fit the budget; all
    # passes run on the unpruned model (nothing is written before every solve is done).
    batches: list[list[int]] = [[]]
    used = 0
    for i, t in enumerate(kept_targets):
        size = (int(t.keep.sum()) + 1) * (len(t.keep) + 1) * 8
        if batches[-1] and used + size > GRAM_BUDGET_BYTES:
            batches.append([])
            used = 0
        batches[-1].append(i)
        used += size
    solutions: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
    for batch in batches:
        requests = [
            GramRequest(i, t.node.inputs[0], t.geometry, _columns(t))  # type: ignore[arg-type]
            for i, t in ((i, kept_targets[i]) for i in batch)
        ]
        grams = input_grams(model, requests, ctx, max_rows=max_rows)
        for i in batch:
            solutions[i] = _solve(kept_targets[i], grams.pop(i), ridge)
    for i, t in enumerate(kept_targets):
        _write_solution(model, groups, t, *solutions[i])
        report.reconstructed.append(t.node.name or t.node.op_type)


def _gemm_bias_ok(node: ir.Node, weight: np.ndarray, axis: int) -> bool:
    features = weight.shape[1 - axis]
    beta = node.attributes.get("beta")
    if beta is not None and float(beta.value) == 0.0:
        return False
    if len(node.inputs) < 3 or node.inputs[2] is None:
        return True
    c = node.inputs[2]
    return (
        c.is_initializer()
        and not c.is_graph_input()
        and c.const_value is not None
        and c.const_value.numpy().size == features
    )


def _affine(t: _Target) -> tuple[np.ndarray, np.ndarray, float, float, ir.Value | None]:
    """The consumer as ``Y = A @ W + b``: (W [D, F] float64, b [F], alpha, beta, bias value)."""
    node = t.node
    weight = t.slice.value.const_value.numpy()  # type: ignore[union-attr]
    alpha = beta = 1.0
    if node.op_type in _CONVS:
        theta_w = weight.reshape(weight.shape[0], -1).T.astype(np.float64)
        bias_v = node.inputs[2] if len(node.inputs) > 2 else None
    else:
        theta_w = (weight.T if t.slice.axis == 1 else weight).astype(np.float64)
        if node.op_type in _GEMMS:
            a_attr, b_attr = node.attributes.get("alpha"), node.attributes.get("beta")
            alpha = float(a_attr.value) if a_attr is not None else 1.0
            beta = float(b_attr.value) if b_attr is not None else 1.0
            theta_w = theta_w * alpha
        bias_v = node.inputs[2] if node.op_type in _GEMMS and len(node.inputs) > 2 else None
    bias = np.zeros(theta_w.shape[1])
    if bias_v is not None and bias_v.const_value is not None:
        bias = bias_v.const_value.numpy().astype(np.float64).reshape(-1) * beta
    return theta_w, bias, alpha, beta, bias_v


def _columns(t: _Target) -> np.ndarray:
    """The columns of ``[A, 1]`` the refit keeps: kept inputs, and the bias if fitted."""
    return np.concatenate([t.keep, [t.intercept]])


def _solve(t: _Target, gram: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray | None]:
    """Ridge least squares for one consumer: the new ``W`` [D, F] (zero rows where inputs
    were removed) and the new bias [F] (None without an intercept).

    Args:
        t: The consumer.
        gram: The kept rows (:func:`_columns`) of ``[A, 1]^T [A, 1]``.
        ridge: Relative ridge strength.
    """
    theta_w, bias, _, _, _ = _affine(t)
    theta = np.vstack([theta_w, bias[None, :]])  # [D + 1, F]
    cols = _columns(t)
    if not t.intercept:
        theta[-1] = 0.0  # the bias stays as it is: fit the output without it
    target = gram @ theta
    a = gram[:, cols]
    n_w = int(t.keep.sum())
    lam = ridge * float(np.mean(np.diag(a)[:n_w])) if n_w else ridge
    a = a + lam * np.diag(np.concatenate([np.ones(n_w), np.zeros(len(a) - n_w)]))
    try:
        solved = np.linalg.solve(a, target)
    except np.linalg.LinAlgError:
        solved = np.linalg.lstsq(a, target, rcond=None)[0]
    new_w = np.zeros_like(theta_w)
    new_w[t.keep] = solved[:n_w]
    return new_w, (solved[n_w] if t.intercept else None)


def _write_solution(
    model: ir.Model, groups: ConvGroups, t: _Target, new_w: np.ndarray, new_b: np.ndarray | None
) -> None:
    """Writes a solved weight and bias into the consumer (adds a bias if it had none)."""
    node = t.node
    weight = t.slice.value.const_value.numpy()  # type: ignore[union-attr]
    dtype = weight.dtype
    _, _, alpha, beta, bias_v = _affine(t)
    writer = Writer(model)
    if node.op_type in _CONVS:
        writer.write(node, 1, new_w.T.reshape(weight.shape).astype(dtype))
    else:
        new_w = new_w / alpha
        writer.write(node, 1, (new_w.T if t.slice.axis == 1 else new_w).astype(dtype))
    if new_b is None:
        return
    if node.op_type in _GEMMS and beta != 0:
        new_b = new_b / beta
    if bias_v is not None and bias_v.const_value is not None:
        shape = bias_v.const_value.shape.numpy()
        writer.write(node, 2, np.asarray(new_b, dtype=dtype).reshape(shape))
        return
    # No bias yet: add one (and make it follow the conv's own output-channel pruning).
    value = writer.new_initializer(f"{node.name or node.op_type}_bias", np.asarray(new_b, dtype=dtype))
    if len(node.inputs) < 3:
        node.resize_inputs(3)
    node.replace_input_with(2, value)
    for sl in list(groups.slices):
        if sl.node is node and sl.input_index == 1 and sl.role == "producer":
            groups.slices.append(TensorSlice(node, 2, 0, sl.owners, "producer"))
