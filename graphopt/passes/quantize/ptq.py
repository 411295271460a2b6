"""``ptq``: int8 post-training quantization (static, calibrated; or dynamic).

Matches: the compute nodes (Conv, Gemm, MatMul with a constant weight) the target's
quantizer policy selects (:mod:`graphopt.backends.ort_quant`,
:mod:`graphopt.backends.tensorrt_quant`), minus ``exclude`` and anything whose calibrated
input range is unusable (attention-mask fills).

Changes: annotate -> calibrate (:class:`~graphopt.analysis.ActivationStatsAnalysis` over
``--calib``) -> insert Q/DQ (:class:`~graphopt.passes.quantize.insert.InsertQDQPass`).
With ``max_loss`` the most sensitive nodes are returned to float until the outputs on
the calibration feeds are within the bound. ``mode=dynamic`` needs no calibration: the
MatMul/Gemm weights are stored as int8 per output channel and the activations are
quantized at run time (:mod:`graphopt.passes.quantize.dynamic`); ``--calib``, when given,
is used for the per-layer SQNR and ``max_loss``.

Preserves: graph inputs/outputs; numerics within the ``quantized`` tolerance (SQNR >= 30
dB per output on realistic data).

Example (``graphopt optimize m.onnx -o q.onnx --passes ptq --calib feeds/``)::

    before: y = MatMul(LayerNorm(x), W)
    after:  y = MatMul(DQ(Q(LayerNorm(x))), DQ(W_int8, axis=1))

Statistics: nodes quantized (by op), values left in float with the reason (``mask path:
'val_105' range [-3.4e+38, 0]``), the observer and calibration samples, per-node output
SQNR on the first calibration feeds, and the output loss when ``max_loss`` is set.
``layers`` lists every candidate node with its decision (``quantized``, ``float`` with
the reason, ``float (max_loss)``) and its output SQNR in dB (the SQNR it had quantized,
for nodes returned to float).
"""

from __future__ import annotations

import contextlib
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
from graphopt.passes.quantize.dynamic import (
    DYNAMIC_MIN_OPSET,
    DynamicPlan,
    InsertDynamicQuantPass,
    check_dynamic_opset,
    layer_rows,
    plan_dynamic,
)
from graphopt.passes.quantize.insert import MIN_OPSET, InsertQDQPass, check_opset, model_opset
from graphopt.passes.quantize.plan import (
    QuantConfig,
    QuantPlan,
    Skip,
    build_groups,
    compute_group_qparams,
    finalize_plan,
    node_label,
)
from graphopt.passes.quantize.quantizer import Quantizer

logger = logging.getLogger(__name__)

Calib = Literal["minmax", "percentile", "entropy", "mse"]

