"""Seeded random graphs through the ``cleanup`` pipeline: valid, same signature, bit-exact
on ORT for two batch sizes, idempotent.

The generator mixes what the cleanup passes rewrite (constant arithmetic, Constant nodes
and initializers, identities, inference Dropout, same-type Casts, identity Transposes,
duplicated nodes, Shape->Gather->Unsqueeze->Concat->Reshape chains, Expand of constants,
dead nodes, an input wired to an output) with ops they must leave alone.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from _cleanup_support import assert_bit_exact, assert_valid, ort_outputs, signature
from onnx import TensorProto, helper, numpy_helper

from graphopt.infra import default_registry
from graphopt.testing.builders import to_proto


class _Builder:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.values = ["x"]  # every value here is float[B, 4]
        self.count = 0

    def name(self, prefix: str = "v") -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def node(self, op: str, inputs: list[str], **attrs: object) -> str:
        out = self.name()
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def constant(self, array: np.ndarray) -> str:
        name = self.name("c")
        if self.rng.random() < 0.5:
            self.initializers.append(numpy_helper.from_array(array, name))
        else:
            self.nodes.append(
                helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array))
            )
        return name

    def float_constant(self, shape: list[int]) -> str:
        return self.constant(self.rng.integers(-3, 4, shape).astype(np.float32))

    def step(self) -> None:
        rng = self.rng
        a = self.values[rng.integers(len(self.values))]
        choice = rng.integers(9)
        if choice == 0:
            out = self.node(str(rng.choice(["Add", "Mul", "Sub"])), [a, self.float_constant([4])])
        elif choice == 1:  # constant-only arithmetic, folded
            c = self.node(
                str(rng.choice(["Add", "Mul", "Sub", "Max"])),
                [self.float_constant([4]), self.float_constant([4])],
            )
            out = self.node("Add", [a, c])
        elif choice == 2:
            out = self.node(str(rng.choice(["Identity", "Relu", "Neg"])), [a])
        elif choice == 3:
            out = self.node("Dropout", [a])
        elif choice == 4:  # x.reshape(x.shape[0], 4)
            shape = self.node("Shape", [a])
            batch = self.node("Gather", [shape, self.constant(np.array(0, np.int64))])
            batch1 = self.node("Unsqueeze", [batch, self.constant(np.array([0], np.int64))])
            four = self.constant(np.array([4], np.int64))
            out = self.node("Reshape", [a, self.node("Concat", [batch1, four], axis=0)])
        elif choice == 5:
            out = self.node("Transpose", [a], perm=[0, 1])
        elif choice == 6:
            out = self.node("Relu", [self.node("Cast", [a], to=TensorProto.FLOAT)])
        elif choice == 7:  # a duplicate of an earlier node
            candidates = [n for n in self.nodes if n.op_type != "Constant" and n.input]
            if not candidates:
                return
            dup = onnx.NodeProto()
            dup.CopyFrom(candidates[rng.integers(len(candidates))])
            out = self.name()
            dup.output[0] = out
            self.nodes.append(dup)
            if dup.op_type in ("Shape", "Gather", "Unsqueeze", "Concat"):
                return  # not a float[B, 4] value
        else:
            shape = self.constant(np.array([1, 4], np.int64))
            out = self.node("Add", [a, self.node("Expand", [self.float_constant([1]), shape])])
        self.values.append(out)

    def model(self) -> onnx.ModelProto:
        for _ in range(self.rng.integers(4, 14)):
            self.step()
        picked = self.rng.choice(self.values[1:] or ["x"], size=self.rng.integers(1, 4))
        outputs = sorted({str(p) for p in picked})
        if self.rng.random() < 0.3:  # an input wired straight to an output
            self.nodes.append(helper.make_node("Identity", ["x"], ["x_out"]))
            outputs.append("x_out")
        graph = helper.make_graph(
            self.nodes,
            "random",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4])],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["B", 4]) for o in outputs],
            initializer=self.initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        return model


@pytest.mark.parametrize("seed", range(40))
def test_random_graph(seed: int) -> None:
    proto = _Builder(seed).model()
    onnx.checker.check_model(proto, full_check=True)
    try:
        ort_outputs(proto, {"x": np.ones((2, 4), np.float32)})
    except Exception:  # noqa: BLE001 - e.g. a duplicated Concat reshaped: invalid original
        pytest.skip("the generated model does not run")
    model = ir.serde.deserialize_model(proto)
    registry = default_registry(plugins=False)
    registry.build("cleanup").execute(model)
    after = to_proto(model)
    assert_valid(after)
    assert signature(after) == signature(proto)
    for batch in (1, 3):
        feeds = {"x": np.random.default_rng(batch).standard_normal((batch, 4)).astype(np.float32)}
        assert_bit_exact(proto, after, feeds)
    assert not registry.build("cleanup").execute(model).modified
    assert to_proto(model).SerializeToString() == after.SerializeToString()
