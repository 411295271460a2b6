"""Conv channel pruning: importance, selection, physical removal, reconstruction.

Called by the ``prune`` pass (``prune(channels=0.3,importance=...,reconstruct=...)``) through
:func:`prune_channels`; usable on its own.

Matches: the channel groups of :class:`~graphopt.analysis.structure.conv_groups.
ConvChannelGroupsAnalysis` (a Conv's output channels and everything coupled to them).

Changes: in every group that is not skipped, the least important ``ratio`` of its
removable components (sets of coupled channels) is removed: weight rows and biases of the
producing convs, BatchNormalization parameters, per-channel constants, input-channel slices
of consuming convs, the ``H*W``-row blocks of Gemm/MatMul weights after a Flatten, the
``group`` attribute of depthwise/grouped convs and flattening Reshape constants. Never
every component of a group.

Importance of a component:

* ``magnitude``: for every coupled weight tensor, the L2 (or L1, ``norm=1``) norm of the
  component's slice, divided by that tensor's mean slice norm, summed over tensors (conv
  and Gemm weights on both sides; for a BatchNormalization its ``|gamma|/sqrt(var+eps)``).
* ``activation``: ``sum_p ||W[:, p]|| * ||X_p||`` over the component's input positions *p*
  of every consumer, ``||X_p||`` the root mean square of the consumer's input at *p* on
  the calibration feeds (Wanda-style ``|W|·||X||``).
* ``hessian``: ``sum_p ||W[:, p]||^2 * ||X_p||^2``: the diagonal (OBD) approximation of the
  consumer's output error when position *p* is removed, ``X^T X`` being its input Hessian.

Reconstruction (``reconstruct=True``, needs calibration): for each consumer that lost
input positions (Conv with ``group=1``, Gemm, 2-D MatMul), the kept part of its weight and
its bias are refit in closed form by ridge least squares, ``min ||[A_K, 1] T - A W||^2 +
lambda ||T||^2``, where ``A`` are its input rows on the *unpruned* model's calibration
activations (im2col patches for a Conv) and ``A W`` its unpruned output, so the consumer's
output matches the unpruned one as closely as the kept channels allow. A missing bias is
added. ``lambda`` is ``ridge`` times the mean diagonal of ``A_K^T A_K``.

Preserves: graph inputs and outputs; numerics exactly when the removed channels are
exactly zero (synthetic models); otherwise lossy, verified by a task metric.

Example (digits CNN, ``prune(channels=0.3)``)::

    before: Conv(W[16,1,3,3]) BN(16) Relu Conv(W[32,16,3,3]) ... Gemm(W[64,512])
    after:  Conv(W[11,1,3,3]) BN(11) Relu Conv(W[22,11,3,3]) ... Gemm(W[64,352])
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from graphopt.analysis.structure.conv_groups import (
    ConvChannelGroupsAnalysis,
    ConvGroups,
    static_shapes,
)
from graphopt.errors import UsageError
from graphopt.infra.analysis import AnalysisManager
from graphopt.infra.context import PassContext
from graphopt.passes.pruning.channel_calib import MAX_ROWS, channel_energy
from graphopt.passes.pruning.channel_reconstruct import reconstruct_consumers
from graphopt.passes.pruning.channel_remove import remove_units

logger = logging.getLogger(__name__)

IMPORTANCES = ("magnitude", "activation", "hessian")


# ----------------------------------------------------------------------------- report


@dataclass
class GroupDecision:
    """What happened to one channel group.

    Attributes:
        group: Group id.
        sources: Convs producing the group's channels.
        components: Removable-or-not sets of coupled channels in the group.
        removed: Components removed.
        removed_channels: Per producing conv, the output channels removed (first 64).
        importance: The importance actually used (``magnitude`` when a group had no
            consumer for activation statistics).
        skip_reason: Why nothing was removed, or None.
    """

    group: int
    sources: list[str]
    components: int
    removed: int = 0
    removed_channels: dict[str, list[int]] = field(default_factory=dict)
    importance: str = ""
    skip_reason: str | None = None


@dataclass
class ChannelPruneReport:
    """What :func:`prune_channels` did.

    Attributes:
        ratio: Requested fraction of components per group (or overall for ``global``).
        importance: The importance criterion.
        scope: ``layer`` or ``global``.
        groups: One decision per group.
        params_before: Initializer elements before.
        params_after: Initializer elements after.
        macs_before: Multiply-accumulates per sample of Conv/Gemm/MatMul nodes, by node.
        macs_after: The same after pruning.
        reconstructed: Consumers refit by least squares.
        reconstruct_skipped: Consumers not refit, with the reason.
    """

    ratio: float
    importance: str
    scope: str
    groups: list[GroupDecision] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    macs_before: dict[str, int] = field(default_factory=dict)
    macs_after: dict[str, int] = field(default_factory=dict)
    reconstructed: list[str] = field(default_factory=list)
    reconstruct_skipped: dict[str, str] = field(default_factory=dict)

    @property
    def modified(self) -> bool:
        """Whether any channel was removed."""
        return any(g.removed for g in self.groups)

    def __iter__(self) -> Iterator[Any]:
        """Unpacks as ``(modified, stats())``: ``modified, stats = prune_channels(...)``."""
        return iter((self.modified, self.stats()))

    def stats(self) -> dict[str, Any]:
        """Flat statistics for pass reports."""
        macs_b, macs_a = sum(self.macs_before.values()), sum(self.macs_after.values())
        pruned = [g for g in self.groups if g.removed]
        return {
            "channel_groups": len(self.groups),
            "channel_groups_pruned": len(pruned),
            "channel_components_removed": sum(g.removed for g in self.groups),
            "channel_params_before": self.params_before,
            "channel_params_after": self.params_after,
            "channel_macs_before": macs_b,
            "channel_macs_after": macs_a,
            "channel_macs_ratio": round(macs_a / macs_b, 4) if macs_b else None,
            "channel_groups_skipped": {
                ", ".join(g.sources[:2]): g.skip_reason for g in self.groups if g.skip_reason
            },
            "channels_removed": {
                src: len(ch) for g in pruned for src, ch in g.removed_channels.items()
            },
            "reconstructed": list(self.reconstructed),
            "reconstruct_skipped": dict(self.reconstruct_skipped),
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready."""
        return asdict(self)


