"""The runtime_ext weight format: what ``graphopt.MatMulLowBit`` reads.

This module is the contract between the weight-only lowering and the C++ kernels in
``runtime_ext/``: :func:`to_ext` turns a :class:`~graphopt.quant.groupwise.GroupQuantized`
into the op's weight inputs and attributes, :func:`from_ext` is its exact inverse.

Packed layout ("channel tiles", the one ``runtime_ext/README.md`` documents):

* Output channels are grouped into tiles of sixteen (``T = ceil(N / 16)``; the last tile
  is padded with zero channels). A word holds ``F = 32 // bits`` *consecutive* codes of one
  channel, code ``k = c * F + f`` at bits ``[f * bits, (f + 1) * bits)`` (bits 2: F=16,
  bits 3: F=10, bits 4: F=8, bits 8: F=4).
* A tile is ``ceil(K / F)`` word columns of 64 bytes (a cache line); column ``c`` is
  sixteen little-endian ``uint32`` words, word ``j`` belonging to channel ``16 * t + j``.
  So a tile is one contiguous stream and each 256-bit half of a column gives eight
  channels in eight lanes.
* ``packed`` is ``uint8[T, ceil(K / F) * 64]``.
* Codes past ``K``, padding channels and unused high bits (3-bit: bits 30..31) are zero.

Scales are ``float32[T, G, 16]`` and zero points ``uint8[T, G, 16]`` (tile-major: the
sixteen channels of a tile side by side per group; padding channels 0); absent zero points mean
``2**(bits - 1)``.

The optional node attribute ``accuracy_level`` picks the activation arithmetic: 0 (the
default, omitted) computes in fp32 with exact dequantization; 4 quantizes each row of ``A``
to int8 per group (faster, like ``MatMulNBits`` ``accuracy_level=4``; see the README).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from graphopt.quant.groupwise import GroupQuantized, num_groups

#: Custom-op domain of the runtime_ext library.
DOMAIN = "graphopt"
#: The packed low-bit matmul op.
OP_TYPE = "MatMulLowBit"
#: Opset version of :data:`DOMAIN` the op belongs to.
DOMAIN_VERSION = 1
#: Bit widths the kernels accept.
EXT_BITS = (2, 3, 4, 8)
#: ``accuracy_level`` values the op accepts: fp32 activations, int8 activations.
ACCURACY_LEVELS = (0, 4)
#: Output channels per tile.
TILE_CHANNELS = 16
#: Bytes per word column of a tile (one 32-bit word per channel).
COLUMN_BYTES = 4 * TILE_CHANNELS


def codes_per_word(bits: int) -> int:
    """Codes one 32-bit word holds at ``bits``."""
    _check_bits(bits)
    return 32 // bits


def num_tiles(n: int) -> int:
    """Tiles of sixteen output channels holding ``N`` channels."""
    return -(-n // TILE_CHANNELS)


def packed_tile_bytes(k: int, bits: int) -> int:
    """Bytes of one packed tile of ``K`` codes per channel."""
    return -(-k // codes_per_word(bits)) * COLUMN_BYTES


def _check_bits(bits: int) -> None:
    if bits not in EXT_BITS:
        raise ValueError(f"runtime_ext supports bits {EXT_BITS}, got {bits}")


def to_tiles(per_channel: np.ndarray) -> np.ndarray:
    """``[N, G]`` per-channel values (scales, zero points) to the tile-major ``[T, G, 16]``."""
    n, groups = per_channel.shape
    padded = np.zeros((num_tiles(n) * TILE_CHANNELS, groups), dtype=per_channel.dtype)
    padded[:n] = per_channel
    return np.ascontiguousarray(padded.reshape(-1, TILE_CHANNELS, groups).transpose(0, 2, 1))


def from_tiles(tiled: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`to_tiles`: the first ``N`` channels as ``[N, G]``."""
    if tiled.ndim != 3 or tiled.shape[0] != num_tiles(n) or tiled.shape[2] != TILE_CHANNELS:
        raise ValueError(
            f"expected [{num_tiles(n)}, G, {TILE_CHANNELS}] for N={n}, got {list(tiled.shape)}"
        )
    return np.ascontiguousarray(tiled.transpose(0, 2, 1).reshape(-1, tiled.shape[1])[:n])


@dataclass(frozen=True)
class ExtWeights:
    """Weight inputs and attributes of one ``graphopt.MatMulLowBit`` node.

    Attributes:
        packed: ``uint8[T, ceil(K / F) * 64]`` in the module's tile layout.
        scales: ``float32[T, G, 16]``.
        zero_points: ``uint8[T, G, 16]`` or ``None`` (implicit ``2**(bits - 1)``).
        attributes: Node attributes: ``K``, ``N``, ``bits``, ``group_size`` (and
            ``accuracy_level`` when not 0).
    """

    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    attributes: dict[str, int]


