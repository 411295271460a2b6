"""RELIABILITY.md, "Bad input and odd graphs": graphs that are valid but unusual must go
through the default ``cleanup`` pipeline (with verification on ONNX Runtime unless noted)
and keep their interface: graph input/output names, order, dtypes and ``dim_param``s."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from reliability_support import (
    CliResult,
    TreeGuard,
    assert_one_line_error,
    finish_model,
    ort_run,
    save_model,
)

Cli = Callable[..., CliResult]


def _io_signature(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """Graph inputs and outputs as text (name, dtype, dims): what must never change."""

    def sig(values: list[onnx.ValueInfoProto]) -> list[str]:
        return [str(onnx.helper.printable_value_info(v)) for v in values]

    return sig(list(model.graph.input)), sig(list(model.graph.output))


def _optimize_ok(cli: Cli, tmp_path: Path, model: onnx.ModelProto, *extra: str) -> onnx.ModelProto:
    """Runs ``optimize --passes cleanup`` on ``model``; checks success, intact input and a
    valid, signature-preserving output; returns the output."""
    src = save_model(model, tmp_path / "in" / "m.onnx")
    (tmp_path / "out").mkdir()
    guard = TreeGuard(tmp_path).freeze()
    dest = tmp_path / "out" / "o.onnx"
    result = cli("optimize", src, "-o", dest, "--passes", "cleanup", "--no-latency", *extra)
    assert result.code == 0, result.err
    guard.assert_inputs_intact([src])
    out = onnx.load(str(dest))
    onnx.checker.check_model(out, full_check=True)
    assert _io_signature(out) == _io_signature(model)
    return out


# ---------------------------------------------------------------------- node names


def test_empty_and_numeric_node_names(cli: Cli, tmp_path: Path) -> None:
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["x", "x"], ["a"], name=""),
            helper.make_node("Mul", ["a", "x"], ["b"], name=""),
            helper.make_node("Relu", ["b"], ["c"], name="0"),
            helper.make_node("Neg", ["c"], ["d"], name="1"),
            helper.make_node("Identity", ["d"], ["e"], name="2"),  # removed by cleanup
            helper.make_node("Abs", ["e"], ["y"], name="-1"),
        ],
        "names",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    model = finish_model(graph)
    out = _optimize_ok(cli, tmp_path, model)  # verified on ONNX Runtime
    _assert_generated_names_unique(model, out)
    assert [n.op_type for n in out.graph.node] == ["Add", "Mul", "Relu", "Neg", "Abs"]
    assert [n.name for n in out.graph.node if n.name in {"0", "1", "-1"}] == ["0", "1", "-1"]


def _assert_generated_names_unique(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    had = {n.name for n in before.graph.node}
    counts = Counter(n.name for n in after.graph.node)
    generated = [name for name in counts if name and name not in had]
    assert all(counts[name] == 1 for name in generated), counts


def _duplicate_names_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["x", "x"], ["a"], name="dup"),
            helper.make_node("Mul", ["a", "x"], ["b"], name="dup"),
            helper.make_node("Identity", ["b"], ["c"], name="dup"),  # removed by cleanup
            helper.make_node("Relu", ["c"], ["y"], name="dup"),
        ],
        "duplicates",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    return finish_model(graph)  # the ONNX checker accepts duplicate node names


def test_duplicate_node_names_work(cli: Cli, tmp_path: Path) -> None:
    """The ONNX standard allows repeated node names; graphopt keeps them as they came in
    and passes no names of its own twice."""
    model = _duplicate_names_model()
    out = _optimize_ok(cli, tmp_path, model, "--no-verify")
    _assert_generated_names_unique(model, out)
    assert [n.op_type for n in out.graph.node] == ["Add", "Mul", "Relu"]


def test_duplicate_node_names_are_verified_on_a_renamed_copy(
    cli: Cli, tmp_path: Path
) -> None:
    """ONNX Runtime refuses duplicate node names ("two nodes with same node name"), so the
    verification runs renamed in-memory copies; the published model keeps the names."""
    model = _duplicate_names_model()
    out = _optimize_ok(cli, tmp_path, model)
    assert [n.name for n in out.graph.node] == ["dup", "dup", "dup"]  # Identity removed


# ---------------------------------------------------------------------- initializers


def test_initializer_that_is_a_graph_input_is_not_folded(cli: Cli, tmp_path: Path) -> None:
    """``scale`` has a default value but callers may override it: not a constant."""
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["scale", "scale"], ["twice"], name="twice"),
            helper.make_node("Mul", ["x", "twice"], ["y"], name="mul"),
            helper.make_node("Add", ["k", "k"], ["k2"], name="fold_me"),  # a true constant
            helper.make_node("Add", ["y", "k2"], ["z"], name="add_k"),
        ],
        "overridable",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [4]),
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, [4]),
        ],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [4])],
        initializer=[
            numpy_helper.from_array(np.full(4, 2.0, np.float32), "scale"),
            numpy_helper.from_array(np.full(4, 0.5, np.float32), "k"),
        ],
    )
    model = finish_model(graph)
    out = _optimize_ok(cli, tmp_path, model)
    assert [i.name for i in out.graph.input] == ["x", "scale"]
    assert "scale" in {t.name for t in out.graph.initializer}
    assert any(n.op_type == "Add" and list(n.input) == ["scale", "scale"] for n in out.graph.node)
    # Overriding the default still takes effect in the optimized model.
    feeds = {"x": np.ones(4, np.float32), "scale": np.full(4, 3.0, np.float32)}
    np.testing.assert_array_equal(ort_run(tmp_path / "out" / "o.onnx", feeds)[0], np.full(4, 7.0))


# ---------------------------------------------------------------------- graph outputs


def test_input_as_output_and_one_value_as_two_outputs(cli: Cli, tmp_path: Path) -> None:
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            helper.make_node("Identity", ["r"], ["y"], name="id_y"),
            helper.make_node("Identity", ["x"], ["x_copy"], name="id_x"),
        ],
        "passthrough",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3]),
            helper.make_tensor_value_info("x_copy", TensorProto.FLOAT, ["n", 3]),
        ],
    )
    model = finish_model(graph)
    out = _optimize_ok(cli, tmp_path, model)
    assert [o.name for o in out.graph.output] == ["x", "y", "y", "x_copy"]
    x = np.array([[-1, 0, 2], [3, -4, 5]], np.float32)
    got = ort_run(tmp_path / "out" / "o.onnx", {"x": x})
    for g, w in zip(got, [x, np.maximum(x, 0), np.maximum(x, 0), x]):
        np.testing.assert_array_equal(g, w)


# ---------------------------------------------------------------------- functions, domains


def _function_model() -> onnx.ModelProto:
    fn = helper.make_function(
        "local.fns",
        "ScaledRelu",
        ["a", "b"],
        ["c"],
        [
            helper.make_node("Mul", ["a", "b"], ["t"], name="fmul"),
            helper.make_node("Identity", ["t"], ["t2"], name="fid"),
            helper.make_node("Relu", ["t2"], ["c"], name="frelu"),
        ],
        opset_imports=[helper.make_opsetid("", 18)],
    )
    graph = helper.make_graph(
        [helper.make_node("ScaledRelu", ["x", "s"], ["y"], domain="local.fns", name="call")],
        "uses_function",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
        initializer=[numpy_helper.from_array(np.full((2, 2), 1.5, np.float32), "s")],
    )
    return finish_model(graph, opsets={"": 18, "local.fns": 1}, functions=[fn])


def test_model_local_function_preserved(cli: Cli, tmp_path: Path) -> None:
    model = _function_model()
    out = _optimize_ok(cli, tmp_path, model)  # verified on ONNX Runtime
    assert [(f.domain, f.name) for f in out.functions] == [("local.fns", "ScaledRelu")]
    assert out.functions[0] == model.functions[0]
    assert [(n.domain, n.op_type) for n in out.graph.node] == [("local.fns", "ScaledRelu")]
    assert {(o.domain, o.version) for o in out.opset_import} >= {("", 18), ("local.fns", 1)}


def _custom_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["x"], ["x1"], name="id"),
            helper.make_node("Scramble", ["x1"], ["z"], domain="com.example", name="custom",
                             seed=7),
            helper.make_node("Scramble", ["x1"], ["unused"], domain="com.example",
                             name="custom_unused"),
        ],
        "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [3])],
    )
    return finish_model(graph, opsets={"": 18, "com.example": 1})


def test_custom_domain_ops_preserved(cli: Cli, tmp_path: Path) -> None:
    """ONNX Runtime cannot run ``com.example::Scramble``, so verification is off here
    (``--no-verify``); the custom node must come through untouched. Custom ops have no
    schema, so even a custom node whose output is unused may have side effects: both stay.
    """
    model = _custom_model()
    out = _optimize_ok(cli, tmp_path, model, "--no-verify")
    custom = [n for n in out.graph.node if n.domain == "com.example"]
    assert [n.name for n in custom] == ["custom", "custom_unused"]
    assert custom[0].attribute == model.graph.node[1].attribute
    assert ("com.example", 1) in {(o.domain, o.version) for o in out.opset_import}


def test_custom_domain_ops_with_verification_fail_cleanly(cli: Cli, tmp_path: Path) -> None:
    """Without ``--no-verify`` the original cannot be run on ONNX Runtime: one line, 3."""
    src = save_model(_custom_model(), tmp_path / "in" / "m.onnx")
    (tmp_path / "out").mkdir()
    guard = TreeGuard(tmp_path).freeze()
    result = cli("optimize", src, "-o", tmp_path / "out" / "o.onnx", "--no-latency")
    # The cleanup pipeline warns that it left the custom nodes alone before verification
    # fails; the error itself is one line.
    assert_one_line_error(result, 3, "m.onnx", "Scramble", warnings_ok=True)
    guard.assert_unchanged()


# ---------------------------------------------------------------------- symbolic dims


def _symbolic_model() -> onnx.ModelProto:
    """Valid only when batch * seq == 15 (a fixed Reshape inside), symbolic at the edges."""
    graph = helper.make_graph(
        [
            helper.make_node("Shape", ["x"], ["shape"], name="shape"),
            helper.make_node("Reshape", ["x", "fixed"], ["flat"], name="flatten"),
            helper.make_node("Identity", ["flat"], ["flat2"], name="id"),
            helper.make_node("Reshape", ["flat2", "shape"], ["y"], name="restore"),
        ],
        "symbolic",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 4])],
        initializer=[numpy_helper.from_array(np.array([15, 4], np.int64), "fixed")],
        value_info=[helper.make_tensor_value_info("flat", TensorProto.FLOAT, [15, 4])],
    )
    return finish_model(graph)


def test_symbolic_dims_kept_and_bound_with_dim(cli: Cli, tmp_path: Path) -> None:
    model = _symbolic_model()
    out = _optimize_ok(cli, tmp_path, model, "--dim", "batch=3", "--dim", "seq=5")
    for value in (out.graph.input[0], out.graph.output[0]):
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        assert dims == ["batch", "seq", 4]


@pytest.mark.parametrize("dims", [[], ["--dim", "batch=2", "--dim", "seq=2"]])
def test_symbolic_dims_that_do_not_fit_fail_cleanly(
    cli: Cli, tmp_path: Path, dims: list[str]
) -> None:
    """Verification feeds use ``--dim`` (or guesses); a shape the model rejects is an error
    naming the model (3) and nothing written. (The one-line check is the xfail below.)"""
    src = save_model(_symbolic_model(), tmp_path / "in" / "m.onnx")
    (tmp_path / "out").mkdir()
    guard = TreeGuard(tmp_path).freeze()
    result = cli("optimize", src, "-o", tmp_path / "out" / "o.onnx", "--no-latency", *dims)
    assert result.code == 3, result.err
    last = result.err_lines[-1]
    assert last.startswith("graphopt: error: ") and "m.onnx" in last and "Reshape" in last
    guard.assert_unchanged()


def test_onnxruntime_run_errors_are_one_line(cli: Cli, tmp_path: Path) -> None:
    src = save_model(_symbolic_model(), tmp_path / "in" / "m.onnx")
    (tmp_path / "out").mkdir()
    result = cli("optimize", src, "-o", tmp_path / "out" / "o.onnx", "--no-latency")
    assert_one_line_error(result, 3, "m.onnx")
