"""Model inputs for verification: generated from the graph's signature, or loaded from .npz.

Generated feeds follow each graph input's element type and shape. Symbolic dimensions
(``dim_param``) are bound by name from ``dims`` first, then guessed from the name
(containing ``batch`` → ``batch``; ``seq``, ``len``, ``past`` or ``token`` → ``seq``;
anything else → 1); dimensions with neither value nor name are 1. A ``dim_param`` name is
bound once per feed, so two inputs sharing ``batch`` agree. Values are chosen by dtype and input name so that typical transformer inputs are valid: ``*mask*`` all
ones, ``token_type_ids`` zeros, ``*position*ids*`` ``0..n-1`` along the last axis, other
``*ids*`` in ``[0, 100)``, other integers in ``[0, 4)``, floats standard normal, booleans
random. Every input draws from its own generator seeded by ``(seed, crc32(name))``, so a
feed does not change when other inputs are added or reordered.

Loaded feeds (``--inputs file.npz`` or a folder of ``.npz`` files) are read with
``allow_pickle=False`` always: object arrays are refused, never unpickled.
"""

from __future__ import annotations

import logging
import os
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto

from graphopt.errors import CalibrationError, InvalidModelError, UsageError
from graphopt.verify.dtypes import is_float_dtype

logger = logging.getLogger(__name__)

#: A model given as a path, a protobuf or an in-memory IR model.
ModelSource = Union[str, "os.PathLike[str]", onnx.ModelProto, ir.Model]

#: Upper bound (exclusive) of generated token ids.
ID_LIMIT = 100
#: Upper bound (exclusive) of other generated integers.
INT_LIMIT = 4

_SEQ_WORDS = ("seq", "len", "past", "token")
_FLOAT_TYPES = frozenset(
    {
        TensorProto.FLOAT,
        TensorProto.DOUBLE,
        TensorProto.FLOAT16,
        TensorProto.BFLOAT16,
        TensorProto.FLOAT8E4M3FN,
        TensorProto.FLOAT8E4M3FNUZ,
        TensorProto.FLOAT8E5M2,
        TensorProto.FLOAT8E5M2FNUZ,
    }
)
_COMPLEX_TYPES = frozenset({TensorProto.COMPLEX64, TensorProto.COMPLEX128})
_INT_TYPES = frozenset(
    {
        TensorProto.INT8,
        TensorProto.INT16,
        TensorProto.INT32,
        TensorProto.INT64,
        TensorProto.UINT8,
        TensorProto.UINT16,
        TensorProto.UINT32,
        TensorProto.UINT64,
    }
)
# Types ONNX Runtime cannot take as a graph input from Python (packed sub-byte types).
_UNSUPPORTED_TYPES = frozenset(
    {
        getattr(TensorProto, name)
        for name in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2", "FLOAT8E8M0")
        if hasattr(TensorProto, name)
    }
)


@dataclass(frozen=True)
class InputSpec:
    """One graph input to feed.

    Attributes:
        name: The input's name.
        elem_type: ONNX element type (``onnx.TensorProto.FLOAT`` ...).
        dims: Per axis: an ``int`` (fixed), a ``str`` (``dim_param``) or None (unknown).
    """

    name: str
    elem_type: int
    dims: tuple[int | str | None, ...]

    @property
    def dtype(self) -> np.dtype:
        """The NumPy dtype (ml_dtypes for bfloat16 and float8)."""
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(self.elem_type))

    @property
    def type_name(self) -> str:
        """The ONNX element type's name (``FLOAT``, ``INT64`` ...)."""
        return str(TensorProto.DataType.Name(self.elem_type))


# --------------------------------------------------------------------------- signature


def _load_proto_header(path: Path) -> onnx.ModelProto:
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if path.is_dir():
        raise UsageError(f"{path}: is a directory, expected an .onnx file")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf error types vary
        raise InvalidModelError(f"{path}: not an ONNX model ({type(e).__name__})") from None


