"""The ``fuse`` pass: target-aware operator fusion with a why-not trace."""

from __future__ import annotations

import dataclasses
import logging

import onnx_ir as ir
import onnx_ir.passes.common as ir_common
import onnxscript.optimizer

from graphopt.backends import get_backend
from graphopt.errors import UsageError
from graphopt.infra.analysis import AnalysisManager, PreservedAnalyses
from graphopt.infra.context import PassContext
from graphopt.infra.options import Options
from graphopt.infra.pass_base import Pass, PassInfo, PassResult
from graphopt.passes.cleanup.dead_code import EliminateDeadCodePass
from graphopt.passes.cleanup.fold_constants import FoldConstantsPass
from graphopt.passes.cleanup.identity import RemoveIdentityPass
from graphopt.passes.fusion.catalog import catalog, rule_names
from graphopt.rewrite import RewriteReport, apply_rules

logger = logging.getLogger(__name__)

#: Domain of onnxscript's intermediate fusion ops (functions it inlines when unconsumed).
FUSION_SCRATCH_DOMAIN = "ai.onnxruntime._fusion"


@dataclasses.dataclass(frozen=True)
class FuseOptions(Options):
    """Options of ``fuse``.

    Attributes:
        rules: Apply only these rules (default: every rule legal for the target).
        exclude: Rules not to apply.
        explain: Record, for each rule that never fired, its closest miss and reason.
        rounds: Repeat the whole rule list until nothing fires, at most this often.
        prepare: Run shape inference and onnxscript's constant folding first (exposes
            patterns hidden behind shape computations).
    """

    rules: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    explain: bool = False
    rounds: int = 2
    prepare: bool = True

    def __post_init__(self) -> None:
        known = set(rule_names())
        for name in (*self.rules, *self.exclude):
            if name not in known:
                raise ValueError(f"unknown rule {name!r}; known rules: {', '.join(sorted(known))}")
        if self.rounds < 1:
            raise ValueError("rounds must be at least 1")


def _finalize_scratch_functions(model: ir.Model) -> int:
    """Inlines onnxscript's intermediate fusion functions that no later rule consumed."""
    scratch = [k for k, f in model.functions.items() if f.domain == FUSION_SCRATCH_DOMAIN]
    if scratch:
        ir_common.InlinePass(criteria=lambda f: f.domain == FUSION_SCRATCH_DOMAIN)(model)
        for key in scratch:
            model.functions.pop(key, None)
    still_used = any(
        n.domain == FUSION_SCRATCH_DOMAIN for n in ir.traversal.RecursiveGraphIterator(model.graph)
    )
    if not still_used:
        model.opset_imports.pop(FUSION_SCRATCH_DOMAIN, None)
    return len(scratch)


class FusePass(Pass[FuseOptions]):
    """Fuses subgraphs into the target's fast ops.

    Matches: the rules of :mod:`graphopt.passes.fusion.catalog` legal for
    ``ctx.target`` (ORT contrib ops for ``ort``/``ext``; standard ONNX only for
    ``tensorrt``/``portable``): LayerNorm/RMSNorm/Skip*Norm, GELU forms, attention,
    BatchNorm folding, MatMul+Add -> Gemm, Pad into Conv, shape chains.

    Changes: replaces each matched subgraph by the fused op; folds constants first when
    ``prepare`` is set.

    Preserves: graph inputs/outputs (names, order, dtypes, dims), model-local functions,
    metadata. Numerics within the ``fusion`` tolerance (rtol 1e-5, atol 1e-6).

    Example::

        before: y = Add(Mul(Div(x, Sqrt(2)) ...Erf...), ...)      # erf GELU
        after:  y = com.microsoft.Gelu(x)
    """

    info = PassInfo(
        name="fuse",
        summary="target-aware operator fusion (norms, GELU, attention, BN, Gemm, ...)",
        tolerance="fusion",
    )
    Options = FuseOptions

    def run(self, model: ir.Model, ctx: PassContext, am: AnalysisManager) -> PassResult:
        backend = get_backend(ctx.target)
        legal = backend.fusion_rules(catalog())
        legal_names = {r.name for r in legal}
        for name in self.options.rules:
            if name not in legal_names:
                raise UsageError(
                    f"fuse: rule {name!r} emits ops target {ctx.target!r} cannot run"
                )
        chosen = [
            r
            for r in legal
            if (not self.options.rules or r.name in self.options.rules)
            and r.name not in self.options.exclude
        ]
        explain = self.options.explain or bool(ctx.options.get("explain"))
        if self.options.prepare:
            try:
                ir_common.ShapeInferencePass()(model)
            except Exception as e:  # noqa: BLE001 - shapes help; their absence must not stop fusion
                logger.debug("shape inference failed: %s", e)
            onnxscript.optimizer.fold_constants(model)
            ir_common.RemoveUnusedNodesPass()(model)
        report = RewriteReport()
        for round_index in range(self.options.rounds):
            this_round = apply_rules(model, chosen, explain=explain and round_index == 0)
            report.merge(this_round)
            if this_round.total == 0:
                break
        inlined = _finalize_scratch_functions(model)
        if report.total:
            # Rewrites leave Identity nodes and constant subgraphs behind (e.g. Q/K/V weights
            # packed by a runtime Concat); fold them exactly and drop what became dead.
            for tidy in (RemoveIdentityPass(), FoldConstantsPass(), EliminateDeadCodePass()):
                tidy.run_with(model, ctx, am)
        stats: dict[str, object] = {"fusions": report.total, "rules": report.counts()}
        if inlined:
            stats["scratch_functions_inlined"] = inlined
        if explain:
            stats["explain"] = {
                o.name: o.skipped or o.closest_miss or "no near-match"
                for o in report.outcomes
                if o.count == 0
            }
        modified = report.total > 0 or self.options.prepare
        return PassResult(model, modified, preserved=PreservedAnalyses.none(), stats=stats)