#: Calibration feeds used to measure per-node SQNR and the output loss.
EVAL_FEEDS = 4
#: Up to this many nodes, max_loss ranks nodes by the output loss with each quantized
#: alone (one model run per node); beyond, by the noise each adds in one run.
ISOLATED_SENSITIVITY_MAX = 64


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
            (int8 weights, activations quantized at run time; MatMul/Gemm only; no
            calibration needed).
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
    """int8 post-training quantization (static or dynamic) with the target's policy."""

    info = PassInfo(
        name="ptq",
        summary="int8 post-training quantization (calibrated QDQ, per-channel weights)",
        tolerance="quantized",
    )
    Options = PtqOptions

    # ------------------------------------------------------------------ checks
    def check_requires(self, model: ir.Model, ctx: PassContext) -> None:
        if self.options.mode == "dynamic":
            if not get_quantizer(ctx.target).supports_dynamic:
                raise UsageError(
                    f"ptq(mode=dynamic): target {ctx.target!r} has no dynamic int8 kernels; "
                    "use mode=static with --calib PATH"
                )
            if self.options.max_loss is not None and ctx.calibration is None:
                raise UsageError(
                    "ptq(mode=dynamic,max_loss=...) measures the loss on calibration data: "
                    "pass --calib PATH or drop max_loss"
                )
            if not self.options.upgrade_opset:
                check_dynamic_opset(model, self.info.name)
            return
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
        stats: dict[str, Any] = {"mode": o.mode}
        upgraded = False
        opset = model_opset(model)
        needed = DYNAMIC_MIN_OPSET if o.mode == "dynamic" else MIN_OPSET
        if opset is None or opset < needed:
            _upgrade_opset(model, needed)
            stats["opset_upgraded"] = f"{opset} -> {needed}"
            upgraded = True
        if o.samples is not None and ctx.calibration is not None:
            ctx = dataclasses.replace(ctx, calibration=_limited(ctx, o.samples))
            am = AnalysisManager(ctx)
        if o.mode == "dynamic":
            return self._run_dynamic(model, ctx, am, stats, upgraded)
        quantizer = get_quantizer(ctx.target)
        config = self.config()
        plan = quantizer.annotate(model, config)
        if not plan.units and not plan.gathers:
            stats.update(plan.summary())
            stats["skip_reasons"] = [s.reason for s in plan.skipped][:50]
            return PassResult(model, upgraded, preserved=PreservedAnalyses.none(), stats=stats)

        analysis = self.calibration_analysis(plan, quantizer)
        if analysis.values:
            calib = am.get(analysis, model)
        else:  # weight-only (embedding tables): nothing to calibrate
            calib = ActivationStats({}, 0, 0.0, o.calib)
        plan.calibration = analysis
        finalize_plan(plan, calib, config)

        restored_sqnr: dict[str, float] = {}
        candidates = [(node_label(u.node), u.node.op_type) for u in plan.units]
        op_of = _op_types(model)
        with contextlib.ExitStack() as stack:
            evaluator: _Evaluator | None = None
            if o.layer_sqnr or o.max_loss is not None:
                scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="graphopt-ptq-")))
                reference = ir.serde.serialize_model(model).SerializeToString()
                probes = [v for _, x, y in _unit_values(plan) for v in (x, y)]
                evaluator = _Evaluator(reference, _eval_feeds(ctx), probes, scratch)
                if o.max_loss is not None:
                    loss, restored, restored_sqnr = _fit_max_loss(
                        model, plan, ctx, evaluator, reference, o.max_loss, config, calib
                    )
                    stats["output_loss"] = loss
                    stats["kept_float_for_max_loss"] = restored
                del reference
            result = InsertQDQPass(plan, ctx).run(model, ctx, am)
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
            more = [f"... {len(reasons) - 50} more"] if len(reasons) > 50 else []
            stats["skip_reasons"] = reasons[:50] + more
            if evaluator is not None and o.layer_sqnr and plan.live_units():
                stats["layer_sqnr_db"] = _layer_sqnr(evaluator, model, _unit_values(plan))
        live = {node_label(u.node) for u in plan.live_units()}
        stats["layers"] = layer_records(
            candidates, live, plan.skipped, stats.get("layer_sqnr_db", {}), restored_sqnr, op_of
        )
        modified = bool(result.modified or upgraded)
        return PassResult(model, modified, preserved=PreservedAnalyses.none(), stats=stats)

    # ------------------------------------------------------------------ dynamic
    def _run_dynamic(
        self, model: ir.Model, ctx: PassContext, am: AnalysisManager, stats: dict[str, Any],
        upgraded: bool,
    ) -> PassResult:
        o = self.options
        quantizer = get_quantizer(ctx.target)
        config = self.config()
        plan = plan_dynamic(model, quantizer, config)
        candidates = [(layer.label, layer.node.op_type) for layer in plan.layers]
        op_of = _op_types(model)
        restored_sqnr: dict[str, float] = {}
        measure = ctx.calibration is not None and (o.layer_sqnr or o.max_loss is not None)
        with contextlib.ExitStack() as stack:
            evaluator: _Evaluator | None = None
            rows = layer_rows(plan)
            if measure and plan.layers:
                scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="graphopt-ptq-")))
                reference = ir.serde.serialize_model(model).SerializeToString()
                probes = [v for _, x, y in rows for v in (x, y)]
                evaluator = _Evaluator(reference, _eval_feeds(ctx), probes, scratch)
                if o.max_loss is not None:
                    loss, restored, restored_sqnr = _fit_max_loss_dynamic(
                        model, plan, ctx, evaluator, reference, o.max_loss, rows
                    )
                    stats["output_loss"] = loss
                    stats["kept_float_for_max_loss"] = restored
                del reference
            modified = upgraded
            if plan.live_layers():
                result = InsertDynamicQuantPass(plan, ctx).run(model, ctx, am)
                stats.update(result.stats)
                modified = modified or result.modified
            if plan.gathers:
                tables = QuantPlan(target=plan.target, gathers=list(plan.gathers))
                gathered = InsertQDQPass(tables, ctx).run(model, ctx, am)
                stats["embedding_tables_quantized"] = gathered.stats.get("embedding_tables_quantized", 0)
                wb = stats.setdefault("weight_bytes", {"float": 0, "int8": 0})
                for k in ("float", "int8"):
                    wb[k] = wb.get(k, 0) + gathered.stats["weight_bytes"][k]
                modified = modified or gathered.modified
            stats.update(plan.summary())
            stats["target"] = quantizer.name
            stats["activation_spec"] = "u8:asym:tensor:dynamic"
            weights = [layer.weight.spec.to_text() for layer in plan.live_layers()]
            if weights:
                stats["weight_spec"] = sorted(set(weights))
            reasons = [s.reason for s in plan.skipped]
            more = [f"... {len(reasons) - 50} more"] if len(reasons) > 50 else []
            stats["skip_reasons"] = reasons[:50] + more
            live_labels = {layer.label for layer in plan.live_layers()}
            if evaluator is not None and o.layer_sqnr and live_labels:
                stats["layer_sqnr_db"] = _layer_sqnr(
                    evaluator, model, [r for r in rows if r[0] in live_labels]
                )
        stats["layers"] = layer_records(
            candidates, live_labels, plan.skipped, stats.get("layer_sqnr_db", {}), restored_sqnr,
            op_of,
        )
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


