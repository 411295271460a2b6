"""GPTQ numerics: exact round trips, error never above RTN's, act-order, robustness."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from graphopt.quant.gptq import gptq_quantize, gptq_quantize_with_info, layer_error
from graphopt.quant.groupwise import GroupQuantized, quantize_rtn


def _layer(seed: int, n: int = 96, k: int = 256, rows: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Random weight and the Hessian of correlated inputs with uneven channel scales."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) / np.sqrt(k) + 0.3 * np.eye(k)
    x = (rng.standard_normal((rows, k)) @ mix) * np.exp(rng.standard_normal(k))
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    return w, x.T @ x / rows


def _representable(seed: int, bits: int, group: int, sym: bool, n: int = 16, k: int = 256) -> GroupQuantized:
    rng = np.random.default_rng(seed)
    g = -(-k // group)
    codes = rng.integers(0, 1 << bits, size=(n, k), dtype=np.uint8)
    # Make every group span its full code range so its min/max parameters are recovered.
    for j in range(g):
        codes[:, j * group] = 0 if not sym else rng.integers(0, 1 << bits)
        codes[:, j * group + 1] = (1 << bits) - 1
        codes[:, j * group + 2] = 0
    # Powers of two keep the min/max parameter arithmetic exact.
    scales = np.exp2(-rng.integers(3, 8, size=(n, g))).astype(np.float32)
    zps = None if sym else rng.integers(1, (1 << bits) - 1, size=(n, g), dtype=np.uint8)
    if sym:
        # symmetric parameters come from max(-lo/mid, hi/(mid-1)): pin code 0 (= -mid).
        codes[:, ::group] = 0
    return GroupQuantized(codes, scales, zps, bits, group)


@pytest.mark.parametrize(("bits", "group", "sym"), [(4, 128, True), (4, 32, False), (3, 64, False), (8, 256, True)])
@pytest.mark.parametrize("act_order", [False, True])
def test_exactly_representable_weights_round_trip_exactly(bits: int, group: int, sym: bool, act_order: bool) -> None:
    ref = _representable(3, bits, group, sym)
    w = ref.dequantize()
    _, h = _layer(1, n=ref.n, k=ref.k)
    np.testing.assert_array_equal(quantize_rtn(w, bits, group, sym).dequantize(), w)
    q = gptq_quantize(w, h, bits, group, sym, act_order=act_order)
    np.testing.assert_array_equal(q.dequantize(), w)


@pytest.mark.parametrize(("bits", "group", "sym"), [(4, 128, True), (4, 128, False), (3, 128, True), (2, 128, False), (4, 32, False), (8, -1, True)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_not_above_rtn(bits: int, group: int, sym: bool, act_order: bool) -> None:
    for seed in range(3):
        w, h = _layer(seed)
        rtn = layer_error(w, quantize_rtn(w, bits, group, sym).dequantize(), h)
        q = gptq_quantize(w, h, bits, group, sym, act_order=act_order)
        assert q.bits == bits and q.symmetric == sym and q.codes.shape == w.shape
        gptq = layer_error(w, q.dequantize(), h)
        assert gptq <= rtn, (seed, gptq, rtn)
        if bits <= 4:
            assert gptq < 0.8 * rtn, (seed, gptq, rtn)  # a real gain, not a tie


def test_act_order_helps_on_uneven_channels() -> None:
    ratios = []
    for seed in range(3):
        w, h = _layer(seed)
        plain = layer_error(w, gptq_quantize(w, h, 4, 128, True, act_order=False).dequantize(), h)
        ordered = layer_error(w, gptq_quantize(w, h, 4, 128, True, act_order=True).dequantize(), h)
        ratios.append(ordered / plain)
    assert np.mean(ratios) < 0.9


def test_block_size_changes_nothing() -> None:
    w, h = _layer(5, k=200)
    a = gptq_quantize(w, h, 4, 64, False, block=128)
    b = gptq_quantize(w, h, 4, 64, False, block=7)
    diff = np.mean(a.codes != b.codes)
    assert diff < 1e-3  # identical up to float rounding ties
    for static in (False, True):
        c = gptq_quantize(w, h, 4, 64, False, block=128, static_groups=static)
        d = gptq_quantize(w, h, 4, 64, False, block=16, static_groups=static)
        np.testing.assert_allclose(layer_error(w, c.dequantize(), h), layer_error(w, d.dequantize(), h), rtol=1e-3)


def test_dead_inputs_rounded_to_nearest_without_nan() -> None:
    w, h = _layer(2, k=128)
    dead = [0, 5, 77]
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    q, info = gptq_quantize_with_info(w, h, 4, 32, True)
    assert info.dead_inputs == 3 and not info.fallback
    deq = q.dequantize()
    assert np.all(np.isfinite(deq))
    rtn = quantize_rtn(w, 4, 32, True)
    np.testing.assert_array_equal(q.codes[:, dead], rtn.codes[:, dead])


def test_singular_hessian_gets_more_damping() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 64))  # rank 8 < K
    w = (rng.standard_normal((16, 64)) * 0.1).astype(np.float32)
    q, info = gptq_quantize_with_info(w, x.T @ x / 8, 4, 32, True, damp=0.0)
    assert not info.fallback and info.damp > 0.0
    assert np.all(np.isfinite(q.dequantize()))


def test_unfactorisable_hessian_falls_back_to_rtn(caplog: pytest.LogCaptureFixture) -> None:
    w, _ = _layer(0, n=8, k=64)
    h = 3.0 * np.ones((64, 64)) - 2.0 * np.eye(64)  # unit diagonal, eigenvalues -2 and 190
    with caplog.at_level(logging.WARNING, logger="graphopt.quant.gptq"):
        q, info = gptq_quantize_with_info(w, h, 4, 32, True, retries=2, name="layer.7")
    assert info.fallback
    assert "layer.7" in caplog.text and "round-to-nearest" in caplog.text
    np.testing.assert_array_equal(q.codes, quantize_rtn(w, 4, 32, True).codes)


def test_bad_arguments() -> None:
    w, h = _layer(0, n=4, k=32)
    with pytest.raises(ValueError, match="h must be"):
        gptq_quantize(w, h[:-1, :-1])
    bad = w.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        gptq_quantize(bad, h)


def test_inverse_cholesky_factor() -> None:
    from graphopt.quant.gptq import inverse_cholesky_upper

    _, h = _layer(4, k=96)
    u = inverse_cholesky_upper(h)
    np.testing.assert_array_equal(u, np.triu(u))
    np.testing.assert_allclose(u.T @ u, np.linalg.inv(h), rtol=1e-8, atol=1e-8 * np.abs(np.linalg.inv(h)).max())
    with pytest.raises(np.linalg.LinAlgError):
        inverse_cholesky_upper(-np.eye(4))
