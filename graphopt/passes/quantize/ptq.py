"""``ptq``: int8 post-training quantization (static, calibrated).

Matches: the compute nodes (Conv, Gemm, MatMul with a constant weight) the target's
quantizer policy selects (:mod:`graphopt.backends.ort_quant`,
:mod:`graphopt.backends.tensorrt_quant`), minus ``exclude`` and anything whose calibrated
input range is unusable (attention-mask fills).

Changes: annotate -> calibrate (:class:`~graphopt.analysis.ActivationStatsAnalysis` over
``--calib``) -> insert Q/DQ (:class:`~graphopt.passes.quantize.insert.InsertQDQPass`).
With ``max_loss`` the most sensitive nodes are returned to float until the outputs on
the calibration feeds are within the bound.

Preserves: graph inputs/outputs; numerics within the ``quantized`` tolerance (SQNR >= 30
dB per output on realistic data).

Example (``graphopt optimize m.onnx -o q.onnx --passes ptq --calib feeds/``)::

    before: y = MatMul(LayerNorm(x), W)
    after:  y = MatMul(DQ(Q(LayerNorm(x))), DQ(W_int8, axis=1))

Statistics: nodes quantized (by op), values left in float with the reason (``mask path:
'val_105' range [-3.4e+38, 0]``), the observer and calibration samples, per-node output
SQNR on the first calibration feeds, and the output loss when ``max_loss`` is set.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnx_ir as ir

from graphopt.analysis.calibration import ActivationStats, ActivationStatsAnalysis
from graphopt.errors import InvalidModelError, UsageError
from graphopt.infra.analysis import AnalysisManager, PreservedAnalyses
from graphopt.infra.context import PassContext
from graphopt.infra.options import Options
from graphopt.infra.pass_base import Pass, PassInfo, PassResult
from graphopt.passes.quantize.insert import MIN_OPSET, InsertQDQPass, check_opset, model_opset
from graphopt.passes.quantize.plan import QuantConfig, QuantPlan, finalize_plan
from graphopt.passes.quantize.quantizer import Quantizer
from graphopt.quant.qparams import sqnr_db

logger = logging.getLogger(__name__)

Calib = Literal["minmax", "percentile", "entropy", "mse"]

#: Calibration feeds used to measure per-node SQNR and the output loss.
EVAL_FEEDS = 4


def get_quantizer(target: str) -> Quantizer:
    """The quantizer policy of a target.

    Raises:
        UsageError: A target without a policy.
    """
    if target in ("ort", "ext", "portable"):
        from graphopt.backends.ort_quant import OrtQuantizer

        return OrtQuantizer()
    if target == "tensorrt":
        from graphopt.backends.tensorrt_quant import TensorRTQuantizer

        return TensorRTQuantizer()
    raise UsageError(f"ptq: no quantizer policy for target {target!r}")


@dataclasses.dataclass(frozen=True)
class PtqOptions(Options):
    """Options of ``ptq``.

    Attributes:
        mode: ``static`` (calibrated activation ranges; needs ``--calib``) or ``dynamic``
            (not implemented yet).
        calib: Observer choosing activation ranges: ``minmax``, ``percentile``, ``entropy``
            or ``mse``.
        percentile: For ``calib=percentile``.
        per_channel: Per-output-channel weight scales.
        reduce_range: 7-bit weights; ``none`` lets the target's policy decide.
        act_matmul: Also quantize activation x activation MatMuls (attention).
        exclude: Node names or op types kept in float.
        max_loss: Bound on the output loss ``1 - cosine`` (float vs quantized outputs on
            the first calibration feeds); the most sensitive nodes go back to float
            until it holds.
        upgrade_opset: Convert models below opset 13 with onnx's version converter
            instead of refusing them.
        samples: Use at most this many calibration feeds.
        layer_sqnr: Measure each quantized node's output SQNR (two extra runs).
    """

    mode: Literal["static", "dynamic"] = "static"
    calib: Calib = "mse"
    percentile: float = 99.999
    per_channel: bool = True
    reduce_range: bool | None = None
    act_matmul: bool = False
    exclude: tuple[str, ...] = ()
    max_loss: float | None = None
    upgrade_opset: bool = False
    samples: int | None = None
    layer_sqnr: bool = True

    def __post_init__(self) -> None:
        if self.max_loss is not None and not 0.0 <= self.max_loss < 1.0:
            raise ValueError("max_loss must be in [0, 1)")
        if self.samples is not None and self.samples < 1:
            raise ValueError("samples must be at least 1")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError("percentile must be in (50, 100]")


class PtqPass(Pass[PtqOptions]):
    """Static int8 post-training quantization with the target's quantizer policy."""

    info = PassInfo(
        name="ptq",
        summary="int8 post-training quantization (calibrated QDQ, per-channel weights)",
        tolerance="quantized",
    )
    Options = PtqOptions

    # ------------------------------------------------------------------ checks
    def check_requires(self, model: ir.Model, ctx: PassContext) -> None:
        if self.options.mode == "dynamic":
            raise UsageError(
                "ptq: mode=dynamic is not implemented yet; use mode=static with --calib PATH"
            )
        if ctx.calibration is None:
            raise UsageError(
                "ptq(mode=static) needs calibration data: pass --calib PATH (an .npz file or "
                "a folder of .npz feeds keyed by graph-input name)"
            )
        if not self.options.upgrade_opset:
            check_opset(model, self.info.name)

    # ------------------------------------------------------------------ run
    def config(self) -> QuantConfig:
        o = self.options
        return QuantConfig(
            per_channel=o.per_channel,
            reduce_range=o.reduce_range,
            exclude=o.exclude,
            act_matmul=o.act_matmul,
        )

    def calibration_analysis(self, plan: QuantPlan, quantizer: Quantizer) -> ActivationStatsAnalysis:
        o = self.options
        kwargs: dict[str, Any] = {}
        if o.calib == "percentile":
            kwargs["percentile"] = o.percentile
        elif o.calib == "mse":
            kwargs["spec"] = quantizer.activation_spec
        elif o.calib == "entropy":
            kwargs["symmetric"] = quantizer.activation_spec.symmetric
        return ActivationStatsAnalysis(tuple(plan.activation_values()), o.calib, **kwargs)

    def run(self, model: ir.Model, ctx: PassContext, am: AnalysisManager) -> PassResult:
        o = self.options
        stats: dict[str, Any] = {}
        upgraded = False
        opset = model_opset(model)
        if opset is None or opset < MIN_OPSET:
            _upgrade_opset(model, MIN_OPSET)
            stats["opset_upgraded"] = f"{opset} -> {MIN_OPSET}"
            upgraded = True
        if o.samples is not None:
            ctx = dataclasses.replace(ctx, calibration=_limited(ctx, o.samples))
            am = AnalysisManager(ctx)
        quantizer = get_quantizer(ctx.target)
        config = self.config()
        plan = quantizer.annotate(model, config)
        if not plan.units:
            stats.update(plan.summary())
            stats["skip_reasons"] = [s.reason for s in plan.skipped][:50]
            return PassResult(model, upgraded, preserved=PreservedAnalyses.none(), stats=stats)

        analysis = self.calibration_analysis(plan, quantizer)
        calib = am.get(analysis, model)
        plan.calibration = analysis
        finalize_plan(plan, calib, config)

        reference: bytes | None = None
        want_eval = o.layer_sqnr or o.max_loss is not None
        if want_eval:
            reference = ir.serde.serialize_model(model).SerializeToString()

        if o.max_loss is not None and reference is not None:
            loss, restored = _fit_max_loss(model, plan, ctx, am, reference, o.max_loss, config, calib)
            stats["output_loss"] = loss
            stats["kept_float_for_max_loss"] = restored

        insert = InsertQDQPass(plan, ctx)
        result = insert.run(model, ctx, am)
        stats.update(result.stats)
        stats.update(plan.summary())
        stats["target"] = quantizer.name
        stats["observer"] = o.calib
        stats["calibration_samples"] = calib.samples
        stats["calibration_seconds"] = round(calib.seconds, 2)
        stats["activation_spec"] = quantizer.activation_spec.to_text()
        weights = [u.weight.spec.to_text() for u in plan.live_units() if u.weight is not None]
        if weights:
            stats["weight_spec"] = sorted(set(weights))
        reasons = [s.reason for s in plan.skipped]
        stats["skip_reasons"] = reasons[:50] + ([f"... {len(reasons) - 50} more"] if len(reasons) > 50 else [])
        if o.layer_sqnr and reference is not None:
            try:
                stats["layer_sqnr_db"] = _layer_sqnr(reference, model, plan, ctx)
            except Exception as e:  # noqa: BLE001 - a report, never a failure
                logger.warning("ptq: per-node SQNR not measured: %s", e)
        modified = bool(result.modified or upgraded)
        return PassResult(model, modified, preserved=PreservedAnalyses.none(), stats=stats)


