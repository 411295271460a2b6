"""``awq``: activation-aware scaling, then round-to-nearest weight-only quantization.

Matches: the weights :class:`~graphopt.passes.weight_only.base.WeightOnlyPass` selects,
grouped by the activation they multiply (q/k/v share one). A group is scaled only when every
use of its weights is a selected site reading that activation (a weight also read by a
``Gather``, e.g. a tied embedding and head, keeps plain rounding).

Changes: per group, scales ``s = mean|x|^α`` (:func:`~graphopt.quant.awq.search_awq_scales`,
``α`` searched on a grid against the input Hessian over ``--calib``); the weights become
``W diag(s)``, rounded to nearest and lowered as ``wq`` does; the activation is divided by
``s`` by folding ``1/s`` into the op that produces it (:func:`plan_scale_fold`):

* ``Mul(x, gamma)`` with a per-channel constant (RMSNorm/LayerNorm weight): ``gamma / s``;
  ``Add(Mul(x, gamma), beta)``: both; ``LayerNormalization`` (and ORT's
  ``SimplifiedLayerNormalization``/``SkipLayerNormalization`` family): scale and bias;
* ``MatMul(x, W)`` (optionally ``+ bias``) or ``Mul(u, MatMul(x, W))`` (a gated MLP's
  ``up`` projection): ``W``'s output columns (and the bias) ``/ s``;
* otherwise (``insert_mul=true``) a ``Mul(x, 1/s)`` inserted before the group's nodes only;
  with ``insert_mul=false`` the group is skipped with its reason.

Constants shared with other nodes are copied before being changed. Preserves: graph inputs
and outputs; numerics within the ``weight-only`` tolerance (the folding itself is exact up to
float rounding).

Example (``--passes "awq(bits=4,group=128)" --calib windows/``)::

    before: n = Mul(gamma, r); q = MatMul(n, Wq); k = MatMul(n, Wk)
    after:  n = Mul(gamma / s, r); q = MatMulNBits(n, Q(Wq ⊙ s)); k = MatMulNBits(n, Q(Wk ⊙ s))
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from graphopt.errors import UsageError
from graphopt.infra.analysis import AnalysisManager
from graphopt.infra.context import PassContext
from graphopt.infra.options import Options
from graphopt.infra.pass_base import PassInfo
from graphopt.infra.progress import LazyProgress
from graphopt.passes.weight_only.base import (
    WeightOnlyOptions,
    WeightOnlyPass,
    WeightSite,
    group_sites,
)
from graphopt.passes.weight_only.gptq_pass import hessian_chunks
from graphopt.quant.awq import awq_grid, search_awq_scales
from graphopt.quant.groupwise import GroupQuantized, quantize_rtn

logger = logging.getLogger(__name__)

_NORM_OPS = {
    ("", "LayerNormalization"): (1, 2),
    ("ai.onnx", "LayerNormalization"): (1, 2),
    ("com.microsoft", "SimplifiedLayerNormalization"): (1, None),
    ("", "RMSNormalization"): (1, None),
    ("com.microsoft", "SkipLayerNormalization"): (2, 3),
    ("com.microsoft", "SkipSimplifiedLayerNormalization"): (2, None),
}


# ----------------------------------------------------------------------------- folding


class ScaleEditor:
    """Edits float constants of a graph, copying any that other nodes also read.

    Args:
        graph: The main graph.
    """

    def __init__(self, graph: ir.Graph) -> None:
        from graphopt.passes.weight_only.lower import Names

        self.graph = graph
        self.names = Names(graph)
        self.first = next(iter(graph), None)
        self.inserted = 0

    def constant(self, value: ir.Value | None) -> np.ndarray | None:
        """The float array of an initializer constant (not a graph input), else None."""
        if value is None or value.const_value is None or not value.is_initializer():
            return None
        if value.is_graph_input():
            return None
        arr = value.const_value.numpy()
        return arr if arr.dtype.kind == "f" else None

    def private(self, node: ir.Node, index: int) -> ir.Value:
        """``node``'s input ``index``, copied into a new initializer if others read it too."""
        value = node.inputs[index]
        assert value is not None and value.const_value is not None
        if len(value.uses()) == 1 and not value.is_graph_output():
            return value
        arr = np.array(value.const_value.numpy(), copy=True)
        new = self._initializer(f"{value.name or 'const'}_scaled", arr)
        node.replace_input_with(index, new)
        return new

    def set(self, value: ir.Value, array: np.ndarray) -> None:
        """Replaces the constant's data (same dtype and shape)."""
        assert value.const_value is not None
        old = value.const_value.numpy()
        value.const_value = ir.Tensor(np.ascontiguousarray(array.astype(old.dtype)), name=value.name)

    def _initializer(self, base: str, array: np.ndarray) -> ir.Value:
        tensor = ir.Tensor(np.ascontiguousarray(array), name=self.names(base))
        value = ir.Value(
            name=tensor.name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor
        )
        self.graph.register_initializer(value)
        return value

    def insert_mul(self, activation: ir.Value, consumers: Sequence[ir.Node], inv: np.ndarray) -> None:
        """``Mul(activation, inv)`` read by ``consumers`` instead of ``activation``."""
        dtype = activation.dtype.numpy() if activation.dtype is not None else np.float32
        const = self._initializer(f"{activation.name or 'x'}_awq_inv_scale", inv.astype(dtype))
        out = ir.Value(
            name=self.names(f"{activation.name or 'x'}_scaled"), shape=activation.shape, type=activation.type
        )
        node = ir.Node("", "Mul", [activation, const], outputs=[out], name=self.names("awq_scale_mul"))
        producer = activation.producer()
        if producer is not None and producer.graph is self.graph:
            self.graph.insert_after(producer, node)
        elif self.first is not None:
            self.graph.insert_before(self.first, node)
        else:
            self.graph.append(node)
        for consumer in consumers:
            for i, inp in enumerate(consumer.inputs):
                if inp is activation:
                    consumer.replace_input_with(i, out)
        self.inserted += 1


