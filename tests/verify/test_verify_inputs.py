"""make_feeds: dim binding, heuristics, dtypes, initializer-inputs, determinism."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.errors import InvalidModelError, UsageError
from graphopt.verify.inputs import input_specs, make_feeds
from graphopt.verify.runner import make_session, run


def _identity_model(inputs: list[onnx.ValueInfoProto], **kwargs: object) -> onnx.ModelProto:
    nodes = [helper.make_node("Identity", [v.name], [f"{v.name}_out"]) for v in inputs]
    outputs = [
        helper.make_tensor_value_info(f"{v.name}_out", v.type.tensor_type.elem_type, None)
        for v in inputs
    ]
    graph = helper.make_graph(nodes, "ids", inputs, outputs, **kwargs)  # type: ignore[arg-type]
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def _bert_like() -> onnx.ModelProto:
    shape = ["batch", "sequence"]
    return _identity_model(
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, shape),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, shape),
            helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, shape),
            helper.make_tensor_value_info("position_ids", TensorProto.INT64, shape),
            helper.make_tensor_value_info("past", TensorProto.FLOAT, ["batch", 2, "past_len", 8]),
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, ["s0", None, 3]),
        ]
    )


def test_dim_params_bound_by_name() -> None:
    feed = make_feeds(_bert_like(), dims={"batch": 3, "sequence": 7, "past_len": 5})
    assert list(feed) == [
        "input_ids",
        "attention_mask",
        "token_type_ids",
        "position_ids",
        "past",
        "scale",
    ]
    assert feed["input_ids"].shape == (3, 7)
    assert feed["attention_mask"].shape == (3, 7)
    assert feed["past"].shape == (3, 2, 5, 8)
    ids = feed["input_ids"]
    assert ids.dtype == np.int64 and ids.min() >= 0 and ids.max() < 100
    assert (feed["attention_mask"] == 1).all()
    assert (feed["token_type_ids"] == 0).all()
    np.testing.assert_array_equal(feed["position_ids"][2], np.arange(7))


def test_dims_guessed_from_names() -> None:
    feed = make_feeds(_bert_like(), batch=2, seq=9)
    assert feed["input_ids"].shape == (2, 9)
    assert feed["past"].shape == (2, 2, 9, 8)  # "past_len" is sequence-like
    assert feed["scale"].shape == (1, 1, 3)  # unknown name and unnamed dim -> 1
    assert make_feeds(_bert_like())["input_ids"].shape == (1, 16)  # defaults


def test_negative_dim_refused() -> None:
    with pytest.raises(UsageError, match="negative"):
        make_feeds(_bert_like(), dims={"batch": -1})


def test_dtypes_and_value_ranges() -> None:
    types = {
        "f32": TensorProto.FLOAT,
        "f64": TensorProto.DOUBLE,
        "f16": TensorProto.FLOAT16,
        "bf16": TensorProto.BFLOAT16,
        "i8": TensorProto.INT8,
        "u8": TensorProto.UINT8,
        "i16": TensorProto.INT16,
        "i32": TensorProto.INT32,
        "u32": TensorProto.UINT32,
        "u64": TensorProto.UINT64,
        "flag": TensorProto.BOOL,
    }
    model = _identity_model(
        [helper.make_tensor_value_info(n, t, [64, 32]) for n, t in types.items()]
    )
    feed = make_feeds(model, seed=3)
    for name, elem_type in types.items():
        assert feed[name].dtype == helper.tensor_dtype_to_np_dtype(elem_type), name
        assert feed[name].shape == (64, 32)
    assert feed["bf16"].dtype == ml_dtypes.bfloat16
    f32 = feed["f32"]
    assert abs(float(f32.mean())) < 0.1 and 0.9 < float(f32.std()) < 1.1  # standard normal
    for name in ("i8", "u8", "i16", "i32", "u32", "u64"):
        assert feed[name].min() >= 0 and feed[name].max() < 4, name
    assert feed["flag"].any() and not feed["flag"].all()


def test_every_generated_dtype_runs_in_ort(tmp_path: Path) -> None:
    types = [TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.UINT16, TensorProto.BOOL]
    model = _identity_model(
        [helper.make_tensor_value_info(f"v{t}", t, ["batch", 3]) for t in types]
    )
    path = tmp_path / "dtypes.onnx"
    onnx.save(model, str(path))
    feed = make_feeds(path, dims={"batch": 2})
    out = run(make_session(path), feed)
    for t in types:
        np.testing.assert_array_equal(out[f"v{t}_out"], feed[f"v{t}"])
        assert out[f"v{t}_out"].dtype == feed[f"v{t}"].dtype


def test_initializer_inputs_are_not_fed(tmp_path: Path) -> None:
    model = _identity_model(
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [2]),
        ],
        initializer=[numpy_helper.from_array(np.zeros(2, np.float32), "w")],
    )
    assert [s.name for s in input_specs(model)] == ["x"]
    assert list(make_feeds(model)) == ["x"]
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    assert list(make_feeds(path)) == ["x"]
    assert list(make_feeds(ir.serde.deserialize_model(model))) == ["x"]


def test_seeded_and_deterministic() -> None:
    a = make_feeds(_bert_like(), seed=5)
    b = make_feeds(_bert_like(), seed=5)
    c = make_feeds(_bert_like(), seed=6)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a["past"], c["past"])
    assert not np.array_equal(a["input_ids"], c["input_ids"])


def test_path_proto_and_ir_agree(tmp_path: Path) -> None:
    model = _bert_like()
    path = tmp_path / "bert.onnx"
    onnx.save(model, str(path))
    from_path = make_feeds(path, seed=2)
    from_ir = make_feeds(ir.serde.deserialize_model(model), seed=2)
    for name, value in make_feeds(model, seed=2).items():
        np.testing.assert_array_equal(value, from_path[name])
        np.testing.assert_array_equal(value, from_ir[name])


def test_bad_model_sources(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such file"):
        make_feeds(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff\xfe not a protobuf \x00\x01")
    with pytest.raises(InvalidModelError, match="junk.onnx"):
        make_feeds(junk)
    seq_input = helper.make_value_info(
        "s", helper.make_sequence_type_proto(helper.make_tensor_type_proto(1, [2]))
    )
    with pytest.raises(InvalidModelError, match="'s'"):
        make_feeds(helper.make_model(helper.make_graph([], "g", [seq_input], [])))
