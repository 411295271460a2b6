"""The ``cleanup`` pipeline: registration, the reliability rules end to end, and a slow
sweep over the onnx package's backend test models."""

from __future__ import annotations

import glob
import logging
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from _cleanup_support import assert_bit_exact, assert_valid, header, ort_outputs, signature
from onnx import numpy_helper

from graphopt.infra import Aspect, PassContext, default_registry
from graphopt.passes.cleanup import (
    CLEANUP_PIPELINE,
    EliminateCommonSubexpressionsPass,
    EliminateDeadCodePass,
    FoldConstantsPass,
    RemoveIdentityPass,
    SimplifyShapesPass,
)
from graphopt.testing.builders import model_from_text, op_types, random_feeds, to_proto

H = header()
PASSES = [
    FoldConstantsPass,
    RemoveIdentityPass,
    SimplifyShapesPass,
    EliminateCommonSubexpressionsPass,
    EliminateDeadCodePass,
]

MIXED = f"""{H}
g (float[B,4,6] x, float[6] gi) => (float[B,4,2,3] y, int64[2] s, float[6] z, float[B,4,6] x_out)
  <float[6] gi = {{1.0, 2.0, 3.0, 4.0, 5.0, 6.0}}, float[6] c = {{0.5, 0.5, 0.5, 0.5, 0.5, 0.5}},
   float[6] c_copy = {{0.5, 0.5, 0.5, 0.5, 0.5, 0.5}}, float[2] unused = {{9.0, 9.0}}> {{
    sh = Shape(x)
    i0 = Constant<value = int64 {{0}}>()
    b = Gather(sh, i0)
    ax = Constant<value = int64[1] {{0}}>()
    bu = Unsqueeze(b, ax)
    four = Constant<value = int64[1] {{4}}>()
    two = Constant<value = int64[1] {{2}}>()
    three = Constant<value = int64[1] {{3}}>()
    t = Concat<axis = 0>(bu, four, two, three)
    ix = Identity(x)
    r = Reshape(ix, t)
    d = Dropout(r)
    y = Relu(d)
    s = Shape<start = 1>(x)
    cc = Add(c, c_copy)
    p1 = Mul(gi, cc)
    p2 = Mul(gi, cc)
    z0 = Add(p1, p2)
    z = Cast<to = 1>(z0)
    dead = Neg(gi)
    x_out = Identity(x)
}}"""


def cleanup() -> object:
    return default_registry(plugins=False).build("cleanup")


def test_registry_entries() -> None:
    registry = default_registry(plugins=False)
    for cls in PASSES:
        assert registry.passes[cls.info.name] is cls
        assert cls.info.tolerance == "exact"
        assert cls.info.name == cls.info.name.lower() and " " not in cls.info.name
        assert cls.__name__.endswith("Pass")
    assert registry.pipelines["cleanup"].text == CLEANUP_PIPELINE
    pm = registry.build("cleanup")
    assert pm.to_text() == CLEANUP_PIPELINE
    assert registry.build(pm.to_text()).to_text() == CLEANUP_PIPELINE
    assert registry.build("default").to_text() == CLEANUP_PIPELINE + ",fuse"


def test_options_round_trip_through_pipeline_text() -> None:
    registry = default_registry(plugins=False)
    text = (
        "fold-constants(max_output_mb=1.5,fold_float_math=true),"
        "simplify-shapes(trust_dim_params=true),"
        "eliminate-common-subexpressions(max_constant_bytes=16)"
    )
    assert registry.build(text).to_text() == text


def test_mixed_model_end_to_end() -> None:
    before = to_proto(model_from_text(MIXED))
    model = model_from_text(MIXED)
    result = cleanup().execute(model)
    after = to_proto(model)
    assert_valid(after)
    assert signature(after) == signature(before)
    for batch in (1, 3):
        feeds = {
            "x": np.random.default_rng(batch).standard_normal((batch, 4, 6)).astype(np.float32),
            "gi": np.arange(6, dtype=np.float32),
        }
        assert_bit_exact(before, after, feeds)
    # The Cast stays: z0 has no type in the model and remove-identity never assumes one.
    assert op_types(model) == ["Reshape", "Relu", "Mul", "Add", "Cast", "Identity"]
    # the graph-input initializer is not folded; the dead, the duplicates and the
    # identities are gone; the input->output Identity stays
    assert sorted(model.graph.initializers) == ["cc", "gi", "s", "t_static"]
    assert model.graph.initializers["t_static"].const_value.numpy().tolist() == [0, 4, 2, 3]
    assert result.stats["fixpoint.rounds"] >= 2
    assert not result.preserved.preserves(Aspect.STRUCTURE)


