"""Per-group low-bit weight codes: the one internal representation of weight-only quantization.

Every weight-only method (round-to-nearest, GPTQ, AWQ-scaled RTN) produces a
:class:`GroupQuantized`, and every lowering (ONNX Runtime ``MatMulNBits``, opset-21 blocked
``DequantizeLinear``, runtime_ext ``graphopt.MatMulLowBit``) is built from one, so
converting between lowerings never re-rounds.

Layout, fixed here:

* The float weight is seen as ``W[N, K]``: ``N`` output channels, ``K`` input features
  (the transpose of an ONNX ``MatMul`` ``B[K, N]``). Groups run along ``K``: group ``g``
  covers ``K`` indices ``[g * group_size, min((g + 1) * group_size, K))``, so the last
  group is short when ``group_size`` does not divide ``K``. Per-channel is
  ``group_size == K``.
* ``codes`` are unsigned integers in ``[0, 2**bits)`` stored one per ``uint8``.
* ``W_hat[n, k] = (codes[n, k] - zero_point[n, k // group_size]) * scales[n, k // group_size]``
  computed in float32; ``zero_points is None`` means the implicit symmetric zero point
  ``2**(bits - 1)`` (so symmetric int4 codes ``0..15`` stand for ``-8..7``).
* Scales are non-zero and, for symmetric codes, may be negative: ``v * s`` with ``s < 0``
  puts a positive extreme on ``v = -2**(bits - 1)``, which gives the extreme's side the
  extra step (as ONNX Runtime's quantizer does). Asymmetric scales are positive.
* Ternary weights are ``bits == 2`` symmetric codes restricted to ``{1, 2, 3}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

UInt8Array = np.ndarray[Any, np.dtype[np.uint8]]
Float32Array = np.ndarray[Any, np.dtype[np.float32]]

#: Bit widths the representation supports.
SUPPORTED_BITS = (2, 3, 4, 8)


def num_groups(k: int, group_size: int) -> int:
    """Groups along ``K`` (the last one may be short)."""
    return -(-k // group_size)


@dataclass(frozen=True)
class GroupQuantized:
    """Low-bit codes with per-group scales (and optional zero points) for ``W[N, K]``.

    Attributes:
        codes: ``uint8[N, K]``, each in ``[0, 2**bits)``.
        scales: ``float32[N, G]`` with ``G = ceil(K / group_size)``.
        zero_points: ``uint8[N, G]`` (asymmetric) or ``None`` (symmetric, implicit
            ``2**(bits - 1)``).
        bits: Code width, one of :data:`SUPPORTED_BITS`.
        group_size: ``K`` entries per group (``K`` itself for per-channel).
    """

    codes: UInt8Array
    scales: Float32Array
    zero_points: UInt8Array | None
    bits: int
    group_size: int

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.codes.ndim != 2 or self.codes.dtype != np.uint8:
            raise ValueError(f"codes must be uint8[N, K], got {self.codes.dtype}{self.codes.shape}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be positive, got {self.group_size}")
        expected = (self.n, num_groups(self.k, self.group_size))
        if self.scales.shape != expected or self.scales.dtype != np.float32:
            raise ValueError(
                f"scales must be float32{expected}, got {self.scales.dtype}{self.scales.shape}"
            )
        if self.zero_points is not None and (
            self.zero_points.shape != expected or self.zero_points.dtype != np.uint8
        ):
            raise ValueError(
                f"zero_points must be uint8{expected}, got "
                f"{self.zero_points.dtype}{self.zero_points.shape}"
            )

    @property
    def n(self) -> int:
        """Output channels."""
        return int(self.codes.shape[0])

    @property
    def k(self) -> int:
        """Input features."""
        return int(self.codes.shape[1])

    @property
    def groups(self) -> int:
        """Groups per output channel."""
        return int(self.scales.shape[1])

    @property
    def symmetric(self) -> bool:
        """Whether the zero point is the implicit middle code."""
        return self.zero_points is None

    def zero_point_matrix(self) -> UInt8Array:
        """``uint8[N, G]`` zero points, the implicit ones filled in."""
        if self.zero_points is not None:
            return self.zero_points
        return np.full(self.scales.shape, 1 << (self.bits - 1), dtype=np.uint8)

    def dequantize(self) -> Float32Array:
        """``float32[N, K]``: ``(code - zero_point) * scale`` per group, in float32."""
        zp = self.zero_point_matrix().astype(np.float32)
        out = np.empty(self.codes.shape, dtype=np.float32)
        for j in range(self.groups):  # group by group: temporaries stay one group wide
            cols = slice(j * self.group_size, (j + 1) * self.group_size)
            out[:, cols] = (
                self.codes[:, cols].astype(np.float32) - zp[:, j : j + 1]
            ) * self.scales[:, j : j + 1]
        return out

    def dequantize_matmul_weight(self) -> Float32Array:
        """``float32[K, N]``: the dequantized weight in ONNX ``MatMul`` ``B`` orientation."""
        return np.ascontiguousarray(self.dequantize().T)

    def nbytes_packed(self) -> int:
        """Bytes of densely packed codes plus float32 scales (and zero points at ``bits`` each)."""
        code_bytes = -(-self.n * self.k * self.bits // 8)
        zp_bytes = 0 if self.zero_points is None else -(-self.zero_points.size * self.bits // 8)
        return code_bytes + self.scales.nbytes + zp_bytes


# ----------------------------------------------------------------------------- quantization

#: Shrink factors tried by the MSE clipping search: the group's range is scaled by each
#: and the one with the least squared reconstruction error wins (1.0 = no clipping).
CLIP_GRID: tuple[float, ...] = tuple(round(1.0 - 0.025 * i, 3) for i in range(21))  # 1.0 .. 0.5

#: Smallest scale used, so an all-zero group still dequantizes to zeros without 0/0.
MIN_GROUP_SCALE = 1e-12


def code_max(bits: int) -> int:
    """Largest code at ``bits``: ``2**bits - 1``."""
    return (1 << bits) - 1


def resolve_group_size(k: int, group_size: int) -> int:
    """``group_size`` for ``K`` input features; ``-1`` or ``0`` (or ``>= K``) is per-channel."""
    if group_size <= 0 or group_size >= k:
        return k
    return group_size


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def _params_for_range(
    lo: np.ndarray,
    hi: np.ndarray,
    bits: int,
    symmetric: bool,
    ternary: bool = False,
    signed_scale: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero point) as float arrays for per-row ranges ``lo <= 0 <= hi``."""
    qmax = code_max(bits)
    if symmetric:
        mid = 1 << (bits - 1)
        # Signed codes v run -mid .. mid - 1 (int4: -8 .. 7). The smallest positive scale
        # that represents both ends unclipped puts a negative extreme on -mid; a negative
        # scale (value = v * scale) puts a positive extreme there instead, so whichever
        # side holds the extreme gets the extra step. Ternary uses only {-1, 0, 1}.
        if ternary:
            scale = np.maximum(-lo, hi)
        else:
            positive = np.maximum(-lo / float(mid), hi / float(mid - 1))
            scale = positive
            if signed_scale:
                negative = np.maximum(hi / float(mid), -lo / float(mid - 1))
                scale = np.where(negative < positive, -negative, positive)
        zero = np.full_like(scale, float(mid))
    else:
        scale = (hi - lo) / float(qmax)
        safe = np.maximum(scale, MIN_GROUP_SCALE)
        zero = np.clip(np.round(-lo / safe), 0, qmax)
    scale = np.where(np.abs(scale) < MIN_GROUP_SCALE, MIN_GROUP_SCALE, scale).astype(np.float32)
    return scale, zero.astype(np.float32)


