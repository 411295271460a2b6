"""The runtime_ext weight format: to_ext/from_ext round trip and the documented layout."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graphopt.backends.ext.format import (
    DOMAIN,
    OP_TYPE,
    ExtWeights,
    codes_per_block,
    from_ext,
    pack_rows,
    packed_row_bytes,
    to_ext,
    unpack_rows,
)
from graphopt.quant.groupwise import GroupQuantized, num_groups


@st.composite
def group_quantized(draw: st.DrawFn) -> GroupQuantized:
    bits = draw(st.sampled_from([2, 3, 4, 8]))
    n = draw(st.integers(1, 9))
    k = draw(st.integers(1, 300))
    group_size = draw(st.integers(1, k))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    g = num_groups(k, group_size)
    codes = rng.integers(0, 1 << bits, size=(n, k), dtype=np.uint8)
    scales = rng.standard_normal((n, g)).astype(np.float32)
    zps = rng.integers(0, 1 << bits, size=(n, g), dtype=np.uint8) if draw(st.booleans()) else None
    return GroupQuantized(codes, scales, zps, bits, group_size)


@settings(max_examples=150, deadline=None)
@given(group_quantized())
def test_round_trip_is_exact(q: GroupQuantized) -> None:
    ext = to_ext(q)
    assert ext.packed.dtype == np.uint8
    assert ext.packed.shape == (q.n, packed_row_bytes(q.k, q.bits))
    assert ext.attributes == {"K": q.k, "N": q.n, "bits": q.bits, "group_size": q.group_size}
    back = from_ext(ext)
    np.testing.assert_array_equal(back.codes, q.codes)
    np.testing.assert_array_equal(back.scales, q.scales)
    if q.zero_points is None:
        assert back.zero_points is None
    else:
        np.testing.assert_array_equal(back.zero_points, q.zero_points)
    assert (back.bits, back.group_size) == (q.bits, q.group_size)
    np.testing.assert_array_equal(back.dequantize(), q.dequantize())


def test_constants() -> None:
    assert (DOMAIN, OP_TYPE) == ("graphopt", "MatMulLowBit")
    assert [codes_per_block(b) for b in (2, 3, 4, 8)] == [128, 80, 64, 32]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_layout_matches_the_documented_formula(bits: int) -> None:
    """Code k = block * C + f * 8 + w sits in word w of its block at bits [f*bits, ...)."""
    rng = np.random.default_rng(bits)
    k = 2 * codes_per_block(bits) + 5
    codes = rng.integers(0, 1 << bits, size=(3, k), dtype=np.uint8)
    words = pack_rows(codes, bits).view("<u4").reshape(3, -1, 8)
    per_block = codes_per_block(bits)
    for row in range(3):
        for index in range(k):
            block, rest = divmod(index, per_block)
            field, word = divmod(rest, 8)
            value = (int(words[row, block, word]) >> (field * bits)) & ((1 << bits) - 1)
            assert value == codes[row, index]
    # Padding codes and (3-bit) unused word bits are zero.
    full = unpack_rows(pack_rows(codes, bits), bits, words.shape[1] * per_block)
    assert not full[:, k:].any()
    if bits == 3:
        assert not (words >> 30).any()


def test_int4_block_example() -> None:
    """Codes 0..63 mod 16: word w holds codes w, w+8, ..., w+56 as nibbles, lowest first."""
    packed = pack_rows((np.arange(64) % 16).astype(np.uint8)[None, :], 4)
    words = packed.view("<u4")[0]
    assert words[0] == 0x80808080
    assert words[1] == 0x91919191


def test_bad_inputs_are_rejected() -> None:
    q = GroupQuantized(np.zeros((2, 10), np.uint8), np.ones((2, 1), np.float32), None, 4, 10)
    ext = to_ext(q)
    with pytest.raises(ValueError, match="packed must be uint8"):
        from_ext(ExtWeights(ext.packed[:, :16], ext.scales, None, ext.attributes))
    with pytest.raises(ValueError, match="lacks 'group_size'"):
        from_ext(ExtWeights(ext.packed, ext.scales, None, {"K": 10, "N": 2, "bits": 4}))
    with pytest.raises(ValueError, match="scales must be"):
        from_ext(ExtWeights(ext.packed, np.ones((2, 2), np.float32), None, ext.attributes))
    with pytest.raises(ValueError, match="a code exceeds 3"):
        pack_rows(np.full((1, 4), 4, np.uint8), 2)
    with pytest.raises(ValueError, match="supports bits"):
        pack_rows(np.zeros((1, 4), np.uint8), 5)
