"""``gptq``: weight-only quantization with Hessian-based error compensation.

Matches: the weights :class:`~graphopt.passes.weight_only.base.WeightOnlyPass` selects
(MatMul/Gemm constant weights, Gather embeddings).

Changes: each MatMul/Gemm weight is rounded by :func:`~graphopt.quant.gptq.gptq_quantize`
against the input Hessian ``XᵀX / rows`` of its activation
(:class:`~graphopt.analysis.hessian.InputHessianAnalysis` over ``--calib``; sites sharing
an activation, e.g. q/k/v projections, share one Hessian; a weight shared by several
MatMuls uses the row-weighted mean of their Hessians). With ``guard=true`` (default) a
layer whose GPTQ error ``tr(ΔW H ΔWᵀ)`` is not below round-to-nearest's keeps RTN's codes,
so every layer's calibration error is at most RTN's. Weights only read by ``Gather``
(untied embeddings) are rounded to nearest. Lowering is the base class's (MatMulNBits /
blocked DequantizeLinear / runtime_ext).

Preserves: graph inputs and outputs, shapes; numerics within the ``weight-only`` tolerance.
All Hessians are computed from the float model in one calibration pass (the "parallel"
variant), chunked by ``hessian_mb`` so that memory stays bounded on deep models.

Example (``--passes "gptq(bits=4,group=128)" --calib windows/``)::

    before: y = MatMul(x, W[576, 1536])
    after:  y = com.microsoft.MatMulNBits(x, W_q4[1536, 5, 64], scales[1536, 5], ...)
            (codes chosen column by column, compensating rounding errors through H)
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import onnx_ir as ir

from graphopt.analysis.hessian import InputHessianAnalysis, InputHessians
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
from graphopt.quant.gptq import gptq_quantize_with_info, layer_error
from graphopt.quant.groupwise import GroupQuantized, quantize_rtn

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GPTQOptions(WeightOnlyOptions):
    """Options of ``gptq`` (besides :class:`WeightOnlyOptions`).

    Attributes:
        act_order: Process input columns by decreasing Hessian diagonal.
        damp: Relative damping of the Hessian (fraction of its mean diagonal).
        block: Columns per lazy update block.
        static_groups: Group scales from the original weights (see
            :mod:`graphopt.quant.gptq`); ``false`` computes them at each group's first
            processed column.
        guard: Keep round-to-nearest codes for a layer where GPTQ's Hessian-weighted error
            is not lower.
        tied: For a weight also read by ``Gather`` (tied embedding and head): ``gptq``
            rounds it for the MatMul's inputs, ``rtn`` rounds it to nearest.
        samples: Use at most this many calibration feeds (none: all).
        hessian_mb: Memory for the Hessians of one calibration pass; more weights take
            several passes.
    """

    act_order: bool = True
    damp: float = 0.01
    block: int = 128
    static_groups: bool = True
    guard: bool = True
    tied: Literal["gptq", "rtn"] = "gptq"
    samples: int | None = None
    hessian_mb: int = 2048

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.damp < 0:
            raise ValueError(f"damp must be >= 0, got {self.damp}")
        if self.block < 1:
            raise ValueError(f"block must be positive, got {self.block}")
        if self.samples is not None and self.samples < 1:
            raise ValueError(f"samples must be positive, got {self.samples}")
        if self.hessian_mb < 1:
            raise ValueError(f"hessian_mb must be positive, got {self.hessian_mb}")


def activation_names(sites: Sequence[WeightSite]) -> list[str]:
    """Distinct names of the sites' activations (Gather sites have none), in order."""
    names: dict[str, None] = {}
    for s in sites:
        if s.activation is not None and s.activation.name:
            names[s.activation.name] = None
    return list(names)


def hessian_chunks(
    model: ir.Model,
    by_weight: dict[str, list[WeightSite]],
    ctx: PassContext,
    am: AnalysisManager,
    samples: int | None,
    budget_mb: int,
) -> Iterator[tuple[InputHessians, list[str]]]:
    """Input Hessians for the weights' activations, a chunk of weights at a time.

    Weights are taken in order and a chunk closes when its distinct activations' Hessians
    (``K * K`` doubles each) would exceed ``budget_mb``. A single chunk is cached in ``am``
    (other passes may reuse it); several chunks are computed uncached and dropped after use.

    Yields:
        ``(hessians, weight names)`` for each chunk; every weight with at least one named
        activation appears in exactly one chunk.
    """
    budget = budget_mb * 2**20
    chunks: list[tuple[list[str], list[str]]] = []
    acts: dict[str, None] = {}
    weights: list[str] = []
    used = 0
    for name, group in by_weight.items():
        new = [a for a in activation_names(group) if a not in acts]
        if not activation_names(group):
            continue
        k = group[0].shape_nk[1]
        cost = len(new) * k * k * 8
        if weights and used + cost > budget:
            chunks.append((list(acts), weights))
            acts, weights, used = {}, [], 0
            new = activation_names(group)
            cost = len(new) * k * k * 8
        for a in new:
            acts[a] = None
        weights.append(name)
        used += cost
    if weights:
        chunks.append((list(acts), weights))
    for values, names in chunks:
        analysis = InputHessianAnalysis(values, samples)
        if len(chunks) == 1:
            yield am.get(analysis, model), names
        else:
            logger.info("hessians: chunk of %d activations for %d weights", len(values), len(names))
            yield analysis.run(model, am, ctx), names


