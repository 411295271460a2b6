"""``prune`` on synthetic attention/FFN blocks: exactness, shapes, GQA layout, selection."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from _prune_support import block_model, copy, inputs, run

from graphopt.analysis.structure.transformer import find_structure
from graphopt.errors import UsageError
from graphopt.infra.analysis import AnalysisManager
from graphopt.infra.context import PassContext
from graphopt.passes.pruning.prune_pass import APPLIED_KEY, PrunePass


def prune(model: ir.Model, text: dict[str, str], ctx: PassContext | None = None):  # type: ignore[no-untyped-def]
    ctx = ctx or PassContext()
    return PrunePass.from_options(text).run_with(model, ctx, AnalysisManager(ctx))


def weights(model: ir.Model) -> dict[str, tuple[int, ...]]:
    return {n: tuple(v.const_value.shape) for n, v in model.graph.initializers.items() if v.const_value is not None}


def test_structure_of_synthetic_blocks() -> None:
    s = find_structure(block_model(heads=6, kv_heads=2, head_dim=4, gated=True, layers=2).graph)
    assert [b.num_heads for b in s.attention] == [6, 6]
    assert [b.num_kv_heads for b in s.attention] == [2, 2]
    assert {b.head_dim for b in s.attention} == {4}
    assert [b.intermediate for b in s.ffn] == [24, 24]
    assert all(b.gate is not None and b.gate.name.endswith("Wg") for b in s.ffn)
    assert s.ffn[0].up.name == "l0_Wu" and s.ffn[0].down.name == "l0_Wd"


@pytest.mark.parametrize("gated", [False, True])
def test_zero_units_are_removed_bit_exactly(gated: bool) -> None:
    zero_heads = {0: [1], 1: [3]}
    zero_neurons = {0: [0, 5, 7, 11, 20, 23], 1: [1, 2, 3, 4, 5, 6]}
    model = block_model(layers=2, gated=gated, zero_heads=zero_heads, zero_neurons=zero_neurons)
    feeds = inputs()
    want = run(model, feeds)
    result = prune(model, {"heads": "0.25", "ffn": "0.25"})
    assert result.modified
    got = run(model, feeds)
    np.testing.assert_array_equal(got, want)
    removed = [b["removed"] for b in result.stats["blocks"] if b["kind"] == "heads"]
    assert removed == [[1], [3]]
    shapes = weights(model)
    assert shapes["l0_Wq"] == (16, 24) and shapes["l0_Wo"] == (24, 16)
    assert shapes["l0_Wu"] == (16, 18) and shapes["l0_Wd"] == (18, 16)
    # Graph I/O unchanged.
    assert [v.name for v in model.graph.inputs] == ["x"] and [v.name for v in model.graph.outputs] == ["y"]
    assert str(model.graph.outputs[0].shape) == "[batch,5,16]"


def test_gqa_whole_groups_keep_layout() -> None:
    # Query heads 2 and 3 read KV head 1: zero them to make group 1 the least important.
    model = block_model(heads=6, kv_heads=3, head_dim=4, layers=1, zero_heads={0: [2, 3]})
    s = find_structure(model.graph)
    assert s.attention[0].group_size == 2
    feeds = inputs()
    want = run(model, feeds)
    # KV head 1 still feeds nothing after its query heads go: removal is exact.
    result = prune(model, {"heads": "0.34", "gqa": "groups"})
    (entry,) = [b for b in result.stats["blocks"] if b["kind"] == "heads"]
    assert entry["heads"] == "6 -> 4" and entry["kv_heads"] == "3 -> 2"
    assert entry["removed"] == [2, 3]
    np.testing.assert_array_equal(run(model, feeds), want)
    shapes = weights(model)
    assert shapes["l0_Wk"] == (16, 8) and shapes["l0_Wq"] == (16, 16)


def test_gqa_within_groups_removes_evenly() -> None:
    model = block_model(heads=6, kv_heads=2, head_dim=4, layers=1, zero_heads={0: [0, 4]})
    feeds = inputs()
    want = run(model, feeds)
    result = prune(model, {"heads": "0.34", "gqa": "within"})
    (entry,) = [b for b in result.stats["blocks"] if b["kind"] == "heads"]
    # One head from each group of three: 0 (group 0) and 4 (group 1).
    assert entry["removed"] == [0, 4]
    assert entry["heads"] == "6 -> 4" and entry["kv_heads"] == "2 -> 2"
    np.testing.assert_array_equal(run(model, feeds), want)
    assert find_structure(model.graph).attention[0].group_size == 2


def test_never_prunes_a_block_to_zero() -> None:
    model = block_model(heads=2, layers=1, inter=2)
    feeds = inputs()
    prune(model, {"heads": "0.9", "ffn": "0.9"})
    s = find_structure(model.graph)
    assert s.attention[0].num_heads == 1 and s.ffn[0].intermediate == 1
    assert run(model, feeds).shape == (2, 5, 16)


def test_global_scope_keeps_every_block_and_hits_budget() -> None:
    model = block_model(layers=3, zero_neurons={0: list(range(20))})
    result = prune(model, {"ffn": "0.3", "scope": "global"})
    s = find_structure(model.graph)
    widths = [b.intermediate for b in s.ffn]
    assert sum(24 - w for w in widths) == round(0.3 * 72)
    assert min(widths) >= 1
    # The zeroed neurons of block 0 go first.
    assert widths[0] <= 24 - 20
    assert result.stats["blocks_pruned"] >= 1


def test_layers_option_and_stats() -> None:
    model = block_model(layers=3)
    result = prune(model, {"heads": "0.5", "layers": ["1"]})
    s = find_structure(model.graph)
    assert [b.num_heads for b in s.attention] == [4, 2, 4]
    (entry,) = result.stats["blocks"]
    # q, k, v: 16x32 + 32 bias, o: 32x16 + 16 bias; half the heads go.
    assert entry["params"] == "2160 -> 1088"
    assert "->" in entry["flops_per_token"]


def test_idempotent_and_input_untouched() -> None:
    original = block_model(layers=1)
    model = copy(original)
    first = prune(model, {"heads": "0.25"})
    again = prune(model, {"heads": "0.25"})
    assert first.modified and not again.modified
    assert model.metadata_props[APPLIED_KEY] == "prune(heads=0.25)"
    assert weights(original)["l0_Wq"] == (16, 32)


def test_calibrated_options_need_calib() -> None:
    with pytest.raises(UsageError, match="--calib"):
        prune(block_model(), {"ffn": "0.25", "reconstruct": "true"})
    with pytest.raises(UsageError, match="must be in"):
        PrunePass.from_options({"heads": "1.0"})


def test_no_blocks_is_a_no_op() -> None:
    model = block_model()
    result = prune(model, {"heads": "0.0", "ffn": "0.0"})
    assert not result.modified


def test_ambiguous_shape_constant_is_skipped_with_reason() -> None:
    # 4 heads of size 4: a Reshape entry 4 could be either; the block is left alone.
    model = block_model(heads=4, head_dim=4, layers=1)
    feeds = inputs()
    want = run(model, feeds)
    result = prune(model, {"heads": "0.25"})
    assert not result.modified
    assert any("ambiguous" in s for s in result.stats["skipped"])
    np.testing.assert_array_equal(run(model, feeds), want)
