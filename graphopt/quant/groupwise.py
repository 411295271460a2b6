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
            raise ValueError(f"scales must be float32{expected}, got {self.scales.dtype}{self.scales.shape}")
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
        group_index = np.arange(self.k) // self.group_size
        zp = self.zero_point_matrix().astype(np.float32)[:, group_index]
        scale = self.scales[:, group_index]
        return ((self.codes.astype(np.float32) - zp) * scale).astype(np.float32)

    def dequantize_matmul_weight(self) -> Float32Array:
        """``float32[K, N]``: the dequantized weight in ONNX ``MatMul`` ``B`` orientation."""
        return np.ascontiguousarray(self.dequantize().T)

    def nbytes_packed(self) -> int:
        """Bytes of densely packed codes plus float32 scales (and zero points at ``bits`` each)."""
        code_bytes = -(-self.n * self.k * self.bits // 8)
        zp_bytes = 0 if self.zero_points is None else -(-self.zero_points.size * self.bits // 8)
        return code_bytes + self.scales.nbytes + zp_bytes
