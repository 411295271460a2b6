"""The runtime_ext weight format: to_ext/from_ext round trip and the documented layout."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graphopt.backends.ext.format import (
    DOMAIN,
    OP_TYPE,
    TILE_CHANNELS,
    ExtWeights,
    codes_per_word,
    from_ext,
    from_tiles,
    num_tiles,
    pack_tiles,
    packed_tile_bytes,
    to_ext,
    to_tiles,
    unpack_tiles,
)
from graphopt.quant.groupwise import GroupQuantized, num_groups


@st.composite
def group_quantized(draw: st.DrawFn) -> GroupQuantized:
    bits = draw(st.sampled_from([2, 3, 4, 8]))
    n = draw(st.integers(1, 20))
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
    assert ext.packed.shape == (num_tiles(q.n), packed_tile_bytes(q.k, q.bits))
    assert ext.scales.shape == (num_tiles(q.n), q.groups, TILE_CHANNELS)
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
    assert (DOMAIN, OP_TYPE, TILE_CHANNELS) == ("graphopt", "MatMulLowBit", 16)
    assert [codes_per_word(b) for b in (2, 3, 4, 8)] == [16, 10, 8, 4]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_layout_matches_the_documented_formula(bits: int) -> None:
    """Code k of channel n sits in tile n // 16, column k // F, word n % 16, bits (k % F) * bits."""
    rng = np.random.default_rng(bits)
    per_word = codes_per_word(bits)
    n, k = 21, 2 * per_word + 5
    codes = rng.integers(0, 1 << bits, size=(n, k), dtype=np.uint8)
    words = pack_tiles(codes, bits).view("<u4").reshape(num_tiles(n), -1, TILE_CHANNELS)
    for channel in range(n):
        for index in range(k):
            word = int(words[channel // 16, index // per_word, channel % 16])
            assert (word >> ((index % per_word) * bits)) & ((1 << bits) - 1) == codes[
                channel, index
            ]
    # Padding codes, padding channels and (3-bit) unused word bits are zero.
    full = unpack_tiles(pack_tiles(codes, bits), bits, words.shape[1] * per_word, num_tiles(n) * 16)
    assert not full[:, k:].any()
    assert not full[n:].any()
    if bits == 3:
        assert not (words >> 30).any()


def test_int4_tile_example() -> None:
    """Channel j's codes 0..7 are the nibbles of word j of column 0, lowest first."""
    codes = (np.arange(8)[None, :] + np.arange(3)[:, None]).astype(np.uint8)  # channel j: j .. j+7
    words = pack_tiles(codes, 4).view("<u4")[0]
    assert [hex(w) for w in words[:3]] == ["0x76543210", "0x87654321", "0x98765432"]
    assert not words[3:].any()


def test_scales_are_tile_major() -> None:
    values = np.arange(20 * 3, dtype=np.float32).reshape(20, 3)
    tiled = to_tiles(values)
    assert tiled.shape == (2, 3, 16)
    assert tiled[1, 2, 3] == values[19, 2]
    assert not tiled[1, :, 4:].any()
    np.testing.assert_array_equal(from_tiles(tiled, 20), values)


def test_bad_inputs_are_rejected() -> None:
    q = GroupQuantized(np.zeros((2, 10), np.uint8), np.ones((2, 1), np.float32), None, 4, 10)
    ext = to_ext(q)
    with pytest.raises(ValueError, match="packed must be uint8"):
        from_ext(ExtWeights(ext.packed[:, :16], ext.scales, None, ext.attributes))
    with pytest.raises(ValueError, match="lacks 'group_size'"):
        from_ext(ExtWeights(ext.packed, ext.scales, None, {"K": 10, "N": 2, "bits": 4}))
    with pytest.raises(ValueError, match="scales must be"):
        from_ext(ExtWeights(ext.packed, np.ones((2, 2), np.float32), None, ext.attributes))
    with pytest.raises(ValueError, match="zero_points must be"):
        from_ext(ExtWeights(ext.packed, ext.scales, np.zeros((2, 1), np.uint8), ext.attributes))
    with pytest.raises(ValueError, match="a code exceeds 3"):
        pack_tiles(np.full((1, 4), 4, np.uint8), 2)
    with pytest.raises(ValueError, match="supports bits"):
        pack_tiles(np.zeros((1, 4), np.uint8), 5)
