"""Calibration data sources: ``--calib PATH``.

Two layouts are accepted:

* one ``.npz`` file with one array per graph input whose first axis is the sample axis:
  sample *i* is ``{name: array[i:i+1]}`` (batch of one, so varying shapes need the folder
  layout);
* a folder of ``.npz`` files, each one feed (arrays keyed by graph-input name, any batch
  size and sequence length), taken in sorted file-name order.

Files are read with ``allow_pickle=False``: object arrays are refused, never unpickled.
Samples are streamed: only one feed is in memory at a time in the folder layout.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from graphopt.errors import CalibrationError, UsageError

logger = logging.getLogger(__name__)


def _model_inputs(model: onnx.ModelProto | ir.Model) -> dict[str, int]:
    """Graph inputs that must be fed (initializers excluded) -> ONNX element type."""
    if isinstance(model, ir.Model):
        return {
            v.name: int(v.dtype) if v.dtype is not None else 0
            for v in model.graph.inputs
            if v.name not in model.graph.initializers and v.name is not None
        }
    inits = {t.name for t in model.graph.initializer}
    return {
        i.name: i.type.tensor_type.elem_type
        for i in model.graph.input
        if i.name not in inits
    }


#: An input's dims: an int for a fixed size, a str for a dim_param, None when unknown.
Dims = tuple[int | str | None, ...]


def _model_input_shapes(model: onnx.ModelProto | ir.Model) -> dict[str, Dims | None]:
    """Graph inputs that must be fed -> their dims (None when the rank is unknown)."""
    shapes: dict[str, Dims | None] = {}
    if isinstance(model, ir.Model):
        for v in model.graph.inputs:
            if v.name is None or v.name in model.graph.initializers:
                continue
            if v.shape is None:
                shapes[v.name] = None
            else:
                shapes[v.name] = tuple(
                    d if isinstance(d, int) else (d.value if d.value else None)
                    for d in v.shape
                )
        return shapes
    inits = {t.name for t in model.graph.initializer}
    for i in model.graph.input:
        if i.name in inits:
            continue
        tensor_type = i.type.tensor_type
        if not tensor_type.HasField("shape"):
            shapes[i.name] = None
            continue
        shapes[i.name] = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in tensor_type.shape.dim
        )
    return shapes


def _check_shape(arr: np.ndarray, dims: Dims | None, name: str, where: str) -> None:
    if dims is None:
        return
    fits = arr.ndim == len(dims) and all(
        not isinstance(d, int) or d == n for d, n in zip(dims, arr.shape)
    )
    if not fits:
        want = "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
        raise CalibrationError(
            f"{where}: input '{name}' has shape {tuple(arr.shape)}, the model expects {want}"
        )


def _get(arrays: Mapping[str, np.ndarray], name: str, where: str) -> np.ndarray:
    try:
        return np.asarray(arrays[name])
    except ValueError as e:  # object arrays with allow_pickle=False: refused, not unpickled
        raise CalibrationError(f"{where}: array '{name}' cannot be read: {e}") from None


def _open_npz(path: Path) -> Mapping[str, np.ndarray]:
    try:
        return np.load(path, allow_pickle=False)  # type: ignore[no-any-return]
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise CalibrationError(f"{path}: not a readable .npz file ({e})") from None


def _validate_feed(
    feed: Mapping[str, np.ndarray],
    inputs: dict[str, int],
    where: str,
    shapes: Mapping[str, Dims | None] | None = None,
) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name in feed:
        if name not in inputs:
            known = ", ".join(sorted(inputs))
            raise CalibrationError(f"{where}: array '{name}' is not a graph input ({known})")
    for name, elem in inputs.items():
        if name not in feed:
            raise CalibrationError(f"{where}: no array for graph input '{name}'")
        try:
            arr = np.asarray(feed[name])
        except ValueError as e:
            raise CalibrationError(f"{where}: input '{name}': {e}") from None
        _check_shape(arr, (shapes or {}).get(name), name, where)
        if arr.dtype == object:
            raise CalibrationError(f"{where}: input '{name}' is an object array; refused")
        want = onnx.helper.tensor_dtype_to_np_dtype(elem) if elem else arr.dtype
        if arr.dtype != want:
            if np.can_cast(arr.dtype, want, casting="same_kind"):
                arr = arr.astype(want)
            else:
                raise CalibrationError(
                    f"{where}: input '{name}' has dtype {arr.dtype}, the model expects {want}"
                )
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = int(np.size(arr) - np.isfinite(arr).sum())
            raise CalibrationError(f"{where}: input '{name}' has {bad} NaN/Inf values")
        out[name] = arr
    return out


class CalibrationDataset:
    """A re-iterable stream of validated calibration feeds.

    Args:
        path: A ``.npz`` file or a folder of ``.npz`` files.
        model: The model whose graph inputs the feeds must match.
        limit: Use at most this many samples (None: all).

    Raises:
        UsageError: The path does not exist.
        CalibrationError: The data is empty.
    """

    def __init__(self, path: str | Path, model: onnx.ModelProto | ir.Model, limit: int | None = None):
        self.path = Path(path)
        self.inputs = _model_inputs(model)
        self.shapes = _model_input_shapes(model)
        self.limit = limit
        if not self.path.exists():
            raise UsageError(f"{self.path}: calibration data not found")
        if self.path.is_dir():
            self.files = sorted(self.path.glob("*.npz"))
            if not self.files:
                raise CalibrationError(f"{self.path}: folder holds no .npz files (zero samples)")
        else:
            self.files = [self.path]
            arrays = _open_npz(self.path)
            counts = {}
            for k in arrays:
                arr = _get(arrays, k, str(self.path))
                counts[k] = int(arr.shape[0]) if arr.ndim else 0
            if not counts or min(counts.values()) == 0:
                raise CalibrationError(f"{self.path}: zero samples")
            if len(set(counts.values())) > 1:
                raise CalibrationError(
                    f"{self.path}: arrays disagree on the number of samples: {counts}"
                )

    def __call__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        count = 0
        if self.path.is_dir():
            for f in self.files:
                if self.limit is not None and count >= self.limit:
                    return
                arrays = _open_npz(f)
                feed = {k: _get(arrays, k, str(f)) for k in arrays}
                yield _validate_feed(feed, self.inputs, str(f), self.shapes)
                count += 1
            return
        arrays = _open_npz(self.path)
        data = {k: _get(arrays, k, str(self.path)) for k in arrays}
        n = min(v.shape[0] for v in data.values())
        for i in range(n):
            if self.limit is not None and count >= self.limit:
                return
            sample = {k: v[i : i + 1] for k, v in data.items()}
            yield _validate_feed(sample, self.inputs, f"{self.path} sample {i}", self.shapes)
            count += 1
