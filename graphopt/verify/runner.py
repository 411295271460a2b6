"""ONNX Runtime sessions for verification and measurement.

Sessions are created from the model's path, so ONNX Runtime resolves external data next to
it. For verification, graph optimizations are off (``ORT_DISABLE_ALL``): the comparison is
then between the two graphs as written, not between what ORT's own fusions made of them.
Thread spinning is off so that sessions in one process do not steal each other's cores.

ONNX Runtime's Python binding does not accept or return ml_dtypes arrays (bfloat16,
float8); :func:`run` passes and reads those through ``OrtValue``s.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from graphopt.errors import InvalidModelError, UsageError
from graphopt.verify.dtypes import is_ml_dtype

logger = logging.getLogger(__name__)

#: ORT type strings whose values NumPy (without ml_dtypes) cannot represent.
_EXOTIC_MARKERS = ("bfloat16", "float8", "float4", "int4", "int2")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return " ".join(line.split())


def make_session(
    path: str | os.PathLike[str],
    *,
    threads: int = 2,
    optimize: bool = False,
    custom_op_libraries: Sequence[str] = (),
) -> ort.InferenceSession:
    """Creates a CPU inference session from a model file.

    Args:
        path: The ``.onnx`` file (external data beside it is resolved by ORT).
        threads: ``intra_op_num_threads``; inter-op is 1 (sequential execution).
        optimize: False for ``ORT_DISABLE_ALL`` (verification), True for
            ``ORT_ENABLE_ALL`` (what users deploy; latency).
        custom_op_libraries: Shared libraries with custom ops to register. The
            runtime_ext library (:func:`graphopt.backends.ext.library_path`) is added
            automatically when the model has nodes in its ``graphopt`` domain.

    Returns:
        The session, with spinning off for intra- and inter-op threads.

    Raises:
        UsageError: The model or a custom-op library does not exist, ``threads < 1``, or
            the model needs the runtime_ext library and it is not built.
        InvalidModelError: ONNX Runtime cannot load the model.
    """
    model_path = Path(path)
    if threads < 1:
        raise UsageError(f"threads must be at least 1, got {threads}")
    if not model_path.is_file():
        raise UsageError(f"{model_path}: no such model file")
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Fatal only: ORT's C++ logger would otherwise print failures on fd 2 in colour;
    # its exceptions carry the same message, which we report as one line.
    options.log_severity_level = 4
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    proto = _load_graph_only(model_path)
    libraries = [str(library) for library in custom_op_libraries]
    if proto is not None:
        libraries.extend(lib for lib in _ext_libraries(proto, model_path) if lib not in libraries)
    for library in libraries:
        if not Path(library).is_file():
            raise UsageError(f"{library}: custom-op library not found")
        try:
            options.register_custom_ops_library(str(library))
        except Exception as e:  # noqa: BLE001
            raise InvalidModelError(
                f"{library}: cannot register custom-op library: {_first_line(e)}"
            ) from None
    source: str | bytes = str(model_path)
    renamed = _unique_node_names_copy(model_path, proto)
    if renamed is not None:
        source = renamed
    try:
        session = ort.InferenceSession(
            source, sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as e:  # noqa: BLE001 - ORT error types vary
        raise InvalidModelError(
            f"{model_path}: ONNX Runtime cannot load the model: {_first_line(e)}"
        ) from None
    logger.debug("session for %s (threads=%d, optimize=%s)", model_path, threads, optimize)
    return session


def _load_graph_only(model_path: Path) -> onnx.ModelProto | None:
    """The model proto without external data; None when over 2 GiB or not parseable."""
    if model_path.stat().st_size > 2**31 - 1:
        return None
    try:
        return onnx.load(str(model_path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not parseable: let ONNX Runtime report it
        return None


def _ext_libraries(proto: onnx.ModelProto, model_path: Path) -> list[str]:
    """The runtime_ext library when the model has ``graphopt``-domain nodes, else nothing.

    Raises:
        UsageError: The model needs the library and it is not built.
    """
    from graphopt.backends.ext import library_path, model_uses_ext

    if not model_uses_ext(proto):
        return []
    try:
        return [str(library_path())]
    except UsageError as e:
        raise UsageError(f"{model_path}: has graphopt-domain ops, {e}") from None


def _unique_node_names_copy(model_path: Path, proto: onnx.ModelProto | None) -> bytes | None:
    """A serialized copy with unique node names when the model repeats names.

    ONNX Runtime refuses duplicate node names, which the ONNX standard allows; for
    verification only, a renamed in-memory copy runs instead (the file is untouched).
    Models with external data (or ``proto`` None) are returned as None (ORT needs their
    folder).
    """
    if proto is None:
        return None
    tensors = [*proto.graph.initializer]
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in tensors):
        return None
    seen: set[str] = set()
    duplicate = False
    for node in proto.graph.node:
        if node.name and node.name in seen:
            duplicate = True
            break
        seen.add(node.name)
    if not duplicate:
        return None
    used: set[str] = set()
    for index, node in enumerate(proto.graph.node):
        name = node.name or f"node_{index}"
        candidate, k = name, 1
        while candidate in used:
            candidate = f"{name}__{k}"
            k += 1
        node.name = candidate
        used.add(candidate)
    logger.info("%s: node names repeat; verifying a renamed in-memory copy", model_path)
    return proto.SerializeToString()


def _to_ortvalue(array: np.ndarray) -> ort.OrtValue:
    array = np.ascontiguousarray(array)
    if is_ml_dtype(array.dtype):
        elem_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
        raw = array.view(np.uint8 if array.dtype.itemsize == 1 else np.uint16)
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(raw, elem_type)
    return ort.OrtValue.ortvalue_from_numpy(array)


def _from_ortvalue(value: ort.OrtValue, name: str, where: str) -> np.ndarray:
    if not value.is_tensor():
        raise InvalidModelError(
            f"{where}: output '{name}' is not a tensor ({value.data_type()}); not supported"
        )
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(value.element_type()))
    shape = tuple(value.shape())
    if not is_ml_dtype(dtype):
        return np.asarray(value.numpy())
    nbytes = value.tensor_size_in_bytes()
    if nbytes == 0:
        return np.empty(shape, dtype=dtype)
    buffer = (ctypes.c_uint8 * nbytes).from_address(value.data_ptr())
    return np.frombuffer(bytes(buffer), dtype=dtype).reshape(shape)


def _as_array(value: object, name: str, where: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, list):
        try:
            return np.stack([np.asarray(v) for v in value])
        except ValueError:
            pass
    raise InvalidModelError(
        f"{where}: output '{name}' is a {type(value).__name__}, not a tensor; not supported"
    )


def bind(
    session: ort.InferenceSession,
    feed: Mapping[str, np.ndarray],
    *,
    label: str | None = None,
) -> Callable[[], dict[str, np.ndarray]]:
    """Prepares a feed once and returns a callable that runs the session on it.

    Used by latency measurement, so that the timed call does only the run. Arrays in
    ``feed`` that the session does not take are ignored.

    Args:
        session: From :func:`make_session`.
        feed: Arrays by input name (ml_dtypes arrays for bfloat16/float8 inputs).
        label: Names the model in error messages (defaults to "model").

    Returns:
        A callable returning the outputs by name, in the graph's output order.

    Raises:
        InvalidModelError: An input is missing (at bind time), or ONNX Runtime fails to
            run (at call time).
    """
    where = label or "model"
    outputs = session.get_outputs()
    names = [o.name for o in outputs]
    selected: dict[str, np.ndarray] = {}
    for meta in session.get_inputs():
        if meta.name not in feed:
            raise InvalidModelError(f"{where}: input '{meta.name}' ({meta.type}) is not fed")
        selected[meta.name] = np.asarray(feed[meta.name])
    exotic = any(is_ml_dtype(a.dtype) for a in selected.values()) or any(
        marker in o.type for o in outputs for marker in _EXOTIC_MARKERS
    )

    def failure(e: Exception) -> InvalidModelError:
        return InvalidModelError(f"{where}: ONNX Runtime failed to run: {_first_line(e)}")

    if exotic:
        try:
            values = {k: _to_ortvalue(v) for k, v in selected.items()}
        except Exception as e:  # noqa: BLE001
            raise failure(e) from None

        def run_values() -> dict[str, np.ndarray]:
            try:
                results = session.run_with_ort_values(names, values)
            except Exception as e:  # noqa: BLE001 - ORT error types vary
                raise failure(e) from None
            return {n: _from_ortvalue(v, n, where) for n, v in zip(names, results, strict=True)}

        return run_values

    def run_arrays() -> dict[str, np.ndarray]:
        try:
            results = session.run(names, selected)
        except Exception as e:  # noqa: BLE001 - ORT error types vary
            raise failure(e) from None
        return {n: _as_array(v, n, where) for n, v in zip(names, results, strict=True)}

    return run_arrays


def run(
    session: ort.InferenceSession,
    feed: Mapping[str, np.ndarray],
    *,
    label: str | None = None,
) -> dict[str, np.ndarray]:
    """Runs a session on one feed.

    Arrays in ``feed`` that the session does not take are ignored.

    Args:
        session: From :func:`make_session`.
        feed: Arrays by input name (ml_dtypes arrays for bfloat16/float8 inputs).
        label: Names the model in error messages (defaults to "model").

    Returns:
        Outputs by name, in the graph's output order.

    Raises:
        InvalidModelError: An input is missing, or ONNX Runtime fails to run.
    """
    return bind(session, feed, label=label)()
