"""Least-squares reconstruction after pruning: the closed form and the pass end to end."""

from __future__ import annotations

import numpy as np
import pytest
from _prune_support import block_model, copy, inputs, run

from graphopt.infra.analysis import AnalysisManager
from graphopt.infra.context import PassContext
from graphopt.passes.pruning.prune_pass import PrunePass
from graphopt.passes.pruning.reconstruct import refit, relative_error


def test_refit_recovers_a_duplicated_channel_exactly() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 5))
    x = np.concatenate([x, x[:, :1]], axis=1)  # channel 5 duplicates channel 0
    h = x.T @ x / len(x)
    w = rng.normal(size=(6, 3))
    keep = np.arange(5)
    result = refit(h, w, keep, damp=0.0)
    assert result.error_refit < 1e-10 < result.error_removed
    np.testing.assert_allclose(result.weight[0], w[0] + w[5], rtol=1e-5)


def test_relative_error_matches_direct_computation() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 6))
    w = rng.normal(size=(6, 4))
    keep = np.array([0, 2, 3, 5])
    wk = rng.normal(size=(4, 4))
    direct = np.sum((x[:, keep] @ wk - x @ w) ** 2) / np.sum((x @ w) ** 2)
    assert relative_error(x.T @ x / len(x), w, keep, wk) == pytest.approx(direct, rel=1e-9)


def test_refit_is_never_worse_than_removal() -> None:
    rng = np.random.default_rng(2)
    h = np.eye(4) * 1e-30  # degenerate Gram: falls back to plain removal
    w = rng.normal(size=(4, 2))
    result = refit(h, w, np.array([0, 1]), damp=0.01)
    assert result.error_refit <= result.error_removed


def _feeds(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    # Correlated activations (one fixed low-rank mix), as real hidden states are.
    mix = np.random.default_rng(99).normal(size=(10, 16)).astype(np.float32)
    rng = np.random.default_rng(seed)
    return [{"x": 0.05 * (rng.normal(size=(4, 5, 10)).astype(np.float32) @ mix)} for _ in range(n)]


@pytest.mark.parametrize("importance", ["activation", "hessian"])
def test_reconstruction_reduces_output_error(importance: str) -> None:
    base = block_model(layers=1, gated=True, inter=32, seed=3)
    calib = _feeds(24, seed=4)
    held = _feeds(4, seed=5)
    ctx = PassContext(calibration=lambda: iter(calib))
    errors = {}
    for reconstruct in (False, True):
        model = copy(base)
        opts = {"heads": "0.25", "ffn": "0.5", "importance": importance, "reconstruct": str(reconstruct)}
        result = PrunePass.from_options(opts).run_with(model, ctx, AnalysisManager(ctx))
        assert result.stats["calibration_samples"] == 24
        entries = result.stats["blocks"]
        assert len(entries) == 2 and all("error_removed" in e for e in entries)
        if reconstruct:
            assert all(e["error_refit"] <= e["error_removed"] for e in entries)
        num = den = 0.0
        for feed in held:
            want, got = run(base, feed), run(model, feed)
            num += float(np.sum((got - want) ** 2))
            den += float(np.sum(want**2))
        errors[reconstruct] = num / den
    assert errors[True] < 0.7 * errors[False], errors


def test_refine_round_runs_and_reports() -> None:
    base = block_model(layers=2, inter=32, seed=6)
    calib = _feeds(16, seed=7)
    ctx = PassContext(calibration=lambda: iter(calib))
    model = copy(base)
    opts = {"ffn": "0.5", "importance": "hessian", "reconstruct": "true", "refine": "true"}
    result = PrunePass.from_options(opts).run_with(model, ctx, AnalysisManager(ctx))
    for entry in result.stats["blocks"]:
        assert entry["error_refined"] <= entry["error_pruned_inputs"] + 1e-12
    assert run(model, inputs()).shape == (2, 5, 16)