def test_pipeline_is_idempotent_and_deterministic() -> None:
    model = model_from_text(MIXED)
    cleanup().execute(model)
    once = to_proto(model).SerializeToString()
    again = cleanup().execute(model)
    assert not again.modified
    assert again.stats["fixpoint.rounds"] == 1
    assert to_proto(model).SerializeToString() == once
    other = model_from_text(MIXED)
    cleanup().execute(other)
    assert to_proto(other).SerializeToString() == once


def test_clean_model_is_reproduced_exactly() -> None:
    text = """<ir_version: 8, opset_import: ["" : 17, "com.unused" : 1, "local" : 1],
      producer_name: "me", producer_version: "1.2", doc_string: "a model",
      metadata_props: ["k" : "v"]>
    g (float[N,3] x) => (float[N,2] y) <float[3,2] w = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0}> {
        ["mm"] m = MatMul(x, w)
        ["call"] y = local.f(m)
    }
    <domain: "local", opset_import: ["" : 17]>
    f (p) => (q) {
        i = Identity(p)
        q = Relu(i)
    }"""
    proto = onnx.parser.parse_model(text)
    proto.graph.node[0].doc_string = "node doc"
    reference = to_proto(ir.serde.deserialize_model(proto)).SerializeToString()
    model = ir.serde.deserialize_model(proto)
    result = cleanup().execute(model)
    assert not result.modified
    assert to_proto(model).SerializeToString() == reference


def test_empty_and_numeric_node_names() -> None:
    model = model_from_text(MIXED)
    for i, node in enumerate(model.graph):
        node.name = "" if i % 2 else str(i)
    before = to_proto(model)
    cleanup().execute(model)
    after = to_proto(model)
    assert_valid(after)
    assert_bit_exact(before, after, random_feeds(before, dim_value=3))


def test_duplicate_node_names() -> None:
    # ORT refuses such models, but the checker accepts them and so must the passes.
    model = model_from_text(MIXED)
    for node in model.graph:
        node.name = "dup"
    cleanup().execute(model)
    onnx.checker.check_model(to_proto(model), full_check=True)


def test_custom_nodes_and_functions_survive_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    text = f"""{header(extra='"com.acme" : 1, "local" : 1')}
    g (float[2] x) => (float[2] y) <float[2] c = {{1.0, 2.0}}> {{
        a = com.acme.Op(c)
        b = local.f(x)
        u = com.acme.Unused(x)
        y = Add(a, b)
    }}
    <domain: "local", opset_import: ["" : 17]>
    f (p) => (q) {{
        c = Constant<value = float[2] {{1.0, 2.0}}>()
        d = Add(c, c)
        q = Add(p, d)
    }}"""
    before = to_proto(model_from_text(text))
    model = model_from_text(text)
    with caplog.at_level(logging.WARNING):
        cleanup().execute(model)
    after = to_proto(model)
    assert op_types(model) == ["com.acme::Op", "local::f", "com.acme::Unused", "Add"]
    assert after.functions == before.functions
    assert after.opset_import == before.opset_import
    warnings = [r for r in caplog.records if "custom-domain" in r.getMessage()]
    assert len(warnings) == 1  # once per model, not once per fixpoint round


def test_passes_run_through_onnx_ir_interfaces() -> None:
    model = model_from_text(MIXED)
    result = ir.passes.Sequential(*(cls() for cls in PASSES))(model)
    assert result.modified
    assert_valid(to_proto(model))


def test_verify_each_accepts_every_intermediate_model() -> None:
    model = model_from_text(MIXED)
    cleanup().execute(model, PassContext(verify_each=True))


# -- slow: onnx backend test models ------------------------------------------------------

_DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"


def _case_dirs() -> list[str]:
    dirs = []
    for group in ("pytorch-converted", "pytorch-operator", "simple", "node"):
        dirs += sorted(glob.glob(str(_DATA / group / "*")))
    # a deterministic sample: every third case, plus every light model (below)
    return [d for d in dirs if os.path.exists(os.path.join(d, "model.onnx"))][::3]