def output_loss(ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]) -> float:
    """``1 - cosine`` between float and quantized outputs (each flattened), worst output."""
    worst = 0.0
    for name, r in ref.items():
        if r.dtype.kind != "f" or name not in got:
            continue
        a = r.astype(np.float64).reshape(-1)
        b = got[name].astype(np.float64).reshape(-1)
        na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
        if na == 0 and nb == 0:
            continue
        cos = float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0
        worst = max(worst, 1.0 - cos)
    return worst


@dataclasses.dataclass
class _Evaluation:
    loss: float
    signal: dict[str, float]
    noise: dict[str, float]

    def relative_noise(self, value: str) -> float:
        s = self.signal.get(value, 0.0)
        return self.noise.get(value, 0.0) / s if s > 0 else 0.0

    def sqnr_db(self, value: str) -> float:
        n, s = self.noise.get(value, 0.0), self.signal.get(value, 0.0)
        if n == 0:
            return math.inf
        if s == 0:
            return -math.inf
        return 10 * math.log10(s / n)


class _Evaluator:
    """The float model's outputs and probe values on a few calibration feeds, compared
    with a candidate's (sessions with optimizations off)."""

    def __init__(
        self, reference: bytes, feeds: Sequence[Mapping[str, np.ndarray]], probes: Sequence[str],
        scratch: Path,
    ) -> None:
        self.scratch = scratch
        proto = _parse(reference)
        self.outputs = [o.name for o in proto.graph.output]
        self.probes = list(dict.fromkeys(probes))
        self.extra = [p for p in self.probes if p not in self.outputs]
        session = self._session(reference, "float.onnx")
        self.feeds = list(feeds)
        self.expected = [_run(session, f, self.outputs + self.extra) for f in self.feeds]
        del session

    def _session(self, data: bytes, name: str) -> Any:
        from graphopt.verify.runner import make_session

        proto = _parse(data)
        for value in self.extra:
            proto.graph.output.append(
                onnx.helper.make_tensor_value_info(value, onnx.TensorProto.FLOAT, None)
            )
        path = self.scratch / name
        if proto.ByteSize() > 2**31 - 1024:
            onnx.save_model(proto, str(path), save_as_external_data=True, location=name + ".data")
        else:
            path.write_bytes(proto.SerializeToString())
        return make_session(path, threads=2, optimize=False)

    def evaluate(self, candidate: ir.Model) -> _Evaluation:
        data = ir.serde.serialize_model(candidate).SerializeToString()
        session = self._session(data, "candidate.onnx")
        loss = 0.0
        signal: dict[str, float] = dict.fromkeys(self.probes, 0.0)
        noise: dict[str, float] = dict.fromkeys(self.probes, 0.0)
        for feed, want in zip(self.feeds, self.expected, strict=True):
            got = _run(session, feed, self.outputs + self.extra)
            loss = max(
                loss,
                output_loss({k: want[k] for k in self.outputs}, {k: got[k] for k in self.outputs}),
            )
            for p in self.probes:
                r = want[p].astype(np.float64)
                signal[p] += float(np.sum(r * r))
                noise[p] += float(np.sum((r - got[p].astype(np.float64)) ** 2))
        return _Evaluation(loss, signal, noise)