# ----------------------------------------------------------------------------- helpers


def _limited(ctx: PassContext, n: int) -> Any:
    source = ctx.calibration

    def limited() -> Any:
        import itertools

        assert source is not None
        return itertools.islice(iter(source()), n)

    return limited


def _upgrade_opset(model: ir.Model, target: int) -> None:
    """Converts the model in place to ``target`` with onnx's version converter."""
    import onnx.version_converter

    proto = ir.serde.serialize_model(model)
    try:
        converted = onnx.version_converter.convert_version(proto, target)
    except Exception as e:  # noqa: BLE001 - the converter raises many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InvalidModelError(
            f"ptq: cannot upgrade the model to opset {target}: {first}"
        ) from None
    converted.ir_version = max(converted.ir_version, 7)
    fresh = ir.serde.deserialize_model(converted)
    model.graph = fresh.graph
    model.ir_version = fresh.ir_version
    model.functions.clear()
    model.functions.update(fresh.functions)
    logger.info("ptq: upgraded the model to opset %d", target)


def _eval_feeds(ctx: PassContext, n: int = EVAL_FEEDS) -> list[Mapping[str, np.ndarray]]:
    feeds = []
    for i, feed in enumerate(ctx.calibration_feeds()):
        if i >= n:
            break
        feeds.append(feed)
    return feeds