def _load_case(directory: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    proto = onnx.load(os.path.join(directory, "model.onnx"))
    initializers = {t.name for t in proto.graph.initializer}
    names = [i.name for i in proto.graph.input if i.name not in initializers]
    feeds = {}
    for name, path in zip(
        names, sorted(glob.glob(os.path.join(directory, "test_data_set_0", "input_*.pb")))
    ):
        tensor = onnx.TensorProto()
        tensor.ParseFromString(Path(path).read_bytes())
        feeds[name] = numpy_helper.to_array(tensor)
    return proto, feeds


def _check_cleanup(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> onnx.ModelProto:
    try:
        ort_outputs(proto, feeds)
    except Exception as e:  # noqa: BLE001 - ORT cannot run the original (old opsets, string locales...)
        pytest.skip(f"ORT cannot run the original: {str(e)[:80]}")
    model = ir.serde.deserialize_model(proto)
    cleanup().execute(model)
    after = to_proto(model)
    assert_valid(after)
    assert signature(after) == signature(proto)
    assert_bit_exact(proto, after, feeds)
    assert not cleanup().execute(model).modified
    return after


@pytest.mark.slow
@pytest.mark.parametrize("directory", _case_dirs(), ids=os.path.basename)
def test_backend_case(directory: str) -> None:
    proto, feeds = _load_case(directory)
    _check_cleanup(proto, feeds)


@pytest.mark.slow
@pytest.mark.parametrize(
    "path", sorted(glob.glob(str(_DATA / "light" / "*.onnx"))), ids=os.path.basename
)
def test_light_model(path: str) -> None:
    # IR 3 models: every initializer is a graph input, so nothing may be folded.
    proto = onnx.load(path)
    after = _check_cleanup(proto, random_feeds(proto, seed=0))
    assert len(after.graph.initializer) == len(proto.graph.initializer)
    assert [n.op_type for n in after.graph.node].count("ConstantOfShape") == [
        n.op_type for n in proto.graph.node
    ].count("ConstantOfShape")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Converting a tensor to a Python")
def test_torch_exported_attention(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")

    class Attention(torch.nn.Module):  # type: ignore[name-defined,misc]
        def __init__(self, dim: int = 16, heads: int = 2) -> None:
            super().__init__()
            self.heads = heads
            self.qkv = torch.nn.Linear(dim, 3 * dim)
            self.out = torch.nn.Linear(dim, dim)

        def forward(self, x):  # type: ignore[no-untyped-def]
            b, t, d = x.shape
            q, k, v = self.qkv(x).split(d, dim=-1)
            q = q.view(b, t, self.heads, d // self.heads).transpose(1, 2)
            k = k.view(b, t, self.heads, d // self.heads).transpose(1, 2)
            v = v.view(b, t, self.heads, d // self.heads).transpose(1, 2)
            a = (q @ k.transpose(-1, -2)).softmax(-1)
            return self.out((a @ v).transpose(1, 2).reshape(b, t, d))

    path = tmp_path / "attention.onnx"
    torch.manual_seed(0)
    torch.onnx.export(
        Attention().eval(),
        (torch.randn(2, 5, 16),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "B", 1: "T"}},
    )
    proto = onnx.load(str(path))
    for pipeline in (
        "cleanup",
        (
            "fixpoint(fold-constants,remove-identity,simplify-shapes(trust_dim_params=true),"
            "eliminate-common-subexpressions,eliminate-dead-code)"
        ),
    ):
        model = ir.serde.deserialize_model(proto)
        default_registry(plugins=False).build(pipeline).execute(model)
        after = to_proto(model)
        assert_valid(after)
        for shape in ((1, 3, 16), (4, 7, 16)):
            feeds = {"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
            assert_bit_exact(proto, after, feeds)
        assert len(after.graph.node) < len(proto.graph.node)
    # trusting dim_params removes every run-time shape computation feeding a Reshape
    assert all(n.op_type != "Concat" for n in after.graph.node)


def test_loop_body_is_cleaned_recursively() -> None:
    text = f"""{H}
    g (float[2,3] x, int64 n) => (float[2,3] y) {{
        cond = Constant<value = bool {{1}}>()
        y = Loop(n, cond, x) <body = body (int64 i, bool c, float[2,3] acc) => (bool c_out, float[2,3] acc_out) {{
            c_out = Identity(c)
            k = Constant<value = float[3] {{1.0, 2.0, 3.0}}>()
            k2 = Add(k, k)
            s = Shape(acc)
            r = Reshape(acc, s)
            a1 = Add(r, k2)
            a2 = Add(r, k2)
            dead = Neg(a1)
            acc_out = Mul(a1, a2)
        }}>
    }}"""
    before = to_proto(model_from_text(text))
    model = model_from_text(text)
    cleanup().execute(model)
    after = to_proto(model)
    assert_valid(after)
    feeds = {"x": np.full((2, 3), 0.5, np.float32), "n": np.array(3, np.int64)}
    assert_bit_exact(before, after, feeds)
    body = model.graph.node(1).attributes["body"].as_graph()
    # c_out = Identity(c) stays (a body input wired to a body output); k2 is folded; the
    # Shape folds and the no-op Reshape goes; a2 merges into a1; Neg is dead.
    assert [n.op_type for n in body] == ["Identity", "Constant", "Add", "Mul"]
    assert [v.name for v in body.outputs] == ["c_out", "acc_out"]
    assert not cleanup().execute(model).modified