# ----------------------------------------------------------------------------- entry


def prune_channels(
    model: ir.Model,
    ratio: float,
    *,
    importance: str,
    ctx: PassContext,
    am: AnalysisManager,
    reconstruct: bool,
    scope: str = "layer",
    norm: int = 2,
    exclude: Sequence[str] = (),
    ridge: float = 1e-3,
    max_rows: int = MAX_ROWS,
    align: int = 1,
) -> ChannelPruneReport:
    """Removes the least important conv channels of ``model`` in place.

    Args:
        model: The model (changed in place; graph I/O unchanged).
        ratio: Fraction of each group's components to remove, in [0, 1).
        importance: ``magnitude``, ``activation`` or ``hessian`` (see the module doc).
        ctx: Gives calibration feeds (activation/hessian importance, reconstruction).
        am: Analysis manager (channel groups).
        reconstruct: Refit consumers by ridge least squares on calibration activations.
        scope: ``layer`` (ratio per group) or ``global`` (ranks all groups' components
            by importance normalized per group).
        norm: 1 or 2: the norm of magnitude importance.
        exclude: Names of convs whose groups are left alone.
        ridge: Relative ridge regularization of reconstruction.
        max_rows: Input rows per calibration feed sampled for reconstruction.
        align: With ``scope=layer``, keep a multiple of this many components per group
            (rounding the kept count up): channel counts that suit blocked kernel
            layouts (ONNX Runtime's NCHWc uses blocks of 8 or 16).

    Returns:
        The report: per-group decisions, parameters and MACs before/after.

    Raises:
        UsageError: A bad option, or calibration needed but not given.
    """
    if not 0.0 <= ratio < 1.0:
        raise UsageError(f"prune: channels={ratio} must be in [0, 1)")
    if importance not in IMPORTANCES:
        raise UsageError(f"prune: importance={importance!r} is not one of {'|'.join(IMPORTANCES)}")
    if scope not in ("layer", "global"):
        raise UsageError(f"prune: scope={scope!r} is not one of layer|global")
    if align < 1:
        raise UsageError(f"prune: align={align} must be at least 1")
    if norm not in (1, 2):
        raise UsageError(f"prune: norm={norm} must be 1 or 2")
    needs_calib = importance != "magnitude" or reconstruct
    if needs_calib and ctx.calibration is None:
        what = "reconstruct=true" if reconstruct else f"importance={importance}"
        raise UsageError(f"prune(channels=...,{what}) needs calibration data: pass --calib PATH")

    report = ChannelPruneReport(ratio=ratio, importance=importance, scope=scope)
    report.params_before = _params(model)
    groups = am.get(ConvChannelGroupsAnalysis(), model)
    report.macs_before = layer_macs(model, groups.shapes)
    if ratio == 0.0:
        report.params_after, report.macs_after = report.params_before, dict(report.macs_before)
        return report
    excluded = set(exclude)
    scores, used = _importance(model, groups, importance, ctx, norm)
    removed = _select(groups, scores, ratio, scope, excluded, report, used, align)
    if removed.size:
        if reconstruct:
            reconstruct_consumers(model, groups, removed, ctx, ridge, max_rows, report)
        remove_units(model, groups, removed)
    report.params_after = _params(model)
    report.macs_after = layer_macs(model)
    logger.info(
        "prune channels: %d components removed in %d/%d groups; params %d -> %d",
        sum(g.removed for g in report.groups),
        sum(1 for g in report.groups if g.removed),
        len(report.groups),
        report.params_before,
        report.params_after,
    )
    return report


