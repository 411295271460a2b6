"""``QuantSpec``: how one tensor is quantized, and its one-word text form.

A spec names the storage dtype, symmetric or asymmetric (affine) quantization, per-tensor
or per-channel granularity (with the channel axis), and the two range options of
:func:`graphopt.quant.dtypes.quant_range`. It says nothing about *how* the float range is
found (that is the observer's job) and holds no scales.

Text form (``to_text`` / ``from_text``) uses only characters the pipeline grammar accepts
as a bare word, so a spec can be an option value (``ptq(act=u8:asym:tensor)``)::

    <dtype>:<sym|asym>:<tensor|axis<N>>[:reduce_range][:narrow]

    u8:asym:tensor
    s8:sym:axis0:narrow
    s8:sym:axis-1:reduce_range:narrow

Biases are not described by a spec of their own choosing: their scale is derived from the
input and weight scales (``graphopt.quant.qparams.bias_qparams``); :data:`BIAS_S32` and
:data:`BIAS_S32_PER_CHANNEL` describe their storage.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from graphopt.errors import UsageError
from graphopt.quant.dtypes import QuantDType, quant_range


@dataclass(frozen=True)
class QuantSpec:
    """How a tensor is quantized.

    Attributes:
        dtype: Storage type of the codes.
        symmetric: Zero point fixed at the middle of the range (0 for signed types, e.g.
            128 for u8); the float range is ``[-a, a]`` with ``a = max(|min|, |max|)``.
            Asymmetric (affine) specs fit ``[min, max]`` with a computed zero point.
        per_channel: One scale/zero point per slice along ``axis``.
        axis: Channel axis (may be negative); ``None`` exactly when per-tensor.
        reduce_range: Use one bit fewer (7-bit weights for CPUs without VNNI).
        narrow: Signed types only: drop the most negative code (s8 in ``[-127, 127]``).
    """

    dtype: QuantDType
    symmetric: bool
    per_channel: bool
    axis: int | None
    reduce_range: bool = False
    narrow: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.dtype, QuantDType):
            raise UsageError(f"QuantSpec dtype must be a QuantDType, not {self.dtype!r}")
        if self.per_channel and self.axis is None:
            raise UsageError("per-channel QuantSpec needs an axis")
        if not self.per_channel and self.axis is not None:
            raise UsageError(f"per-tensor QuantSpec takes no axis (got axis={self.axis})")
        # Validates narrow against the dtype.
        quant_range(self.dtype, reduce_range=self.reduce_range, narrow=self.narrow)

    @property
    def qmin(self) -> int:
        """Smallest code this spec uses."""
        return quant_range(self.dtype, reduce_range=self.reduce_range, narrow=self.narrow)[0]

    @property
    def qmax(self) -> int:
        """Largest code this spec uses."""
        return quant_range(self.dtype, reduce_range=self.reduce_range, narrow=self.narrow)[1]

    @property
    def symmetric_zero_point(self) -> int:
        """Zero point of a symmetric spec: 0 for signed types, the middle code otherwise.

        ``(qmin + qmax + 1) // 2``: 0 for s8, 128 for u8, 64 for reduced-range u8.
        """
        return (self.qmin + self.qmax + 1) // 2

    def with_axis(self, axis: int | None) -> QuantSpec:
        """The same spec with another channel axis (``None`` makes it per-tensor).

        Args:
            axis: The new axis, or ``None`` for per-tensor.

        Returns:
            A new spec.
        """
        return dataclasses.replace(self, per_channel=axis is not None, axis=axis)

    def to_text(self) -> str:
        """Canonical one-word text, e.g. ``s8:sym:axis0:narrow``.

        Returns:
            Text that :meth:`from_text` parses back to an equal spec.
        """
        parts = [
            self.dtype.value,
            "sym" if self.symmetric else "asym",
            f"axis{self.axis}" if self.per_channel else "tensor",
        ]
        if self.reduce_range:
            parts.append("reduce_range")
        if self.narrow:
            parts.append("narrow")
        return ":".join(parts)

    @classmethod
    def from_text(cls, text: str) -> QuantSpec:
        """Parses the text form written by :meth:`to_text`.

        Args:
            text: ``<dtype>:<sym|asym>:<tensor|axisN>[:reduce_range][:narrow]``; flags may
                come in any order.

        Returns:
            The spec.

        Raises:
            UsageError: The text does not parse; the message names the bad part.
        """
        parts = text.strip().split(":")
        if len(parts) < 3:
            raise UsageError(f"quantization spec {text!r} needs <dtype>:<sym|asym>:<tensor|axisN>")
        dtype = QuantDType.parse(parts[0])
        if parts[1] not in ("sym", "asym"):
            raise UsageError(f"quantization spec {text!r}: {parts[1]!r} is not sym or asym")
        granularity = parts[2]
        axis: int | None
        if granularity == "tensor":
            axis = None
        elif granularity.startswith("axis"):
            try:
                axis = int(granularity[4:])
            except ValueError:
                raise UsageError(
                    f"quantization spec {text!r}: bad channel axis {granularity!r}"
                ) from None
        else:
            raise UsageError(
                f"quantization spec {text!r}: {granularity!r} is not 'tensor' or 'axis<N>'"
            )
        flags = parts[3:]
        for flag in flags:
            if flag not in ("reduce_range", "narrow"):
                raise UsageError(
                    f"quantization spec {text!r}: unknown flag {flag!r} "
                    "(expected reduce_range or narrow)"
                )
        if len(set(flags)) != len(flags):
            raise UsageError(f"quantization spec {text!r}: repeated flag")
        return cls(
            dtype=dtype,
            symmetric=parts[1] == "sym",
            per_channel=axis is not None,
            axis=axis,
            reduce_range="reduce_range" in flags,
            narrow="narrow" in flags,
        )


#: Activations, u8 affine per tensor (ONNX Runtime's fast path on x86 without VNNI).
ACT_U8_ASYM = QuantSpec(QuantDType.U8, symmetric=False, per_channel=False, axis=None)
#: Activations, s8 affine per tensor.
ACT_S8_ASYM = QuantSpec(QuantDType.S8, symmetric=False, per_channel=False, axis=None)
#: Activations, s8 symmetric per tensor.
ACT_S8_SYM = QuantSpec(QuantDType.S8, symmetric=True, per_channel=False, axis=None)
#: Activations, u16 affine per tensor (sensitive tensors).
ACT_U16_ASYM = QuantSpec(QuantDType.U16, symmetric=False, per_channel=False, axis=None)
#: Activations, s16 symmetric per tensor.
ACT_S16_SYM = QuantSpec(QuantDType.S16, symmetric=True, per_channel=False, axis=None)
#: Weights, s8 symmetric in [-127, 127], one scale for the whole tensor.
WEIGHT_S8_SYM = QuantSpec(QuantDType.S8, symmetric=True, per_channel=False, axis=None, narrow=True)
#: Weights, s8 symmetric in [-127, 127] per output channel (axis 0: Conv, Gemm with transB;
#: use ``.with_axis(1)`` for MatMul's ``[K, N]`` weights).
WEIGHT_S8_SYM_PER_CHANNEL = QuantSpec(
    QuantDType.S8, symmetric=True, per_channel=True, axis=0, narrow=True
)
#: As above with 7-bit codes ([-63, 63]) for u8 x s8 kernels on CPUs without VNNI.
WEIGHT_S8_SYM_PER_CHANNEL_REDUCED = QuantSpec(
    QuantDType.S8, symmetric=True, per_channel=True, axis=0, reduce_range=True, narrow=True
)
#: Weights, u8 affine per output channel.
WEIGHT_U8_ASYM_PER_CHANNEL = QuantSpec(QuantDType.U8, symmetric=False, per_channel=True, axis=0)
#: Bias storage with a per-tensor weight scale: int32, zero point 0.
BIAS_S32 = QuantSpec(QuantDType.S32, symmetric=True, per_channel=False, axis=None)
#: Bias storage with per-channel weight scales (a bias is 1-D, so axis 0).
BIAS_S32_PER_CHANNEL = QuantSpec(QuantDType.S32, symmetric=True, per_channel=True, axis=0)
