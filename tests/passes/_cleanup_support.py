"""Checks shared by the cleanup pass tests: validity, bit-exactness on ORT, signature,
idempotence and determinism."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from graphopt.infra import AnalysisManager, Pass, PassContext, PassResult
from graphopt.testing.builders import model_from_text, random_feeds, to_proto

PassFactory = Callable[[], Pass[Any]]


def run_pass(pass_: Pass[Any], model: ir.Model) -> PassResult:
    """Runs one pass through graphopt's contract (requires -> run -> ensures)."""
    return pass_.run_with(model, PassContext(), AnalysisManager())


def ort_session(proto: onnx.ModelProto) -> ort.InferenceSession:
    """A CPU session with every graph optimization off (ORT must not fold for us)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def ort_outputs(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Runs the model on ORT CPU (graph optimizations off)."""
    return ort_session(proto).run(None, feeds)  # type: ignore[no-any-return]


def signature(proto: onnx.ModelProto) -> list[tuple[str, str, str]]:
    """Graph inputs and outputs: (kind, name, serialized type incl. dim_params)."""
    out = [("in", v.name, str(v.type)) for v in proto.graph.input]
    out += [("out", v.name, str(v.type)) for v in proto.graph.output]
    return out


def assert_valid(proto: onnx.ModelProto) -> None:
    """Full ONNX check plus an ORT load."""
    onnx.checker.check_model(proto, full_check=True)
    ort_session(proto)


def assert_bit_exact(
    before: onnx.ModelProto,
    after: onnx.ModelProto,
    feeds: dict[str, np.ndarray] | None = None,
) -> None:
    """Same outputs, bit for bit (NaNs equal), on ORT CPU with optimizations off."""
    feeds = feeds if feeds is not None else random_feeds(before)
    expected = ort_outputs(before, feeds)
    actual = ort_outputs(after, feeds)
    assert len(expected) == len(actual)
    for e, a, info in zip(expected, actual, after.graph.output):
        assert e.dtype == a.dtype, info.name
        assert e.shape == a.shape, info.name
        if e.dtype.kind == "f":
            assert np.array_equal(_bits(e), _bits(a)), info.name
        else:
            assert np.array_equal(e, a), info.name


def _bits(arr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(arr).reshape(-1).view(np.uint8)


def _load(source: str | onnx.ModelProto) -> ir.Model:
    if isinstance(source, str):
        return model_from_text(source)
    copy = onnx.ModelProto()
    copy.CopyFrom(source)
    return ir.serde.deserialize_model(copy)


def check_pass(
    make_pass: PassFactory,
    text: str | onnx.ModelProto,
    feeds: dict[str, np.ndarray] | None = None,
    *,
    numeric: bool = True,
) -> tuple[ir.Model, PassResult]:
    """Runs a fresh pass on the model (ONNX text or proto) and checks the whole contract.

    Checked: the result passes ``check_model(full_check=True)`` and loads in ORT; graph
    I/O names, order, dtypes and dim_params are unchanged; outputs are bit-identical on
    ORT (when ``numeric``); a second run changes nothing; a second model from the same
    text gives byte-identical output.

    Returns:
        The transformed model and the first run's result.
    """
    before = to_proto(_load(text))
    model = _load(text)
    result = run_pass(make_pass(), model)
    after = to_proto(model)
    assert_valid(after)
    assert signature(after) == signature(before)
    if numeric:
        assert_bit_exact(before, after, feeds)
    # Idempotence: a second run reports no change and the bytes stay the same.
    again = run_pass(make_pass(), model)
    assert not again.modified, f"second run modified the model: {again.stats}"
    assert to_proto(model).SerializeToString() == after.SerializeToString()
    # Determinism: the same input gives the same bytes.
    other = _load(text)
    run_pass(make_pass(), other)
    assert to_proto(other).SerializeToString() == after.SerializeToString()
    return model, result


def header(opset: int = 17, ir_version: int = 8, extra: str = "") -> str:
    """The ``<ir_version, opset_import>`` header of an ONNX text model."""
    imports = f'"" : {opset}' + (f", {extra}" if extra else "")
    return f"<ir_version: {ir_version}, opset_import: [{imports}]>"
