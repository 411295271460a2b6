"""Pass contract, pass manager, analyses and registry."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as ir_common
import pytest

from graphopt.errors import PassError, PluginError, UnknownPassError, UsageError
from graphopt.infra import (
    Analysis,
    AnalysisManager,
    Aspect,
    Options,
    Pass,
    PassContext,
    PassInfo,
    PassManager,
    PassRegistry,
    PassResult,
    PreservedAnalyses,
    TimingInstrument,
)

MODEL_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,3] x) => (float[2,3] y) {
    a = Relu(x)
    b = Neg(a)
    y = Neg(b)
}
"""


def make_model() -> ir.Model:
    return ir.serde.deserialize_model(onnx.parser.parse_model(MODEL_TEXT))


@dataclasses.dataclass(frozen=True)
class DropNegOptions(Options):
    """Options of the test pass."""

    limit: int = 100
    mode: Literal["fast", "slow"] = "fast"
    tag: str | None = None
    flag: bool = False


class DropDoubleNegPass(Pass[DropNegOptions]):
    """Rewrites Neg(Neg(x)) to x (test pass)."""

    info = PassInfo(name="drop-double-neg", summary="test pass")
    Options = DropNegOptions

    def run(self, model: ir.Model, ctx: PassContext, am: AnalysisManager) -> PassResult:
        changed = 0
        for node in list(model.graph):
            if node.op_type != "Neg" or changed >= self.options.limit:
                continue
            producer = node.inputs[0].producer() if node.inputs[0] is not None else None
            if producer is None or producer.op_type != "Neg":
                continue
            out = node.outputs[0]
            source = producer.inputs[0]
            assert source is not None
            if out.is_graph_output():
                # Keep the graph output's name: an Identity takes over the output.
                ident = ir.node("Identity", [source], name="keep_output")
                model.graph.insert_before(node, ident)
                name = out.name
                out.replace_all_uses_with(ident.outputs[0], replace_graph_outputs=True)
                model.graph.remove(node, safe=True)
                ident.outputs[0].name = name
                ident.outputs[0].type = out.type
                ident.outputs[0].shape = out.shape
            else:
                out.replace_all_uses_with(source)
                model.graph.remove(node, safe=True)
            changed += 1
        for node in list(model.graph):
            if node.op_type == "Neg" and not any(o.uses() or o.is_graph_output() for o in node.outputs):
                model.graph.remove(node, safe=True)
        return PassResult(
            model, changed > 0, preserved=PreservedAnalyses.only(Aspect.WEIGHTS),
            stats={"rewritten": changed},
        )


class FailingPass(Pass[Options]):
    """Always raises (test pass)."""

    info = PassInfo(name="always-fail", summary="test pass")

    def run(self, model: ir.Model, ctx: PassContext, am: AnalysisManager) -> PassResult:
        raise ValueError("boom")


class NodeCount(Analysis[int]):
    """Counts nodes (test analysis)."""

    name = "node-count"
    depends_on = Aspect.STRUCTURE
    runs = 0

    def run(self, model: ir.Model, am: AnalysisManager, ctx: PassContext) -> int:
        NodeCount.runs += 1
        return len(list(model.graph))


def test_options_parse_types_and_errors() -> None:
    opts = DropNegOptions.parse({"limit": "3", "mode": "slow", "tag": "none", "flag": "true"})
    assert opts == DropNegOptions(limit=3, mode="slow", tag=None, flag=True)
    assert opts.to_text() == "limit=3,mode=slow,flag=true"
    for bad in ({"limit": "x"}, {"mode": "medium"}, {"nope": "1"}, {"flag": "maybe"}):
        with pytest.raises(UsageError):
            DropNegOptions.parse(bad)