def _session(data: bytes, scratch: Path, name: str, extra_outputs: Sequence[tuple[str, int]] = ()) -> Any:
    from graphopt.verify.runner import make_session

    proto = onnx.ModelProto()
    proto.ParseFromString(data)
    existing = {o.name for o in proto.graph.output}
    for value, elem in extra_outputs:
        if value not in existing:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(value, elem, None))
    path = scratch / name
    if proto.ByteSize() > 2**31 - 1024:
        onnx.save_model(proto, str(path), save_as_external_data=True, location=name + ".data")
    else:
        path.write_bytes(proto.SerializeToString())
    return make_session(path, threads=2, optimize=False)


def _run(session: Any, feed: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
    wanted = {i.name for i in session.get_inputs()}
    out = session.run(list(names), {k: v for k, v in feed.items() if k in wanted})
    return dict(zip(names, out, strict=True))


def _layer_sqnr(reference: bytes, model: ir.Model, plan: QuantPlan, ctx: PassContext) -> dict[str, float]:
    """Output SQNR (dB) of every quantized node, float model vs quantized model."""
    outputs = []
    for u in plan.live_units():
        out = u.node.outputs[0]
        if out.name and out.dtype == ir.DataType.FLOAT:
            outputs.append((u.node.name or out.name, out.name))
    extra = [(v, onnx.TensorProto.FLOAT) for _, v in outputs]
    feeds = _eval_feeds(ctx, 2)
    if not feeds or not outputs:
        return {}
    with tempfile.TemporaryDirectory(prefix="graphopt-ptq-") as scratch:
        quantized = ir.serde.serialize_model(model).SerializeToString()
        ref_s = _session(reference, Path(scratch), "float.onnx", extra)
        q_s = _session(quantized, Path(scratch), "quant.onnx", extra)
        names = [v for _, v in outputs]
        signal: dict[str, float] = dict.fromkeys(names, 0.0)
        noise: dict[str, float] = dict.fromkeys(names, 0.0)
        for feed in feeds:
            a = _run(ref_s, feed, names)
            b = _run(q_s, feed, names)
            for n in names:
                r = a[n].astype(np.float64)
                signal[n] += float(np.sum(r * r))
                noise[n] += float(np.sum((r - b[n].astype(np.float64)) ** 2))
    result = {}
    for label, n in outputs:
        if noise[n] == 0:
            result[label] = math.inf
        elif signal[n] == 0:
            result[label] = -math.inf
        else:
            result[label] = round(10 * math.log10(signal[n] / noise[n]), 2)
    return result


def output_loss(ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]) -> float:
    """``1 - cosine`` between float and quantized outputs, worst over float outputs."""
    worst = 0.0
    for name, r in ref.items():
        if r.dtype.kind != "f" or name not in got:
            continue
        a = r.astype(np.float64).reshape(-1)
        b = got[name].astype(np.float64).reshape(-1)
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        if na == 0 and nb == 0:
            continue
        cos = float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0
        worst = max(worst, 1.0 - cos)
    return worst