def pack_tiles(codes: np.ndarray, bits: int) -> np.ndarray:
    """Packs ``uint8[N, K]`` codes (each below ``2**bits``) into the tile layout."""
    _check_bits(bits)
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.dtype != np.uint8:
        raise ValueError(f"codes must be uint8[N, K], got {codes.dtype}{codes.shape}")
    if codes.size and int(codes.max()) >= (1 << bits):
        raise ValueError(f"a code exceeds {(1 << bits) - 1} at {bits} bits")
    n, k = codes.shape
    per_word = codes_per_word(bits)
    columns = -(-k // per_word)
    padded = np.zeros((num_tiles(n) * TILE_CHANNELS, columns * per_word), dtype=np.uint32)
    padded[:n, :k] = codes
    # [T, j, c, f] -> word (t, c, j) = sum over f of code << (f * bits).
    fields = padded.reshape(-1, TILE_CHANNELS, columns, per_word)
    shifts = np.arange(per_word, dtype=np.uint32) * bits
    words = np.bitwise_or.reduce(fields << shifts, axis=3).transpose(0, 2, 1)  # [T, c, j]
    return (
        np.ascontiguousarray(words.astype("<u4")).view(np.uint8).reshape(-1, columns * COLUMN_BYTES)
    )


def unpack_tiles(packed: np.ndarray, bits: int, k: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_tiles`: ``uint8[N, K]`` codes."""
    _check_bits(bits)
    packed = np.asarray(packed)
    expected = (num_tiles(n), packed_tile_bytes(k, bits))
    if packed.dtype != np.uint8 or packed.shape != expected:
        raise ValueError(
            f"packed must be uint8{list(expected)} for K={k}, N={n} at {bits} bits, "
            f"got {packed.dtype}{list(packed.shape)}"
        )
    per_word = codes_per_word(bits)
    words = (
        np.ascontiguousarray(packed).view("<u4").reshape(expected[0], -1, TILE_CHANNELS)
    )  # [T, c, j]
    shifts = np.arange(per_word, dtype=np.uint32) * bits
    fields = (words.transpose(0, 2, 1)[..., None] >> shifts) & np.uint32(
        (1 << bits) - 1
    )  # [T, j, c, f]
    return fields.reshape(expected[0] * TILE_CHANNELS, -1)[:n, :k].astype(np.uint8)


def to_ext(q: GroupQuantized, accuracy_level: int = 0) -> ExtWeights:
    """The ``MatMulLowBit`` inputs and attributes holding ``q`` losslessly.

    Args:
        q: The quantized weight.
        accuracy_level: 0 (fp32 activations, attribute omitted) or 4 (int8 activations,
            attribute ``accuracy_level=4`` added).

    Raises:
        ValueError: ``q.bits`` is not one of :data:`EXT_BITS`, or a bad ``accuracy_level``.
    """
    _check_bits(q.bits)
    if accuracy_level not in ACCURACY_LEVELS:
        raise ValueError(f"accuracy_level must be one of {ACCURACY_LEVELS}, got {accuracy_level}")
    attributes = {"K": q.k, "N": q.n, "bits": q.bits, "group_size": q.group_size}
    if accuracy_level:
        attributes["accuracy_level"] = accuracy_level
    zero_points = (
        None if q.zero_points is None else to_tiles(np.asarray(q.zero_points, dtype=np.uint8))
    )
    return ExtWeights(
        packed=pack_tiles(q.codes, q.bits),
        scales=to_tiles(np.asarray(q.scales, dtype=np.float32)),
        zero_points=zero_points,
        attributes=attributes,
    )


def _attribute(w: ExtWeights, name: str) -> int:
    try:
        return int(w.attributes[name])
    except KeyError:
        raise ValueError(f"ExtWeights.attributes lacks {name!r}") from None


def from_ext(w: ExtWeights) -> GroupQuantized:
    """Exact inverse of :func:`to_ext`.

    Raises:
        ValueError: Inconsistent shapes or attributes.
    """
    k, n = _attribute(w, "K"), _attribute(w, "N")
    bits, group_size = _attribute(w, "bits"), _attribute(w, "group_size")
    if group_size < 1 or k < 1 or n < 1:
        raise ValueError(
            f"K, N and group_size must be positive, got K={k} N={n} group_size={group_size}"
        )
    codes = unpack_tiles(w.packed, bits, k, n)
    expected = (num_tiles(n), num_groups(k, group_size), TILE_CHANNELS)
    if w.scales.shape != expected:
        raise ValueError(f"scales must be {list(expected)}, got {list(w.scales.shape)}")
    if w.zero_points is not None and w.zero_points.shape != expected:
        raise ValueError(f"zero_points must be {list(expected)}, got {list(w.zero_points.shape)}")
    scales = from_tiles(np.asarray(w.scales, dtype=np.float32), n)
    zero_points = (
        None if w.zero_points is None else from_tiles(np.asarray(w.zero_points, dtype=np.uint8), n)
    )
    return GroupQuantized(codes, scales, zero_points, bits, group_size)


def attributes_for(k: int, n: int, bits: int, group_size: int) -> dict[str, Any]:
    """The node attributes for a ``K x N`` weight at ``bits`` with ``group_size``."""
    _check_bits(bits)
    return {"K": int(k), "N": int(n), "bits": int(bits), "group_size": int(group_size)}