def _specs_from_proto(model: onnx.ModelProto, where: str) -> list[InputSpec]:
    initializers = {t.name for t in model.graph.initializer}
    initializers.update(t.values.name for t in model.graph.sparse_initializer)
    specs: list[InputSpec] = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        kind = value.type.WhichOneof("value")
        if kind != "tensor_type":
            raise InvalidModelError(
                f"{where}: input '{value.name}' is a {kind or 'untyped'} value; only tensor "
                "inputs can be generated, pass --inputs"
            )
        tensor_type = value.type.tensor_type
        if not tensor_type.HasField("shape"):
            raise InvalidModelError(
                f"{where}: input '{value.name}' has no shape (unknown rank); pass --inputs"
            )
        dims: list[int | str | None] = []
        for d in tensor_type.shape.dim:
            which = d.WhichOneof("value")
            if which == "dim_value":
                dims.append(int(d.dim_value))
            elif which == "dim_param" and d.dim_param:
                dims.append(str(d.dim_param))
            else:
                dims.append(None)
        specs.append(InputSpec(value.name, int(tensor_type.elem_type), tuple(dims)))
    return specs


def _specs_from_ir(model: ir.Model, where: str) -> list[InputSpec]:
    specs: list[InputSpec] = []
    initializers = model.graph.initializers
    for value in model.graph.inputs:
        name = value.name or ""
        if name in initializers:
            continue
        if value.dtype is None:
            raise InvalidModelError(
                f"{where}: input '{name}' has no tensor element type; pass --inputs"
            )
        if value.shape is None:
            raise InvalidModelError(
                f"{where}: input '{name}' has no shape (unknown rank); pass --inputs"
            )
        dims: list[int | str | None] = []
        for d in value.shape:
            if isinstance(d, int):
                dims.append(d)
            else:
                dims.append(d.value)
        specs.append(InputSpec(name, int(value.dtype), tuple(dims)))
    return specs


def input_specs(model: ModelSource) -> list[InputSpec]:
    """Lists the graph inputs that must be fed (inputs that are also initializers are not).

    Args:
        model: A path to an ``.onnx`` file (external data is not read), a protobuf or an IR
            model.

    Returns:
        The inputs in graph order.

    Raises:
        UsageError: The path is missing or a folder.
        InvalidModelError: The file is not ONNX, or an input is not a typed, ranked tensor.
    """
    if isinstance(model, ir.Model):
        return _specs_from_ir(model, "model")
    if isinstance(model, onnx.ModelProto):
        return _specs_from_proto(model, "model")
    path = Path(model)
    return _specs_from_proto(_load_proto_header(path), str(path))


# --------------------------------------------------------------------------- generation


def guess_dim(param: str, *, batch: int, seq: int) -> int:
    """Guesses a value for a ``dim_param`` that ``dims`` does not bind.

    Args:
        param: The symbolic dimension's name.
        batch: The value for batch-like names.
        seq: The value for sequence-like names.

    Returns:
        ``batch`` for names containing "batch"; ``seq`` for names containing "seq"
        (sequence), "len" (length), "past" or "token"; 1 otherwise (case-insensitive).
    """
    lowered = param.lower()
    if "batch" in lowered:
        return batch
    if any(word in lowered for word in _SEQ_WORDS):
        return seq
    return 1


def resolve_shape(
    spec: InputSpec,
    bound: dict[str, int],
    dims: Mapping[str, int],
    *,
    batch: int,
    seq: int,
) -> tuple[int, ...]:
    """Turns an input's dims into a concrete shape, binding ``dim_param``s in ``bound``.

    Args:
        spec: The input.
        bound: ``dim_param`` values bound so far in this feed; updated in place.
        dims: User-given ``dim_param`` values.
        batch: Batch size for batch-like names.
        seq: Sequence length for sequence-like names.

    Returns:
        The concrete shape.
    """
    shape: list[int] = []
    for d in spec.dims:
        if isinstance(d, int):
            shape.append(d)
        elif d is None:
            shape.append(1)
        else:
            if d not in bound:
                if d in dims:
                    bound[d] = int(dims[d])
                else:
                    bound[d] = guess_dim(d, batch=batch, seq=seq)
                    logger.debug("input %s: dim %r guessed as %d", spec.name, d, bound[d])
            shape.append(bound[d])
    return tuple(shape)


