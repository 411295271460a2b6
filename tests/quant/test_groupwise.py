"""Per-group low-bit quantization math: exact round trips, ranges, errors, packing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from graphopt.quant.groupwise import (
    GroupQuantized,
    group_params,
    num_groups,
    pack_codes,
    quantize_rtn,
    quantize_with_params,
    resolve_group_size,
    unpack_codes,
)

BITS = st.sampled_from([2, 3, 4, 8])
LOW_BITS = st.sampled_from([2, 3, 4])


@st.composite
def codes_and_bits(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    bits = draw(BITS)
    shape = draw(st.tuples(st.integers(1, 5), st.integers(1, 70)))
    codes = draw(hnp.arrays(np.uint8, shape, elements=st.integers(0, (1 << bits) - 1)))
    return codes, bits


@given(codes_and_bits())
@settings(max_examples=150, deadline=None)
def test_pack_unpack_identity(case: tuple[np.ndarray, int]) -> None:
    codes, bits = case
    packed = pack_codes(codes, bits)
    assert packed.shape == (codes.shape[0], -(-codes.shape[1] * bits // 8))
    np.testing.assert_array_equal(unpack_codes(packed, bits, codes.shape[1]), codes)


def test_pack_layout_is_low_bits_first() -> None:
    # 4 bits: element 0 in the low nibble; 2 bits: element 0 in bits 0-1; 3 bits crosses bytes.
    assert pack_codes(np.array([[1, 2]], np.uint8), 4).tolist() == [[0x21]]
    assert pack_codes(np.array([[1, 2, 3, 0]], np.uint8), 2).tolist() == [[0b00111001]]
    assert pack_codes(np.array([[7, 7, 7]], np.uint8), 3).tolist() == [[0xFF, 0x01]]


def test_pack_rejects_out_of_range_codes() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        pack_codes(np.array([[16]], np.uint8), 4)


@st.composite
def representable(draw: st.DrawFn) -> tuple[np.ndarray, GroupQuantized, bool]:
    """A weight built from codes on a power-of-two scale grid, each group reaching its
    range's ends, so round-to-nearest must reproduce it exactly."""
    bits = draw(BITS)
    sym = draw(st.booleans())
    n = draw(st.integers(1, 4))
    k = draw(st.integers(4, 80))
    group = draw(st.sampled_from([4, 8, 16, 32, -1]))
    gs = resolve_group_size(k, group)
    g = num_groups(k, gs)
    qmax = (1 << bits) - 1
    codes = draw(hnp.arrays(np.uint8, (n, k), elements=st.integers(0, qmax)))
    exps = draw(hnp.arrays(np.int8, (n, g), elements=st.integers(-12, 4)))
    scales = np.ldexp(np.ones((n, g), np.float32), exps.astype(np.int32)).astype(np.float32)
    zps = None
    if sym:
        for j in range(g):
            codes[:, j * gs] = 0  # -mid sets the scale exactly
    else:
        zps = draw(hnp.arrays(np.uint8, (n, g), elements=st.integers(0, qmax)))
        for j in range(g):
            codes[:, j * gs] = 0
            if gs > 1 and j * gs + 1 < k:
                codes[:, j * gs + 1] = qmax
            else:
                zps[:, j] = 0
    q = GroupQuantized(codes, scales, zps, bits, gs)
    return q.dequantize(), q, sym


@given(representable())
@settings(max_examples=150, deadline=None)
def test_exactly_representable_weights_round_trip(
    case: tuple[np.ndarray, GroupQuantized, bool],
) -> None:
    w, q, sym = case
    got = quantize_rtn(w, q.bits, q.group_size, sym)
    np.testing.assert_array_equal(got.dequantize(), w)
    again = quantize_with_params(w, q.scales, q.zero_points, q.bits, q.group_size)
    np.testing.assert_array_equal(again.codes, q.codes)


FLOATS = hnp.arrays(
    np.float32,
    st.tuples(st.integers(1, 4), st.integers(2, 70)),
    elements=st.floats(-100, 100, width=32, allow_subnormal=False),
)


@given(FLOATS, BITS, st.booleans(), st.sampled_from([8, 16, 32, -1]), st.booleans())
@settings(max_examples=200, deadline=None)
def test_codes_in_range_and_error_within_half_scale(
    w: np.ndarray, bits: int, sym: bool, group: int, signed: bool
) -> None:
    q = quantize_rtn(w, bits, group, sym, signed_scale=signed)
    assert q.codes.shape == w.shape and int(q.codes.max()) < (1 << bits)
    assert np.all(q.scales != 0)
    if not (sym and signed):
        assert np.all(q.scales > 0)
    idx = np.arange(q.k) // q.group_size
    err = np.abs(q.dequantize() - w)
    half = np.abs(q.scales[:, idx]) / 2
    # float32 rounding of w / scale adds at most a few ulps of the value
    assert np.all(err <= half * (1 + 1e-5) + np.abs(w) * 1e-6 + 1e-30)


