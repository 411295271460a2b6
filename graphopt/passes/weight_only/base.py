"""The weight-only quantization pass base: select weights, quantize them, lower them.

:class:`WeightOnlyPass` fixes the flow every weight-only method shares::

    select(model, ctx)                      -> list[WeightSite]
    quantize_sites(model, sites, ctx, am)   -> {weight name: GroupQuantized}
    lower (per ctx.target or the ``lowering`` option)

Round-to-nearest (``wq``) uses the default :meth:`WeightOnlyPass.quantize_sites`; GPTQ and
AWQ override it (and may extend :class:`WeightOnlyOptions`). Selection lives in
:mod:`~graphopt.passes.weight_only.selection`, the lowerings in ``lower_*`` modules, all
built from one :class:`~graphopt.quant.groupwise.GroupQuantized` per weight.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

import numpy as np
import onnx_ir as ir

from graphopt.infra.analysis import AnalysisManager, PreservedAnalyses
from graphopt.infra.context import PassContext
from graphopt.infra.options import Options
from graphopt.infra.pass_base import Pass, PassInfo, PassResult
from graphopt.passes.weight_only.tolerance import WEIGHT_ONLY, register_tolerance
from graphopt.quant.groupwise import GroupQuantized, quantize_rtn

logger = logging.getLogger(__name__)

register_tolerance()

SiteKind = Literal["matmul", "gemm", "gather"]
Lowering = Literal["auto", "nbits", "dq", "ext"]

#: Targets whose runtimes reject negative quantization scales.
POSITIVE_SCALE_TARGETS = frozenset({"tensorrt"})

#: Lowering chosen for each target when ``lowering=auto``.
TARGET_LOWERING: dict[str, str] = {
    "ort": "nbits",
    "tensorrt": "dq",
    "portable": "dq",
    "ext": "ext",
}


@dataclass(frozen=True)
class WeightSite:
    """One use of a constant weight by a MatMul, Gemm or Gather.

    Attributes:
        node: The MatMul / Gemm / Gather consuming the weight.
        weight: The constant initializer (float32, 2-D).
        activation: The float input multiplied by the weight; ``None`` for Gather.
        kind: ``matmul``, ``gemm`` or ``gather``.
        layout: How the initializer is laid out relative to ``W[N, K]``: ``kn`` (a MatMul
            ``B[K, N]`` or Gemm ``transB=0``) or ``nk`` (Gemm ``transB=1``, an embedding
            table, a MatMul fed through ``Transpose(perm=[1, 0])``).
        transpose: The ``Transpose`` between the initializer and a MatMul (tied heads),
            else ``None``.
    """

    node: ir.Node
    weight: ir.Value
    activation: ir.Value | None
    kind: SiteKind
    layout: Literal["kn", "nk"] = "kn"
    transpose: ir.Node | None = None

    @property
    def name(self) -> str:
        """The weight's name (the key of :meth:`WeightOnlyPass.quantize_sites`)."""
        return self.weight.name or ""

    def matrix(self) -> np.ndarray:
        """``float32[N, K]``: the weight output-major (rows = output channels)."""
        tensor = self.weight.const_value
        if tensor is None:
            raise ValueError(f"weight {self.name!r} has no constant value")
        array = np.asarray(tensor.numpy(), dtype=np.float32)
        return np.ascontiguousarray(array.T if self.layout == "kn" else array)

    @property
    def shape_nk(self) -> tuple[int, int]:
        """``(N, K)`` without reading the data."""
        shape = self.weight.shape
        assert shape is not None
        a, b = int(shape[0]), int(shape[1])  # type: ignore[arg-type]
        return (b, a) if self.layout == "kn" else (a, b)


def group_sites(sites: Sequence[WeightSite]) -> dict[str, list[WeightSite]]:
    """Sites grouped by weight name (a tied/shared weight has several), in first-seen order."""
    out: dict[str, list[WeightSite]] = {}
    for site in sites:
        out.setdefault(site.name, []).append(site)
    return out


