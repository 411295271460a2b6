"""Least-squares reconstruction of the projection after a pruned block.

With ``X`` the calibration inputs of the projection in the unpruned model, ``W`` its
original weight and ``k`` the kept input channels, the ridge problem
``min_W' ‖X_k W' − X W‖² + λ‖W' − W_k‖²`` has the closed form
``W' = (H_kk + λI)⁻¹ (H_k: W + λ W_k)`` with ``H = XᵀX / n`` (the input Gram). ``λ`` is
``damp`` times the mean of ``diag(H_kk)``. The ridge pulls toward the kept rows ``W_k``
(plain removal), not toward zero: with few calibration rows (fewer than ``K`` or not
many more) a large ``damp`` degrades gracefully to removal instead of shrinking weights. The relative output error ``‖X_k W' − X W‖² / ‖X W‖²``
follows from ``H`` alone and is reported for the refit and for plain removal
(``W' = W_k``).

Because every block is refit against the *unpruned* model's inputs, the errors of earlier
blocks are not seen by later ones. :func:`paired_grams` and :func:`refit_paired` add a
second round: both models run on the calibration feeds, and each projection is refit from
the pruned model's actual inputs ``X̃`` to the unpruned output ``X W``:
``W' = (X̃ᵀX̃ + λI)⁻¹ X̃ᵀX W``.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from graphopt.infra.context import PassContext


@dataclass(frozen=True)
class Refit:
    """A refit weight and the block-output errors with and without it.

    Attributes:
        weight: The new ``[len(keep), N]`` weight (float32).
        error_removed: Relative output error of plain removal.
        error_refit: Relative output error after the refit.
    """

    weight: np.ndarray
    error_removed: float
    error_refit: float


def _quad(a: np.ndarray, h: np.ndarray, b: np.ndarray) -> float:
    """``tr(aᵀ H b)`` with matrix products (einsum's loop is far slower)."""
    return float(np.sum(a * (h @ b)))


def relative_error(h: np.ndarray, w: np.ndarray, keep: np.ndarray, w_keep: np.ndarray) -> float:
    """``‖X_k W' − X W‖² / ‖X W‖²`` from the Gram ``H``."""
    delta = w.copy()
    delta[keep, :] -= w_keep
    signal = float(_quad(w, h, w))
    noise = float(_quad(delta, h, delta))
    return noise / signal if signal > 0 else 0.0


def refit(h: np.ndarray, w: np.ndarray, keep: np.ndarray, damp: float) -> Refit:
    """Ridge least-squares refit of the rows ``keep`` of ``w`` (see the module docstring).

    Args:
        h: The input Gram ``[K, K]`` of the unpruned model (float64).
        w: The original weight ``[K, N]``.
        keep: Kept input channels (sorted).
        damp: Ridge strength relative to the mean kept diagonal of ``h``.
    """
    h = np.asarray(h, dtype=np.float64)
    w64 = np.asarray(w, dtype=np.float64)
    hkk = h[np.ix_(keep, keep)]
    mean = float(np.mean(np.diag(hkk))) if keep.size else 0.0
    lam = damp * mean if mean > 0 else 1e-8
    rhs = h[keep, :] @ w64 + lam * w64[keep, :]
    try:
        solved = np.linalg.solve(hkk + lam * np.eye(keep.size), rhs)
    except np.linalg.LinAlgError:
        solved = np.linalg.lstsq(hkk + lam * np.eye(keep.size), rhs, rcond=None)[0]
    removed = relative_error(h, w64, keep, w64[keep, :])
    fitted = relative_error(h, w64, keep, solved)
    if not np.all(np.isfinite(solved)) or fitted > removed:
        return Refit(w64[keep, :].astype(np.float32), removed, removed)
    return Refit(solved.astype(np.float32), removed, fitted)


@dataclass
class PairedGram:
    """Running ``X̃ᵀX̃`` and ``X̃ᵀX`` for one projection: ``X̃`` its kept input channels in
    the pruned model, ``X`` its full input in the unpruned model (same calibration rows)."""

    keep: np.ndarray
    gram: np.ndarray
    cross: np.ndarray
    rows: int = 0

    def add(self, pruned: np.ndarray, original: np.ndarray) -> None:
        xt = np.ascontiguousarray(pruned.reshape(-1, pruned.shape[-1]), dtype=np.float32)
        x = np.ascontiguousarray(original.reshape(-1, original.shape[-1]), dtype=np.float32)
        self.gram += (xt.T @ xt).astype(np.float64)
        self.cross += (xt.T @ x).astype(np.float64)
        self.rows += int(xt.shape[0])


def paired_grams(
    original: ir.Model,
    pruned: ir.Model,
    keeps: dict[str, np.ndarray],
    ctx: PassContext,
    max_samples: int | None,
) -> dict[str, PairedGram]:
    """Runs both models on the calibration feeds and accumulates :class:`PairedGram` per
    value name (the input of each refit projection, named alike in both models)."""
    from graphopt.analysis.calibration import run_feed, session_with_outputs

    names = list(keeps)
    acc: dict[str, PairedGram] = {}
    with tempfile.TemporaryDirectory(prefix="graphopt-prune-") as scratch:
        ref_dir, new_dir = Path(scratch, "ref"), Path(scratch, "new")
        ref_dir.mkdir()
        new_dir.mkdir()
        ref = session_with_outputs(original, names, ref_dir, 2)
        new = session_with_outputs(pruned, names, new_dir, 2)
        for index, feed in enumerate(ctx.calibration_feeds()):
            if max_samples is not None and index >= max_samples:
                break
            want = run_feed(ref, names, feed, index)
            got = run_feed(new, names, feed, index)
            for name in names:
                x, xt = want[name], got[name]
                if name not in acc:
                    k, kk = x.shape[-1], xt.shape[-1]
                    acc[name] = PairedGram(keeps[name], np.zeros((kk, kk)), np.zeros((kk, k)))
                acc[name].add(xt, x)
    return acc


def refit_paired(
    paired: PairedGram, w: np.ndarray, current: np.ndarray, h: np.ndarray, damp: float
) -> tuple[np.ndarray, float, float]:
    """``W' = (X̃ᵀX̃ + λI)⁻¹ (X̃ᵀX W + λ W_now)``: the kept rows that best reproduce the unpruned
    block output from the pruned model's own inputs.

    Args:
        paired: The accumulated grams.
        w: The original weight ``[K, N]``.
        current: The weight in the pruned model now ``[len(keep), N]``.
        h: The unpruned input Gram ``E[XᵀX]`` (for the reported errors).
        damp: Ridge strength relative to the mean diagonal of ``X̃ᵀX̃``.

    Returns:
        The new weight and the relative output errors ``‖X̃ W' − X W‖² / ‖X W‖²`` with
        ``current`` and with the new weight (the pruned model's own inputs).
    """
    n = max(paired.rows, 1)
    g = paired.gram / n
    c = paired.cross / n
    w64 = np.asarray(w, dtype=np.float64)
    mean = float(np.mean(np.diag(g))) if g.size else 0.0
    lam = damp * mean if mean > 0 else 1e-8
    current64 = np.asarray(current, dtype=np.float64)
    solved = np.linalg.solve(g + lam * np.eye(g.shape[0]), c @ w64 + lam * current64)
    signal = float(_quad(w64, h, w64))

    def error(wk: np.ndarray) -> float:
        if signal <= 0:
            return 0.0
        noise = (
            float(_quad(wk, g, wk))
            - 2.0 * float(_quad(wk, c, w64))
            + signal
        )
        return max(noise, 0.0) / signal

    fitted = error(solved)
    before = error(np.asarray(current, dtype=np.float64))
    if not np.all(np.isfinite(solved)) or fitted > before:
        return np.asarray(current, dtype=np.float32), before, before
    return solved.astype(np.float32), before, fitted
