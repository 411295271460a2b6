"""Calibration statistics for channel pruning: per-channel energy and input Gram matrices.

Both stream ``ctx.calibration_feeds()`` through ONNX Runtime (CPU, graph optimizations
off) on a serialized copy of the *unpruned* model with the needed intermediate values as
extra outputs; memory is constant in the number of feeds.

* :func:`channel_energy`: ``sum(x**2)`` and the element count per position of axis 1 of
  each value (``||X_c||`` for activation-aware importance).
* :func:`input_grams`: for each consumer (a Conv with ``group=1``, a Gemm or a 2-D MatMul),
  the Gram matrix ``A^T A`` of its input rows ``A`` (im2col patches for a Conv, rows of
  the flattened input for Gemm/MatMul), with a trailing column of ones for the bias.
  Rows are subsampled to at most ``max_rows`` per feed (seeded).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from graphopt.errors import CalibrationError, UsageError
from graphopt.infra.context import PassContext

logger = logging.getLogger(__name__)

#: Rows of a consumer's input sampled per calibration feed for its Gram matrix.
MAX_ROWS = 8192
#: Bytes of sampled input rows per consumer and feed (wide inputs get fewer rows).
ROW_BYTES = 32 * 2**20


def _float_info(name: str, dtype: ir.DataType | None) -> onnx.ValueInfoProto:
    elem = int(dtype) if dtype is not None else onnx.TensorProto.FLOAT
    return onnx.helper.make_tensor_value_info(name, elem, None)


def stream_values(
    proto: onnx.ModelProto,
    names: Sequence[str],
    dtypes: Mapping[str, ir.DataType | None],
    ctx: PassContext,
    callback: Callable[[int, dict[str, np.ndarray]], None],
    *,
    threads: int = 2,
) -> int:
    """Runs every calibration feed and hands ``{name: array}`` to ``callback``.

    Args:
        proto: The model to run (a copy; outputs are appended to it).
        names: Values to fetch (graph inputs are taken from the feed).
        dtypes: Element type of each fetched value.
        ctx: Gives the calibration feeds.
        callback: Called with the feed index and the fetched arrays.
        threads: ORT intra-op threads.

    Returns:
        The number of feeds.

    Raises:
        CalibrationError: No feeds, a feed lacking an input, or ORT failing on a feed.
    """
    from graphopt.verify.runner import make_session

    inputs = {i.name for i in proto.graph.input}
    computed = [n for n in dict.fromkeys(names) if n not in inputs]
    existing = {o.name for o in proto.graph.output}
    for n in computed:
        if n not in existing:
            proto.graph.output.append(_float_info(n, dtypes.get(n)))
    count = 0
    with tempfile.TemporaryDirectory(prefix="graphopt-prune-") as scratch:
        path = Path(scratch) / "calibration.onnx"
        onnx.save_model(proto, str(path), save_as_external_data=proto.ByteSize() > 2**31 - 2**20)
        session = make_session(path, threads=threads, optimize=False)
        wanted = [i.name for i in session.get_inputs()]
        for index, feed in enumerate(ctx.calibration_feeds()):
            missing = [w for w in wanted if w not in feed]
            if missing:
                raise CalibrationError(f"calibration sample {index}: no array for graph input '{missing[0]}'")
            selected = {w: np.asarray(feed[w]) for w in wanted}
            try:
                results = session.run(computed, selected) if computed else []
            except Exception as e:  # noqa: BLE001 - ORT error types vary
                line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise CalibrationError(f"calibration sample {index}: ONNX Runtime failed: {line}") from None
            arrays = dict(zip(computed, results, strict=True))
            arrays.update({n: selected[n] for n in names if n in selected})
            for n, arr in arrays.items():
                if not np.all(np.isfinite(arr)):
                    raise CalibrationError(f"calibration sample {index}: '{n}' has NaN or infinite values")
            callback(index, arrays)
            count += 1
    if count == 0:
        raise CalibrationError("calibration data has zero samples")
    return count


def channel_energy(
    model: ir.Model,
    values: Sequence[ir.Value],
    ctx: PassContext,
    axes: Mapping[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """Mean square per position of an axis (1 unless ``axes`` names another) for each
    value, over all calibration feeds.

    Returns:
        ``{value name: float64 array [C]}`` (``||X_c||^2 / count``).
    """
    names = [v.name for v in values if v.name]
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    chosen = dict(axes or {})

    def accumulate(_: int, arrays: dict[str, np.ndarray]) -> None:
        for n in names:
            x = np.asarray(arrays[n], dtype=np.float64)
            axis = chosen.get(n, 1) % x.ndim
            moved = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
            sums[n] = sums.get(n, 0.0) + np.einsum("ij,ij->i", moved, moved)
            counts[n] = counts.get(n, 0) + moved.shape[1]

    proto = ir.serde.serialize_model(model)
    stream_values(proto, names, {v.name: v.dtype for v in values if v.name}, ctx, accumulate)
    return {n: sums[n] / max(counts[n], 1) for n in names}


# ----------------------------------------------------------------------------- im2col


@dataclass(frozen=True)
class ConvGeometry:
    """What im2col needs of a 2-D Conv."""

    kernel: tuple[int, int]
    strides: tuple[int, int]
    dilations: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    auto_pad: str

    @classmethod
    def of(cls, node: ir.Node, weight_shape: Sequence[int]) -> ConvGeometry:
        """Reads the attributes of a Conv with a 4-D weight.

        Raises:
            UsageError: Not a 2-D convolution.
        """
        if len(weight_shape) != 4:
            raise UsageError(f"Conv '{node.name}': only 2-D convolutions are reconstructed")

        def ints(name: str, default: list[int]) -> list[int]:
            attr = node.attributes.get(name)
            return [int(v) for v in attr.value] if attr is not None else default

        auto = node.attributes.get("auto_pad")
        pads = ints("pads", [0, 0, 0, 0])
        return cls(
            kernel=(int(weight_shape[2]), int(weight_shape[3])),
            strides=tuple(ints("strides", [1, 1])),  # type: ignore[arg-type]
            dilations=tuple(ints("dilations", [1, 1])),  # type: ignore[arg-type]
            pads=(pads[0], pads[1], pads[2], pads[3]),
            auto_pad=str(auto.value) if auto is not None else "NOTSET",
        )

    def pads_for(self, height: int, width: int) -> tuple[int, int, int, int]:
        """Explicit pads for an input of this spatial size (resolves ``auto_pad``)."""
        if self.auto_pad in ("NOTSET", ""):
            return self.pads
        if self.auto_pad == "VALID":
            return (0, 0, 0, 0)
        out: list[tuple[int, int]] = []
        for size, k, s, d in zip((height, width), self.kernel, self.strides, self.dilations, strict=True):
            target = -(-size // s)
            total = max(0, (target - 1) * s + (k - 1) * d + 1 - size)
            small, big = total // 2, total - total // 2
            out.append((small, big) if self.auto_pad == "SAME_UPPER" else (big, small))
        return (out[0][0], out[1][0], out[0][1], out[1][1])


def im2col_rows(
    x: np.ndarray, geo: ConvGeometry, rng: np.random.Generator, max_rows: int
) -> np.ndarray:
    """Patches of ``x`` [N, C, H, W] as rows ``[rows, C*kh*kw]`` (columns ordered like
    ``W.reshape(C_out, -1)``), at most ``max_rows`` of them chosen at random."""
    n, c, h, w = x.shape
    top, left, bottom, right = geo.pads_for(h, w)
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    (kh, kw), (sh, sw), (dh, dw) = geo.kernel, geo.strides, geo.dilations
    span_h, span_w = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    windows = np.lib.stride_tricks.sliding_window_view(xp, (span_h, span_w), axis=(2, 3))
    windows = windows[:, :, ::sh, ::sw, ::dh, ::dw]  # [N, C, Ho, Wo, kh, kw]
    ho, wo = windows.shape[2], windows.shape[3]
    total = n * ho * wo
    picked = np.arange(total) if total <= max_rows else np.sort(rng.choice(total, max_rows, replace=False))
    ni, rest = np.divmod(picked, ho * wo)
    hi, wi = np.divmod(rest, wo)
    patches = windows[ni, :, hi, wi]  # [rows, C, kh, kw]
    return patches.reshape(len(picked), c * kh * kw)


@dataclass
class GramRequest:
    """One consumer whose input Gram rows are wanted.

    Attributes:
        key: Caller's identifier.
        value: The consumer's input activation.
        geometry: For a Conv, its im2col geometry; None for Gemm/MatMul rows.
        rows: Which rows of the Gram matrix to keep (bool over ``D + 1`` columns, the
            last for the bias); all when None.
    """

    key: Any
    value: ir.Value
    geometry: ConvGeometry | None
    rows: np.ndarray | None = None


def _row_cap(max_rows: int, width: int) -> int:
    """Rows per feed: at most ``max_rows`` and about ``ROW_BYTES`` of float32 patches."""
    return max(256, min(max_rows, ROW_BYTES // (4 * max(width, 1))))


def input_grams(
    model: ir.Model,
    requests: Sequence[GramRequest],
    ctx: PassContext,
    *,
    max_rows: int = MAX_ROWS,
) -> dict[Any, np.ndarray]:
    """Rows of the Gram matrices ``[A, 1]^T [A, 1]`` of the consumers' input rows.

    Each feed's product is computed in float32 and summed in float64.

    Returns:
        ``{request key: [R, D + 1]}`` (R the kept rows, all ``D + 1`` by default), the
        last column for the bias.
    """
    grams: dict[Any, np.ndarray] = {}
    rng = ctx.rng("prune-channels-gram")

    def accumulate(_: int, arrays: dict[str, np.ndarray]) -> None:
        for req in requests:
            x = np.asarray(arrays[req.value.name or ""], dtype=np.float32)
            if req.geometry is not None:
                width = x.shape[1] * req.geometry.kernel[0] * req.geometry.kernel[1]
                rows = im2col_rows(x, req.geometry, rng, _row_cap(max_rows, width))
            else:
                rows = x.reshape(-1, x.shape[-1])
                cap = _row_cap(max_rows, rows.shape[1])
                if len(rows) > cap:
                    rows = rows[np.sort(rng.choice(len(rows), cap, replace=False))]
            rows = np.concatenate([rows, np.ones((len(rows), 1), dtype=np.float32)], axis=1)
            left = rows if req.rows is None else rows[:, req.rows]
            gram = (left.T @ rows).astype(np.float64)
            grams[req.key] = grams[req.key] + gram if req.key in grams else gram

    values = {r.value.name: r.value.dtype for r in requests if r.value.name}
    proto = ir.serde.serialize_model(model)
    stream_values(proto, list(values), values, ctx, accumulate)
    return grams
