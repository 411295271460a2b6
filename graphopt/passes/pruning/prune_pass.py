"""``prune``: structured pruning of attention heads, FFN neurons and conv channels.

Matches: the attention and FFN blocks found by
:class:`~graphopt.analysis.structure.transformer.TransformerStructureAnalysis` (unfused
exports: Q/K/V/O projections as ``MatMul(+Add)`` with constant weights; FFNs with
``up``/``gate``/``down``), and, with ``channels > 0``, the conv channel groups of
:mod:`graphopt.passes.pruning.channels`.

Changes: per block, ranks units by ``importance`` and physically removes the least
important ``heads`` / ``ffn`` fraction: query/key/value columns and biases, output
projection rows, head-count entries of ``Reshape``/``Expand`` shape constants (cloned per
block when shared), per-neuron constants. Grouped-query attention keeps its layout:
whole KV groups go with their query heads (``gqa=groups``), or the same number of query
heads from every group (``gqa=within``). No block is ever emptied. With
``reconstruct=true`` the projection after each pruned block (attention output, FFN
down) is refit by ridge least squares so the block's output on the calibration data
matches the unpruned model's (:mod:`~graphopt.passes.pruning.reconstruct`).

Preserves: graph inputs and outputs (names, dtypes, symbolic dims). Numerics are exact
when the removed units are all-zero; otherwise the pass reports the per-block relative
output error on the calibration data (with and without reconstruction when
calibrated).

Example (``--passes "prune(heads=0.25,ffn=0.25,importance=hessian,reconstruct=true)"
--calib feeds/``)::

    before: q = x @ Wq[384,384]; ...; y = ctx @ Wo[384,384]  (12 heads of 32)
    after:  q = x @ Wq[384,288]; ...; y = ctx @ Wo'[288,384] (9 heads of 32, Wo' refit)

Statistics: blocks found and skipped (with reasons), per block what was removed and the
score range that decided it, parameters and FLOPs per token before/after, and the
reconstruction errors.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from graphopt.analysis.structure.transformer import (
    AttentionBlock,
    FFNBlock,
    TransformerStructureAnalysis,
)
from graphopt.errors import UsageError
from graphopt.infra.analysis import AnalysisManager, PreservedAnalyses
from graphopt.infra.context import PassContext
from graphopt.infra.options import Options
from graphopt.infra.pass_base import Pass, PassInfo, PassResult
from graphopt.passes.cleanup import _util
from graphopt.passes.pruning import importance as imp
from graphopt.passes.pruning.ffn import prune_neurons
from graphopt.passes.pruning.heads import HeadPlan, plan_heads, prune_heads
from graphopt.passes.pruning.reconstruct import paired_grams, refit, refit_paired
from graphopt.passes.pruning.slicing import SkipBlock, set_constant, weight_array

logger = logging.getLogger(__name__)

Importance = Literal["magnitude", "activation", "hessian"]

#: metadata key recording the prune options already applied (idempotence).
APPLIED_KEY = "graphopt.prune.applied"
#: sequence length used for the attention-product FLOPs in the report.
REPORT_SEQ = 128


@dataclasses.dataclass(frozen=True)
class PruneOptions(Options):
    """Options of ``prune``.

    Attributes:
        heads: Fraction of attention (query) heads to remove.
        ffn: Fraction of FFN intermediate neurons to remove.
        channels: Fraction of conv output channels to remove.
        importance: ``magnitude`` (weights only), ``activation`` or ``hessian`` (both
            need ``--calib``).
        reconstruct: Refit the projection after each pruned block by ridge least squares
            on calibration activations (needs ``--calib``).
        scope: ``layer`` (the same fraction in every block) or ``global`` (units ranked
            across blocks by their score relative to their block's mean; every block keeps
            at least one unit).
        gqa: For grouped KV heads: ``groups`` removes whole KV groups with their query
            heads, ``within`` the same number of query heads from every group, ``auto``
            whichever lands closer to ``heads`` (``groups`` on a tie).
        layers: Only these block indices (attention and FFN blocks counted separately,
            in graph order); empty for all.
        damp: Ridge strength relative to the mean diagonal of the input Gram (used by
            reconstruction, where it pulls the refit toward the kept weights, and by
            ``hessian`` importance). Raise it when calibration has few rows per input
            channel (SmolLM2 with 2048 rows: 1.0; MiniLM with ~4000 rows: 0.001).
        refine: With ``reconstruct``, a second round that runs the pruned and the
            unpruned model side by side and refits each projection from the pruned
            model's own inputs (so later blocks compensate earlier blocks' errors).
        samples: Use at most this many calibration feeds.
    """

    heads: float = 0.0
    ffn: float = 0.0
    channels: float = 0.0
    importance: Importance = "magnitude"
    reconstruct: bool = False
    scope: Literal["layer", "global"] = "layer"
    gqa: Literal["auto", "groups", "within"] = "auto"
    layers: tuple[int, ...] = ()
    damp: float = 0.01
    refine: bool = False
    samples: int | None = None

    def __post_init__(self) -> None:
        for name in ("heads", "ffn", "channels"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name}={value} must be in [0, 1)")
        if self.damp < 0:
            raise ValueError(f"damp={self.damp} must be >= 0")
        if self.samples is not None and self.samples < 1:
            raise ValueError("samples must be at least 1")


class PrunePass(Pass[PruneOptions]):
    """Structured pruning (see the module docstring)."""

    info = PassInfo(
        name="prune",
        summary="structured pruning: attention heads, FFN neurons, conv channels",
        tolerance="pruned",
    )
    Options = PruneOptions

    def needs_calibration(self) -> bool:
        """Whether the options need ``--calib``."""
        o = self.options
        transformer = o.heads > 0 or o.ffn > 0
        return transformer and (o.reconstruct or o.importance != "magnitude")

    def check_requires(self, model: ir.Model, ctx: PassContext) -> None:
        if self.needs_calibration() and ctx.calibration is None:
            what = "reconstruct=true" if self.options.reconstruct else f"importance={self.options.importance}"
            raise UsageError(f"prune({what}) needs calibration data: pass --calib PATH")

    def run(self, model: ir.Model, ctx: PassContext, am: AnalysisManager) -> PassResult:
        o = self.options
        applied = self.to_text()
        if model.metadata_props.get(APPLIED_KEY) == applied:
            return PassResult(model, False, stats={"skipped": f"already applied: {applied}"})
        stats: dict[str, Any] = {}
        modified = False
        if o.heads > 0 or o.ffn > 0:
            modified |= self._prune_transformer(model, ctx, am, stats)
        if o.channels > 0:
            modified |= self._prune_channels(model, ctx, am, stats)
        if modified:
            model.metadata_props[APPLIED_KEY] = applied
        return PassResult(model, modified, preserved=PreservedAnalyses.none(), stats=stats)

    # ------------------------------------------------------------------ channels
    def _prune_channels(
        self, model: ir.Model, ctx: PassContext, am: AnalysisManager, stats: dict[str, Any]
    ) -> bool:
        try:
            from graphopt.passes.pruning.channels import prune_channels
        except ImportError:
            raise UsageError(
                "prune: channels>0 needs graphopt.passes.pruning.channels (conv channel "
                "pruning), which this build does not have"
            ) from None
        o = self.options
        result = prune_channels(
            model, ratio=o.channels, importance=o.importance, reconstruct=o.reconstruct,
            ctx=ctx, am=am, scope=o.scope,
        )
        modified, channel_stats = result
        stats["channels"] = channel_stats
        return bool(modified)

    # ------------------------------------------------------------------ transformer
    def _prune_transformer(
        self, model: ir.Model, ctx: PassContext, am: AnalysisManager, stats: dict[str, Any]
    ) -> bool:
        o = self.options
        structure = am.get(TransformerStructureAnalysis(), model)
        wanted = set(o.layers)
        attn = [b for b in structure.attention if not wanted or b.index in wanted] if o.heads > 0 else []
        ffns = [b for b in structure.ffn if not wanted or b.index in wanted] if o.ffn > 0 else []
        stats["structure"] = structure.summary()
        stats["importance"] = o.importance
        if not attn and not ffns:
            stats["pruned"] = "nothing: no prunable attention or FFN block found"
            logger.warning("prune: no prunable attention or FFN block found")
            return False

        hessians = None
        if self.needs_calibration():
            from graphopt.analysis.hessian import InputHessianAnalysis

            values = [b.o.input.name for b in attn] + [b.down.input.name for b in ffns]
            hessians = am.get(InputHessianAnalysis([v for v in values if v], max_samples=o.samples), model)
            stats["calibration_samples"] = hessians.samples

        before = {id(b): _attention_cost(b) for b in attn} | {id(b): _ffn_cost(b) for b in ffns}
        head_keep = self._select_heads(attn, hessians)
        neuron_keep = self._select_neurons(ffns, hessians)

        snapshot = ir.serde.serialize_model(model) if o.reconstruct and o.refine else None
        originals: dict[str, tuple[Any, np.ndarray, np.ndarray]] = {}
        namer = _util.NameGenerator(model)
        report: list[dict[str, Any]] = []
        skipped: list[str] = [f"{w}: {r}" for w, r in structure.skipped]
        modified = False
        for block in attn:
            plan = head_keep.get(id(block))
            if plan is None or plan.heads.size == block.num_heads:
                continue
            entry: dict[str, Any] = {"block": block.name, "kind": "heads"}
            old_o = weight_array(block.o.weight).copy()
            removed = sorted(set(range(block.num_heads)) - set(plan.heads.tolist()))
            try:
                heads_before, kv_before = block.num_heads, block.num_kv_heads
                prune_heads(model, block, plan, namer)
            except SkipBlock as e:
                skipped.append(str(e))
                continue
            modified = True
            entry.update(
                heads=f"{heads_before} -> {block.num_heads}",
                kv_heads=f"{kv_before} -> {block.num_kv_heads}",
                removed=removed,
            )
            cols = (plan.heads[:, None] * block.head_dim + np.arange(block.head_dim)).reshape(-1)
            if hessians is not None:
                entry.update(self._reconstruct(block.o, hessians, old_o, cols))
            originals[block.o.input.name or ""] = (block.o, old_o, cols)
            report.append(entry)
        for fb in ffns:
            keep = neuron_keep.get(id(fb))
            if keep is None or keep.size == fb.intermediate:
                continue
            old_down = weight_array(fb.down.weight).copy()
            width = fb.intermediate
            try:
                prune_neurons(model, fb, keep, namer)
            except SkipBlock as e:
                skipped.append(str(e))
                continue
            modified = True
            entry = {"block": fb.name, "kind": "ffn", "neurons": f"{width} -> {keep.size}"}
            if hessians is not None:
                entry.update(self._reconstruct(fb.down, hessians, old_down, keep))
            originals[fb.down.input.name or ""] = (fb.down, old_down, keep)
            report.append(entry)
        if snapshot is not None and originals and hessians is not None:
            self._refine(ir.serde.deserialize_model(snapshot), model, originals, hessians, ctx, report)
        del snapshot

        after = {id(b): _attention_cost(b) for b in attn} | {id(b): _ffn_cost(b) for b in ffns}
        changed: list[Any] = [b for b in (*attn, *ffns) if _changed(before, after, b)]
        for entry, changed_block in zip(report, changed, strict=False):
            entry["params"] = f"{before[id(changed_block)][0]} -> {after[id(changed_block)][0]}"
            entry["flops_per_token"] = f"{before[id(changed_block)][1]} -> {after[id(changed_block)][1]}"
        stats["blocks"] = report
        stats["skipped"] = skipped[:50]
        p0 = sum(v[0] for v in before.values())
        p1 = sum(v[0] for v in after.values())
        f0 = sum(v[1] for v in before.values())
        f1 = sum(v[1] for v in after.values())
        stats["params_in_pruned_blocks"] = f"{p0} -> {p1}"
        stats["flops_per_token_in_pruned_blocks"] = f"{f0} -> {f1} (attention products at seq {REPORT_SEQ})"
        errors = [e for e in report if "error_removed" in e]
        if errors:
            stats["mean_error_removed"] = float(np.mean([e["error_removed"] for e in errors]))
            if o.reconstruct:
                stats["mean_error_refit"] = float(np.mean([e["error_refit"] for e in errors]))
            refined = [e for e in errors if "error_refined" in e]
            if refined:
                stats["mean_error_pruned_inputs"] = float(np.mean([e["error_pruned_inputs"] for e in refined]))
                stats["mean_error_refined"] = float(np.mean([e["error_refined"] for e in refined]))
        stats["heads_removed"] = sum(len(e.get("removed", [])) for e in report)
        stats["blocks_pruned"] = len(report)
        for item in report:
            logger.debug("prune: %s", item)
        return modified

    def _reconstruct(
        self, proj: Any, hessians: Any, original: np.ndarray, keep: np.ndarray
    ) -> dict[str, Any]:
        """Refits ``proj`` (already sliced to ``keep``) when asked; returns the errors."""
        name = proj.input.name
        h = hessians.hessian(name)
        result = refit(h, original, keep, self.options.damp)
        out: dict[str, Any] = {"error_removed": round(result.error_removed, 6)}
        if self.options.reconstruct:
            set_constant(proj.weight, result.weight.astype(original.dtype))
            out["error_refit"] = round(result.error_refit, 6)
        return out

    def _refine(
        self,
        original: ir.Model,
        model: ir.Model,
        originals: dict[str, tuple[Any, np.ndarray, np.ndarray]],
        hessians: Any,
        ctx: PassContext,
        report: list[dict[str, Any]],
    ) -> None:
        """Second reconstruction round from the pruned model's own inputs."""
        keeps = {name: keep for name, (_, _, keep) in originals.items()}
        paired = paired_grams(original, model, keeps, ctx, self.options.samples)
        for (name, (proj, w, _)), entry in zip(originals.items(), report, strict=True):
            current = weight_array(proj.weight)
            new, before, after = refit_paired(paired[name], w, current, hessians.hessian(name), self.options.damp)
            set_constant(proj.weight, new.astype(w.dtype))
            entry["error_pruned_inputs"] = round(before, 6)
            entry["error_refined"] = round(after, 6)

    # ------------------------------------------------------------------ selection
    def _select_heads(self, blocks: list[AttentionBlock], hessians: Any) -> dict[int, HeadPlan]:
        o = self.options
        out: dict[int, HeadPlan] = {}
        scored = [(b, imp.head_scores(b, o.importance, hessians, o.damp)) for b in blocks]
        if o.scope == "global":
            units: list[tuple[float, int, np.ndarray]] = []  # (relative score, block, heads)
            for i, (b, s) in enumerate(scored):
                groups = _unit_groups(b, self._gqa_mode(b))
                rel = s / (float(s.mean()) or 1.0)
                units.extend((float(rel[g].sum()) / len(g), i, g) for g in groups)
            total = sum(b.num_heads for b in blocks)
            budget = _round(o.heads * total)
            removed: dict[int, list[np.ndarray]] = {i: [] for i in range(len(blocks))}
            taken = 0
            for _, i, g in sorted(units, key=lambda u: u[0]):
                if taken >= budget:
                    break
                b = blocks[i]
                left = b.num_heads - sum(len(x) for x in removed[i]) - len(g)
                if left < max(1, b.group_size if self._gqa_mode(b) == "groups" else 1):
                    continue
                trial = removed[i] + [g]
                try:
                    plan_heads(b, _complement(b.num_heads, trial))
                except SkipBlock:
                    continue
                removed[i] = trial
                taken += len(g)
            for i, (b, _) in enumerate(scored):
                out[id(b)] = plan_heads(b, _complement(b.num_heads, removed[i]))
            return out
        for b, s in scored:
            out[id(b)] = self._layer_heads(b, s)
        return out

    def _gqa_mode(self, b: AttentionBlock) -> str:
        if b.group_size == 1:
            return "within"
        mode = self.options.gqa
        if mode != "auto":
            return mode
        by_groups = round(self.options.heads * b.num_kv_heads) * b.group_size
        by_within = round(self.options.heads * b.group_size) * b.num_kv_heads
        target = self.options.heads * b.num_heads
        return "groups" if abs(by_groups - target) <= abs(by_within - target) else "within"

    def _layer_heads(self, b: AttentionBlock, scores: np.ndarray) -> HeadPlan:
        ratio = self.options.heads
        g = b.group_size
        if self._gqa_mode(b) == "groups":
            n = min(_round(ratio * b.num_kv_heads), b.num_kv_heads - 1)
            group_scores = scores.reshape(b.num_kv_heads, g).sum(axis=1)
            drop = np.argsort(group_scores, kind="stable")[:n]
            keep = np.array([h for h in range(b.num_heads) if h // g not in set(drop.tolist())])
            return plan_heads(b, keep)
        if g == 1:
            n = min(_round(ratio * b.num_heads), b.num_heads - 1)
            drop = np.argsort(scores, kind="stable")[:n]
            return plan_heads(b, np.setdiff1d(np.arange(b.num_heads), drop))
        n = min(_round(ratio * g), g - 1)
        kept: list[int] = []
        for kv in range(b.num_kv_heads):
            members = np.arange(kv * g, (kv + 1) * g)
            order = members[np.argsort(scores[members], kind="stable")]
            kept.extend(sorted(order[n:].tolist()))
        return plan_heads(b, np.array(kept))

    def _select_neurons(self, blocks: list[FFNBlock], hessians: Any) -> dict[int, np.ndarray]:
        o = self.options
        scored = [(b, imp.neuron_scores(b, o.importance, hessians, o.damp)) for b in blocks]
        out: dict[int, np.ndarray] = {}
        if o.scope == "global" and scored:
            rel = [s / (float(s.mean()) or 1.0) for _, s in scored]
            flat = np.concatenate(rel)
            owner = np.concatenate([np.full(s.size, i) for i, s in enumerate(rel)])
            index = np.concatenate([np.arange(s.size) for s in rel])
            budget = _round(o.ffn * flat.size)
            dropped: dict[int, list[int]] = {i: [] for i in range(len(scored))}
            for j in np.argsort(flat, kind="stable"):
                if budget == 0:
                    break
                i = int(owner[j])
                if len(dropped[i]) + 1 >= rel[i].size:
                    continue
                dropped[i].append(int(index[j]))
                budget -= 1
            for i, (b, _) in enumerate(scored):
                out[id(b)] = np.setdiff1d(np.arange(b.intermediate), dropped[i])
            return out
        for b, s in scored:
            n = min(_round(o.ffn * b.intermediate), b.intermediate - 1)
            drop = np.argsort(s, kind="stable")[:n]
            out[id(b)] = np.setdiff1d(np.arange(b.intermediate), drop)
        return out


# ----------------------------------------------------------------------------- helpers


def _round(x: float) -> int:
    """Round half up (``0.5 -> 1``), never negative."""
    return max(0, math.floor(x + 0.5))


def _complement(n: int, removed: list[np.ndarray]) -> np.ndarray:
    drop = set(np.concatenate(removed).tolist()) if removed else set()
    return np.array([h for h in range(n) if h not in drop], dtype=np.int64)


def _unit_groups(b: AttentionBlock, mode: str) -> list[np.ndarray]:
    """The head sets that global ranking removes as one unit."""
    g = b.group_size
    if mode == "groups":
        return [np.arange(kv * g, (kv + 1) * g) for kv in range(b.num_kv_heads)]
    if g == 1:
        return [np.array([h]) for h in range(b.num_heads)]
    # within groups: one head from every group at a time (by position in the group)
    return [np.arange(j, b.num_heads, g) for j in range(g)]


def _changed(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]], b: Any) -> bool:
    return before[id(b)] != after[id(b)]


def _proj_params(p: Any) -> int:
    k, n = p.shape
    return k * n + (n if p.bias is not None else 0)


def _attention_cost(b: AttentionBlock) -> tuple[int, int]:
    """(parameters, FLOPs per token) of an attention block at :data:`REPORT_SEQ`."""
    projs = (b.q, b.k, b.v, b.o)
    params = sum(_proj_params(p) for p in projs)
    flops = sum(2 * p.shape[0] * p.shape[1] for p in projs)
    flops += 2 * 2 * REPORT_SEQ * b.num_heads * b.head_dim  # scores and context products
    return params, flops


def _ffn_cost(b: FFNBlock) -> tuple[int, int]:
    projs = (*b.inputs, b.down)
    return sum(_proj_params(p) for p in projs), sum(2 * p.shape[0] * p.shape[1] for p in projs)
