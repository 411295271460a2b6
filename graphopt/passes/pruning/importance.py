"""Importance scores of prunable units (attention heads, FFN neurons).

Three estimates, each higher = more important:

* ``magnitude``: for each unit, the L2 norms of every slice coupled to it (query/key/value
  columns and output-projection rows of a head; up/gate columns and down rows of a
  neuron), each divided by that matrix's mean per-unit norm so matrices of different
  scales weigh alike, then summed. A KV head's key/value slices are shared by its group's
  query heads and are split evenly between them.
* ``activation``: ``Σ_i ‖x_i‖ · ‖W_i,:‖`` over the unit's input channels ``i`` of the
  following projection (output projection or down), ``‖x_i‖`` the channel's RMS on the
  calibration data: how much the unit contributes to the block's output.
* ``hessian``: the optimal-brain-surgeon loss of removing the unit's channel group ``S``
  from the following projection with the remaining weights refit:
  ``tr(W_Sᵀ ([H⁻¹]_SS)⁻¹ W_S)``, ``H`` the damped Gram ``E[xᵀx]`` of its input.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from graphopt.analysis.structure.transformer import AttentionBlock, FFNBlock, Projection
from graphopt.passes.pruning.slicing import weight_array


class InputStats(Protocol):
    """Calibration statistics of a projection's input (see :mod:`graphopt.analysis.hessian`)."""

    def hessian(self, value: str) -> np.ndarray: ...

    def channel_rms(self, value: str) -> np.ndarray: ...


def _unit_norms(w: np.ndarray, size: int, axis: int) -> np.ndarray:
    """L2 norm of each block of ``size`` consecutive columns (axis=1) or rows (axis=0)."""
    w = w.astype(np.float64)
    if axis == 1:
        w = w.T
    units = w.shape[0] // size
    norms = np.sqrt(np.sum(w.reshape(units, -1) ** 2, axis=1))
    mean = float(norms.mean())
    return norms / mean if mean > 0 else norms


def head_scores(block: AttentionBlock, method: str, stats: InputStats | None, damp: float) -> np.ndarray:
    """One score per query head of ``block``."""
    hd, g = block.head_dim, block.group_size
    if method == "magnitude":
        q = _unit_norms(weight_array(block.q.weight), hd, axis=1)
        o = _unit_norms(weight_array(block.o.weight), hd, axis=0)
        kv = _unit_norms(weight_array(block.k.weight), hd, 1) + _unit_norms(weight_array(block.v.weight), hd, 1)
        return q + o + np.repeat(kv, g) / g
    assert stats is not None
    return _grouped_scores(block.o, method, stats, hd, damp)


def neuron_scores(block: FFNBlock, method: str, stats: InputStats | None, damp: float) -> np.ndarray:
    """One score per intermediate neuron of ``block``."""
    if method == "magnitude":
        total = _unit_norms(weight_array(block.down.weight), 1, axis=0)
        for proj in block.inputs:
            total = total + _unit_norms(weight_array(proj.weight), 1, axis=1)
        return total
    assert stats is not None
    return _grouped_scores(block.down, method, stats, 1, damp)


def _grouped_scores(proj: Projection, method: str, stats: InputStats, size: int, damp: float) -> np.ndarray:
    name = proj.input.name
    assert name is not None
    w = weight_array(proj.weight).astype(np.float64)
    units = w.shape[0] // size
    if method == "activation":
        rms = np.asarray(stats.channel_rms(name), dtype=np.float64)
        contrib = rms * np.sqrt(np.sum(w * w, axis=1))
        return contrib.reshape(units, size).sum(axis=1)
    if method == "hessian":
        h = damped(np.asarray(stats.hessian(name), dtype=np.float64), damp)
        hinv = np.linalg.inv(h)
        if size == 1:
            return np.sum(w * w, axis=1) / np.diag(hinv)
        scores = np.empty(units)
        for u in range(units):
            s = slice(u * size, (u + 1) * size)
            ws = w[s, :]
            scores[u] = float(np.trace(ws.T @ np.linalg.solve(hinv[s, s], ws)))
        return scores
    raise ValueError(f"unknown importance {method!r}")


def damped(h: np.ndarray, damp: float) -> np.ndarray:
    """``H + damp·mean(diag H)·I`` (``I`` alone when ``H`` is zero)."""
    mean = float(np.mean(np.diag(h))) if h.size else 0.0
    return h + (damp * mean if mean > 0 else 1.0) * np.eye(h.shape[0])