@dataclass(frozen=True)
class FoldPlan:
    """How to divide an activation by per-channel scales.

    Attributes:
        kind: ``norm``, ``mul-const``, ``matmul`` or ``insert-mul``.
        where: The node changed (or before which a Mul is inserted), for reports.
        apply: Applies ``activation / s`` given ``s`` (float32 ``[K]``).
    """

    kind: str
    where: str
    apply: Callable[[np.ndarray], None]


def _channel_vector(arr: np.ndarray | None, k: int) -> bool:
    """A constant broadcasting along the last axis only: shape ``[K]`` or ``[1, ..., 1, K]``."""
    if arr is None or arr.ndim == 0 or arr.shape[-1] != k:
        return False
    return all(d == 1 for d in arr.shape[:-1])


def _scale_input(editor: ScaleEditor, node: ir.Node, index: int, s: np.ndarray) -> None:
    value = editor.private(node, index)
    arr = value.const_value.numpy()  # type: ignore[union-attr]
    editor.set(value, arr / s.reshape((1,) * (arr.ndim - 1) + (-1,)).astype(arr.dtype))


def _scale_inputs(editor: ScaleEditor, targets: Sequence[tuple[ir.Node, int]], s: np.ndarray) -> None:
    for node, index in targets:
        _scale_input(editor, node, index, s)


def _scale_matmul_columns(editor: ScaleEditor, node: ir.Node, s: np.ndarray) -> None:
    """``MatMul(x, W[K', K])`` output columns ``/ s``."""
    value = editor.private(node, 1)
    arr = value.const_value.numpy()  # type: ignore[union-attr]
    editor.set(value, arr / s[None, :].astype(arr.dtype))