def _parse(data: bytes) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    proto.ParseFromString(data)
    return proto


def _run(session: Any, feed: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
    wanted = {i.name for i in session.get_inputs()}
    out = session.run(list(names), {k: v for k, v in feed.items() if k in wanted})
    return dict(zip(names, out, strict=True))


def _unit_values(plan: QuantPlan) -> list[tuple[str, str, str]]:
    """(label, input value, output value) of each live unit with float names."""
    rows = []
    for u in plan.live_units():
        x = u.activations[0].value
        y = u.node.outputs[0]
        if x.name and y.name and y.dtype == ir.DataType.FLOAT:
            rows.append((node_label(u.node), x.name, y.name))
    return rows


def _layer_sqnr(evaluator: _Evaluator, model: ir.Model, rows: Sequence[tuple[str, str, str]]) -> dict[str, float]:
    """Output SQNR (dB) of every quantized node, float model vs quantized model."""
    result = evaluator.evaluate(model)
    return {label: round(result.sqnr_db(y), 2) for label, _, y in rows}


def _replay(model: ir.Model, plan: QuantPlan, copy: ir.Model, dropped: set[int],
            config: QuantConfig, calib: ActivationStats) -> QuantPlan:
    """The plan, without the units in ``dropped``, on a copy of the model (nodes matched
    by position)."""
    position = {id(n): i for i, n in enumerate(model.graph)}
    nodes = list(copy.graph)

    def move(e: Any) -> Any:
        return dataclasses.replace(e, node=nodes[position[id(e.node)]], group=None)

    fresh = QuantPlan(target=plan.target)
    kept: set[int] = set()
    for i, unit in enumerate(plan.units):
        if not unit.live or i in dropped:
            continue
        kept.add(id(unit.node))
        fresh.units.append(dataclasses.replace(
            unit,
            node=nodes[position[id(unit.node)]],
            activations=[move(e) for e in unit.activations],
            weight=move(unit.weight) if unit.weight else None,
            bias=move(unit.bias) if unit.bias else None,
        ))
    for edge_set in plan.shared:
        fresh.shared.append([move(e) for e in edge_set if id(e.node) in kept])
    build_groups(fresh, config)
    compute_group_qparams(fresh, calib)
    return fresh


def _fit_max_loss(
    model: ir.Model,
    plan: QuantPlan,
    ctx: PassContext,
    evaluator: _Evaluator,
    reference: bytes,
    max_loss: float,
    config: QuantConfig,
    calib: ActivationStats,
) -> tuple[float, list[str], dict[str, float]]:
    """Returns the most harmful nodes to float until the output loss is within bound
    (static plan; see :func:`_search_float_set`).

    Returns:
        The output loss reached, the labels of the nodes returned to float, and their
        output SQNR (dB) with every node quantized.
    """
    live = [i for i, u in enumerate(plan.units) if u.live]
    labels = {r[0]: r for r in _unit_values(plan)}
    rows = {
        i: labels.get(node_label(plan.units[i].node))
        for i in live
    }

    def trial(dropped: set[int]) -> _Evaluation:
        copy = ir.serde.deserialize_model(_parse(reference))
        trial_plan = _replay(model, plan, copy, dropped, config, calib)
        if trial_plan.units:
            InsertQDQPass(trial_plan, ctx).run(copy, ctx, AnalysisManager(ctx))
        return evaluator.evaluate(copy)

    loss, dropped, first = _search_float_set(live, rows, trial, max_loss)
    restored: list[str] = []
    restored_sqnr: dict[str, float] = {}
    for i in dropped:
        unit = plan.units[i]
        label = node_label(unit.node)
        plan.drop_unit(unit, f"{label}: kept in float for max_loss={max_loss:g}", "max-loss")
        restored.append(label)
        row = rows.get(i)
        if row is not None:
            restored_sqnr[label] = round(first.sqnr_db(row[2]), 2)
    if dropped:
        build_groups(plan, config)
        compute_group_qparams(plan, calib)
    return loss, restored, restored_sqnr


def _fit_max_loss_dynamic(
    model: ir.Model,
    plan: DynamicPlan,
    ctx: PassContext,
    evaluator: _Evaluator,
    reference: bytes,
    max_loss: float,
    rows: Sequence[tuple[str, str, str]],
) -> tuple[float, list[str], dict[str, float]]:
    """:func:`_fit_max_loss` for a dynamic plan."""
    live = [i for i, layer in enumerate(plan.layers) if layer.live]
    by_label = {r[0]: r for r in rows}
    row_of = {i: by_label.get(plan.layers[i].label) for i in live}
    position = {id(n): k for k, n in enumerate(model.graph)}

    def trial(dropped: set[int]) -> _Evaluation:
        copy = ir.serde.deserialize_model(_parse(reference))
        nodes = list(copy.graph)
        trial_plan = DynamicPlan(target=plan.target, share_inputs=plan.share_inputs)
        for i in live:
            if i in dropped:
                continue
            layer = plan.layers[i]
            node = nodes[position[id(layer.node)]]
            weight = dataclasses.replace(layer.weight, node=node)
            trial_plan.layers.append(dataclasses.replace(layer, node=node, weight=weight))
        if trial_plan.layers:
            InsertDynamicQuantPass(trial_plan, ctx).run(copy, ctx, AnalysisManager(ctx))
        return evaluator.evaluate(copy)

    loss, dropped, first = _search_float_set(live, row_of, trial, max_loss)
    restored: list[str] = []
    restored_sqnr: dict[str, float] = {}
    for i in dropped:
        layer = plan.layers[i]
        plan.drop(layer, f"{layer.label}: kept in float for max_loss={max_loss:g}", "max-loss")
        restored.append(layer.label)
        row = row_of.get(i)
        if row is not None:
            restored_sqnr[layer.label] = round(first.sqnr_db(row[2]), 2)
    return loss, restored, restored_sqnr


def _search_float_set(
    live: Sequence[int],
    rows: Mapping[int, tuple[str, str, str] | None],
    trial: Any,
    max_loss: float,
) -> tuple[float, list[int], _Evaluation]:
    """The smallest set of the most harmful nodes whose return to float meets the bound.

    Harm of a node: the output loss with that node alone quantized (up to
    :data:`ISOLATED_SENSITIVITY_MAX` nodes), else the relative noise it adds (``noise /
    signal`` of its output minus that of its input) with every node quantized. The
    smallest prefix of that order whose return to float meets the bound is found by
    doubling then bisection, each step measured on a fresh quantized copy (``trial``:
    indices kept in float -> evaluation).

    Returns:
        The loss reached, the indices returned to float (most harmful first) and the
        evaluation with every node quantized.
    """
    first = trial(set())
    loss = first.loss
    logger.info("ptq: output loss with every node quantized: %.3g (max_loss %g)", loss, max_loss)

    def noise_added(i: int) -> float:
        row = rows.get(i)
        if row is None:
            return 0.0
        _, x, y = row
        return first.relative_noise(y) - first.relative_noise(x)

    if loss <= max_loss:
        return loss, [], first
    if len(live) <= ISOLATED_SENSITIVITY_MAX:
        # Exact: the output loss with only that node quantized (one trial per node).
        isolated = {i: trial(set(live) - {i}).loss for i in live}
        order = sorted(live, key=lambda i: (isolated[i], noise_added(i)), reverse=True)
    else:
        order = sorted(live, key=noise_added, reverse=True)
    losses: dict[int, float] = {0: loss, len(order): 0.0}

    def loss_with(k: int) -> float:
        """Output loss with the ``k`` most harmful nodes in float."""
        if k not in losses:
            losses[k] = trial(set(order[:k])).loss
            logger.info("ptq: %d nodes in float: output loss %.3g", k, losses[k])
        return losses[k]

    # Doubling to bracket the smallest prefix that meets the bound, then bisection.
    lo, hi = 0, 1
    while hi < len(order) and loss_with(hi) > max_loss:
        lo, hi = hi, min(2 * hi, len(order))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if loss_with(mid) <= max_loss:
            hi = mid
        else:
            lo = mid
    return loss_with(hi), list(order[:hi]), first


def _op_types(model: ir.Model) -> dict[str, str]:
    """Op type by node label (name, else ``<op>``), as skips name nodes."""
    return {node_label(n): n.op_type for n in model.graph}


#: Skip categories that name a value rather than a node (their node gets its own skip).
_VALUE_CATEGORIES = frozenset({"mask-path", "huge-range", "float-bias"})


def layer_records(
    candidates: Sequence[tuple[str, str]],
    live: set[str],
    skipped: Sequence[Skip],
    sqnr: Mapping[str, float],
    restored_sqnr: Mapping[str, float],
    ops: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """One record per candidate node: its decision, the reason and its SQNR.

    Args:
        candidates: ``(label, op type)`` of every node the policy considered (in graph
            order); node-level skips not among them are appended.
        live: Labels of the nodes quantized.
        skipped: The plan's skips (reasons).
        sqnr: Output SQNR (dB) of quantized nodes.
        restored_sqnr: Output SQNR (dB) nodes returned to float by max_loss had quantized.
        ops: Op type by node label, for skipped nodes that are not candidates.

    Returns:
        ``{"node", "op", "decision", "reason", "sqnr_db"}`` dicts; decision is
        ``quantized``, ``float`` or ``float (max_loss)``; sqnr_db is None when unmeasured.
    """
    reasons: dict[str, Skip] = {}
    for s in skipped:
        if s.category not in _VALUE_CATEGORIES:
            reasons.setdefault(s.what, s)
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    for label, op in candidates:
        if label in seen:
            continue
        seen.add(label)
        skip = reasons.get(label)
        if label in live:
            decision, reason, db = "quantized", "", sqnr.get(label)
        elif skip is not None and skip.category == "max-loss":
            decision, reason, db = "float (max_loss)", skip.reason, restored_sqnr.get(label)
        else:
            decision = "float"
            reason = skip.reason if skip is not None else "not quantized"
            db = None
        records.append({"node": label, "op": op, "decision": decision, "reason": reason,
                        "sqnr_db": db})
    for what, skip in reasons.items():
        if what not in seen:
            seen.add(what)
            records.append({"node": what, "op": (ops or {}).get(what, ""), "decision": "float",
                            "reason": skip.reason, "sqnr_db": None})
    return records
