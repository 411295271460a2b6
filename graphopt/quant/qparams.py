"""Quantization parameters from float ranges, and linear (de)quantization.

Semantics, fixed here and tested:

* **Range.** ``[min, max]`` is first widened to include 0, so 0 is always inside.
  Asymmetric: ``scale = (max - min) / (qmax - qmin)``, ``zero_point = rint(qmin - min /
  scale)`` clipped to ``[qmin, qmax]``. Symmetric: ``zero_point`` is the spec's middle code
  (0 for signed types) and ``scale = a / min(qmax - zp, zp - qmin)`` with ``a = max(|min|,
  |max|)``, so both ``-a`` and ``a`` are representable (s8: ``a / 127``; the code -128 is
  only reached by saturation). Scales are computed in float64 and stored as float32.
* **Finite levels.** Every code in ``[qmin, qmax]`` dequantizes to a finite float32: for
  ranges reaching past ``~1.7e38`` the scale is capped at ``float32_max / max(qmax - zp,
  zp - qmin)`` (symmetric s8 with ``|x|`` up to ``3.4e38``: ``scale = max / 128``, so the
  last ~1% of the float32 range saturates instead of rounding within half a step).
* **Zero is exact.** The zero point is an integer code, so ``quantize(0) == zero_point``
  and ``dequantize(zero_point) == 0.0`` exactly.
* **Scale floor.** Every scale is a normal float32 ``>= MIN_SCALE`` (``2**-40``): ranges
  narrower than ``~255 * 2**-40`` lose resolution, which no real tensor notices, and the
  product of two scales (a bias scale) stays a normal float32.
* **min == max.** For a constant ``c != 0`` the scale is ``|c| / 2**k`` with ``2**k``
  the largest power of two not above the codes available to ``c`` (asymmetric: ``qmax -
  qmin``, so u8 gives ``c / 128``; symmetric: ``min(qmax - zp, zp - qmin)``, so s8 gives
  ``c / 64`` and ``-c`` is representable too). ``c`` quantizes to ``2**k`` codes from the
  zero point and dequantizes back to exactly ``c`` (powers of two divide and multiply
  exactly) for every ``|c| >= MIN_SCALE``; smaller constants get ``MIN_SCALE`` and round
  to within half of it. Near the float32 limit, asymmetric specs move the zero point so
  that ``c`` takes the extreme code (still exact); symmetric specs with ``|c| > 1.7e38``
  get the capped scale below and ``c`` may saturate (error under one step). For ``min ==
  max == 0`` the scale is ``ZERO_RANGE_SCALE`` (``2**-23``, float32 epsilon,
  ``1.1920929e-07``) and the zero point the usual one (qmin for asymmetric, the middle
  code for symmetric).
* **Errors.** Non-finite ``min``/``max``, ``min > max`` or values outside float32 raise
  :class:`~graphopt.errors.CalibrationError` naming the tensor.
* **quantize** is ONNX ``QuantizeLinear``: ``saturate(rint(x / scale) + zero_point)`` with
  ``x`` and ``scale`` in float32 (IEEE division), round half to even, saturation to the
  spec's ``[qmin, qmax]`` (the dtype's full range unless ``reduce_range``/``narrow``).
  Codes are bit-identical to ONNX Runtime's for float32 inputs. ``+-inf`` saturates; NaN
  raises.
* **dequantize** is ONNX ``DequantizeLinear``: ``float32(q - zero_point) * scale``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from graphopt.errors import CalibrationError
from graphopt.quant.spec import QuantSpec

#: Smallest scale ever produced (``2**-40``); a normal float32 whose square is normal too.
MIN_SCALE: float = 2.0**-40
#: Scale for an all-zero range (``min == max == 0``): float32 epsilon, ``2**-23``.
ZERO_RANGE_SCALE: float = 2.0**-23

_F32_MAX = float(np.finfo(np.float32).max)
_F32_TINY = float(np.finfo(np.float32).tiny)


@dataclass(frozen=True, eq=False)
class QParams:
    """Scale and zero point of a quantized tensor.

    Attributes:
        scale: float32; a 0-d array per tensor, 1-D (one per channel) per channel.
        zero_point: Same shape, in the storage dtype (uint8, int8, ...).
    """

    scale: np.ndarray[Any, np.dtype[np.float32]]
    zero_point: np.ndarray[Any, np.dtype[Any]]

    def __post_init__(self) -> None:
        if self.scale.dtype != np.float32:
            raise ValueError(f"QParams scale must be float32, not {self.scale.dtype}")
        if self.scale.shape != self.zero_point.shape or self.scale.ndim > 1:
            raise ValueError(
                f"QParams scale {self.scale.shape} and zero point {self.zero_point.shape} "
                "must have the same 0-d or 1-D shape"
            )

    @property
    def per_channel(self) -> bool:
        """Whether there is one scale per channel (1-D parameters)."""
        return self.scale.ndim == 1


def _range_arrays(
    min_val: npt.ArrayLike, max_val: npt.ArrayLike, spec: QuantSpec, value_name: str
) -> tuple[np.ndarray[Any, np.dtype[np.float64]], np.ndarray[Any, np.dtype[np.float64]]]:
    lo = np.asarray(min_val, dtype=np.float64)
    hi = np.asarray(max_val, dtype=np.float64)
    if lo.shape != hi.shape:
        raise ValueError(f"'{value_name}': min shape {lo.shape} != max shape {hi.shape}")
    want = 1 if spec.per_channel else 0
    if lo.ndim != want:
        kind = "per-channel (1-D)" if spec.per_channel else "per-tensor (scalar)"
        raise ValueError(f"'{value_name}': {kind} spec needs {kind} min/max, got shape {lo.shape}")
    bad = ~(np.isfinite(lo) & np.isfinite(hi))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        where = f" channel {i}" if spec.per_channel else ""
        raise CalibrationError(
            f"cannot quantize '{value_name}'{where}: range [{lo.flat[i]}, {hi.flat[i]}] is not finite"
        )
    inverted = lo > hi
    if inverted.any():
        i = int(np.flatnonzero(inverted)[0])
        raise CalibrationError(
            f"cannot quantize '{value_name}': min {lo.flat[i]} > max {hi.flat[i]}"
        )
    too_big = (np.abs(lo) > _F32_MAX) | (np.abs(hi) > _F32_MAX)
    if too_big.any():
        i = int(np.flatnonzero(too_big)[0])
        raise CalibrationError(
            f"cannot quantize '{value_name}': range [{lo.flat[i]}, {hi.flat[i]}] exceeds float32"
        )
    return lo, hi


def compute_qparams(
    min_val: npt.ArrayLike,
    max_val: npt.ArrayLike,
    spec: QuantSpec,
    *,
    value_name: str = "tensor",
) -> QParams:
    """Scale and zero point that represent ``[min_val, max_val]`` (widened to hold 0).

    See the module docstring for the exact formulas, the scale floor and the ``min ==
    max`` rule.

    Args:
        min_val: Range minimum: a scalar per tensor, a 1-D array per channel.
        max_val: Range maximum, same shape.
        spec: The quantization spec.
        value_name: Tensor name used in error messages.

    Returns:
        float32 scales and zero points in the spec's dtype, 0-d or 1-D like the inputs.

    Raises:
        CalibrationError: A bound is NaN/inf, ``min > max``, or outside float32.
        ValueError: The shapes do not fit the spec's granularity.

    Examples:
        >>> from graphopt.quant.spec import ACT_U8_ASYM
        >>> qp = compute_qparams(-1.0, 3.0, ACT_U8_ASYM)
        >>> float(qp.scale), int(qp.zero_point)
        (0.01568627543747425, 64)
    """
    lo, hi = _range_arrays(min_val, max_val, spec, value_name)
    qmin, qmax = spec.qmin, spec.qmax
    lo0 = np.minimum(lo, 0.0)
    hi0 = np.maximum(hi, 0.0)
    zp: np.ndarray[Any, np.dtype[np.float64]]
    if spec.symmetric:
        mid = spec.symmetric_zero_point
        levels = min(qmax - mid, mid - qmin)
        scale = (np.maximum(-lo0, hi0) / levels).astype(np.float32)
    else:
        scale = ((hi0 - lo0) / (qmax - qmin)).astype(np.float32)
    scale = np.maximum(scale, np.float32(MIN_SCALE))
    scale = np.where(hi0 == lo0, np.float32(ZERO_RANGE_SCALE), scale).astype(np.float32)
    if spec.symmetric:
        zp = np.full(lo.shape, float(spec.symmetric_zero_point))
    else:
        zp = np.clip(np.rint(qmin - lo0 / scale.astype(np.float64)), qmin, qmax)

    c32 = lo.astype(np.float32)
    const = (lo == hi) & (c32 != 0)
    if const.any():
        scale, zp = _constant_qparams(c32, const, scale, zp, spec)
    scale, zp = _fit_float32(scale, zp, lo0, spec)

    if not (np.isfinite(scale).all() and (scale >= _F32_TINY).all()):
        raise CalibrationError(f"cannot quantize '{value_name}': scale {scale} is not usable")
    return QParams(scale=scale, zero_point=zp.astype(spec.dtype.numpy_dtype))


def _constant_qparams(
    c32: np.ndarray[Any, np.dtype[np.float32]],
    const: np.ndarray[Any, np.dtype[np.bool_]],
    scale: np.ndarray[Any, np.dtype[np.float32]],
    zp: np.ndarray[Any, np.dtype[np.float64]],
    spec: QuantSpec,
) -> tuple[np.ndarray[Any, np.dtype[np.float32]], np.ndarray[Any, np.dtype[np.float64]]]:
    """Scales that round-trip a constant ``c`` exactly: ``|c| / 2**k`` (see module doc)."""
    qmin, qmax = spec.qmin, spec.qmax
    positive = c32 > 0
    if spec.symmetric:
        mid = spec.symmetric_zero_point
        side = np.full(c32.shape, float(min(qmax - mid, mid - qmin)))
    else:
        side = np.full(c32.shape, float(qmax - qmin))
    magnitude = np.abs(c32).astype(np.float64)
    # floor(log2(v)) == frexp exponent - 1, exact for the integers and powers of two here.
    k_codes = np.frexp(np.maximum(side, 1.0))[1] - 1
    k_floor = np.frexp(np.where(const, magnitude, 1.0) / MIN_SCALE)[1] - 1
    k = np.minimum(k_codes, k_floor)
    exact = np.ldexp(np.abs(c32), -np.maximum(k, 0).astype(np.int32)).astype(np.float32)
    const_scale = np.where(k >= 0, exact, np.float32(MIN_SCALE)).astype(np.float32)
    if not spec.symmetric:
        # c sits 2**k codes from the zero point: at qmin + 2**k (c > 0) or qmax - 2**k
        # (c < 0); if the far end of the grid would overflow float32, c takes the extreme
        # code instead (zero point qmax - 2**k or qmin + 2**k).
        steps = np.ldexp(1.0, np.maximum(k, 0).astype(np.int32))
        far = (qmax - qmin) * const_scale.astype(np.float64)
        flip = far > _F32_MAX
        natural = np.where(positive, float(qmin), float(qmax))
        flipped = np.where(positive, qmax - steps, qmin + steps)
        zp = np.where(const, np.where(flip, flipped, natural), zp)
    return np.where(const, const_scale, scale).astype(np.float32), zp


def _fit_float32(
    scale: np.ndarray[Any, np.dtype[np.float32]],
    zp: np.ndarray[Any, np.dtype[np.float64]],
    lo0: np.ndarray[Any, np.dtype[np.float64]],
    spec: QuantSpec,
) -> tuple[np.ndarray[Any, np.dtype[np.float32]], np.ndarray[Any, np.dtype[np.float64]]]:
    """Caps scales so that every code in ``[qmin, qmax]`` dequantizes to a finite float32.

    Only ranges reaching past ``~1.7e38`` are affected (``(qmin - zp) * scale`` would
    overflow, e.g. the code -128 that out-of-range values saturate to in symmetric s8).
    """
    for _ in range(8):
        reach = np.maximum(spec.qmax - zp, zp - spec.qmin)
        cap = (_F32_MAX / np.maximum(reach, 1.0)).astype(np.float32)
        scale = np.minimum(scale, cap).astype(np.float32)
        with np.errstate(over="ignore"):
            top = (spec.qmax - zp).astype(np.float32) * scale
            bottom = (spec.qmin - zp).astype(np.float32) * scale
        overflow = ~(np.isfinite(top) & np.isfinite(bottom))
        if not overflow.any():
            break
        scale = np.where(overflow, np.nextafter(scale, np.float32(0)), scale).astype(np.float32)
        if not spec.symmetric:
            fresh = np.clip(
                np.rint(spec.qmin - lo0 / scale.astype(np.float64)), spec.qmin, spec.qmax
            )
            zp = np.where(overflow & (lo0 != 0), fresh, zp)
    return scale, zp


def _channel_view(
    params: np.ndarray[Any, np.dtype[Any]], ndim: int, shape: tuple[int, ...], axis: int | None
) -> np.ndarray[Any, np.dtype[Any]]:
    """Reshapes 1-D per-channel parameters to broadcast along ``axis``."""
    if params.ndim == 0:
        return params
    if axis is None:
        raise ValueError("per-channel quantization parameters need an axis")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for a tensor of rank {ndim}")
    axis %= ndim
    if shape[axis] != params.shape[0]:
        raise ValueError(
            f"tensor has {shape[axis]} channels along axis {axis} but there are "
            f"{params.shape[0]} quantization parameters"
        )
    view = [1] * ndim
    view[axis] = params.shape[0]
    return params.reshape(view)


def quantize(
    x: npt.ArrayLike,
    qparams: QParams,
    spec: QuantSpec,
    axis: int | None = None,
    *,
    value_name: str = "tensor",
) -> np.ndarray[Any, np.dtype[Any]]:
    """ONNX ``QuantizeLinear``: ``saturate(rint(x / scale) + zero_point)``.

    ``x`` is cast to float32 and divided by the float32 scale (IEEE division); ``rint``
    rounds half to even; saturation is to the spec's ``[qmin, qmax]``.

    Args:
        x: Float values.
        qparams: Scales and zero points (0-d per tensor, 1-D per channel).
        spec: Gives the storage dtype and the code range.
        axis: Channel axis of ``x`` for per-channel parameters; defaults to ``spec.axis``.
        value_name: Tensor name used in error messages.

    Returns:
        Codes in the spec's numpy dtype, same shape as ``x``.

    Raises:
        CalibrationError: ``x`` holds NaN.
        ValueError: Per-channel parameters do not fit ``x`` along the axis.
    """
    xf = np.asarray(x, dtype=np.float32)
    if np.isnan(xf).any():
        raise CalibrationError(f"cannot quantize '{value_name}': it contains NaN")
    chan_axis = axis if axis is not None else spec.axis
    scale = _channel_view(qparams.scale, xf.ndim, xf.shape, chan_axis)
    zero_point = _channel_view(qparams.zero_point, xf.ndim, xf.shape, chan_axis)
    work = np.float32 if spec.dtype.bits <= 16 else np.float64
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        rounded = np.rint(xf / scale).astype(work)
    codes = np.clip(rounded + zero_point.astype(work), spec.qmin, spec.qmax)
    out: np.ndarray[Any, np.dtype[Any]] = codes.astype(spec.dtype.numpy_dtype)
    return out


def dequantize(
    q: npt.ArrayLike, qparams: QParams, axis: int | None = None
) -> np.ndarray[Any, np.dtype[np.float32]]:
    """ONNX ``DequantizeLinear``: ``float32(q - zero_point) * scale``.

    Args:
        q: Integer codes.
        qparams: Scales and zero points.
        axis: Channel axis of ``q`` (needed for per-channel parameters).

    Returns:
        float32 values, same shape as ``q``.

    Raises:
        ValueError: ``q`` is not an integer array, or per-channel parameters do not fit.
    """
    codes = np.asarray(q)
    if codes.dtype.kind not in "iu":
        raise ValueError(f"dequantize needs integer codes, not {codes.dtype}")
    scale = _channel_view(qparams.scale, codes.ndim, codes.shape, axis)
    zero_point = _channel_view(qparams.zero_point, codes.ndim, codes.shape, axis)
    wide = np.int32 if codes.dtype.itemsize <= 2 else np.int64
    diff = codes.astype(wide) - zero_point.astype(wide)
    out: np.ndarray[Any, np.dtype[np.float32]] = diff.astype(np.float32) * scale
    return out


def fake_quantize(
    x: npt.ArrayLike,
    qparams: QParams,
    spec: QuantSpec,
    axis: int | None = None,
    *,
    value_name: str = "tensor",
) -> np.ndarray[Any, np.dtype[np.float32]]:
    """``dequantize(quantize(x))``: the float values a Q/DQ pair lets through.

    Args:
        x: Float values.
        qparams: Scales and zero points.
        spec: The quantization spec.
        axis: Channel axis for per-channel parameters; defaults to ``spec.axis``.
        value_name: Tensor name used in error messages.

    Returns:
        float32 values, same shape as ``x``.
    """
    chan_axis = axis if axis is not None else spec.axis
    codes = quantize(x, qparams, spec, chan_axis, value_name=value_name)
    return dequantize(codes, qparams, chan_axis)


def sqnr_db(ref: npt.ArrayLike, approx: npt.ArrayLike) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum(ref^2) / sum((ref - approx)^2))``.

    Computed in float64. Identical arrays give ``+inf``; a zero reference with a non-zero
    error gives ``-inf``.

    Args:
        ref: Reference values.
        approx: Approximation, same shape.

    Returns:
        The ratio in decibels.

    Raises:
        ValueError: The shapes differ.
    """
    r = np.asarray(ref, dtype=np.float64)
    a = np.asarray(approx, dtype=np.float64)
    if r.shape != a.shape:
        raise ValueError(f"sqnr_db: shapes differ: {r.shape} vs {a.shape}")
    signal = float(np.sum(r * r))
    noise = float(np.sum((r - a) ** 2))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def bias_qparams(input_scale: npt.ArrayLike, weight_scales: npt.ArrayLike) -> QParams:
    """Parameters of an int32 bias: ``scale = input_scale * weight_scale``, zero point 0.

    The product is a float32 multiplication, as ONNX Runtime's QLinear kernels compute it.
    Quantize the bias with :data:`graphopt.quant.spec.BIAS_S32` (per-tensor weight scale)
    or ``BIAS_S32_PER_CHANNEL``; a bias larger than ``2**31 * scale`` saturates, so check
    ``abs(bias) / scale`` before trusting it.

    Args:
        input_scale: The activation's per-tensor scale.
        weight_scales: The weight's scale: a scalar or one per output channel.

    Returns:
        float32 scales shaped like ``weight_scales`` and int32 zero points (all 0).

    Raises:
        CalibrationError: A scale is not a positive finite float, or the product is not a
            normal float32.
        ValueError: ``input_scale`` is not a scalar or ``weight_scales`` is not 0-d/1-D.
    """
    s_in = np.asarray(input_scale, dtype=np.float32)
    s_w = np.asarray(weight_scales, dtype=np.float32)
    if s_in.size != 1:
        raise ValueError(f"bias_qparams: input scale must be a scalar, got shape {s_in.shape}")
    if s_w.ndim > 1:
        raise ValueError(f"bias_qparams: weight scales must be 0-d or 1-D, got {s_w.shape}")
    for label, arr in (("input scale", s_in), ("weight scale", s_w)):
        if not (np.isfinite(arr).all() and (arr > 0).all()):
            raise CalibrationError(f"bias_qparams: {label} {arr} is not positive and finite")
    scale = (s_in.reshape(()) * s_w).astype(np.float32)
    if not (np.isfinite(scale).all() and (scale >= _F32_TINY).all()):
        raise CalibrationError(
            f"bias_qparams: bias scale {scale} (input {s_in} x weight) is not a normal float32"
        )
    return QParams(scale=scale, zero_point=np.zeros(scale.shape, dtype=np.int32))
