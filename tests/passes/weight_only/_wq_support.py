"""Small synthetic models and runners for the weight-only pass tests."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from graphopt.infra.analysis import AnalysisManager
from graphopt.infra.context import PassContext
from graphopt.infra.pass_base import PassResult
from graphopt.passes.weight_only import QuantizeWeightsRtnPass, WeightOnlyOptions

K, N, VOCAB = 96, 80, 64


def _model(
    nodes: list[Any], inputs: list[Any], outputs: list[Any], inits: list[Any], opset: int = 20
) -> ir.Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 9
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


def weights(seed: int = 0) -> dict[str, np.ndarray]:
    """The float weights the builders use (returned so tests can compute references)."""
    rng = np.random.default_rng(seed)
    return {
        "w_kn": (rng.standard_normal((K, N)) * 0.1).astype(np.float32),
        "w_nk": (rng.standard_normal((N, K)) * 0.1).astype(np.float32),
        "bias": rng.standard_normal(N).astype(np.float32),
        "table": rng.standard_normal((VOCAB, K)).astype(np.float32),
        "small": rng.standard_normal((K, 8)).astype(np.float32),
    }


def mlp_model(seed: int = 0) -> ir.Model:
    """``x[B, S, K] -> MatMul(W[K, N]) -> h``; ``x2[M, K] -> Gemm(W[N, K], transB=1) + bias``;
    plus a tiny MatMul below ``min_dim``."""
    w = weights(seed)
    nodes = [
        helper.make_node("MatMul", ["x", "w_kn"], ["h"], name="mm"),
        helper.make_node("Gemm", ["x2", "w_nk", "bias"], ["g"], name="gemm", transB=1),
        helper.make_node("MatMul", ["x2", "small"], ["t"], name="tiny"),
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", K]),
        helper.make_tensor_value_info("x2", TensorProto.FLOAT, ["m", K]),
    ]
    outputs = [
        helper.make_tensor_value_info("h", TensorProto.FLOAT, ["b", "s", N]),
        helper.make_tensor_value_info("g", TensorProto.FLOAT, ["m", N]),
        helper.make_tensor_value_info("t", TensorProto.FLOAT, ["m", 8]),
    ]
    inits = [numpy_helper.from_array(w[k], k) for k in ("w_kn", "w_nk", "bias", "small")]
    return _model(nodes, inputs, outputs, inits)


def tied_model(seed: int = 0) -> ir.Model:
    """``ids -> Gather(table) -> e``; ``logits = MatMul(e, Transpose(table))`` (tied head)."""
    w = weights(seed)
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
        helper.make_node("Transpose", ["table"], ["table_t"], name="head_t", perm=[1, 0]),
        helper.make_node("MatMul", ["e", "table_t"], ["logits"], name="head"),
    ]
    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])]
    outputs = [
        helper.make_tensor_value_info("e", TensorProto.FLOAT, ["b", "s", K]),
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", VOCAB]),
    ]
    return _model(nodes, inputs, outputs, [numpy_helper.from_array(w["table"], "table")])


def feeds(seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((2, 3, K)).astype(np.float32),
        "x2": rng.standard_normal((5, K)).astype(np.float32),
        "ids": rng.integers(0, VOCAB, (2, 3)).astype(np.int64),
    }


def run_model(model: ir.Model, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Runs on ORT CPU with graph optimizations off."""
    proto = ir.serde.serialize_model(model)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    session = ort.InferenceSession(
        proto.SerializeToString(), so, providers=["CPUExecutionProvider"]
    )
    names = [i.name for i in session.get_inputs()]
    outs = session.run(None, {k: inputs[k] for k in names})
    return {o.name: v for o, v in zip(session.get_outputs(), outs, strict=True)}


def run_wq(model: ir.Model, target: str = "ort", **options: Any) -> PassResult:
    """Runs ``wq`` with ``options`` (raw text values or typed) in place."""
    opts = WeightOnlyOptions.parse({k: v for k, v in options.items()}, owner="wq")
    ctx = PassContext(target=target)
    return QuantizeWeightsRtnPass(opts).run_with(model, ctx, AnalysisManager(ctx))


def op_counts(model: ir.Model) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in model.graph:
        out[n.op_type] = out.get(n.op_type, 0) + 1
    return out