def _matmul_fold(editor: ScaleEditor, value: ir.Value, k: int) -> Callable[[np.ndarray], None] | None:
    """``value = MatMul(x, W)`` or ``Add(MatMul(x, W), bias)`` with single uses: its columns."""
    producer = value.producer()
    if producer is None or len(value.uses()) != 1 or value.is_graph_output():
        return None
    bias_node: ir.Node | None = None
    bias_index = 0
    if producer.op_type == "Add" and producer.domain in ("", "ai.onnx"):
        for i, j in ((0, 1), (1, 0)):
            if _channel_vector(editor.constant(producer.inputs[j]), k):
                inner = producer.inputs[i]
                if inner is not None and inner.producer() is not None and len(inner.uses()) == 1:
                    bias_node, bias_index, producer = producer, j, inner.producer()
                    break
        else:
            return None
    assert producer is not None
    if producer.op_type != "MatMul" or producer.domain not in ("", "ai.onnx"):
        return None
    w = editor.constant(producer.inputs[1])
    if w is None or w.ndim != 2 or w.shape[1] != k:
        return None
    matmul = producer

    def apply(s: np.ndarray) -> None:
        _scale_matmul_columns(editor, matmul, s)
        if bias_node is not None:
            _scale_input(editor, bias_node, bias_index, s)

    return apply


def plan_scale_fold(
    editor: ScaleEditor, activation: ir.Value, consumers: Sequence[ir.Node], k: int, insert_mul: bool
) -> FoldPlan | str:
    """How to divide ``activation`` (read by ``consumers``) by per-channel scales.

    Returns:
        A :class:`FoldPlan`, or the reason no fold is possible.
    """
    others = [u.node for u in activation.uses() if u.node not in consumers]
    producer = activation.producer()
    label = activation.name or "?"

    def inserted() -> FoldPlan | str:
        if not insert_mul:
            why = (
                f"{label} also feeds {others[0].op_type} {others[0].name!r}" if others
                else f"{label}: no foldable producer"
            )
            return f"{why} (insert_mul=false)"
        return FoldPlan("insert-mul", label, lambda s: editor.insert_mul(activation, consumers, 1.0 / s))

    if others or producer is None or activation.is_graph_output() or producer.graph is not editor.graph:
        return inserted()
    op = (producer.domain, producer.op_type)
    if op in _NORM_OPS and int(_attr(producer, "axis", -1)) in (-1, len(activation.shape or ()) - 1):
        gamma_i, beta_i = _NORM_OPS[op]
        beta = (
            producer.inputs[beta_i] if beta_i is not None and beta_i < len(producer.inputs) else None
        )
        gamma_ok = _channel_vector(editor.constant(producer.inputs[gamma_i]), k)
        beta_ok = beta is None or _channel_vector(editor.constant(beta), k)
        if activation is producer.outputs[0] and gamma_ok and beta_ok:
            norm = producer

            def apply_norm(s: np.ndarray) -> None:
                _scale_input(editor, norm, gamma_i, s)
                if beta is not None and beta_i is not None:
                    _scale_input(editor, norm, beta_i, s)

            return FoldPlan("norm", producer.name or producer.op_type, apply_norm)
    if producer.op_type == "Mul" and producer.domain in ("", "ai.onnx"):
        const_at = [j for j in (0, 1) if _channel_vector(editor.constant(producer.inputs[j]), k)]
        if const_at:
            mul, index = producer, const_at[0]

            def apply_mul(s: np.ndarray) -> None:
                _scale_input(editor, mul, index, s)

            return FoldPlan("mul-const", producer.name or "Mul", apply_mul)
        for j in (0, 1):
            operand = producer.inputs[j]
            fold = _matmul_fold(editor, operand, k) if operand is not None else None
            if fold is not None:
                return FoldPlan("matmul", producer.name or "Mul", fold)
    if producer.op_type == "Add" and producer.domain in ("", "ai.onnx"):
        # Add(Mul(x, gamma), beta): a decomposed LayerNorm's affine part.
        for i, j in ((0, 1), (1, 0)):
            inner = producer.inputs[i]
            if not _channel_vector(editor.constant(producer.inputs[j]), k) or inner is None:
                continue
            scale_mul = inner.producer()
            if (
                scale_mul is None
                or scale_mul.op_type != "Mul"
                or len(inner.uses()) != 1
                or inner.is_graph_output()
            ):
                continue
            gammas = [g for g in (0, 1) if _channel_vector(editor.constant(scale_mul.inputs[g]), k)]
            if gammas:
                targets = ((scale_mul, gammas[0]), (producer, j))
                return FoldPlan("norm", producer.name or "Add", functools.partial(_scale_inputs, editor, targets))
    fold = _matmul_fold(editor, activation, k)
    if fold is not None:
        return FoldPlan("matmul", producer.name or "MatMul", fold)
    return inserted()


