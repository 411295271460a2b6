"""Integer storage types for linear quantization and their code ranges.

A :class:`QuantDType` names the integer type a quantized tensor is stored in (``u8``,
``s8``, ``u16``, ``s16``, and ``s32`` for biases). :func:`quant_range` gives the codes a
tensor may use, which can be narrower than the type:

* ``reduce_range`` drops one bit: ``u8`` -> ``[0, 127]``, ``s8`` -> ``[-64, 63]`` (and
  likewise for 16/32-bit types). ONNX Runtime's u8 x s8 kernels on x86 CPUs without VNNI
  add pairs of u8 x s8 products in int16 (``vpmaddubsw``); 7-bit weights keep
  ``2 * 255 * 64`` inside int16, so they never saturate.
* ``narrow`` makes a signed range symmetric: ``s8`` -> ``[-127, 127]`` (the most negative
  code is never used). It is refused for unsigned types.

The ONNX element types are the ``onnx.TensorProto`` enum values, written out so that this
module (numerics only) does not import onnx.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import numpy as np

from graphopt.errors import UsageError


@dataclass(frozen=True)
class _DTypeInfo:
    bits: int
    signed: bool
    numpy: type[np.integer[Any]]
    onnx: int


_INFO: dict[str, _DTypeInfo] = {
    "u8": _DTypeInfo(8, False, np.uint8, 2),  # TensorProto.UINT8
    "s8": _DTypeInfo(8, True, np.int8, 3),  # TensorProto.INT8
    "u16": _DTypeInfo(16, False, np.uint16, 4),  # TensorProto.UINT16
    "s16": _DTypeInfo(16, True, np.int16, 5),  # TensorProto.INT16
    "s32": _DTypeInfo(32, True, np.int32, 6),  # TensorProto.INT32
}


class QuantDType(enum.Enum):
    """An integer storage type for quantized values.

    The value is the short name used in spec text (``"u8"``, ``"s8"``, ...).
    """

    U8 = "u8"
    S8 = "s8"
    U16 = "u16"
    S16 = "s16"
    S32 = "s32"

    @property
    def bits(self) -> int:
        """Width of the type in bits."""
        return _INFO[self.value].bits

    @property
    def signed(self) -> bool:
        """Whether the type is signed (two's complement)."""
        return _INFO[self.value].signed

    @property
    def qmin(self) -> int:
        """Smallest code of the full type range."""
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        """Largest code of the full type range."""
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def numpy_dtype(self) -> np.dtype[Any]:
        """The numpy dtype codes are stored in."""
        return np.dtype(_INFO[self.value].numpy)

    @property
    def onnx_type(self) -> int:
        """The ``onnx.TensorProto`` element type (e.g. 2 for ``UINT8``)."""
        return _INFO[self.value].onnx

    @classmethod
    def parse(cls, text: str) -> QuantDType:
        """Parses a short name (``u8``, ``s8``, ``u16``, ``s16``, ``s32``).

        Args:
            text: The short name.

        Returns:
            The matching dtype.

        Raises:
            UsageError: The name is not a known dtype.
        """
        try:
            return cls(text)
        except ValueError:
            known = "|".join(d.value for d in cls)
            raise UsageError(
                f"unknown quantization dtype {text!r}; expected one of {known}"
            ) from None


def quant_range(
    dtype: QuantDType, *, reduce_range: bool = False, narrow: bool = False
) -> tuple[int, int]:
    """The codes ``[qmin, qmax]`` a tensor of ``dtype`` may use.

    Args:
        dtype: The storage type.
        reduce_range: Use one bit fewer (7-bit for 8-bit types).
        narrow: For signed types, drop the most negative code so the range is symmetric.

    Returns:
        ``(qmin, qmax)``, both inclusive.

    Raises:
        UsageError: ``narrow`` was asked for an unsigned type.

    Examples:
        >>> quant_range(QuantDType.S8, narrow=True)
        (-127, 127)
        >>> quant_range(QuantDType.U8, reduce_range=True)
        (0, 127)
        >>> quant_range(QuantDType.S8, reduce_range=True)
        (-64, 63)
    """
    if narrow and not dtype.signed:
        raise UsageError(f"narrow range needs a signed dtype, not {dtype.value}")
    bits = dtype.bits - 1 if reduce_range else dtype.bits
    if dtype.signed:
        qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    else:
        qmin, qmax = 0, (1 << bits) - 1
    if narrow:
        qmin = -qmax
    return qmin, qmax