def _quantize_block(
    w: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int, ternary: bool = False
) -> np.ndarray:
    """Codes for ``w[rows, cols]`` with per-row ``scale``/``zero`` (float32 arithmetic)."""
    lo, hi = (
        (zero - 1, zero + 1)
        if ternary
        else (np.zeros_like(zero), np.full_like(zero, code_max(bits)))
    )
    q = np.round(w.astype(np.float32) / scale[:, None]) + zero[:, None]
    return np.clip(q, lo[:, None], hi[:, None]).astype(np.uint8)


def _block_error(
    w: np.ndarray, codes: np.ndarray, scale: np.ndarray, zero: np.ndarray
) -> np.ndarray:
    recon = (codes.astype(np.float32) - zero[:, None]) * scale[:, None]
    return np.sum((recon - w) ** 2, axis=1)


def group_params(
    w_slice: np.ndarray,
    bits: int,
    symmetric: bool,
    clip_search: bool = False,
    ternary: bool = False,
    signed_scale: bool = True,
) -> tuple[Float32Array, UInt8Array | None]:
    """Scale and zero point of one group per row of ``w_slice[N, g]``.

    Args:
        w_slice: The group's columns, ``float32[N, g]`` (GPTQ passes a column slice).
        bits: Code width.
        symmetric: Implicit middle zero point (returns ``None`` zero points).
        clip_search: Shrink the range by the :data:`CLIP_GRID` factor with the least
            squared error per row.
        ternary: Codes restricted to ``{mid - 1, mid, mid + 1}`` (needs ``bits == 2`` and
            ``symmetric``).
        signed_scale: Symmetric only: allow a negative scale so that a positive extreme
            takes the extra code ``-mid`` (int4: 8 steps on the extreme's side instead of
            7; never clips). ``False`` keeps every scale positive (TensorRT requires it).

    Returns:
        ``(scales float32[N], zero_points uint8[N] or None)``.
    """
    _check_bits(bits)
    if ternary and (bits != 2 or not symmetric):
        raise ValueError("ternary needs bits=2 and symmetric=True")
    w = np.asarray(w_slice, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"w_slice must be 2-D [N, g], got shape {w.shape}")
    lo = np.minimum(w.min(axis=1), 0.0)
    hi = np.maximum(w.max(axis=1), 0.0)
    scale, zero = _params_for_range(lo, hi, bits, symmetric, ternary, signed_scale)
    if clip_search:
        best = _block_error(w, _quantize_block(w, scale, zero, bits, ternary), scale, zero)
        for factor in CLIP_GRID[1:]:
            s, z = _params_for_range(
                lo * factor, hi * factor, bits, symmetric, ternary, signed_scale
            )
            err = _block_error(w, _quantize_block(w, s, z, bits, ternary), s, z)
            better = err < best
            if np.any(better):
                best = np.where(better, err, best)
                scale = np.where(better, s, scale)
                zero = np.where(better, z, zero)
    zp = None if symmetric else zero.astype(np.uint8)
    return scale.astype(np.float32), zp