def weight_hessian(hs: InputHessians, sites: Sequence[WeightSite]) -> np.ndarray | None:
    """Row-weighted mean Hessian of a weight's activations, or None when it has none."""
    acts = activation_names(sites)
    if not acts:
        return None
    gram = sum((hs.gram(a) for a in acts), np.zeros_like(hs.gram(acts[0])))
    rows = sum(hs.rows(a) for a in acts)
    return gram / float(rows)


class QuantizeWeightsGptqPass(WeightOnlyPass[GPTQOptions]):
    """GPTQ weight-only quantization (registry name ``gptq``); see the module docstring."""

    info: ClassVar[PassInfo] = PassInfo(
        name="gptq",
        summary="weight-only low-bit quantization with GPTQ error compensation (needs --calib)",
        tolerance="weight-only",
    )
    Options: ClassVar[type[Options]] = GPTQOptions

    def check_requires(self, model: ir.Model, ctx: PassContext) -> None:
        if ctx.calibration is None:
            raise UsageError(
                "gptq needs calibration data for its input Hessians: pass --calib PATH "
                "(or use wq for round-to-nearest without calibration)"
            )

    def quantize_sites(
        self,
        model: ir.Model,
        sites: Sequence[WeightSite],
        ctx: PassContext,
        am: AnalysisManager,
    ) -> dict[str, GroupQuantized]:
        self.check_requires(model, ctx)
        o = self.options
        by_weight = group_sites(sites)
        out: dict[str, GroupQuantized] = {}
        counts = {"gptq": 0, "rtn_guard": 0, "rtn_fallback": 0, "rtn_gather": 0, "rtn_tied": 0}
        ratios: list[float] = []

        signed = self.signed_scale(ctx)

        def rtn(w: np.ndarray) -> GroupQuantized:
            return quantize_rtn(
                w, o.bits, o.group, o.sym, clip_search=o.clip, ternary=o.ternary, signed_scale=signed
            )

        calibrated = []
        for name, group in by_weight.items():
            if not activation_names(group):
                out[name] = rtn(group[0].matrix())
                counts["rtn_gather"] += 1
            elif o.tied == "rtn" and any(s.kind == "gather" for s in group):
                out[name] = rtn(group[0].matrix())
                counts["rtn_tied"] += 1
            else:
                calibrated.append(name)
        todo = {name: by_weight[name] for name in calibrated}
        started = time.perf_counter()
        hessian_s = 0.0
        with LazyProgress("gptq", len(todo), "layers") as progress:
            t0 = time.perf_counter()
            for hs, names in hessian_chunks(model, todo, ctx, am, o.samples, o.hessian_mb):
                hessian_s += time.perf_counter() - t0
                for name in names:
                    group = todo[name]
                    w = group[0].matrix()
                    h = weight_hessian(hs, group)
                    assert h is not None
                    if h.shape != (w.shape[1], w.shape[1]):
                        logger.warning(
                            "gptq: %s: activation has %d features, weight K is %d; rounding to nearest",
                            name, h.shape[0], w.shape[1],
                        )
                        out[name] = rtn(w)
                        counts["rtn_fallback"] += 1
                        progress.advance(name)
                        continue
                    q, info = gptq_quantize_with_info(
                        w, h, o.bits, o.group, o.sym, act_order=o.act_order, damp=o.damp,
                        block=o.block, static_groups=o.static_groups, clip_search=o.clip,
                        signed_scale=signed, name=name,
                    )
                    if info.fallback:
                        counts["rtn_fallback"] += 1
                    elif o.guard:
                        base = rtn(w)
                        e_rtn = layer_error(w, base.dequantize(), h)
                        e_gptq = layer_error(w, q.dequantize(), h)
                        ratios.append(e_gptq / e_rtn if e_rtn > 0 else 1.0)
                        if e_gptq >= e_rtn:
                            q = base
                            counts["rtn_guard"] += 1
                        else:
                            counts["gptq"] += 1
                    else:
                        counts["gptq"] += 1
                    out[name] = q
                    progress.advance(name)
                t0 = time.perf_counter()
        self._gptq_stats = {
            "gptq_layers": counts,
            "gptq_seconds": round(time.perf_counter() - started, 2),
            "hessian_seconds": round(hessian_s, 2),
        }
        if ratios:
            self._gptq_stats["gptq_error_vs_rtn_median"] = round(float(np.median(ratios)), 4)
        logger.info(
            "gptq: %d layers by GPTQ, %s; %.1fs (Hessians %.1fs)",
            counts["gptq"], {k: v for k, v in counts.items() if k != "gptq" and v},
            time.perf_counter() - started, hessian_s,
        )
        return out

    _gptq_stats: dict[str, Any]

    def run(self, model: ir.Model, ctx: PassContext, am: AnalysisManager) -> Any:
        self._gptq_stats = {}
        result = super().run(model, ctx, am)
        result.stats.update(self._gptq_stats)
        return result