@dataclasses.dataclass(frozen=True)
class WeightOnlyOptions(Options):
    """Options every weight-only pass shares.

    Attributes:
        bits: Code width: 2, 3, 4 or 8.
        group: Group length along the input features; ``-1`` (or 0) is per-channel.
        sym: Symmetric codes with the implicit middle zero point; ``false`` stores a zero
            point per group.
        clip: MSE-optimal clipping search per group (shrinks each group's range).
        ternary: ``bits=2`` symmetric codes restricted to {-1, 0, 1} times the scale.
        embeddings: Also quantize ``Gather`` embedding tables.
        exclude: Node names, weight names (glob patterns) or op types kept in float.
        min_dim: Skip weights whose K or N is below this.
        lowering: ``auto`` follows ``--target`` (ort -> ``nbits``, tensorrt/portable ->
            ``dq``, ext -> ``ext``); or force ``nbits`` (com.microsoft MatMulNBits and
            GatherBlockQuantized), ``dq`` (opset-21 blocked DequantizeLinear) or ``ext``
            (graphopt MatMulLowBit).
        accuracy_level: MatMulNBits ``accuracy_level``; ``none`` picks the measured best for
            CPU (see :mod:`~graphopt.passes.weight_only.lower_nbits`).
        signed_scale: Symmetric scales may be negative so a positive extreme gets the extra
            code (see :func:`~graphopt.quant.groupwise.group_params`); ``none`` allows it
            for every target except ``tensorrt`` (whose parser requires positive scales).
    """

    bits: int = 4
    group: int = 128
    sym: bool = True
    clip: bool = False
    ternary: bool = False
    embeddings: bool = True
    exclude: tuple[str, ...] = ()
    min_dim: int = 32
    lowering: Lowering = "auto"
    accuracy_level: int | None = None
    signed_scale: bool | None = None

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4, 8):
            raise ValueError(f"bits must be 2, 3, 4 or 8, got {self.bits}")
        if self.group not in (-1, 0) and self.group < 2:
            raise ValueError(f"group must be -1 (per-channel) or at least 2, got {self.group}")
        if self.ternary and (self.bits != 2 or not self.sym):
            raise ValueError("ternary=true needs bits=2 and sym=true")
        if self.min_dim < 1:
            raise ValueError(f"min_dim must be positive, got {self.min_dim}")
        if self.accuracy_level is not None and self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"accuracy_level must be 0..4, got {self.accuracy_level}")


O = TypeVar("O", bound=WeightOnlyOptions)