# ----------------------------------------------------------------------------- importance


def _params(model: ir.Model) -> int:
    from graphopt.report import count_parameters

    return count_parameters(model)


def layer_macs(
    model: ir.Model, shapes: dict[str, tuple[int | None, ...]] | None = None
) -> dict[str, int]:
    """Multiply-accumulates per sample (batch dims as 1) of every Conv, Gemm and MatMul
    with a known output shape, keyed by node name (or ``op#index``).

    Args:
        model: The model.
        shapes: Static shapes of its values, when already known.
    """
    shapes = shapes if shapes is not None else static_shapes(model)
    out: dict[str, int] = {}
    for index, node in enumerate(model.graph):
        fused = node.domain == "com.microsoft" and node.op_type in ("FusedConv", "FusedGemm")
        if not fused and (node.op_type not in ("Conv", "Gemm", "MatMul") or node.domain not in ("", "ai.onnx")):
            continue
        y = shapes.get(node.outputs[0].name or "")
        w = node.inputs[1]
        w_shape = shapes.get(w.name or "") if w is not None else None
        if w_shape is None and w is not None and w.shape is not None:
            w_shape = tuple(d if isinstance(d, int) else None for d in w.shape)
        if y is None or w_shape is None or any(d is None for d in (*y[1:], *w_shape)):
            continue
        dims = [int(d) for d in y[1:] if d is not None]
        if node.op_type in ("Conv", "FusedConv"):
            per_output = math.prod(int(d) for d in w_shape[1:] if d is not None)
        elif node.op_type in ("Gemm", "FusedGemm"):
            trans_b = node.attributes.get("transB")
            per_output = int((w_shape[1] if trans_b is not None and trans_b.value else w_shape[0]) or 0)
        else:
            per_output = int(w_shape[-2] or 0)
        out[node.name or f"{node.op_type}#{index}"] = math.prod(dims) * per_output
    return out


def _slice_norms(arr: np.ndarray, axis: int, owners: np.ndarray, n_units: int, p: int) -> np.ndarray:
    """Per unit: the p-norm of the unit's slice of ``arr`` along ``axis`` (zero elsewhere)."""
    moved = np.moveaxis(arr, axis, 0).reshape(arr.shape[axis], -1)
    if p == 1:
        per_index = np.abs(moved).sum(axis=1, dtype=np.float64)
    else:
        per_index = np.einsum("ij,ij->i", moved, moved, dtype=np.float64)
    acc = np.zeros(n_units)
    np.add.at(acc, owners, per_index)
    return acc if p == 1 else np.sqrt(acc)


def _bn_scale(node: ir.Node) -> np.ndarray | None:
    gamma = node.inputs[1].const_value.numpy() if node.inputs[1] is not None and node.inputs[1].const_value is not None else None
    if gamma is None:
        return None
    if node.op_type != "BatchNormalization":
        return np.abs(gamma.astype(np.float64))
    var_v = node.inputs[4]
    if var_v is None or var_v.const_value is None:
        return None
    eps_attr = node.attributes.get("epsilon")
    eps = float(eps_attr.value) if eps_attr is not None else 1e-5
    return np.abs(gamma.astype(np.float64)) / np.sqrt(var_v.const_value.numpy().astype(np.float64) + eps)


def _magnitude(groups: ConvGroups, p: int) -> np.ndarray:
    n_units = len(groups.unit_source)
    score = np.zeros(n_units)
    for sl in groups.slices:
        if sl.role in ("producer", "consumer") and sl.input_index == 1:
            arr = sl.value.const_value.numpy()  # type: ignore[union-attr]
            per_unit = _slice_norms(arr, sl.axis, sl.owners, n_units, p)
        elif sl.role == "norm" and sl.input_index == 1:
            scale = _bn_scale(sl.node)
            if scale is None:
                continue
            per_unit = np.zeros(n_units)
            np.add.at(per_unit, sl.owners, scale)
        else:
            continue
        present = np.unique(sl.owners)
        mean = per_unit[present].mean()
        if mean > 0:
            score += per_unit / mean
    return score


