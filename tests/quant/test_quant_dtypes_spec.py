"""QuantDType ranges and QuantSpec validation / text round trip."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from graphopt.errors import UsageError
from graphopt.quant import (
    ACT_U8_ASYM,
    BIAS_S32,
    WEIGHT_S8_SYM_PER_CHANNEL,
    WEIGHT_S8_SYM_PER_CHANNEL_REDUCED,
    QuantDType,
    QuantSpec,
    quant_range,
)

_ONNX = {
    QuantDType.U8: onnx.TensorProto.UINT8,
    QuantDType.S8: onnx.TensorProto.INT8,
    QuantDType.U16: onnx.TensorProto.UINT16,
    QuantDType.S16: onnx.TensorProto.INT16,
    QuantDType.S32: onnx.TensorProto.INT32,
}


@pytest.mark.parametrize("dtype", list(QuantDType))
def test_dtype_table_matches_numpy_and_onnx(dtype: QuantDType) -> None:
    info = np.iinfo(dtype.numpy_dtype)
    assert (dtype.qmin, dtype.qmax) == (info.min, info.max)
    assert dtype.bits == info.bits
    assert dtype.signed == (info.min < 0)
    assert dtype.onnx_type == _ONNX[dtype]
    assert quant_range(dtype) == (info.min, info.max)
    assert QuantDType.parse(dtype.value) is dtype


@pytest.mark.parametrize(
    ("dtype", "reduce_range", "narrow", "expected"),
    [
        (QuantDType.U8, True, False, (0, 127)),
        (QuantDType.S8, True, False, (-64, 63)),
        (QuantDType.S8, False, True, (-127, 127)),
        (QuantDType.S8, True, True, (-63, 63)),
        (QuantDType.U16, True, False, (0, 32767)),
        (QuantDType.S16, False, True, (-32767, 32767)),
    ],
)
def test_reduced_and_narrow_ranges(
    dtype: QuantDType, reduce_range: bool, narrow: bool, expected: tuple[int, int]
) -> None:
    assert quant_range(dtype, reduce_range=reduce_range, narrow=narrow) == expected


def test_reduced_range_weights_cannot_overflow_int16_pair_sums() -> None:
    # u8 x s8 products summed in pairs (vpmaddubsw) must stay inside int16.
    qmin, qmax = quant_range(QuantDType.S8, reduce_range=True)
    assert 2 * 255 * max(-qmin, qmax) <= np.iinfo(np.int16).max


def test_narrow_unsigned_is_refused() -> None:
    with pytest.raises(UsageError, match="u8"):
        quant_range(QuantDType.U8, narrow=True)
    with pytest.raises(UsageError, match="signed"):
        QuantSpec(QuantDType.U8, symmetric=True, per_channel=False, axis=None, narrow=True)


def test_unknown_dtype() -> None:
    with pytest.raises(UsageError, match="'u4'"):
        QuantDType.parse("u4")


def test_axis_must_match_granularity() -> None:
    with pytest.raises(UsageError, match="axis"):
        QuantSpec(QuantDType.S8, symmetric=True, per_channel=True, axis=None)
    with pytest.raises(UsageError, match="axis=1"):
        QuantSpec(QuantDType.S8, symmetric=True, per_channel=False, axis=1)


def test_symmetric_zero_points_and_common_specs() -> None:
    assert QuantSpec(QuantDType.S8, True, False, None).symmetric_zero_point == 0
    assert QuantSpec(QuantDType.U8, True, False, None).symmetric_zero_point == 128
    assert QuantSpec(QuantDType.U8, True, False, None, reduce_range=True).symmetric_zero_point == 64
    assert QuantSpec(QuantDType.U16, True, False, None).symmetric_zero_point == 32768
    assert BIAS_S32.symmetric_zero_point == 0
    assert (WEIGHT_S8_SYM_PER_CHANNEL.qmin, WEIGHT_S8_SYM_PER_CHANNEL.qmax) == (-127, 127)
    reduced = WEIGHT_S8_SYM_PER_CHANNEL_REDUCED
    assert (reduced.qmin, reduced.qmax) == (-63, 63)
    assert WEIGHT_S8_SYM_PER_CHANNEL.with_axis(1).axis == 1
    assert WEIGHT_S8_SYM_PER_CHANNEL.with_axis(None) == QuantSpec(
        QuantDType.S8, True, False, None, narrow=True
    )


@st.composite
def specs(draw: st.DrawFn) -> QuantSpec:
    dtype = draw(st.sampled_from(list(QuantDType)))
    axis = draw(st.one_of(st.none(), st.integers(-4, 4)))
    return QuantSpec(
        dtype=dtype,
        symmetric=draw(st.booleans()),
        per_channel=axis is not None,
        axis=axis,
        reduce_range=draw(st.booleans()),
        narrow=dtype.signed and draw(st.booleans()),
    )


_WORD = re.compile(r"^[A-Za-z0-9_\-.:+/*]+$")  # a bare word of the pipeline grammar


@given(specs())
def test_text_round_trip(spec: QuantSpec) -> None:
    text = spec.to_text()
    assert _WORD.match(text)
    assert QuantSpec.from_text(text) == spec


def test_text_examples() -> None:
    assert ACT_U8_ASYM.to_text() == "u8:asym:tensor"
    assert WEIGHT_S8_SYM_PER_CHANNEL.to_text() == "s8:sym:axis0:narrow"
    spec = QuantSpec.from_text("s8:sym:axis-1:narrow:reduce_range")
    assert spec.axis == -1 and spec.narrow and spec.reduce_range
    assert spec.to_text() == "s8:sym:axis-1:reduce_range:narrow"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("u8", "needs"),
        ("u4:asym:tensor", "u4"),
        ("u8:affine:tensor", "affine"),
        ("u8:asym:axisX", "axisX"),
        ("u8:asym:row", "row"),
        ("s8:sym:tensor:tiny", "tiny"),
        ("s8:sym:tensor:narrow:narrow", "repeated"),
        ("u8:sym:tensor:narrow", "signed"),
    ],
)
def test_bad_text(text: str, needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        QuantSpec.from_text(text)


def test_docstring_examples() -> None:
    import doctest

    import graphopt.quant.dtypes
    import graphopt.quant.qparams

    for module in (graphopt.quant.dtypes, graphopt.quant.qparams):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, module.__name__
