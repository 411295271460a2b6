"""Helpers shared by the cleanup passes (private to this package).

Everything here is about reading and rewriting an onnx-ir graph safely under the rules of
``RELIABILITY.md``: what counts as a constant (never an initializer that is also a graph
input), which nodes are left alone (custom domains, non-deterministic ops), how a value is
replaced by a constant without renaming graph outputs, and how graphs nest.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

logger = logging.getLogger(__name__)

#: Domains whose operators have ONNX standard semantics (``ai.onnx`` normalises to "").
STANDARD_DOMAINS = frozenset({"", "ai.onnx"})

#: Standard operators whose result depends on more than their inputs: never folded or merged.
#: ``Dropout`` is random in training mode; it is removed by ``remove-identity`` when it is
#: provably in inference mode, and otherwise left as it is.
NON_DETERMINISTIC_OPS = frozenset(
    {
        "Bernoulli",
        "Dropout",
        "Multinomial",
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
    }
)

_GRAPH_ATTRS = (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)


def is_standard(node: ir.Node) -> bool:
    """Whether ``node`` is an operator of the default ONNX domain."""
    return node.domain in STANDARD_DOMAINS


def is_op(node: ir.Node, op_type: str) -> bool:
    """Whether ``node`` is the standard operator ``op_type``."""
    return node.op_type == op_type and is_standard(node)


def is_nondeterministic(node: ir.Node) -> bool:
    """Whether ``node`` may produce different results for the same inputs."""
    return is_standard(node) and node.op_type in NON_DETERMINISTIC_OPS


def subgraphs(node: ir.Node) -> list[ir.Graph]:
    """The graphs held in ``node``'s attributes (If/Loop/Scan bodies), in attribute order."""
    out: list[ir.Graph] = []
    for attr in node.attributes.values():
        if attr.is_ref():
            continue
        if attr.type == ir.AttributeType.GRAPH:
            out.append(attr.as_graph())
        elif attr.type == ir.AttributeType.GRAPHS:
            out.extend(attr.as_graphs())
    return out


def has_subgraphs(node: ir.Node) -> bool:
    """Whether ``node`` holds a graph attribute (a control-flow node)."""
    return any(a.type in _GRAPH_ATTRS for a in node.attributes.values() if not a.is_ref())


def has_attr_refs(node: ir.Node) -> bool:
    """Whether ``node`` has attributes referring to an enclosing function's attributes."""
    return any(a.is_ref() for a in node.attributes.values())


def iter_graphs(graph: ir.Graph) -> Iterator[ir.Graph]:
    """``graph`` and every graph nested in it, parents before children, in node order."""
    stack = [graph]
    while stack:
        current = stack.pop()
        yield current
        nested = [g for node in current for g in subgraphs(node)]
        stack.extend(reversed(nested))


def node_path(node: ir.Node) -> str:
    """A readable location for logs: ``op_type 'name'``."""
    return f"{node.op_type} {node.name!r}" if node.name else node.op_type


def onnx_opset(model: ir.Model) -> int:
    """The model's default-domain opset version (``ai.onnx``)."""
    imports = model.opset_imports
    return imports.get("", imports.get("ai.onnx", 1))


def node_opset(node: ir.Node, model_opset: int) -> int:
    """The opset a standard node runs under (its own version, else the model's)."""
    return node.version if node.version is not None else model_opset


def uses_initializers(model: ir.Model) -> bool:
    """Whether new constants may become initializers of the main graph.

    Before IR version 4 every initializer must also be a graph input, so adding one would
    change the model's signature; those models get ``Constant`` nodes instead.
    """
    return model.ir_version is None or model.ir_version >= 4


