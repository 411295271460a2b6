"""Third-party plugins through entry points: ``tests/plugin_fixture`` is pip-installed into
a temporary ``--target`` folder and the installed ``graphopt`` script runs with it on
``PYTHONPATH`` (the project's own environment is never touched)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper
from reliability_support import (
    TreeGuard,
    assert_one_line_error,
    finish_model,
    run_script,
    save_model,
)

FIXTURE = Path(__file__).resolve().parents[1] / "plugin_fixture"


@pytest.fixture(scope="session")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the installed example plugin (``graphopt-plugin-example``)."""
    work = tmp_path_factory.mktemp("plugin")
    # Build from a copy: pip builds in the source tree (build/, *.egg-info), which must
    # neither dirty the repository nor race with another xdist worker.
    source = work / "src"
    shutil.copytree(FIXTURE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    target = work / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
         "--no-index", "--quiet", "--disable-pip-version-check", "--target", str(target),
         str(source)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"installing the plugin fixture failed:\n{proc.stdout}\n{proc.stderr}")
    assert list(target.glob("graphopt_plugin_example*.dist-info")), sorted(target.iterdir())
    return target


def _env(plugin_path: Path) -> dict[str, str]:
    return {"PYTHONPATH": str(plugin_path), "COLUMNS": "200"}


def _model_with_doc_strings() -> onnx.ModelProto:
    then_graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["t"], name="neg", doc_string="inner doc")],
        "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Abs", ["x"], ["e"], name="abs")],
        "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])],
    )
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0, name="sum",
                             doc_string="outer doc"),
            helper.make_node("Cast", ["s"], ["c"], to=TensorProto.BOOL, name="cast"),
            helper.make_node("If", ["c"], ["y"], then_branch=then_graph, else_branch=else_graph,
                             name="if", doc_string="if doc"),
        ],
        "docs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        doc_string="graph doc stays",
    )
    return finish_model(graph)


def _node_doc_strings(model: onnx.ModelProto) -> list[str]:
    docs: list[str] = []
    graphs = [model.graph]
    for graph in graphs:
        for node in graph.node:
            docs.append(node.doc_string)
            graphs.extend(a.g for a in node.attribute if a.HasField("g"))
    return [d for d in docs if d]


def test_passes_lists_the_plugin_pass(plugin_path: Path) -> None:
    result = run_script(["passes"], env=_env(plugin_path))
    assert result.code == 0, result.err
    line = next(ln for ln in result.out.splitlines() if "clear-node-doc-strings" in ln)
    assert "example" in line, line


def test_passes_without_plugins_does_not_list_it(plugin_path: Path) -> None:
    result = run_script(["passes", "--no-plugins"], env=_env(plugin_path))
    assert result.code == 0, result.err
    assert "clear-node-doc-strings" not in result.out


def test_plugin_pass_runs(plugin_path: Path, tmp_path: Path) -> None:
    model = _model_with_doc_strings()
    assert _node_doc_strings(model) == ["outer doc", "if doc", "inner doc"]
    src = save_model(model, tmp_path / "in" / "m.onnx")
    (tmp_path / "out").mkdir()
    guard = TreeGuard(tmp_path).freeze()
    dest = tmp_path / "out" / "o.onnx"
    result = run_script(
        ["optimize", src, "-o", dest, "--passes", "clear-node-doc-strings", "--no-latency"],
        env=_env(plugin_path),
    )
    assert result.code == 0, result.err
    guard.assert_inputs_intact([src])
    out = onnx.load(str(dest))
    assert _node_doc_strings(out) == []
    assert out.graph.doc_string == "graph doc stays"
    provenance = {p.key: p.value for p in out.metadata_props}
    assert provenance.get("graphopt.pipeline") == "clear-node-doc-strings"


def test_no_plugins_makes_the_plugin_pass_unknown(plugin_path: Path, tmp_path: Path) -> None:
    src = save_model(_model_with_doc_strings(), tmp_path / "in" / "m.onnx")
    (tmp_path / "out").mkdir()
    guard = TreeGuard(tmp_path).freeze()
    result = run_script(
        ["optimize", src, "-o", tmp_path / "out" / "o.onnx", "--passes",
         "clear-node-doc-strings", "--no-plugins", "--no-latency"],
        env=_env(plugin_path),
    )
    assert_one_line_error(result, 2, "unknown pass 'clear-node-doc-strings'")
    guard.assert_unchanged()
