"""compute_qparams, quantize/dequantize and bias parameters: exact semantics and properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from graphopt.errors import CalibrationError
from graphopt.quant import (
    ACT_S8_SYM,
    ACT_U8_ASYM,
    BIAS_S32,
    BIAS_S32_PER_CHANNEL,
    MIN_SCALE,
    WEIGHT_S8_SYM,
    WEIGHT_S8_SYM_PER_CHANNEL,
    ZERO_RANGE_SCALE,
    QuantDType,
    QuantSpec,
    bias_qparams,
    compute_qparams,
    dequantize,
    fake_quantize,
    quantize,
    sqnr_db,
)

F32_TINY = float(np.finfo(np.float32).tiny)


@st.composite
def tensor_specs(draw: st.DrawFn) -> QuantSpec:
    dtype = draw(st.sampled_from([QuantDType.U8, QuantDType.S8, QuantDType.U16, QuantDType.S16]))
    return QuantSpec(
        dtype=dtype,
        symmetric=draw(st.booleans()),
        per_channel=False,
        axis=None,
        reduce_range=draw(st.booleans()),
        narrow=dtype.signed and draw(st.booleans()),
    )


finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)
moderate = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32)


def _widened(lo: float, hi: float, spec: QuantSpec) -> tuple[float, float]:
    lo0, hi0 = min(lo, 0.0), max(hi, 0.0)
    if spec.symmetric:
        a = max(-lo0, hi0)
        return -a, a
    return lo0, hi0


def _check_valid(qp_scale: np.ndarray, spec: QuantSpec, zp: np.ndarray) -> None:
    assert qp_scale.dtype == np.float32
    assert np.isfinite(qp_scale).all()
    assert (qp_scale >= np.float32(MIN_SCALE)).all()
    assert (qp_scale >= F32_TINY).all()  # normal, never subnormal
    assert zp.dtype == spec.dtype.numpy_dtype
    assert ((zp >= spec.qmin) & (zp <= spec.qmax)).all()


def test_documented_example() -> None:
    qp = compute_qparams(-1.0, 3.0, ACT_U8_ASYM)
    assert qp.scale == np.float32(4.0 / 255.0)
    assert int(qp.zero_point) == 64
    assert qp.scale.shape == () and qp.zero_point.shape == ()
    assert not qp.per_channel


@settings(max_examples=300, deadline=None)
@given(a=finite32, b=finite32, spec=tensor_specs(), seed=st.integers(0, 2**32 - 1))
def test_properties_per_tensor(a: float, b: float, spec: QuantSpec, seed: int) -> None:
    lo, hi = min(a, b), max(a, b)
    qp = compute_qparams(lo, hi, spec, value_name="t")
    _check_valid(qp.scale, spec, qp.zero_point)
    scale = float(qp.scale)
    extremes = dequantize(np.array([spec.qmin, spec.qmax], spec.dtype.numpy_dtype), qp)
    assert np.isfinite(extremes).all()

    # Zero is exactly representable.
    q0 = quantize(np.float32(0.0), qp, spec)
    assert int(q0) == int(qp.zero_point)
    assert dequantize(q0, qp) == 0.0

    rng = np.random.default_rng(seed)
    wlo, whi = _widened(lo, hi, spec)
    inside = (wlo + (whi - wlo) * rng.uniform(size=256)).astype(np.float32)
    inside = np.clip(inside, wlo, whi).astype(np.float32)
    inside = np.concatenate([inside, np.float32([lo, hi, wlo, whi, 0.0])])
    beyond = np.clip([whi * 1.5, wlo * 1.5], -3.4e38, 3.4e38)
    outside = np.concatenate(
        [np.float32([np.inf, -np.inf, 3.4e38, -3.4e38]), beyond.astype(np.float32)]
    )

    codes = quantize(np.concatenate([inside, outside]), qp, spec)
    assert codes.dtype == spec.dtype.numpy_dtype
    assert ((codes >= spec.qmin) & (codes <= spec.qmax)).all()

    # Round trip inside the (widened) range: error <= scale / 2 up to float32 arithmetic.
    back = dequantize(quantize(inside, qp, spec), qp).astype(np.float64)
    err = np.abs(back - inside.astype(np.float64))
    slack = scale * 1e-6 * (spec.qmax - spec.qmin) + 1e-6 * np.abs(inside)
    if max(abs(wlo), abs(whi)) > 1.6e38:
        # Documented cap near the float32 limit: values past the last level saturate.
        zp = float(qp.zero_point)
        top, bottom = (spec.qmax - zp) * scale, (spec.qmin - zp) * scale
        keep = (inside <= top) & (inside >= bottom)
        err, slack = err[keep], slack[keep]
    assert (err <= 0.5 * scale + slack).all(), (lo, hi, spec, scale, err.max())


@settings(max_examples=200, deadline=None)
@given(
    c=st.one_of(finite32, st.sampled_from([0.0, -0.0, 0.1, -0.3, 1e-12, 3.4e38, -3.4e38])),
    spec=tensor_specs(),
)
def test_constant_range_round_trips_exactly(c: float, spec: QuantSpec) -> None:
    c32 = float(np.float32(c))
    qp = compute_qparams(c32, c32, spec, value_name="const")
    _check_valid(qp.scale, spec, qp.zero_point)
    back = dequantize(quantize(np.float32(c32), qp, spec), qp)
    if (abs(c32) >= MIN_SCALE and (abs(c32) < 1.7e38 or not spec.symmetric)) or c32 == 0.0:
        assert float(back) == c32
    elif abs(c32) < MIN_SCALE:
        assert abs(float(back) - c32) <= MIN_SCALE / 2
    else:  # symmetric beyond 1.7e38: the scale is capped and c may saturate
        assert abs(float(back) - c32) <= float(qp.scale) * (1 + 1e-6)
    extremes = dequantize(np.array([spec.qmin, spec.qmax], spec.dtype.numpy_dtype), qp)
    assert np.isfinite(extremes).all()
    if c32 == 0.0:
        assert float(qp.scale) == np.float32(ZERO_RANGE_SCALE)


def test_constant_scales_are_documented_powers_of_two() -> None:
    qp = compute_qparams(0.1, 0.1, ACT_U8_ASYM)
    assert qp.scale == np.float32(0.1) / np.float32(128) and int(qp.zero_point) == 0
    qp = compute_qparams(-0.3, -0.3, ACT_U8_ASYM)
    assert qp.scale == np.float32(0.3) / np.float32(128) and int(qp.zero_point) == 255
    qp = compute_qparams(0.1, 0.1, ACT_S8_SYM)
    assert qp.scale == np.float32(0.1) / np.float32(64) and int(qp.zero_point) == 0
    # In a symmetric spec the opposite constant is representable too.
    assert float(fake_quantize(np.float32(-0.1), qp, ACT_S8_SYM)) == np.float32(-0.1)
    qp = compute_qparams(0.0, 0.0, ACT_U8_ASYM)
    assert float(qp.scale) == 2.0**-23 and int(qp.zero_point) == 0


def test_tiny_range_gets_scale_floor() -> None:
    qp = compute_qparams(0.0, 1e-20, ACT_U8_ASYM)
    assert float(qp.scale) == np.float32(MIN_SCALE)
    assert float(np.float32(MIN_SCALE)) ** 2 >= F32_TINY  # bias scales of floors stay normal


def test_symmetric_scale_and_zero_point() -> None:
    qp = compute_qparams(-2.0, 1.0, ACT_S8_SYM)
    assert qp.scale == np.float32(2.0 / 127) and int(qp.zero_point) == 0
    u8_sym = QuantSpec(QuantDType.U8, symmetric=True, per_channel=False, axis=None)
    qp = compute_qparams(-2.0, 1.0, u8_sym)
    assert qp.scale == np.float32(2.0 / 127) and int(qp.zero_point) == 128
    # Both ends of [-a, a] are representable without saturation.
    codes = quantize(np.float32([-2.0, 2.0]), qp, u8_sym)
    assert codes.tolist() == [1, 255]


def test_narrow_and_reduced_ranges_saturate_to_the_spec() -> None:
    qp = compute_qparams(-1.0, 1.0, WEIGHT_S8_SYM)
    codes = quantize(np.float32([-1.0, 1.0, -5.0, 5.0, -np.inf]), qp, WEIGHT_S8_SYM)
    assert codes.tolist() == [-127, 127, -127, 127, -127]
    reduced_u8 = QuantSpec(QuantDType.U8, False, False, None, reduce_range=True)
    qp = compute_qparams(-1.0, 1.0, reduced_u8)
    codes = quantize(np.linspace(-3, 3, 101, dtype=np.float32), qp, reduced_u8)
    assert codes.min() == 0 and codes.max() == 127
    reduced_s8 = QuantSpec(QuantDType.S8, True, False, None, reduce_range=True)
    qp = compute_qparams(-1.0, 1.0, reduced_s8)
    assert qp.scale == np.float32(1.0 / 63)
    codes = quantize(np.linspace(-3, 3, 101, dtype=np.float32), qp, reduced_s8)
    assert codes.min() == -64 and codes.max() == 63


def test_round_half_to_even_and_saturation() -> None:
    spec = QuantSpec(QuantDType.S8, False, False, None)
    qp = compute_qparams(-128.0, 127.0, spec)
    assert qp.scale == 1.0 and int(qp.zero_point) == 0
    x = np.float32([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 127.5, 1e9, -1e9, np.inf, -np.inf])
    assert quantize(x, qp, spec).tolist() == [0, 2, 2, 0, -2, -2, 126, 127, 127, -128, 127, -128]


def test_quantize_nan_names_the_tensor() -> None:
    qp = compute_qparams(-1.0, 1.0, ACT_U8_ASYM)
    with pytest.raises(CalibrationError, match="'layer1.out'"):
        quantize(np.float32([0.0, np.nan]), qp, ACT_U8_ASYM, value_name="layer1.out")


@pytest.mark.parametrize(
    ("lo", "hi", "needle"),
    [
        (float("nan"), 1.0, "not finite"),
        (0.0, float("inf"), "not finite"),
        (2.0, 1.0, "min 2.0 > max 1.0"),
        (-1e39, 1.0, "exceeds float32"),
    ],
)
def test_bad_ranges_raise_calibration_error(lo: float, hi: float, needle: str) -> None:
    with pytest.raises(CalibrationError, match=needle) as info:
        compute_qparams(lo, hi, ACT_U8_ASYM, value_name="attn.mask_add")
    assert "'attn.mask_add'" in str(info.value)
    assert "\n" not in str(info.value)
    assert info.value.exit_code == 3


def test_shape_checks() -> None:
    with pytest.raises(ValueError, match="per-tensor"):
        compute_qparams(np.zeros(3), np.ones(3), ACT_U8_ASYM)
    with pytest.raises(ValueError, match="per-channel"):
        compute_qparams(0.0, 1.0, WEIGHT_S8_SYM_PER_CHANNEL)
    with pytest.raises(ValueError, match="shape"):
        compute_qparams(np.zeros(3), np.ones(4), WEIGHT_S8_SYM_PER_CHANNEL)


def test_per_channel_bad_channel_is_named() -> None:
    with pytest.raises(CalibrationError, match="channel 1"):
        compute_qparams(np.array([0.0, np.nan]), np.array([1.0, 1.0]), WEIGHT_S8_SYM_PER_CHANNEL)


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
@pytest.mark.parametrize("symmetric", [True, False])
def test_per_channel_matches_per_slice(axis: int, symmetric: bool) -> None:
    rng = np.random.default_rng(axis + 10)
    w = (rng.standard_normal((5, 6, 7)) * rng.uniform(0.01, 10, size=(5, 1, 1))).astype(np.float32)
    w[..., 3] = 0.25  # a constant slice along the last axis
    spec = QuantSpec(QuantDType.S8, symmetric=symmetric, per_channel=True, axis=axis)
    ax = axis % w.ndim
    others = tuple(i for i in range(w.ndim) if i != ax)
    qp = compute_qparams(w.min(axis=others), w.max(axis=others), spec)
    assert qp.per_channel and qp.scale.shape == (w.shape[ax],)
    assert qp.zero_point.shape == (w.shape[ax],) and qp.zero_point.dtype == np.int8
    codes = quantize(w, qp, spec)
    assert codes.shape == w.shape
    per_tensor = spec.with_axis(None)
    for c in range(w.shape[ax]):
        sl = np.take(w, c, axis=ax)
        qc = compute_qparams(sl.min(), sl.max(), per_tensor)
        assert qc.scale == qp.scale[c] and qc.zero_point == qp.zero_point[c]
        np.testing.assert_array_equal(np.take(codes, c, axis=ax), quantize(sl, qc, per_tensor))
    back = dequantize(codes, qp, axis=axis)
    scale_view = qp.scale.reshape([-1 if i == ax else 1 for i in range(w.ndim)])
    assert (np.abs(back - w) <= scale_view * 0.5 * (1 + 1e-5)).all()
    np.testing.assert_array_equal(fake_quantize(w, qp, spec), back)


def test_per_channel_axis_errors() -> None:
    spec = WEIGHT_S8_SYM_PER_CHANNEL
    qp = compute_qparams(-np.ones(4), np.ones(4), spec)
    with pytest.raises(ValueError, match="4 quantization parameters"):
        quantize(np.zeros((3, 4), np.float32), qp, spec)
    with pytest.raises(ValueError, match="out of range"):
        quantize(np.zeros((4,), np.float32), qp, spec, axis=2)
    with pytest.raises(ValueError, match="need an axis"):
        dequantize(np.zeros((4, 3), np.int8), qp)
    with pytest.raises(ValueError, match="integer codes"):
        dequantize(np.zeros(3, np.float32), compute_qparams(0.0, 1.0, ACT_U8_ASYM))


def test_sqnr() -> None:
    ref = np.array([1.0, 1.0])
    assert sqnr_db(ref, ref) == math.inf
    assert sqnr_db(ref, [1.1, 0.9]) == pytest.approx(20.0)
    assert sqnr_db([0.0, 0.0], [0.0, 1.0]) == -math.inf
    with pytest.raises(ValueError, match="shapes"):
        sqnr_db(ref, [1.0])


def test_int8_on_gaussian_data_is_above_30_db() -> None:
    x = np.random.default_rng(0).standard_normal(10000).astype(np.float32)
    qp = compute_qparams(x.min(), x.max(), ACT_U8_ASYM)
    assert sqnr_db(x, fake_quantize(x, qp, ACT_U8_ASYM)) > 30.0


def test_bias_qparams() -> None:
    s_in = np.float32(0.0123)
    s_w = np.float32([0.5, 1e-3, 2.0])
    qp = bias_qparams(s_in, s_w)
    np.testing.assert_array_equal(qp.scale, s_in * s_w)  # float32 product, as ORT
    assert qp.scale.dtype == np.float32 and qp.zero_point.dtype == np.int32
    assert (qp.zero_point == 0).all() and qp.per_channel
    bias = np.float32([0.3, -0.002, 7.0])
    codes = quantize(bias, qp, BIAS_S32_PER_CHANNEL)
    assert codes.dtype == np.int32
    assert (np.abs(dequantize(codes, qp, axis=0) - bias) <= qp.scale * 0.5 * (1 + 1e-6)).all()

    per_tensor = bias_qparams(0.5, 0.25)
    assert per_tensor.scale.shape == () and float(per_tensor.scale) == 0.125
    big = quantize(np.float32([1e30, -1e30]), per_tensor, BIAS_S32)
    assert big.tolist() == [2**31 - 1, -(2**31)]


@pytest.mark.parametrize(
    ("s_in", "s_w", "needle"),
    [
        (0.0, 1.0, "input scale"),
        (1.0, [1.0, -1.0], "weight scale"),
        (1.0, [np.nan], "weight scale"),
        (1e-30, 1e-30, "not a normal float32"),
    ],
)
def test_bias_qparams_errors(s_in: float, s_w: float, needle: str) -> None:
    with pytest.raises(CalibrationError, match=needle):
        bias_qparams(s_in, s_w)


@given(lo=moderate, hi=moderate)
def test_zero_point_formula(lo: float, hi: float) -> None:
    assume(lo < hi)
    qp = compute_qparams(lo, hi, ACT_U8_ASYM)
    scale = float(qp.scale)
    lo0 = min(lo, 0.0)
    hi0 = max(hi, 0.0)
    if lo < hi and hi0 > lo0:
        expected = float(np.float32((hi0 - lo0) / 255.0))
        assert scale == max(expected, float(np.float32(MIN_SCALE)))
        assert int(qp.zero_point) == int(np.clip(np.rint(-lo0 / scale), 0, 255))