def constant_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The constant tensor behind ``value``, or None when it is not a constant.

    Constants are initializers that are not graph inputs (a graph input can be overridden
    at run time) and outputs of standard ``Constant`` nodes with a tensor, float(s) or
    int(s) value. String and sparse constants are not treated as constants.
    """
    if value is None or value.is_graph_input():
        return None
    if value.is_initializer():
        tensor = value.const_value
        if tensor is None or tensor.dtype == ir.DataType.STRING:
            return None
        return tensor
    producer = value.producer()
    if producer is None or not is_op(producer, "Constant") or len(producer.attributes) != 1:
        return None
    ((name, attr),) = producer.attributes.items()
    if attr.is_ref():
        return None
    if name == "value":
        tensor = attr.as_tensor()
        return None if tensor.dtype == ir.DataType.STRING else tensor
    if name == "value_float":
        return ir.tensor(np.array(attr.as_float(), dtype=np.float32))
    if name == "value_floats":
        return ir.tensor(np.array(list(attr.as_floats()), dtype=np.float32))
    if name == "value_int":
        return ir.tensor(np.array(attr.as_int(), dtype=np.int64))
    if name == "value_ints":
        return ir.tensor(np.array(list(attr.as_ints()), dtype=np.int64))
    return None


def constant_array(value: ir.Value | None, max_bytes: int | None = None) -> np.ndarray | None:
    """Like :func:`constant_tensor` but as a numpy array (None when over ``max_bytes``)."""
    tensor = constant_tensor(value)
    if tensor is None:
        return None
    if max_bytes is not None and tensor.nbytes > max_bytes:
        return None
    try:
        return tensor.numpy()
    except Exception as e:  # noqa: BLE001 - an unreadable or unsupported tensor is simply not a constant
        logger.debug("cannot read constant %s: %s", getattr(value, "name", None), e)
        return None


def small_int_vector(value: ir.Value | None) -> list[int] | None:
    """A constant 0-D or 1-D integer tensor (axes, perms, shapes) as a list, else None."""
    arr = constant_array(value, max_bytes=1 << 16)
    if arr is None or arr.ndim > 1 or arr.dtype.kind not in "iu":
        return None
    return [int(v) for v in arr.reshape(-1)]


def is_constant_source(value: ir.Value) -> bool:
    """Whether ``value`` already is a constant leaf (an initializer or a Constant output)."""
    if value.is_initializer():
        return True
    producer = value.producer()
    return producer is not None and is_op(producer, "Constant")


class NameGenerator:
    """Makes value names unique across a whole model (every graph, every function).

    Args:
        model: The model whose existing names must not be reused.
    """

    def __init__(self, model: ir.Model) -> None:
        self._taken: set[str] = set()
        graphs: list[ir.Graph] = [model.graph]
        graphs.extend(f.graph for f in model.functions.values())
        for root in graphs:
            for graph in iter_graphs(root):
                for v in (*graph.inputs, *graph.outputs, *graph.initializers.values()):
                    if v.name:
                        self._taken.add(v.name)
                for node in graph:
                    for v in node.outputs:
                        if v.name:
                            self._taken.add(v.name)
        self._counters: dict[str, int] = {}

    def new(self, base: str) -> str:
        """A fresh name starting with ``base`` (deterministic: a per-base counter)."""
        base = base or "v"
        if base not in self._taken:
            self._taken.add(base)
            return base
        n = self._counters.get(base, 0)
        while True:
            n += 1
            candidate = f"{base}__{n}"
            if candidate not in self._taken:
                self._counters[base] = n
                self._taken.add(candidate)
                return candidate


def adopt_declared_type(target: ir.Value, declared: ir.Value) -> None:
    """Gives ``target`` the declared type and shape of graph output ``declared``.

    Graph outputs keep their dtypes and ``dim_param`` names when another value takes
    their place; unknown parts fall back to what ``target`` knew.
    """
    if declared.type is not None:
        target.type = declared.type
    if declared.shape is not None:
        target.shape = declared.shape
    if declared.doc_string and not target.doc_string:
        target.doc_string = declared.doc_string
    for key, text in declared.metadata_props.items():
        target.metadata_props.setdefault(key, text)


def new_constant_value(
    graph: ir.Graph,
    array: np.ndarray,
    name: str,
    *,
    as_initializer: bool,
    before: ir.Node | None,
    node_name: str | None = None,
) -> ir.Value:
    """Adds a constant to ``graph`` and returns its value.

    Args:
        graph: The graph that will own the constant.
        array: Its value.
        name: The value's name.
        as_initializer: Register an initializer; otherwise insert a ``Constant`` node.
        before: Where to insert the ``Constant`` node (appended when None).
        node_name: Name of the ``Constant`` node.
    """
    tensor = ir.tensor(array, name=name)
    if as_initializer:
        value = ir.Value(
            name=name,
            type=ir.TensorType(tensor.dtype),
            shape=ir.Shape(array.shape),
            const_value=tensor,
        )
        graph.register_initializer(value)
        return value
    node = ir.Node(
        "",
        "Constant",
        inputs=[],
        attributes=[ir.AttrTensor("value", tensor)],
        num_outputs=1,
        name=node_name or None,
    )
    out = node.outputs[0]
    out.name = name
    out.type = ir.TensorType(tensor.dtype)
    out.shape = ir.Shape(array.shape)
    if before is not None:
        graph.insert_before(before, node)
    else:
        graph.append(node)
    return out


def can_take_output_name(value: ir.Value, graph: ir.Graph) -> bool:
    """Whether ``value`` may be renamed to become an output of ``graph``.

    Graph inputs and outputs are never renamed, initializers are left alone, and values
    defined in an enclosing graph belong to that graph.
    """
    if value.is_graph_input() or value.is_graph_output() or value.is_initializer():
        return False
    producer = value.producer()
    return producer is not None and producer.graph is graph


def warn_once(model: ir.Model, key: str, message: str, *args: object) -> None:
    """Logs a warning once per model object (fixpoint pipelines rerun passes)."""
    meta = model.graph.meta
    seen_key = f"graphopt.cleanup.warned.{key}"
    if meta.get(seen_key):
        return
    meta[seen_key] = True
    logger.warning(message, *args)


def custom_nodes(model: ir.Model) -> list[str]:
    """Locations of non-standard nodes in the model (for the 'left alone' warning)."""
    found = []
    for graph in iter_graphs(model.graph):
        for node in graph:
            if not is_standard(node):
                found.append(f"{node.domain}::{node_path(node)}")
    return found


def warn_custom_nodes(model: ir.Model) -> None:
    """Warns (once per model) that custom-domain nodes are left alone."""
    found = custom_nodes(model)
    if found:
        shown = ", ".join(found[:8]) + (f" (+{len(found) - 8} more)" if len(found) > 8 else "")
        warn_once(
            model, "custom", "cleanup: %d custom-domain node(s) left alone: %s", len(found), shown
        )