def _generator(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])


def _integer_values(
    name: str, shape: tuple[int, ...], dtype: np.dtype, rng: np.random.Generator
) -> np.ndarray:
    lowered = name.lower()
    if "mask" in lowered:
        return np.ones(shape, dtype=dtype)
    if "token_type" in lowered or "segment" in lowered:
        return np.zeros(shape, dtype=dtype)
    if "position" in lowered and "ids" in lowered and shape:
        return np.broadcast_to(np.arange(shape[-1]), shape).astype(dtype)
    high = ID_LIMIT if "ids" in lowered else INT_LIMIT
    high = min(high, int(np.iinfo(dtype).max) + 1)
    return rng.integers(0, high, size=shape).astype(dtype)


def generate_value(spec: InputSpec, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Generates one input's values (see the module docstring for the rules).

    Args:
        spec: The input.
        shape: Its concrete shape.
        rng: The generator to draw from.

    Returns:
        An array of ``spec.dtype`` and ``shape``.

    Raises:
        InvalidModelError: The element type cannot be fed from Python.
    """
    t = spec.elem_type
    if t in _UNSUPPORTED_TYPES or t == TensorProto.UNDEFINED:
        raise InvalidModelError(
            f"input '{spec.name}': element type {spec.type_name} cannot be fed to ONNX Runtime"
        )
    dtype = spec.dtype
    masked = "mask" in spec.name.lower()
    if t in _INT_TYPES:
        return _integer_values(spec.name, shape, dtype, rng)
    if t == TensorProto.BOOL:
        if masked:
            return np.ones(shape, dtype=np.bool_)
        return rng.random(shape) < 0.5
    if t in _FLOAT_TYPES:
        if masked:
            return np.ones(shape, dtype=np.float32).astype(dtype)
        return rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    if t in _COMPLEX_TYPES:
        real = rng.standard_normal(shape)
        imag = rng.standard_normal(shape)
        return (real + 1j * imag).astype(dtype)
    if t == TensorProto.STRING:
        words = np.array(["a", "b", "c", "d"], dtype=object)
        return words[rng.integers(0, len(words), size=shape)]
    raise InvalidModelError(f"input '{spec.name}': element type {spec.type_name} is not supported")


def make_feeds(
    model_path_or_proto: ModelSource,
    *,
    dims: Mapping[str, int] | None = None,
    seed: int = 0,
    batch: int = 1,
    seq: int = 16,
) -> dict[str, np.ndarray]:
    """Generates one feed for a model from its input signature.

    Args:
        model_path_or_proto: A path to an ``.onnx`` file, a protobuf or an IR model.
        dims: Values of symbolic dimensions by ``dim_param`` name
            (``{"batch": 8, "sequence": 128}``); names not given are guessed.
        seed: Seed; the same seed gives the same feed.
        batch: Value for batch-like ``dim_param``s not in ``dims``.
        seq: Value for sequence-like ``dim_param``s not in ``dims``.

    Returns:
        Arrays by input name, in graph order.

    Raises:
        UsageError: The path is missing or a folder, or a dimension value is negative.
        InvalidModelError: An input cannot be generated (non-tensor, unknown rank, packed
            4-bit element type).
    """
    given = dict(dims or {})
    for key, value in given.items():
        if int(value) < 0:
            raise UsageError(f"dimension '{key}': value {value} is negative")
    if batch < 0 or seq < 0:
        raise UsageError(f"batch ({batch}) and seq ({seq}) must not be negative")
    specs = input_specs(model_path_or_proto)
    bound: dict[str, int] = {}
    feed: dict[str, np.ndarray] = {}
    for spec in specs:
        shape = resolve_shape(spec, bound, given, batch=batch, seq=seq)
        feed[spec.name] = generate_value(spec, shape, _generator(seed, spec.name))
    unused = sorted(set(given) - set(bound))
    if unused:
        logger.debug("dims not used by any input: %s", ", ".join(unused))
    return feed


# --------------------------------------------------------------------------- loading


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise CalibrationError(f"{path}: cannot be read ({e.strerror})") from None
    if head.startswith(b"\x93NUMPY"):
        raise CalibrationError(
            f"{path}: is a single .npy array; expected an .npz archive of arrays keyed by "
            "input name (numpy.savez(path, input_ids=...))"
        )
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        raise CalibrationError(
            f"{path}: refused: the file is a Python pickle, which is never unpickled; save "
            "plain numeric arrays with numpy.savez"
        )
    if not head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        raise CalibrationError(f"{path}: not an .npz archive (no zip header)")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise CalibrationError(f"{path}: not an .npz archive ({type(e).__name__})") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise CalibrationError(f"{path}: not an .npz archive")
    arrays: dict[str, np.ndarray] = {}
    with loaded:
        for key in loaded.files:
            try:
                arrays[key] = np.asarray(loaded[key])
            except ValueError as e:
                if "pickle" in str(e).lower() or "object" in str(e).lower():
                    raise CalibrationError(
                        f"{path}: input '{key}': refused: array holds Python objects "
                        "(pickle), which are never unpickled"
                    ) from None
                raise CalibrationError(f"{path}: input '{key}': unreadable ({e})") from None
            except (OSError, EOFError, zipfile.BadZipFile) as e:
                raise CalibrationError(
                    f"{path}: input '{key}': unreadable ({type(e).__name__})"
                ) from None
    if not arrays:
        raise CalibrationError(f"{path}: holds no arrays (zero inputs)")
    return arrays


def _cast(path: Path, spec: InputSpec, array: np.ndarray) -> np.ndarray:
    target = spec.dtype
    source = array.dtype
    if source == target:
        return array
    problem = f"{path}: input '{spec.name}': dtype {source} cannot be used as {spec.type_name}"
    if source.kind == "V" and not is_float_dtype(source):
        raise CalibrationError(f"{problem} (raw bytes; save bfloat16 data as float32)")
    if spec.elem_type == TensorProto.STRING:
        if source.kind not in "USO":
            raise CalibrationError(problem)
        return array.astype(object)
    if is_float_dtype(target):
        if not (is_float_dtype(source) or source.kind in "iub"):
            raise CalibrationError(problem)
        with np.errstate(over="ignore", invalid="ignore"):
            cast = array.astype(target)
        if (
            np.isfinite(array.astype(np.float64)).all()
            and not np.isfinite(cast.astype(np.float64)).all()
        ):
            raise CalibrationError(f"{path}: input '{spec.name}': values overflow {spec.type_name}")
        return cast
    if source.kind == "f" or is_float_dtype(source) or source.kind in "cUSO":
        raise CalibrationError(problem)
    if target.kind in "iu":
        if source.kind == "b":
            return array.astype(target)
        info = np.iinfo(target)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise CalibrationError(
                f"{path}: input '{spec.name}': values [{array.min()}, {array.max()}] "
                f"do not fit {spec.type_name}"
            )
        return array.astype(target)
    if target.kind == "b":
        if source.kind == "b":
            return array
        raise CalibrationError(problem)
    if target.kind == "c" and source.kind in "iubfc":
        return array.astype(target)
    raise CalibrationError(problem)


def validate_feed(
    path: Path, feed: dict[str, np.ndarray], specs: list[InputSpec] | None
) -> dict[str, np.ndarray]:
    """Checks one loaded feed and casts it to the model's dtypes.

    Args:
        path: The file it came from, for messages.
        feed: Arrays by name.
        specs: The model's inputs, or None to check only the values.

    Returns:
        The feed, cast to the model's dtypes, in the model's input order.

    Raises:
        CalibrationError: Unknown or missing input, uncastable dtype, wrong rank or fixed
            dimension, inconsistent symbolic dimension, NaN or Inf.
    """
    out: dict[str, np.ndarray] = {}
    if specs is not None:
        known = {s.name for s in specs}
        for key in feed:
            if key not in known:
                names = ", ".join(s.name for s in specs) or "none"
                raise CalibrationError(
                    f"{path}: array '{key}' is not a model input (inputs: {names})"
                )
        bound: dict[str, tuple[int, str]] = {}
        for spec in specs:
            if spec.name not in feed:
                raise CalibrationError(f"{path}: input '{spec.name}' is missing")
            array = _cast(path, spec, feed[spec.name])
            if array.ndim != len(spec.dims):
                raise CalibrationError(
                    f"{path}: input '{spec.name}': rank {array.ndim} (shape "
                    f"{tuple(array.shape)}), model expects rank {len(spec.dims)}"
                )
            for axis, (size, want) in enumerate(zip(array.shape, spec.dims, strict=True)):
                if isinstance(want, int) and size != want:
                    raise CalibrationError(
                        f"{path}: input '{spec.name}': axis {axis} is {size}, model expects {want}"
                    )
                if isinstance(want, str):
                    if want in bound and bound[want][0] != size:
                        first_size, first_input = bound[want]
                        raise CalibrationError(
                            f"{path}: input '{spec.name}': axis {axis} ('{want}') is {size} "
                            f"but '{first_input}' has {want}={first_size}"
                        )
                    bound.setdefault(want, (size, spec.name))
            out[spec.name] = array
    else:
        out = dict(feed)
    for name, array in out.items():
        if is_float_dtype(array.dtype) or array.dtype.kind == "c":
            wide = np.complex128 if array.dtype.kind == "c" else np.float64
            finite = np.isfinite(array.astype(wide))
            if not finite.all():
                bad = int(finite.size - np.count_nonzero(finite))
                index = tuple(int(i) for i in np.argwhere(~finite)[0])
                raise CalibrationError(
                    f"{path}: input '{name}': {bad} NaN/Inf value(s), first at index {index}"
                )
    return out


def load_feeds(
    path: str | os.PathLike[str], model: ModelSource | None = None
) -> list[dict[str, np.ndarray]]:
    """Reads feeds from an ``.npz`` file (one feed) or a folder of them (one feed each).

    Files are read with ``allow_pickle=False``: object arrays are refused, never unpickled.
    In a folder, ``*.npz`` files are taken in name order; other files are ignored.

    Args:
        path: An ``.npz`` file or a folder.
        model: The model the feeds are for; when given, names, dtypes (cast when safe) and
            shapes are checked against its inputs.

    Returns:
        The feeds, in file-name order.

    Raises:
        UsageError: The path does not exist.
        CalibrationError: Not an .npz, pickled content, zero samples, unknown or missing
            input, uncastable dtype, wrong shape, NaN or Inf.
        InvalidModelError: ``model`` cannot be read.
    """
    source = Path(path)
    if not source.exists():
        raise UsageError(f"{source}: no such file or folder")
    if source.is_dir():
        files = sorted(
            (p for p in source.iterdir() if p.suffix == ".npz" and p.is_file()),
            key=lambda p: p.name,
        )
        if not files:
            raise CalibrationError(f"{source}: folder holds no .npz files (zero samples)")
    else:
        files = [source]
    specs = input_specs(model) if model is not None else None
    feeds = [validate_feed(f, _read_npz(f), specs) for f in files]
    logger.debug("loaded %d feed(s) from %s", len(feeds), source)
    return feeds
