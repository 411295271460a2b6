"""Raising the default-domain opset so blocked ``DequantizeLinear`` (opset 21) is legal."""

from __future__ import annotations

import logging

import onnx_ir as ir

from graphopt.errors import InvalidModelError

logger = logging.getLogger(__name__)

#: From this opset on, moving to 21 changes no operator's meaning except the ones below.
DIRECT_BUMP_FROM = 18
#: Operators whose semantics changed between 18 and 21 (a direct bump would alter them).
CHANGED_SINCE_18 = frozenset({"GroupNormalization"})
#: IR version that opset 21 (and int4/uint4 tensors) need.
IR_VERSION_FOR_21 = 10


def ensure_default_opset(model: ir.Model, version: int) -> bool:
    """Makes the default-domain opset at least ``version``; True if it changed.

    From opset 18 the import is raised in place (opsets 19-21 only add types, blocked
    quantization and defaults that keep old behaviour) unless the graph holds an
    operator whose meaning changed; otherwise onnx's version converter rewrites the model.

    Raises:
        InvalidModelError: The converter cannot upgrade the model.
    """
    current = model.opset_imports.get("", None)
    if current is not None and current >= version:
        return False
    ops = {n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.domain == ""}
    if current is not None and current >= DIRECT_BUMP_FROM and not ops & CHANGED_SINCE_18:
        model.opset_imports[""] = version
        model.ir_version = max(model.ir_version or 0, IR_VERSION_FOR_21)
        logger.info("raised the default opset %d -> %d", current, version)
        return True
    import onnx.version_converter

    proto = ir.serde.serialize_model(model)
    try:
        converted = onnx.version_converter.convert_version(proto, version)
    except Exception as e:  # noqa: BLE001 - the converter raises many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InvalidModelError(f"cannot upgrade the model to opset {version}: {first}") from None
    fresh = ir.serde.deserialize_model(converted)
    model.graph = fresh.graph
    model.ir_version = max(fresh.ir_version or 0, IR_VERSION_FOR_21)
    model.opset_imports.clear()
    model.opset_imports.update(fresh.opset_imports)
    logger.info("converted the model from opset %s to %d", current, version)
    return True
