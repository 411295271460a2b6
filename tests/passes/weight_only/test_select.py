"""Which weights ``wq`` selects: ops, layouts, tied tables, exclusions, size floor."""

from __future__ import annotations

import onnx_ir as ir
import pytest
from _wq_support import VOCAB, K, N, mlp_model, tied_model
from onnx import TensorProto, helper, numpy_helper

from graphopt.passes.weight_only import WeightOnlyOptions, group_sites
from graphopt.passes.weight_only.selection import select_sites


def _select(model: ir.Model, **options: str) -> tuple[list[tuple[str, str, str]], list[str]]:
    sites, skipped = select_sites(model, WeightOnlyOptions.parse(options))
    return [(s.node.name, s.kind, s.layout) for s in sites], skipped


def test_matmul_and_gemm_transb_selected_tiny_skipped() -> None:
    model = mlp_model()
    chosen, skipped = _select(model)
    assert chosen == [("mm", "matmul", "kn"), ("gemm", "gemm", "nk")]
    assert any("tiny" in s and "min_dim" in s for s in skipped)
    sites, _ = select_sites(model, WeightOnlyOptions())
    assert sites[0].matrix().shape == (N, K)
    assert sites[1].matrix().shape == (N, K)
    assert sites[0].activation is not None and sites[0].activation.name == "x"


@pytest.mark.parametrize(
    ("pattern", "left"),
    [("mm", ["gemm"]), ("Gemm", ["mm"]), ("w_*", []), ("w_nk", ["mm"]), ("zz*", ["mm", "gemm"])],
)
def test_exclusion_by_node_weight_glob_or_op(pattern: str, left: list[str]) -> None:
    chosen, skipped = _select(mlp_model(), exclude=pattern)
    assert [c[0] for c in chosen] == left
    assert sum("excluded" in s for s in skipped) == 2 - len(left)


def test_tied_table_one_weight_two_uses() -> None:
    model = tied_model()
    sites, _ = select_sites(model, WeightOnlyOptions())
    grouped = group_sites(sites)
    assert list(grouped) == ["table"]
    kinds = sorted((s.kind, s.layout) for s in grouped["table"])
    assert kinds == [("gather", "nk"), ("matmul", "nk")]
    head = next(s for s in sites if s.kind == "matmul")
    assert head.transpose is not None and head.matrix().shape == (VOCAB, K)


def test_embeddings_false_keeps_gather_float() -> None:
    chosen, skipped = _select(tied_model(), embeddings="false")
    assert chosen == [("head", "matmul", "nk")]
    assert any("embeddings=false" in s for s in skipped)


def test_gemm_trans_a_alpha_and_graph_input_weights_skipped() -> None:
    w = numpy_helper.from_array(__import__("numpy").ones((K, N), "float32"), "w")
    nodes = [
        helper.make_node("Gemm", ["a", "w"], ["y1"], name="ta", transA=1),
        helper.make_node("Gemm", ["b", "w"], ["y2"], name="al", alpha=0.5),
        helper.make_node("MatMul", ["b", "wi"], ["y3"], name="inp"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [K, 4]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [4, K]),
            helper.make_tensor_value_info("wi", TensorProto.FLOAT, [K, N]),
        ],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y1", "y2", "y3")],
        [w, numpy_helper.from_array(__import__("numpy").ones((K, N), "float32"), "wi")],
    )
    model = ir.serde.deserialize_model(helper.make_model(graph))
    chosen, skipped = _select(model)
    assert chosen == []
    assert any("transA" in s for s in skipped) and any("alpha" in s for s in skipped)


def test_shared_weight_read_in_both_orientations_keeps_first() -> None:
    import numpy as np

    sq = numpy_helper.from_array(np.ones((K, K), np.float32), "sq")
    nodes = [
        helper.make_node("MatMul", ["x", "sq"], ["y1"], name="plain"),
        helper.make_node("Gemm", ["x", "sq"], ["y2"], name="transposed", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, K])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y1", "y2")],
        [sq],
    )
    chosen, skipped = _select(ir.serde.deserialize_model(helper.make_model(graph)))
    assert chosen == [("plain", "matmul", "kn")]
    assert any("transposed relative" in s for s in skipped)


def test_min_dim_option() -> None:
    chosen, _ = _select(mlp_model(), min_dim="4")
    assert [c[0] for c in chosen] == ["mm", "gemm", "tiny"]
