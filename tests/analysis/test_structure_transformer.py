"""Attention/FFN structure discovery: synthetic fused nodes, MiniLM and SmolLM2 exports."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import onnx_ir as ir
import pytest

from graphopt.analysis.structure.transformer import TransformerStructureAnalysis, find_structure
from graphopt.infra.analysis import AnalysisManager
from graphopt.testing.builders import model_from_text

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def test_fused_attention_is_reported_as_skipped() -> None:
    model = model_from_text(
        """
        <ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>
        g (float[1, 4, 8] x) => (float[1, 4, 8] y) <float[8, 24] w, float[24] b> {
            y = com.microsoft.Attention <num_heads: int = 2> (x, w, b)
        }
        """
    )
    s = find_structure(model.graph)
    assert s.attention == [] and s.ffn == []
    assert [r for _, r in s.skipped] == ["skipped: fused"]


def _mlp(activation: str | None) -> ir.Model:
    rng = np.random.default_rng(0)
    inits = [
        onh.from_array(rng.normal(size=(8, 16)).astype(np.float32), "w1"),
        onh.from_array(rng.normal(size=(16,)).astype(np.float32), "b1"),
        onh.from_array(rng.normal(size=(16, 8)).astype(np.float32), "w2"),
    ]
    nodes = [oh.make_node("MatMul", ["x", "w1"], ["h"]), oh.make_node("Add", ["h", "b1"], ["hb"])]
    if activation:
        nodes.append(oh.make_node(activation, ["hb"], ["r"]))
    nodes.append(oh.make_node("MatMul", ["r" if activation else "hb", "w2"], ["y"]))
    graph = oh.make_graph(
        nodes, "mlp",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 8])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 8])],
        inits,
    )
    return ir.serde.deserialize_model(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]))


def test_mlp_without_activation_region_is_not_an_ffn() -> None:
    # Two chained projections with only a bias between them: no intermediate to prune.
    assert find_structure(_mlp(None).graph).ffn == []


def test_relu_mlp_is_an_ffn_and_analysis_caches() -> None:
    model = _mlp("Relu")
    am = AnalysisManager()
    s = am.get(TransformerStructureAnalysis(), model)
    assert am.get(TransformerStructureAnalysis(), model) is s
    (ffn,) = s.ffn
    assert ffn.intermediate == 16 and ffn.up.bias is not None and ffn.gate is None
    assert ffn.activation == "Relu"


@pytest.mark.slow
def test_minilm_dynamo_export() -> None:
    from models import minilm

    s = find_structure(ir.load(minilm.build("dynamo")).graph)
    assert [b.num_heads for b in s.attention] == [12] * 6
    assert {b.head_dim for b in s.attention} == {32}
    assert all(b.q.bias is not None and b.o.bias is not None for b in s.attention)
    assert [b.intermediate for b in s.ffn] == [1536] * 6
    assert {b.activation for b in s.ffn} == {"Gelu"} and all(b.gate is None for b in s.ffn)
    assert s.skipped == []


@pytest.mark.slow
def test_smollm2_gqa_and_swiglu() -> None:
    from models import smollm2

    s = find_structure(ir.load(smollm2.build("no-cache")).graph)
    assert len(s.attention) == 30 and len(s.ffn) == 30
    assert {(b.num_heads, b.num_kv_heads, b.head_dim) for b in s.attention} == {(9, 3, 64)}
    assert s.attention[0].q.name == "model.layers.0.self_attn.q_proj.weight.T"
    assert s.attention[0].o.name == "model.layers.0.self_attn.o_proj.weight.T"
    ffn = s.ffn[5]
    assert ffn.gate is not None and ffn.gate.name == "model.layers.5.mlp.gate_proj.weight.T"
    assert ffn.up.name == "model.layers.5.mlp.up_proj.weight.T"
    assert ffn.down.name == "model.layers.5.mlp.down_proj.weight.T"
    assert ffn.intermediate == 1536