def _fit_max_loss(
    model: ir.Model,
    plan: QuantPlan,
    ctx: PassContext,
    am: AnalysisManager,
    reference: bytes,
    max_loss: float,
    config: QuantConfig,
    calib: ActivationStats,
) -> tuple[float, list[str]]:
    """Returns the most sensitive units to float until the output loss is within bound.

    Sensitivity of a unit: the output loss when only that unit is quantized... is too
    costly (one model per unit); instead each unit's own output SQNR in the fully
    quantized model ranks them (lowest first), and units are returned to float in
    doubling batches, measuring the output loss after each batch.
    """
    from graphopt.passes.quantize.plan import build_groups, compute_group_qparams

    feeds = _eval_feeds(ctx)
    if not feeds:
        return 0.0, []
    ref_proto = reference

    def trial(dropped: set[int]) -> tuple[float, dict[str, float]]:
        trial_model = ir.serde.deserialize_model(_parse(ref_proto))
        trial_plan = _replay_plan(trial_model, plan, dropped, config, calib)
        InsertQDQPass(trial_plan, ctx).run(trial_model, ctx, AnalysisManager(ctx))
        with tempfile.TemporaryDirectory(prefix="graphopt-ptq-") as scratch:
            outs = [o.name for o in model.graph.outputs if o.name]
            unit_outs = [
                (u.node.name, u.node.outputs[0].name)
                for u in plan.live_units()
                if u.node.outputs[0].name and u.node.outputs[0].dtype == ir.DataType.FLOAT
            ]
            extra = [(v, onnx.TensorProto.FLOAT) for _, v in unit_outs]
            ref_s = _session(ref_proto, Path(scratch), "float.onnx", extra)
            q_s = _session(
                ir.serde.serialize_model(trial_model).SerializeToString(),
                Path(scratch), "quant.onnx", extra,
            )
            names = outs + [v for _, v in unit_outs if v not in outs]
            loss = 0.0
            sig: dict[str, float] = {}
            noi: dict[str, float] = {}
            for feed in feeds:
                a = _run(ref_s, feed, names)
                b = _run(q_s, feed, names)
                loss = max(loss, output_loss({k: a[k] for k in outs}, {k: b[k] for k in outs}))
                for label, v in unit_outs:
                    r = a[v].astype(np.float64)
                    sig[label] = sig.get(label, 0.0) + float(np.sum(r * r))
                    noi[label] = noi.get(label, 0.0) + float(np.sum((r - b[v]) ** 2))
        sq = {k: (10 * math.log10(sig[k] / noi[k]) if noi[k] > 0 and sig[k] > 0 else math.inf) for k in sig}
        return loss, sq

    dropped: set[int] = set()
    loss, sqnr = trial(dropped)
    logger.info("ptq: output loss with every node quantized: %.5f (bound %g)", loss, max_loss)
    order = sorted(
        (i for i, u in enumerate(plan.units) if u.live),
        key=lambda i: sqnr.get(plan.units[i].node.name, math.inf),
    )
    batch = 1
    while loss > max_loss and len(dropped) < len(order):
        for i in order:
            if len(dropped) >= len(order):
                break
            if i in dropped:
                continue
            dropped.add(i)
            if sum(1 for j in order if j in dropped) >= batch:
                break
        loss, _ = trial(dropped)
        logger.info("ptq: %d nodes in float: output loss %.5f", len(dropped), loss)
        batch *= 2
    restored = []
    for i in sorted(dropped):
        unit = plan.units[i]
        plan.drop_unit(unit, f"{unit.node.name or unit.node.op_type}: kept in float for max_loss",
                       "max-loss")
        restored.append(unit.node.name or unit.node.op_type)
    if dropped:
        build_groups(plan, config)
        compute_group_qparams(plan, calib)
    return loss, restored


def _parse(data: bytes) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    proto.ParseFromString(data)
    return proto


def _replay_plan(
    model: ir.Model, plan: QuantPlan, dropped: set[int], config: QuantConfig, calib: ActivationStats
) -> QuantPlan:
    """The same plan on a fresh copy of the model (matched by node position)."""
    from graphopt.passes.quantize.plan import build_groups, compute_group_qparams

    nodes = list(model.graph)
    index = {id(n): i for i, n in enumerate(plan.units[0].node.graph or [])} if plan.units else {}
    fresh = QuantPlan(target=plan.target)
    mapping: dict[int, Any] = {}
    for i, unit in enumerate(plan.units):
        if not unit.live or i in dropped:
            continue
        pos = index[id(unit.node)]
        node = nodes[pos]
        mapping[id(unit.node)] = node
        new = dataclasses.replace(
            unit,
            node=node,
            activations=[dataclasses.replace(e, node=node) for e in unit.activations],
            weight=dataclasses.replace(unit.weight, node=node) if unit.weight else None,
            bias=dataclasses.replace(unit.bias, node=node) if unit.bias else None,
        )
        fresh.units.append(new)
    for edge_set in plan.shared:
        fresh.shared.append(
            [dataclasses.replace(e, node=mapping[id(e.node)]) for e in edge_set if id(e.node) in mapping]
        )
    build_groups(fresh, config)
    compute_group_qparams(fresh, calib)
    return fresh
