"""Tiny-model builders and name-insensitive structural comparison.

Write before/expected models in ONNX text, run a pass on one, compare with the other while
ignoring the names passes may generate::

    before = model_from_text('''
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2] x) => (float[2] y) { a = Identity(x)  y = Relu(a) }
    ''')
    expected = model_from_text('''
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2] x) => (float[2] y) { y = Relu(x) }
    ''')
    RemoveIdentityPass()(before)
    assert_same_structure(before, expected)

The canonical form (:func:`structure`) lists nodes in graph order with their op, domain,
attributes and inputs, where an input is named by what it *is*: a graph input (by name,
since graph inputs are never renamed), a constant (by dtype, shape and bytes, whether an
initializer or a Constant node), or the output of an earlier node (by position). Graph
outputs are listed by name and source. Internal value names and node names are ignored.
"""

from __future__ import annotations

import difflib
import pprint
from typing import Any

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir


def model_from_text(text: str) -> ir.Model:
    """Parses ONNX text format (``onnx.parser``) into an onnx-ir model."""
    proto = onnx.parser.parse_model(text)
    return ir.serde.deserialize_model(proto)


def proto_from_text(text: str) -> onnx.ModelProto:
    """Parses ONNX text format into a ModelProto (checked with the ONNX checker)."""
    proto = onnx.parser.parse_model(text)
    onnx.checker.check_model(proto)
    return proto


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """Serializes an onnx-ir model."""
    return ir.serde.serialize_model(model)


def op_types(model: ir.Model | ir.Graph) -> list[str]:
    """The op types of the main graph's nodes, in order (``domain::op`` for non-ONNX)."""
    graph = model.graph if isinstance(model, ir.Model) else model
    return [n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in graph]


def _const_key(value: ir.Value) -> tuple[Any, ...] | None:
    tensor = None
    if value.is_initializer() and not value.is_graph_input():
        tensor = value.const_value
    else:
        producer = value.producer()
        if (
            producer is not None
            and producer.op_type == "Constant"
            and producer.domain in ("", "ai.onnx")
            and "value" in producer.attributes
        ):
            tensor = producer.attributes["value"].as_tensor()
    if tensor is None:
        return None
    arr = tensor.numpy()
    return ("const", str(arr.dtype), tuple(arr.shape), arr.tolist())


def _attr_value(attr: ir.Attr, scope: dict[int, Any]) -> Any:
    if attr.is_ref():
        return ("ref", attr.ref_attr_name)
    kind = attr.type
    if kind == ir.AttributeType.GRAPH:
        return _graph_structure(attr.as_graph(), dict(scope))
    if kind == ir.AttributeType.GRAPHS:
        return [_graph_structure(g, dict(scope)) for g in attr.as_graphs()]
    if kind == ir.AttributeType.TENSOR:
        arr = attr.as_tensor().numpy()
        return ("tensor", str(arr.dtype), tuple(arr.shape), arr.tolist())
    if kind == ir.AttributeType.TENSORS:
        return [("tensor", str(t.numpy().dtype), t.numpy().tolist()) for t in attr.as_tensors()]
    value = attr.value
    if isinstance(value, (list, tuple)):
        return list(value)
    return value


def _graph_structure(graph: ir.Graph, scope: dict[int, Any]) -> dict[str, Any]:
    for graph_input in graph.inputs:
        scope[id(graph_input)] = ("input", graph_input.name)
    nodes = []
    for index, node in enumerate(graph):
        inputs: list[Any] = []
        for value in node.inputs:
            if value is None:
                inputs.append(None)
            elif id(value) in scope:
                inputs.append(scope[id(value)])
            else:
                const = _const_key(value)
                inputs.append(const if const is not None else ("outer", value.name))
        attrs = {name: _attr_value(a, scope) for name, a in sorted(node.attributes.items())}
        domain = node.domain or ""
        nodes.append((domain, node.op_type, attrs, inputs))
        for out_index, out in enumerate(node.outputs):
            const = _const_key(out)
            scope[id(out)] = const if const is not None else ("node", index, out_index)
    outputs = []
    for value in graph.outputs:
        source = scope.get(id(value))
        if source is None:
            source = _const_key(value) or ("outer", value.name)
        outputs.append((value.name, source))
    return {
        "inputs": [v.name for v in graph.inputs],
        "nodes": nodes,
        "outputs": outputs,
    }


def structure(model: ir.Model | ir.Graph) -> dict[str, Any]:
    """A canonical, name-insensitive description of a model's main graph (see module doc).

    ``Constant`` nodes are kept as nodes, but their outputs (like initializers) are
    referred to by value, so folding a constant into an initializer or a Constant node
    compares equal on the consumer side.
    """
    graph = model.graph if isinstance(model, ir.Model) else model
    return _graph_structure(graph, {})


def assert_same_structure(actual: ir.Model | ir.Graph, expected: ir.Model | ir.Graph) -> None:
    """Asserts two models have the same canonical structure, with a readable diff."""
    a = structure(actual)
    e = structure(expected)
    if a == e:
        return
    diff = "\n".join(
        difflib.unified_diff(
            pprint.pformat(e, width=100).splitlines(),
            pprint.pformat(a, width=100).splitlines(),
            "expected",
            "actual",
            lineterm="",
        )
    )
    raise AssertionError(f"structures differ:\n{diff}")


def random_feeds(
    proto: onnx.ModelProto, seed: int = 0, dim_value: int = 2
) -> dict[str, np.ndarray]:
    """Random inputs for a model's non-initializer graph inputs (symbolic dims -> ``dim_value``)."""
    rng = np.random.default_rng(seed)
    initializers = {t.name for t in proto.graph.initializer}
    feeds: dict[str, np.ndarray] = {}
    for info in proto.graph.input:
        if info.name in initializers:
            continue
        tensor_type = info.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        shape = [
            d.dim_value if d.HasField("dim_value") else dim_value for d in tensor_type.shape.dim
        ]
        if dtype.kind == "f":
            arr = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            arr = rng.integers(0, 2, shape).astype(dtype)
        else:
            arr = rng.integers(0, 5, shape).astype(dtype)
        feeds[info.name] = arr
    return feeds