def _attr(node: ir.Node, name: str, default: Any) -> Any:
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def scale_weight(editor: ScaleEditor, site: WeightSite, s: np.ndarray) -> None:
    """Multiplies the weight's input-feature axis by ``s`` (``W[N, K] -> W diag(s)``)."""
    value = site.weight
    arr = value.const_value.numpy()  # type: ignore[union-attr]
    scaled = arr * (s[:, None] if site.layout == "kn" else s[None, :]).astype(arr.dtype)
    editor.set(value, scaled)


def scalable_groups(
    sites: Sequence[WeightSite],
) -> tuple[dict[str, list[WeightSite]], list[WeightSite], list[str]]:
    """Sites grouped by activation where every use of each weight is in that group.

    Returns:
        ``(activation name -> sites, sites left for plain rounding, reasons)``.
    """
    by_weight = group_sites(sites)
    groups: dict[str, list[WeightSite]] = {}
    rest: list[WeightSite] = []
    reasons: list[str] = []
    for name, uses in by_weight.items():
        acts = {s.activation.name if s.activation is not None else None for s in uses}
        total_uses = len(uses[0].weight.uses())
        direct = [s for s in uses if s.transpose is None]
        if None in acts or len(acts) != 1 or len(direct) != len(uses) or total_uses != len(uses):
            rest.extend(uses)
            reasons.append(f"{name}: shared by other uses or activations; rounded without scaling")
            continue
        act = next(iter(acts))
        assert act is not None
        groups.setdefault(act, []).extend(uses)
    return groups, rest, reasons


def _refresh_activations(sites: Sequence[WeightSite]) -> None:
    """Points each MatMul/Gemm site at its node's current first input (after inserted Muls).

    The base pass lowers from the same ``sites`` list it passed to ``quantize_sites``, so the
    list is updated in place.
    """
    if not isinstance(sites, list):
        raise TypeError("awq: sites must be a list to be updated after inserting scale Muls")
    for i, site in enumerate(sites):
        if site.kind in ("matmul", "gemm") and site.node.inputs[0] is not site.activation:
            sites[i] = dataclasses.replace(site, activation=site.node.inputs[0])


# ----------------------------------------------------------------------------- the pass


@dataclasses.dataclass(frozen=True)
class AWQOptions(WeightOnlyOptions):
    """Options of ``awq`` (besides :class:`WeightOnlyOptions`).

    Attributes:
        grid: ``α`` grid points in ``[0, 1)``.
        insert_mul: Insert ``Mul(x, 1/s)`` where no producer can absorb the scales (else
            skip those groups).
        samples: Use at most this many calibration feeds (none: all).
        hessian_mb: Memory for the Hessians of one calibration pass.
    """

    grid: int = 20
    insert_mul: bool = True
    samples: int | None = None
    hessian_mb: int = 2048

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.grid < 1:
            raise ValueError(f"grid must be positive, got {self.grid}")
        if self.samples is not None and self.samples < 1:
            raise ValueError(f"samples must be positive, got {self.samples}")
        if self.ternary:
            raise ValueError("awq does not support ternary codes")


