"""The runtime_ext weight format: what ``graphopt.MatMulLowBit`` reads.

This module is the contract between the weight-only lowering and the C++ kernels in
``runtime_ext/``: :func:`to_ext` turns a :class:`~graphopt.quant.groupwise.GroupQuantized`
into the op's weight inputs and attributes, :func:`from_ext` is its exact inverse.

Packed layout ("word-interleaved blocks", the one ``runtime_ext/README.md`` documents):

* Each output channel ``n`` (a row of ``W[N, K]``) is stored on its own, as
  ``ceil(K / C)`` blocks of 32 bytes. A block is eight little-endian ``uint32`` words and
  holds ``C = 8 * F`` codes, with ``F = 32 // bits`` codes per word
  (bits 2: F=16, C=128; bits 3: F=10, C=80; bits 4: F=8, C=64; bits 8: F=4, C=32).
* Code ``k`` of the row, with ``k = block * C + f * 8 + w`` (``0 <= f < F``,
  ``0 <= w < 8``), sits in word ``w`` of its block at bits ``[f * bits, (f + 1) * bits)``.
  So one 256-bit load and one shift-and-mask yield the codes of eight *consecutive* ``k``.
* Codes past ``K`` and unused high bits (3-bit: bits 30..31) are zero.
* ``packed`` is ``uint8[N, ceil(K / C) * 32]``.

Scales are ``float32[N, G]`` and zero points ``uint8[N, G]`` (one code each, unpacked)
exactly as in :class:`GroupQuantized`; absent zero points mean ``2**(bits - 1)``.

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
#: Bytes per packed block (eight 32-bit words).
BLOCK_BYTES = 32
_WORDS = 8


def codes_per_word(bits: int) -> int:
    """Codes one 32-bit word holds at ``bits``."""
    _check_bits(bits)
    return 32 // bits


def codes_per_block(bits: int) -> int:
    """Codes one 32-byte block holds at ``bits``."""
    return _WORDS * codes_per_word(bits)


def packed_row_bytes(k: int, bits: int) -> int:
    """Bytes of one packed output channel of ``K`` codes."""
    return -(-k // codes_per_block(bits)) * BLOCK_BYTES


def _check_bits(bits: int) -> None:
    if bits not in EXT_BITS:
        raise ValueError(f"runtime_ext supports bits {EXT_BITS}, got {bits}")


@dataclass(frozen=True)
class ExtWeights:
    """Weight inputs and attributes of one ``graphopt.MatMulLowBit`` node.

    Attributes:
        packed: ``uint8[N, ceil(K / C) * 32]`` in the module's block layout.
        scales: ``float32[N, G]``.
        zero_points: ``uint8[N, G]`` or ``None`` (implicit ``2**(bits - 1)``).
        attributes: Node attributes: ``K``, ``N``, ``bits``, ``group_size`` (and
            ``accuracy_level`` when not 0).
    """

    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    attributes: dict[str, int]


def pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """Packs ``uint8[N, K]`` codes (each below ``2**bits``) into the block layout."""
    _check_bits(bits)
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.dtype != np.uint8:
        raise ValueError(f"codes must be uint8[N, K], got {codes.dtype}{codes.shape}")
    if codes.size and int(codes.max()) >= (1 << bits):
        raise ValueError(f"a code exceeds {(1 << bits) - 1} at {bits} bits")
    n, k = codes.shape
    per_word = codes_per_word(bits)
    per_block = codes_per_block(bits)
    blocks = -(-k // per_block)
    padded = np.zeros((n, blocks * per_block), dtype=np.uint32)
    padded[:, :k] = codes
    # [N, block, f, w] -> word w gets sum over f of code << (f * bits).
    fields = padded.reshape(n, blocks, per_word, _WORDS)
    shifts = (np.arange(per_word, dtype=np.uint32) * bits)[None, None, :, None]
    words = np.bitwise_or.reduce(fields << shifts, axis=2)  # [N, block, w]
    return np.ascontiguousarray(words.astype("<u4")).view(np.uint8).reshape(n, blocks * BLOCK_BYTES)


def unpack_rows(packed: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Inverse of :func:`pack_rows`: ``uint8[N, K]`` codes."""
    _check_bits(bits)
    packed = np.asarray(packed)
    per_word = codes_per_word(bits)
    row_bytes = packed_row_bytes(k, bits)
    if packed.ndim != 2 or packed.dtype != np.uint8 or packed.shape[1] != row_bytes:
        raise ValueError(
            f"packed must be uint8[N, {row_bytes}] for K={k} at {bits} bits, "
            f"got {packed.dtype}{packed.shape}"
        )
    n = packed.shape[0]
    words = np.ascontiguousarray(packed).view("<u4").reshape(n, -1, 1, _WORDS)
    shifts = (np.arange(per_word, dtype=np.uint32) * bits)[None, None, :, None]
    fields = (words >> shifts) & np.uint32((1 << bits) - 1)  # [N, block, f, w]
    return fields.reshape(n, -1)[:, :k].astype(np.uint8)


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
    zero_points = None if q.zero_points is None else np.ascontiguousarray(q.zero_points, dtype=np.uint8)
    return ExtWeights(
        packed=pack_rows(q.codes, q.bits),
        scales=np.ascontiguousarray(q.scales, dtype=np.float32),
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
        raise ValueError(f"K, N and group_size must be positive, got K={k} N={n} group_size={group_size}")
    codes = unpack_rows(w.packed, bits, k)
    if codes.shape[0] != n:
        raise ValueError(f"packed has {codes.shape[0]} rows, attribute N={n}")
    expected = (n, num_groups(k, group_size))
    if w.scales.shape != expected:
        raise ValueError(f"scales must be {expected}, got {w.scales.shape}")
    zero_points = None if w.zero_points is None else np.array(w.zero_points, dtype=np.uint8)
    return GroupQuantized(codes, np.array(w.scales, dtype=np.float32), zero_points, bits, group_size)


def attributes_for(k: int, n: int, bits: int, group_size: int) -> dict[str, Any]:
    """The node attributes for a ``K x N`` weight at ``bits`` with ``group_size``."""
    _check_bits(bits)
    return {"K": int(k), "N": int(n), "bits": int(bits), "group_size": int(group_size)}
