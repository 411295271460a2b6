"""AWQ scale search and SmoothQuant scales: numerics."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.quant.awq import awq_grid, quantize_scaled, scales_for_alpha, search_awq_scales
from graphopt.quant.gptq import layer_error
from graphopt.quant.groupwise import quantize_rtn
from graphopt.quant.smoothquant import smoothquant_scales


def _outlier_layer(seed: int, n: int = 64, k: int = 256, rows: int = 512) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Two weights reading one activation with a few large-magnitude channels."""
    rng = np.random.default_rng(seed)
    mag = np.ones(k)
    mag[rng.choice(k, 8, replace=False)] = 30.0
    x = rng.standard_normal((rows, k)) * mag
    ws = [(rng.standard_normal((n, k)) * 0.05).astype(np.float32) for _ in range(2)]
    return ws, x.T @ x / rows, np.mean(np.abs(x), axis=0)


def test_scales_are_normalised_and_monotone() -> None:
    mean_abs = np.array([0.1, 1.0, 10.0, 0.0])
    s = scales_for_alpha(mean_abs, 0.5)
    assert s.dtype == np.float32 and np.all(s > 0) and np.all(np.isfinite(s))
    np.testing.assert_allclose(np.sqrt(s.max() * s.min()), 1.0, rtol=1e-5)
    assert s[0] < s[1] < s[2]
    np.testing.assert_array_equal(scales_for_alpha(mean_abs, 0.0), np.ones(4, np.float32))
    assert awq_grid(4) == (0.0, 0.25, 0.5, 0.75)


@pytest.mark.parametrize(("bits", "group", "sym"), [(4, 128, True), (4, 32, False), (3, 128, True)])
def test_awq_beats_rtn_on_outlier_channels(bits: int, group: int, sym: bool) -> None:
    for seed in range(2):
        ws, h, mean_abs = _outlier_layer(seed)
        res = search_awq_scales(ws, h, mean_abs, bits, group, sym, grid=awq_grid(8))
        rtn = sum(layer_error(w, quantize_rtn(w, bits, group, sym).dequantize(), h) for w in ws)
        np.testing.assert_allclose(res.error_unscaled, rtn, rtol=1e-6)
        assert res.alpha > 0 and res.error < 0.9 * rtn
        # The reported error is what the scaled weights really give.
        again = sum(
            layer_error(w, quantize_scaled(w, res.scales, bits, group, sym).dequantize() / res.scales, h)
            for w in ws
        )
        np.testing.assert_allclose(again, res.error, rtol=1e-6)


def test_awq_keeps_rtn_when_scaling_cannot_help() -> None:
    # Uniform activations: every alpha gives all-ones scales after normalisation.
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((16, 64)) * 0.1).astype(np.float32)
    res = search_awq_scales([w], np.eye(64), np.ones(64), 4, 32, True, grid=[0.5])
    np.testing.assert_array_equal(res.scales, np.ones(64, np.float32))
    assert res.error == res.error_unscaled


def test_awq_argument_checks() -> None:
    ws, h, mean_abs = _outlier_layer(0, k=64)
    with pytest.raises(ValueError):
        search_awq_scales([], h, mean_abs)
    with pytest.raises(ValueError):
        search_awq_scales(ws, h[:-1, :-1], mean_abs)


def test_smoothquant_scales_balance_ranges() -> None:
    rng = np.random.default_rng(0)
    act_max = np.abs(rng.standard_normal(32)) + 0.1
    act_max[3] = 300.0
    ws = [rng.standard_normal((8, 32)).astype(np.float32), rng.standard_normal((4, 32)).astype(np.float32)]
    w_max = np.max(np.abs(np.concatenate(ws)), axis=0)
    s = smoothquant_scales(act_max, ws, 0.5)
    # After smoothing, activation and weight channel maxima are equal (alpha = 0.5).
    np.testing.assert_allclose(act_max / s, w_max * s, rtol=1e-5)
    assert np.argmax(act_max / s) != 3 or np.max(act_max / s) < 300.0 / 5
    np.testing.assert_allclose(smoothquant_scales(act_max, ws, 0.0), 1.0 / w_max, rtol=1e-5)
    dead = act_max.copy()
    dead[0] = 0.0
    assert smoothquant_scales(dead, ws, 0.5)[0] == 1.0
    with pytest.raises(ValueError):
        smoothquant_scales(act_max, ws, 1.5)
