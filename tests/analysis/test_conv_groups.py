"""Conv channel dependency groups (``graphopt.analysis.structure.conv_groups``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from graphopt.analysis.structure.conv_groups import ConvChannelGroupsAnalysis, conv_channel_groups
from graphopt.infra.analysis import AnalysisManager


class G:
    """Minimal graph builder: ``x`` is [1, 4, 6, 6]."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])]
        self.rng = np.random.default_rng(0)

    def const(self, name: str, arr: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def node(self, op: str, inputs: Sequence[str], out: str, **attrs: object) -> str:
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=out, **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, out: str, group: int = 1) -> str:
        w = self.const(f"{out}.w", self.rng.normal(size=(cout, cin // group, 1, 1)).astype(np.float32))
        return self.node("Conv", [x, w], out, group=group)

    def model(self, outputs: Sequence[str]) -> ir.Model:
        graph = helper.make_graph(
            self.nodes, "g", self.inputs,
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], self.inits,
        )  # fmt: skip
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        return ir.serde.deserialize_model(proto)


def by_sources(model: ir.Model) -> dict[tuple[str, ...], object]:
    return {tuple(g.sources): g for g in conv_channel_groups(model).groups}


def test_residual_add_merges_producers_into_one_group() -> None:
    g = G()
    g.conv("x", 4, 8, "a")
    g.conv(g.node("Relu", ["a"], "r"), 8, 8, "b")
    g.node("Add", ["a", "b"], "s")
    g.conv("s", 8, 2, "y")
    groups = by_sources(g.model(["y"]))
    group = groups[("a", "b")]
    assert len(group.components) == 8  # type: ignore[attr-defined]
    assert all(len(c) == 2 for c in group.components)  # type: ignore[attr-defined]
    assert groups[("y",)].skip_reason.startswith("reaches graph output")  # type: ignore[attr-defined]


def test_concat_layout_is_offset() -> None:
    g = G()
    g.conv("x", 4, 3, "a")
    g.conv("x", 4, 5, "b")
    g.node("Concat", ["a", "b"], "c", axis=1)
    g.conv("c", 8, 2, "y")
    model = g.model(["y"])
    result = conv_channel_groups(model)
    concat = next(n for n in model.graph if n.op_type == "Concat")
    layout = result.layouts[concat.outputs[0]]
    assert [result.unit_source[u] for u in layout] == ["a"] * 3 + ["b"] * 5
    assert [result.unit_channel[u] for u in layout] == [0, 1, 2, 0, 1, 2, 3, 4]
    consumer = next(s for s in result.slices if s.role == "consumer")
    assert consumer.node.name == "y" and consumer.axis == 1 and list(consumer.owners) == list(layout)


def test_grouped_conv_couples_each_group() -> None:
    g = G()
    g.conv("x", 4, 8, "a")
    g.conv("a", 8, 4, "gc", group=2)  # 4 input channels per group, 2 outputs per group
    g.conv("gc", 4, 2, "y")
    result = conv_channel_groups(g.model(["y"]))
    (group,) = [grp for grp in result.groups if grp.sources == ["a"]]
    assert sorted(len(c) for c in group.components) == [4, 4]
    attr = result.group_attrs[0]
    assert attr.node.name == "gc" and attr.per_group == 4


def test_flatten_repeats_units_per_spatial_position() -> None:
    g = G()
    g.conv("x", 4, 3, "a")
    g.node("Flatten", ["a"], "f", axis=1)
    w = g.const("fc", np.ones((5, 108), np.float32))
    g.node("Gemm", ["f", w], "y", transB=1)
    result = conv_channel_groups(g.model(["y"]))
    gemm = next(s for s in result.slices if s.node.name == "y")
    assert gemm.axis == 1 and len(gemm.owners) == 108
    assert [result.unit_channel[u] for u in gemm.owners[::36]] == [0, 1, 2]


def test_blocked_groups_say_why() -> None:
    g = G()
    g.conv("x", 4, 4, "a")
    shape = g.const("shape", np.array([1, 4, 36], np.int64))
    g.node("Reshape", ["a", shape], "ra")
    g.conv("x", 4, 4, "b")
    g.node("Resize", ["b", "", "", g.const("sizes", np.array([1, 4, 12, 12], np.int64))], "rb")
    g.conv("x", 4, 4, "c")
    g.node("Shape", ["c"], "sc")
    groups = by_sources(g.model(["ra", "rb", "sc"]))
    assert "not a flatten of the channel axis" in groups[("a",)].skip_reason  # type: ignore[attr-defined]
    assert "sizes" in groups[("b",)].skip_reason  # type: ignore[attr-defined]
    assert "Shape" in groups[("c",)].skip_reason  # type: ignore[attr-defined]


def test_non_constant_batchnorm_params_block() -> None:
    g = G()
    g.conv("x", 4, 4, "a")
    names = [g.const(f"p{i}", np.ones(4, np.float32)) for i in range(4)]
    g.inputs.append(helper.make_tensor_value_info("p0", TensorProto.FLOAT, [4]))  # overridable
    g.node("BatchNormalization", ["a", *names], "bn")
    g.conv("bn", 4, 2, "y")
    groups = by_sources(g.model(["y"]))
    assert "not a constant initializer" in groups[("a",)].skip_reason  # type: ignore[attr-defined]


def test_concat_with_graph_input_pins_its_positions() -> None:
    g = G()
    g.conv("x", 4, 4, "a")
    g.node("Concat", ["x", "a"], "c", axis=1)
    g.conv("c", 8, 2, "y")
    groups = by_sources(g.model(["y"]))
    assert len(groups[("a",)].free) == 4  # type: ignore[attr-defined]
    pinned = groups[("pinned:x",)]
    assert "not produced by a prunable conv" in pinned.skip_reason  # type: ignore[attr-defined]


def test_analysis_is_cached() -> None:
    g = G()
    g.conv(g.conv("x", 4, 4, "a"), 4, 2, "y")
    model = g.model(["y"])
    am = AnalysisManager()
    first = am.get(ConvChannelGroupsAnalysis(), model)
    assert am.get(ConvChannelGroupsAnalysis(), model) is first and am.hits == 1


def test_fused_conv_summand_couples_like_add() -> None:
    g = G()
    g.conv("x", 4, 6, "a")
    w = g.const("f.w", g.rng.normal(size=(6, 4, 1, 1)).astype(np.float32))
    b = g.const("f.b", np.zeros(6, np.float32))
    g.nodes.append(
        helper.make_node("FusedConv", ["x", w, b, "a"], ["f"], name="f", domain="com.microsoft", activation="Relu")
    )
    g.conv("f", 6, 2, "y")
    groups = by_sources(g.model(["y"]))
    group = groups[("a", "f")]
    assert len(group.components) == 6 and not group.blocked  # type: ignore[attr-defined]