@given(FLOATS, LOW_BITS, st.booleans())
@settings(max_examples=100, deadline=None)
def test_clip_search_never_increases_group_error(w: np.ndarray, bits: int, sym: bool) -> None:
    plain = quantize_rtn(w, bits, 16, sym)
    clipped = quantize_rtn(w, bits, 16, sym, clip_search=True)
    for j in range(plain.groups):
        cols = slice(j * 16, (j + 1) * 16)
        e_plain = np.sum((plain.dequantize()[:, cols] - w[:, cols]) ** 2, axis=1)
        e_clip = np.sum((clipped.dequantize()[:, cols] - w[:, cols]) ** 2, axis=1)
        assert np.all(e_clip <= e_plain * (1 + 1e-5) + 1e-12)


def test_signed_scale_gives_a_positive_extreme_the_extra_step() -> None:
    w = np.array([[8.0, -1.0, 3.0, 0.5], [-8.0, 1.0, 3.0, 0.5]], np.float32)
    signed = quantize_rtn(w, 4, -1, True)
    positive = quantize_rtn(w, 4, -1, True, signed_scale=False)
    np.testing.assert_array_equal(signed.scales[:, 0], [-1.0, 1.0])  # 8 = -8 * -1
    np.testing.assert_allclose(positive.scales[:, 0], [8 / 7, 1.0])
    np.testing.assert_array_equal(signed.dequantize(), np.round(w))
    rng = np.random.default_rng(4)
    x = rng.standard_normal((256, 128)).astype(np.float32)
    mse = [
        float(np.mean((quantize_rtn(x, 4, 32, True, signed_scale=f).dequantize() - x) ** 2))
        for f in (True, False)
    ]
    assert mse[0] < 0.95 * mse[1]


def test_clip_search_helps_heavy_tails() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_t(2, (64, 256)).astype(np.float32)
    mse = [
        float(np.mean((quantize_rtn(w, 3, 128, True, c).dequantize() - w) ** 2))
        for c in (False, True)
    ]
    assert mse[1] < 0.9 * mse[0]  # measured 0.84


def test_ternary_codes() -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    q = quantize_rtn(w, 2, 32, True, ternary=True)
    assert set(np.unique(q.codes)) <= {1, 2, 3}
    values = np.unique(np.round(q.dequantize() / q.scales[:, np.arange(64) // 32], 6))
    assert set(values.tolist()) <= {-1.0, 0.0, 1.0}
    with pytest.raises(ValueError, match="ternary"):
        group_params(w, 4, True, ternary=True)


def test_group_params_matches_rtn_per_group() -> None:
    rng = np.random.default_rng(2)
    w = rng.standard_normal((6, 100)).astype(np.float32)
    q = quantize_rtn(w, 4, 32, False, clip_search=True)
    for j in range(q.groups):
        s, z = group_params(w[:, j * 32 : (j + 1) * 32], 4, False, clip_search=True)
        np.testing.assert_array_equal(s, q.scales[:, j])
        assert z is not None
        np.testing.assert_array_equal(z, q.zero_points[:, j])  # type: ignore[index]


def test_short_last_group_and_per_channel() -> None:
    w = np.random.default_rng(3).standard_normal((3, 70)).astype(np.float32)
    q = quantize_rtn(w, 4, 32, True)
    assert q.scales.shape == (3, 3) and q.group_size == 32
    pc = quantize_rtn(w, 8, -1, True)
    assert pc.scales.shape == (3, 1) and pc.group_size == 70
    assert float(np.max(np.abs(pc.dequantize() - w))) <= float(np.abs(pc.scales).max()) / 2 * 1.0001


def test_all_zero_group_dequantizes_to_zero() -> None:
    w = np.zeros((2, 32), np.float32)
    for sym in (True, False):
        np.testing.assert_array_equal(quantize_rtn(w, 4, 16, sym).dequantize(), w)


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="bits"):
        quantize_rtn(np.ones((2, 4), np.float32), 5, 4, True)
    with pytest.raises(ValueError, match="non-finite"):
        quantize_rtn(np.array([[np.nan, 1.0]], np.float32), 4, 2, True)
    with pytest.raises(ValueError, match="scales"):
        GroupQuantized(np.zeros((2, 4), np.uint8), np.ones((2, 3), np.float32), None, 4, 2)