class QuantizeWeightsAwqPass(WeightOnlyPass[AWQOptions]):
    """AWQ weight-only quantization (registry name ``awq``); see the module docstring."""

    info: ClassVar[PassInfo] = PassInfo(
        name="awq",
        summary="weight-only low-bit quantization with activation-aware scales (needs --calib)",
        tolerance="weight-only",
    )
    Options: ClassVar[type[Options]] = AWQOptions

    def check_requires(self, model: ir.Model, ctx: PassContext) -> None:
        if ctx.calibration is None:
            raise UsageError(
                "awq needs calibration data for its activation statistics: pass --calib PATH "
                "(or use wq for round-to-nearest without calibration)"
            )

    def quantize_sites(
        self,
        model: ir.Model,
        sites: Sequence[WeightSite],
        ctx: PassContext,
        am: AnalysisManager,
    ) -> dict[str, GroupQuantized]:
        """Searches scales, folds them into the graph and the weights, then rounds."""
        self.check_requires(model, ctx)
        o = self.options
        signed = self.signed_scale(ctx)
        started = time.perf_counter()
        groups, _rest, reasons = scalable_groups(sites)
        editor = ScaleEditor(model.graph)
        grid = awq_grid(o.grid)
        chosen: list[tuple[list[WeightSite], np.ndarray, FoldPlan]] = []
        kinds: dict[str, int] = {}
        gains: list[float] = []
        with LazyProgress("awq", len(groups), "layers") as progress:
            for hs, acts in hessian_chunks(model, groups, ctx, am, o.samples, o.hessian_mb):
                for act in acts:
                    group = groups[act]
                    weights = [s.matrix() for s in {s.name: s for s in group}.values()]
                    k = weights[0].shape[1]
                    h = hs.hessian(act)
                    if h.shape != (k, k):
                        reasons.append(f"{act}: activation has {h.shape[0]} features, weights K={k}")
                        progress.advance(act)
                        continue
                    result = search_awq_scales(
                        weights, h, hs.channel_mean_abs(act), o.bits, o.group, o.sym,
                        grid=grid, clip_search=o.clip, signed_scale=signed,
                    )
                    progress.advance(act)
                    if result.alpha == 0.0:
                        kinds["unscaled"] = kinds.get("unscaled", 0) + 1
                        continue
                    activation = group[0].activation
                    assert activation is not None
                    plan = plan_scale_fold(editor, activation, [s.node for s in group], k, o.insert_mul)
                    if isinstance(plan, str):
                        reasons.append(plan)
                        kinds["skipped"] = kinds.get("skipped", 0) + 1
                        continue
                    gains.append(result.error / result.error_unscaled if result.error_unscaled > 0 else 1.0)
                    chosen.append((group, result.scales, plan))
        # All scales were searched on the original weights; now change the graph.
        for group, s, plan in chosen:
            plan.apply(s)
            for site in {site.name: site for site in group}.values():
                scale_weight(editor, site, s)
            kinds[plan.kind] = kinds.get(plan.kind, 0) + 1
        if editor.inserted:
            _refresh_activations(sites)
        self._skipped.extend(reasons)
        out: dict[str, GroupQuantized] = {}
        for name, uses in group_sites(sites).items():
            out[name] = quantize_rtn(
                uses[0].matrix(), o.bits, o.group, o.sym, clip_search=o.clip, signed_scale=signed
            )
        self._awq_stats = {
            "awq_groups": kinds,
            "awq_seconds": round(time.perf_counter() - started, 2),
            "awq_muls_inserted": editor.inserted,
        }
        if gains:
            self._awq_stats["awq_error_vs_rtn_median"] = round(float(np.median(gains)), 4)
        logger.info("awq: scaled %d activation groups %s in %.1fs", len(chosen), kinds, time.perf_counter() - started)
        return out

    _awq_stats: dict[str, Any]

    def run(self, model: ir.Model, ctx: PassContext, am: AnalysisManager) -> Any:
        self._awq_stats = {}
        result = super().run(model, ctx, am)
        result.stats.update(self._awq_stats)
        return result
