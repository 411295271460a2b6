"""``smoothquant``: migrate activation outliers into the weights ahead of w8a8 ``ptq``.

Matches: MatMul/Gemm sites with a constant 2-D weight (as the weight-only passes select
them, ``Gather`` excluded), grouped by the activation they read; a group is smoothed only
when every use of its weights reads that activation.

Changes: per group, ``s = max|X|^α / max|W|^(1-α)`` per input channel
(:func:`~graphopt.quant.smoothquant.smoothquant_scales`, activation maxima from
:class:`~graphopt.analysis.hessian.InputHessianAnalysis` over ``--calib``); the activation
is divided by ``s`` (folded into its producer exactly as ``awq`` does, see
:func:`~graphopt.passes.weight_only.awq_pass.plan_scale_fold`, or a ``Mul`` inserted before
the group), the float weights multiplied by it. The model stays float: follow with ``ptq``
(``--passes "smoothquant,ptq"``), whose per-tensor activation ranges then fit.

Preserves: graph inputs and outputs; numerics within the ``fusion`` tolerance class (the
rewrite is exact up to float rounding).

Example::

    before: n = LayerNormalization(x, scale, bias); y = MatMul(n, W)
    after:  n = LayerNormalization(x, scale / s, bias / s); y = MatMul(n, W ⊙ s[:, None])
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from graphopt.errors import UsageError
from graphopt.infra.analysis import AnalysisManager, PreservedAnalyses
from graphopt.infra.context import PassContext
from graphopt.infra.options import Options
from graphopt.infra.pass_base import Pass, PassInfo, PassResult
from graphopt.passes.weight_only.awq_pass import (
    ScaleEditor,
    plan_scale_fold,
    scalable_groups,
    scale_weight,
)
from graphopt.passes.weight_only.base import WeightOnlyOptions
from graphopt.passes.weight_only.gptq_pass import hessian_chunks
from graphopt.quant.smoothquant import smoothquant_scales

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SmoothQuantOptions(Options):
    """Options of ``smoothquant``.

    Attributes:
        alpha: Migration strength in ``[0, 1]`` (0.5 balances activation and weight ranges).
        exclude: Node names, weight names (glob patterns) or op types left alone.
        min_dim: Skip weights whose K or N is below this.
        insert_mul: Insert ``Mul(x, 1/s)`` where no producer can absorb the scales (else
            skip those groups).
        samples: Use at most this many calibration feeds (none: all).
    """

    alpha: float = 0.5
    exclude: tuple[str, ...] = ()
    min_dim: int = 16
    insert_mul: bool = True
    samples: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.min_dim < 1:
            raise ValueError(f"min_dim must be positive, got {self.min_dim}")
        if self.samples is not None and self.samples < 1:
            raise ValueError(f"samples must be positive, got {self.samples}")


class SmoothActivationsPass(Pass[SmoothQuantOptions]):
    """SmoothQuant activation smoothing (registry name ``smoothquant``); see the module
    docstring."""

    info: ClassVar[PassInfo] = PassInfo(
        name="smoothquant",
        summary="migrate activation outliers into weights before int8 ptq (needs --calib)",
        tolerance="fusion",
    )
    Options: ClassVar[type[Options]] = SmoothQuantOptions

    def check_requires(self, model: ir.Model, ctx: PassContext) -> None:
        if ctx.calibration is None:
            raise UsageError("smoothquant needs calibration data for activation ranges: pass --calib PATH")

    def run(self, model: ir.Model, ctx: PassContext, am: AnalysisManager) -> PassResult:
        from graphopt.passes.weight_only.selection import select_sites

        o = self.options
        started = time.perf_counter()
        select_opts = WeightOnlyOptions(embeddings=False, exclude=o.exclude, min_dim=o.min_dim)
        sites, skipped = select_sites(model, select_opts)
        groups, _rest, reasons = scalable_groups(sites)
        reasons = [r.replace("rounded without scaling", "not smoothed") for r in reasons]
        if not groups:
            return PassResult(model, False, stats={"skip_reasons": (skipped + reasons)[:50]})
        editor = ScaleEditor(model.graph)
        planned: list[tuple[Any, np.ndarray, Any]] = []
        for hs, acts in hessian_chunks(model, groups, ctx, am, o.samples, 2048):
            for act in acts:
                group = groups[act]
                weights = [s.matrix() for s in {s.name: s for s in group}.values()]
                k = weights[0].shape[1]
                act_max = hs.channel_max_abs(act)
                if act_max.shape[0] != k:
                    reasons.append(f"{act}: activation has {act_max.shape[0]} features, weights K={k}")
                    continue
                s = smoothquant_scales(act_max, weights, o.alpha)
                activation = group[0].activation
                assert activation is not None
                plan = plan_scale_fold(editor, activation, [x.node for x in group], k, o.insert_mul)
                if isinstance(plan, str):
                    reasons.append(plan)
                    continue
                planned.append((group, s, plan))
        kinds: dict[str, int] = {}
        for group, s, plan in planned:
            plan.apply(s)
            for site in {x.name: x for x in group}.values():
                scale_weight(editor, site, s)
            kinds[plan.kind] = kinds.get(plan.kind, 0) + 1
        stats: dict[str, Any] = {
            "groups_smoothed": kinds,
            "muls_inserted": editor.inserted,
            "seconds": round(time.perf_counter() - started, 2),
            "skip_reasons": (skipped + reasons)[:50],
        }
        logger.info("smoothquant: smoothed %d activation groups %s", len(planned), kinds)
        if not planned:
            return PassResult(model, False, stats=stats)
        return PassResult(model, True, preserved=PreservedAnalyses.none(), stats=stats)