def _activation(
    model: ir.Model, groups: ConvGroups, ctx: PassContext, squared: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Per unit: activation-aware score; and per unit whether any consumer saw it."""
    consumers = [s for s in groups.slices if s.role == "consumer"]
    values = list({id(s.activation): s.activation for s in consumers if s.activation is not None}.values())
    energy = channel_energy(model, values, ctx) if values else {}
    n_units = len(groups.unit_source)
    score = np.zeros(n_units)
    seen = np.zeros(n_units, dtype=bool)
    for sl in consumers:
        act = sl.activation
        assert act is not None
        e = energy.get(act.name or "")
        if e is None or len(e) != len(sl.owners):
            continue
        arr = sl.value.const_value.numpy()  # type: ignore[union-attr]
        moved = np.moveaxis(arr, sl.axis, 0).reshape(arr.shape[sl.axis], -1)
        w2 = np.einsum("ij,ij->i", moved, moved, dtype=np.float64)
        per_index = w2 * e if squared else np.sqrt(w2 * e)
        np.add.at(score, sl.owners, per_index)
        seen[sl.owners] = True
    return score, seen


def _importance(
    model: ir.Model, groups: ConvGroups, importance: str, ctx: PassContext, p: int
) -> tuple[np.ndarray, dict[int, str]]:
    """Per-component scores (indexed like the groups' components, flattened by unit) and
    the importance each group ends up using."""
    magnitude = _magnitude(groups, p)
    used: dict[int, str] = {}
    if importance == "magnitude":
        return magnitude, {g.id: "magnitude" for g in groups.groups}
    act, seen = _activation(model, groups, ctx, squared=importance == "hessian")
    score = np.array(magnitude)
    for g in groups.groups:
        units = np.array([u for comp in g.components for u in comp], dtype=np.int64)
        if units.size and seen[units].all():
            score[units] = act[units]
            used[g.id] = importance
        else:
            used[g.id] = "magnitude"
    return score, used


# ----------------------------------------------------------------------------- selection


def _select(
    groups: ConvGroups,
    unit_scores: np.ndarray,
    ratio: float,
    scope: str,
    excluded: set[str],
    report: ChannelPruneReport,
    used: dict[int, str],
    align: int = 1,
) -> np.ndarray:
    """Chooses the components to remove; fills ``report.groups``; returns removed units."""
    candidates: list[tuple[float, int, int]] = []  # (score, group, component)
    caps: dict[int, int] = {}
    decisions: dict[int, GroupDecision] = {}
    for g in groups.groups:
        decision = GroupDecision(g.id, list(g.sources), len(g.components), importance=used.get(g.id, ""))
        decisions[g.id] = decision
        report.groups.append(decision)
        hit = sorted(excluded.intersection(g.sources))
        if hit:
            decision.skip_reason = f"excluded ({', '.join(hit)})"
            continue
        if g.skip_reason:
            decision.skip_reason = g.skip_reason
            continue
        comp_scores = np.array([unit_scores[list(c)].sum() for c in g.components])
        free = g.free
        cap = min(len(free), len(g.components) - 1)
        if scope == "layer":
            wanted = min(int(ratio * len(g.components) + 0.5), cap)
            if align > 1:  # keep a multiple of align components (round the kept count up)
                kept = -(-(len(g.components) - wanted) // align) * align
                wanted = max(0, min(len(g.components) - kept, cap))
            if wanted <= 0:
                decision.skip_reason = f"{len(g.components)} components: {ratio} of them rounds to 0"
                continue
            order = sorted(free, key=lambda i: (comp_scores[i], i))
            for i in order[:wanted]:
                candidates.append((0.0, g.id, i))
        else:
            mean = comp_scores.mean() if comp_scores.size else 0.0
            norm = comp_scores / mean if mean > 0 else comp_scores
            caps[g.id] = cap
            candidates.extend((float(norm[i]), g.id, i) for i in free)
    if scope == "global":
        total = sum(len(g.components) for g in groups.groups if g.id in caps)
        budget = int(ratio * total + 0.5)
        taken: dict[int, int] = defaultdict(int)
        chosen: list[tuple[float, int, int]] = []
        for item in sorted(candidates):
            if len(chosen) >= budget:
                break
            if taken[item[1]] < caps[item[1]]:
                taken[item[1]] += 1
                chosen.append(item)
        candidates = chosen
    by_id = {g.id: g for g in groups.groups}
    removed_units: list[int] = []
    for _, gid, ci in candidates:
        comp = by_id[gid].components[ci]
        decisions[gid].removed += 1
        removed_units.extend(comp)
        for u in comp:
            decisions[gid].removed_channels.setdefault(groups.unit_source[u], []).append(
                groups.unit_channel[u]
            )
    for d in decisions.values():
        for src in d.removed_channels:
            d.removed_channels[src] = sorted(d.removed_channels[src])[:64]
    return np.array(sorted(removed_units), dtype=np.int64)