def quantize_with_params(
    w: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    bits: int,
    group_size: int,
    ternary: bool = False,
) -> GroupQuantized:
    """Rounds ``w[N, K]`` to nearest with given per-group parameters.

    Args:
        w: ``float32[N, K]``.
        scales: ``float32[N, G]``.
        zero_points: ``uint8[N, G]`` or ``None`` for symmetric.
        bits: Code width.
        group_size: Group length along ``K`` (``-1``/``0`` for per-channel).
        ternary: Clamp codes to the three middle values.
    """
    _check_bits(bits)
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"w must be 2-D [N, K], got shape {w.shape}")
    gs = resolve_group_size(w.shape[1], group_size)
    scales = np.asarray(scales, dtype=np.float32)
    zp = (
        np.full(scales.shape, 1 << (bits - 1), dtype=np.float32)
        if zero_points is None
        else np.asarray(zero_points).astype(np.float32)
    )
    codes = np.empty(w.shape, dtype=np.uint8)
    # Group by group: temporaries stay one group wide (embedding tables are large).
    for j in range(num_groups(w.shape[1], gs)):
        cols = slice(j * gs, (j + 1) * gs)
        codes[:, cols] = _quantize_block(w[:, cols], scales[:, j], zp[:, j], bits, ternary)
    zps = None if zero_points is None else np.asarray(zero_points, dtype=np.uint8)
    return GroupQuantized(codes, scales, zps, bits, gs)