def test_pass_runs_and_reports_stats() -> None:
    model = make_model()
    ctx = PassContext()
    timing = TimingInstrument()
    ctx.instruments.append(timing)
    pm = PassManager([DropDoubleNegPass()])
    result = pm.execute(model, ctx)
    assert result.modified
    assert result.stats == {"drop-double-neg.rewritten": 1}
    assert [n.op_type for n in model.graph] == ["Relu", "Identity"]
    assert model.graph.outputs[0].name == "y"
    assert timing.records[0].nodes_before == 3 and timing.records[0].nodes_after == 2
    again = PassManager([DropDoubleNegPass()]).execute(model, ctx)
    assert not again.modified and again.preserved == PreservedAnalyses.all()


def test_graphopt_pass_runs_inside_onnx_ir_pipelines() -> None:
    model = make_model()
    pipeline = ir.passes.PassManager([DropDoubleNegPass(), ir_common.RemoveUnusedNodesPass()])
    result = pipeline(model)
    assert result.modified
    onnx.checker.check_model(ir.serde.serialize_model(result.model), full_check=True)


def test_failure_names_pass_position_and_history() -> None:
    pm = PassManager([DropDoubleNegPass(), FailingPass()])
    with pytest.raises(PassError) as info:
        pm.execute(make_model())
    err = info.value
    assert err.pass_name == "always-fail" and err.position == 1
    assert err.already_run == ["drop-double-neg"]
    assert "boom" in str(err)


def test_analysis_cached_then_invalidated_by_unpreserved_aspect() -> None:
    model = make_model()
    am = AnalysisManager()
    NodeCount.runs = 0
    assert am.get(NodeCount(), model) == 3
    assert am.get(NodeCount(), model) == 3
    assert NodeCount.runs == 1 and am.hits == 1
    assert am.invalidate(PreservedAnalyses.only(Aspect.STRUCTURE, Aspect.SHAPES)) == []
    assert am.cached(NodeCount(), model) == 3
    assert am.invalidate(PreservedAnalyses.only(Aspect.WEIGHTS)) == ["node-count"]
    assert am.cached(NodeCount(), model) is None


def test_pass_manager_invalidates_between_passes() -> None:
    class UsesCount(Pass[Options]):
        info = PassInfo(name="uses-count", summary="")
        seen: ClassVar[list[int]] = []

        def run(self, model: ir.Model, ctx: PassContext, am: AnalysisManager) -> PassResult:
            UsesCount.seen.append(am.get(NodeCount(), model))
            return PassResult(model, False)

    UsesCount.seen = []
    NodeCount.runs = 0
    PassManager([UsesCount(), UsesCount(), DropDoubleNegPass(), UsesCount()]).execute(make_model())
    assert UsesCount.seen == [3, 3, 2]
    assert NodeCount.runs == 2


def test_registry_build_round_trips_and_rejects_unknown_and_duplicates() -> None:
    reg = PassRegistry()
    reg.register_pass(DropDoubleNegPass)
    reg.register_pipeline("both", "drop-double-neg(limit=2),drop-double-neg", "test")
    pm = reg.build("both,fixpoint(drop-double-neg(mode=slow),max_iter=3)")
    text = pm.to_text()
    assert text == (
        "drop-double-neg(limit=2),drop-double-neg,fixpoint(drop-double-neg(mode=slow),max_iter=3)"
    )
    assert reg.build(text).to_text() == text
    with pytest.raises(UnknownPassError, match="did you mean 'drop-double-neg'"):
        reg.build("drop-doubleneg")
    with pytest.raises(UsageError, match="column 1"):
        reg.build("drop-double-neg(limit=x)")
    with pytest.raises(PluginError, match="already registered"):
        reg.register_pass(DropDoubleNegPass)


def test_fixpoint_repeats_until_no_change() -> None:
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x) => (float[2] y) {
        a = Neg(x)
        b = Neg(a)
        c = Neg(b)
        d = Neg(c)
        y = Relu(d)
    }
    """
    model = ir.serde.deserialize_model(onnx.parser.parse_model(text))
    reg = PassRegistry()
    reg.register_pass(DropDoubleNegPass)
    result = reg.build("fixpoint(drop-double-neg(limit=1))").execute(model)
    assert result.stats["fixpoint.rounds"] == 3
    assert [n.op_type for n in model.graph] == ["Relu"]