class WeightOnlyPass(Pass[O]):
    """Base of weight-only quantization passes (``wq``, ``gptq``, ``awq``).

    Matches: MatMul / Gemm whose weight is a constant 2-D float32 initializer (directly or
    through ``Transpose(perm=[1, 0])``), and ``Gather`` embedding tables when
    ``embeddings=true``; not excluded, K and N at least ``min_dim``.

    Changes: each selected weight becomes low-bit codes with per-group scales, lowered
    for the target. A weight shared by several nodes (SmolLM2's tied embedding and head)
    is quantized once and every selected use reads the same codes.

    Preserves: graph inputs/outputs and their shapes; numerics within the ``weight-only``
    tolerance. Uses that were excluded keep reading the float weight.
    """

    info: ClassVar[PassInfo] = PassInfo(
        name="weight-only", summary="weight-only quantization (base)", tolerance=WEIGHT_ONLY.name
    )
    Options: ClassVar[type[Options]] = WeightOnlyOptions

    #: Reasons candidates were not selected (filled by :meth:`select`).
    _skipped: list[str]

    # ------------------------------------------------------------------ hooks
    def signed_scale(self, ctx: PassContext) -> bool:
        """Whether symmetric scales may be negative (the option, else by target)."""
        if self.options.signed_scale is not None:
            return self.options.signed_scale
        return ctx.target not in POSITIVE_SCALE_TARGETS

    def select(self, model: ir.Model, ctx: PassContext) -> list[WeightSite]:
        """The weight uses to quantize (see the class docstring)."""
        from graphopt.passes.weight_only.selection import select_sites

        sites, skipped = select_sites(model, self.options)
        self._skipped = skipped
        return sites

    def quantize_sites(
        self,
        model: ir.Model,
        sites: Sequence[WeightSite],
        ctx: PassContext,
        am: AnalysisManager,
    ) -> dict[str, GroupQuantized]:
        """Quantizes each distinct weight once; round-to-nearest here, GPTQ/AWQ override.

        Returns:
            ``{weight name: GroupQuantized}`` for ``W[N, K]`` of each weight.
        """
        o = self.options
        signed = self.signed_scale(ctx)
        out: dict[str, GroupQuantized] = {}
        for name, group in group_sites(sites).items():
            out[name] = quantize_rtn(
                group[0].matrix(),
                o.bits,
                o.group,
                o.sym,
                clip_search=o.clip,
                ternary=o.ternary,
                signed_scale=signed,
            )
        return out

    # ------------------------------------------------------------------ run
    def lowering_name(self, ctx: PassContext) -> str:
        """``nbits``, ``dq`` or ``ext`` from the option or the target."""
        from graphopt.errors import UsageError

        if self.options.lowering != "auto":
            return self.options.lowering
        try:
            return TARGET_LOWERING[ctx.target]
        except KeyError:
            raise UsageError(
                f"{self.info.name}: no weight-only lowering for target {ctx.target!r} "
                f"(targets: {', '.join(TARGET_LOWERING)})"
            ) from None

    def run(self, model: ir.Model, ctx: PassContext, am: AnalysisManager) -> PassResult:
        from graphopt.passes.weight_only.lower import lower_weights

        self._skipped = []
        lowering = self.lowering_name(ctx)
        sites = self.select(model, ctx)
        stats: dict[str, Any] = {"lowering": lowering}
        if not sites:
            stats["skip_reasons"] = list(self._skipped)[:50]
            return PassResult(model, False, stats=stats)
        quantized = self.quantize_sites(model, sites, ctx, am)
        if ctx.target in POSITIVE_SCALE_TARGETS:
            check_positive_scales(quantized, ctx.target)
        stats.update(quantization_stats(sites, quantized))
        stats.update(lower_weights(model, sites, quantized, lowering, self.options))
        reasons = list(self._skipped)
        stats["skip_reasons"] = reasons[:50] + (
            [f"... {len(reasons) - 50} more"] if len(reasons) > 50 else []
        )
        logger.info(
            "%s: quantized %d weights (%d uses) to %d bits, lowering %s",
            self.info.name,
            len(quantized),
            len(sites),
            self.options.bits,
            lowering,
        )
        return PassResult(model, True, preserved=PreservedAnalyses.none(), stats=stats)


def check_positive_scales(quantized: Mapping[str, GroupQuantized], target: str) -> None:
    """Raises LoweringError naming the first weight with a negative scale."""
    from graphopt.errors import LoweringError

    for name, q in quantized.items():
        if np.any(q.scales < 0):
            raise LoweringError(
                target, name, "negative quantization scales; quantize with signed_scale=false"
            )


def quantization_stats(
    sites: Sequence[WeightSite], quantized: Mapping[str, GroupQuantized]
) -> dict[str, Any]:
    """Counts, bytes and the worst weight SQNR for reports."""
    by_weight = group_sites(sites)
    float_bytes = 0
    packed_bytes = 0
    worst = (np.inf, "")
    for name, q in quantized.items():
        w = by_weight[name][0].matrix()
        float_bytes += w.nbytes
        packed_bytes += q.nbytes_packed()
        err = float(np.sum((q.dequantize() - w).astype(np.float64) ** 2))
        sig = float(np.sum(w.astype(np.float64) ** 2))
        sqnr = np.inf if err == 0 else 10 * np.log10(max(sig, 1e-300) / err)
        if sqnr < worst[0]:
            worst = (sqnr, name)
    kinds: dict[str, int] = {}
    for s in sites:
        kinds[s.kind] = kinds.get(s.kind, 0) + 1
    return {
        "weights_quantized": len(quantized),
        "uses_quantized": kinds,
        "weight_float_bytes": float_bytes,
        "weight_packed_bytes": packed_bytes,
        "worst_weight_sqnr_db": None if not np.isfinite(worst[0]) else round(float(worst[0]), 2),
        "worst_weight": worst[1],
    }