def quantize_rtn(
    w: np.ndarray,
    bits: int,
    group_size: int,
    symmetric: bool,
    clip_search: bool = False,
    ternary: bool = False,
    signed_scale: bool = True,
) -> GroupQuantized:
    """Round-to-nearest per-group quantization of ``w[N, K]``.

    Args:
        w: ``float32[N, K]`` (output-major).
        bits: 2, 3, 4 or 8.
        group_size: Group length along ``K``; ``-1``/``0`` or ``>= K`` is per-channel.
        symmetric: Implicit middle zero point, scale from the largest magnitude.
        clip_search: Per-group MSE-optimal range shrink (:data:`CLIP_GRID`).
        ternary: ``bits=2`` symmetric codes restricted to ``{1, 2, 3}``.
        signed_scale: Symmetric scales may be negative (see :func:`group_params`).
    """
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"w must be 2-D [N, K], got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError("w has non-finite values")
    n, k = w.shape
    gs = resolve_group_size(k, group_size)
    g = num_groups(k, gs)
    scales = np.empty((n, g), dtype=np.float32)
    zps = None if symmetric else np.empty((n, g), dtype=np.uint8)
    for j in range(g):
        s, z = group_params(
            w[:, j * gs : (j + 1) * gs], bits, symmetric, clip_search, ternary, signed_scale
        )
        scales[:, j] = s
        if zps is not None and z is not None:
            zps[:, j] = z
    return quantize_with_params(w, scales, zps, bits, gs, ternary)


# ----------------------------------------------------------------------------- packing


def pack_codes(codes: np.ndarray, bits: int) -> UInt8Array:
    """Packs codes densely along the last axis, little-endian within each byte.

    Code ``i`` of a row occupies bits ``[i * bits, (i + 1) * bits)`` of the row's bit
    stream, byte ``b`` holding stream bits ``[8b, 8b + 8)`` with the lowest first (so at 4
    bits, element ``2j`` is the low nibble of byte ``j``, as ``MatMulNBits`` and ONNX int4
    expect). Rows are padded with zero bits to whole bytes.

    Args:
        codes: ``uint8[..., K]`` with every value below ``2**bits``.
        bits: 2, 3, 4 or 8.

    Returns:
        ``uint8[..., ceil(K * bits / 8)]``.
    """
    _check_bits(bits)
    codes = np.asarray(codes)
    if codes.dtype != np.uint8:
        raise ValueError(f"codes must be uint8, got {codes.dtype}")
    if bits == 8:
        return codes.copy()
    if codes.size and int(codes.max()) > code_max(bits):
        raise ValueError(f"a code exceeds {code_max(bits)} at {bits} bits")
    k = codes.shape[-1]
    # Expand to a little-endian bit stream per row, then pack 8 stream bits per byte.
    shifts = np.arange(bits, dtype=np.uint8)
    stream = ((codes[..., None] >> shifts) & 1).reshape(*codes.shape[:-1], k * bits)
    return np.packbits(stream, axis=-1, bitorder="little")


def unpack_codes(packed: np.ndarray, bits: int, k: int) -> UInt8Array:
    """Inverse of :func:`pack_codes`: ``uint8[..., K]`` from the packed rows."""
    _check_bits(bits)
    packed = np.asarray(packed, dtype=np.uint8)
    if bits == 8:
        return packed[..., :k].copy()
    need = -(-k * bits // 8)
    if packed.shape[-1] < need:
        raise ValueError(f"packed rows hold {packed.shape[-1]} bytes, {need} needed for K={k}")
    stream = np.unpackbits(packed, axis=-1, bitorder="little")[..., : k * bits]
    stream = stream.reshape(*packed.shape[:-1], k, bits)
    weights = (1 << np.arange(bits)).astype(np.uint8)
    return np.sum(stream * weights, axis=-1, dtype=np.uint8)
