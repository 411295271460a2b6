"""GPTQ: rounding of ``W[N, K]`` that compensates each column's error in the columns after it.

Given the input Hessian ``H = XᵀX / rows`` of a linear layer, GPTQ quantizes the input
columns of ``W`` one at a time; after rounding column ``j`` it spreads the rounding error
over the not-yet-quantized columns so that the layer's output error ``tr(ΔW H ΔWᵀ)`` stays
small (Frantar et al., 2022, "GPTQ: accurate post-training quantization for generative
pre-trained transformers"). This module is numerics only: numpy in, a
:class:`~graphopt.quant.groupwise.GroupQuantized` out.

Choices made here:

* **Damping**: ``H + damp * mean(diag H) * I`` before inversion.
* **Dead inputs** (zero diagonal: a channel that was always zero in calibration): their
  diagonal is set to 1, which decouples them, so they are rounded to nearest inside their
  group and neither give nor receive error compensation. Their weights are kept (not
  zeroed), because the calibration set may simply not have exercised them.
* **Activation order** (``act_order``): columns are processed by decreasing ``diag H``.
  Groups stay defined in the original ``K`` order (group ``g`` covers original columns
  ``[g * group, (g + 1) * group)``), so the result is an ordinary group-wise layout that
  every lowering accepts, with no index table. A group's scale and zero point are computed
  when its *first* column is reached in processing order, from the group's then-current
  weights (which already carry the compensation from every column processed before);
  with ``static_groups`` they are computed once from the original weights instead. Without
  act-order both rules coincide with the original algorithm's (parameters at each group's
  start).
* **Lazy block updates**: columns are processed in blocks of ``block``; inside a block the
  updates are applied immediately, to the rest of the matrix once per block.
* **Cholesky failure**: the damping is multiplied by 10 and the factorisation retried (up to
  ``retries`` times); if it still fails, or the result is not finite, the layer falls back to
  round-to-nearest with a warning.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from graphopt.quant.groupwise import (
    GroupQuantized,
    code_max,
    group_params,
    num_groups,
    quantize_rtn,
    resolve_group_size,
)

logger = logging.getLogger(__name__)

Float64Array = np.ndarray[Any, np.dtype[np.float64]]


@dataclass(frozen=True)
class GPTQInfo:
    """How one layer's GPTQ went.

    Attributes:
        damp: The relative damping finally used.
        fallback: Round-to-nearest was used because the Hessian could not be factorised.
        dead_inputs: Input channels with a zero Hessian diagonal.
        reason: Why the fallback happened (empty when it did not).
    """

    damp: float
    fallback: bool
    dead_inputs: int
    reason: str = ""


def layer_error(w: np.ndarray, w_hat: np.ndarray, h: np.ndarray) -> float:
    """``tr((Ŵ - W) H (Ŵ - W)ᵀ)``: the mean squared output error of the layer (per row of X)."""
    delta = np.asarray(w_hat, dtype=np.float32) - np.asarray(w, dtype=np.float32)
    prod = delta @ np.asarray(h, dtype=np.float32)  # float32 products: fast, ample for a ratio
    return float(np.einsum("nk,nk->", prod, delta, dtype=np.float64))


def inverse_cholesky_upper(h: np.ndarray) -> Float64Array:
    """Upper-triangular ``U`` with ``Uᵀ U = H⁻¹`` for a symmetric positive definite ``H``.

    One Cholesky factorisation of ``H`` with its index order reversed gives an upper
    ``R`` with ``H = R Rᵀ``; then ``H⁻¹ = R⁻ᵀ R⁻¹``, so ``U = R⁻¹`` (upper triangular, and
    by uniqueness of the Cholesky factor the one GPTQ needs). This costs one factorisation
    and one triangular inverse instead of factorising both ``H`` and ``H⁻¹``.

    Raises:
        numpy.linalg.LinAlgError: ``H`` is not (numerically) positive definite.
    """
    h = np.asarray(h, dtype=np.float64)
    with _single_threaded_lapack():
        lower_rev = np.linalg.cholesky(h[::-1, ::-1])
        r = np.ascontiguousarray(lower_rev[::-1, ::-1])  # upper, H = R Rᵀ
        u = _upper_triangular_inverse(r)
    if not np.all(np.isfinite(u)):
        raise np.linalg.LinAlgError("non-finite inverse Cholesky factor")
    return u


def _single_threaded_lapack() -> contextlib.AbstractContextManager[Any]:
    """One BLAS thread for the factorisations, when threadpoolctl is installed.

    OpenBLAS's threaded Cholesky at these sizes (K <= a few thousand) synchronises so often
    that on a busy 2-core machine it ran 10-100x slower than one thread (384: 0.18 s vs
    1 ms); large GEMMs elsewhere keep every thread.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - optional
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _upper_triangular_inverse(r: np.ndarray) -> Float64Array:
    """``R⁻¹`` of an upper-triangular ``R`` (LAPACK ``trtri`` when SciPy is installed)."""
    try:
        from scipy.linalg import lapack
    except ImportError:  # pragma: no cover - numpy's general inverse is exact enough
        return np.triu(np.linalg.inv(r))
    inv, info = lapack.dtrtri(r, lower=0)
    if info != 0:
        raise np.linalg.LinAlgError(f"triangular inverse failed (info={info})")
    return np.triu(inv)


def gptq_quantize(
    w: np.ndarray,
    h: np.ndarray,
    bits: int = 4,
    group_size: int = 128,
    symmetric: bool = True,
    *,
    act_order: bool = True,
    damp: float = 0.01,
    block: int = 128,
    static_groups: bool = True,
    clip_search: bool = False,
    signed_scale: bool = True,
    retries: int = 4,
    name: str = "",
) -> GroupQuantized:
    """GPTQ-quantizes ``w[N, K]`` against input Hessian ``h[K, K]``; see the module docstring.

    Args:
        w: ``float32[N, K]`` (output-major).
        h: ``float64[K, K]`` input Hessian (any positive scale; only its shape matters).
        bits: 2, 3, 4 or 8.
        group_size: Group length along ``K``; ``-1``/``0`` or ``>= K`` is per-channel.
        symmetric: Implicit middle zero point.
        act_order: Process columns by decreasing Hessian diagonal.
        damp: Relative damping (fraction of the mean diagonal), at least 0.
        block: Columns per lazy update block.
        static_groups: Group parameters from the original weights instead of at each
            group's first processed column.
        clip_search: MSE clipping search when choosing each group's parameters.
        signed_scale: Symmetric scales may be negative (the extreme's side gets the extra
            code; see :func:`~graphopt.quant.groupwise.group_params`); false for targets
            that need positive scales.
        retries: Damping increases (×10 each) before falling back to round-to-nearest.
        name: Layer name for log messages.

    Returns:
        The codes and per-group parameters in the standard (original ``K`` order) layout.
    """
    q, _ = gptq_quantize_with_info(
        w, h, bits, group_size, symmetric, act_order=act_order, damp=damp, block=block,
        static_groups=static_groups, clip_search=clip_search, signed_scale=signed_scale,
        retries=retries, name=name,
    )
    return q


def gptq_quantize_with_info(
    w: np.ndarray,
    h: np.ndarray,
    bits: int = 4,
    group_size: int = 128,
    symmetric: bool = True,
    *,
    act_order: bool = True,
    damp: float = 0.01,
    block: int = 128,
    static_groups: bool = True,
    clip_search: bool = False,
    signed_scale: bool = True,
    retries: int = 4,
    name: str = "",
) -> tuple[GroupQuantized, GPTQInfo]:
    """:func:`gptq_quantize`, also returning a :class:`GPTQInfo`."""
    w = np.asarray(w, dtype=np.float32)
    h = np.asarray(h, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"w must be 2-D [N, K], got shape {w.shape}")
    k = w.shape[1]
    if h.shape != (k, k):
        raise ValueError(f"h must be [K, K] = [{k}, {k}] for w{list(w.shape)}, got {list(h.shape)}")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"{name or 'w'}: weight has non-finite values")
    if damp < 0 or block < 1 or retries < 0:
        raise ValueError("damp must be >= 0, block >= 1, retries >= 0")
    gs = resolve_group_size(k, group_size)
    label = name or f"w{list(w.shape)}"

    h = (h + h.T) * 0.5
    diag = np.diag(h).copy()
    dead = ~(diag > 0) | ~np.isfinite(diag)
    h = np.where(np.isfinite(h), h, 0.0)
    if np.any(dead):
        h[dead, :] = 0.0
        h[:, dead] = 0.0
        h[dead, dead] = 1.0
    diag = np.diag(h).copy()
    mean_diag = float(np.mean(diag))

    perm = np.argsort(-diag, kind="stable") if act_order else np.arange(k)
    h_perm = h[np.ix_(perm, perm)]

    reason = ""
    current = damp
    for _attempt in range(retries + 1):
        damped = h_perm + np.eye(k) * (current * mean_diag)
        try:
            u = inverse_cholesky_upper(damped)
        except np.linalg.LinAlgError as e:
            reason = str(e) or "not positive definite"
            current = max(current * 10.0, 1e-6)
            continue
        result = _gptq_core(
            w, u, perm, bits, gs, symmetric, block, static_groups, clip_search, signed_scale
        )
        if result is not None:
            return result, GPTQInfo(current, False, int(dead.sum()))
        reason = "non-finite values during the update"
        current = max(current * 10.0, 1e-6)
    logger.warning(
        "gptq: %s: Hessian could not be factorised (%s) even with damping %.3g; "
        "using round-to-nearest for this layer",
        label, reason, current / 10.0,
    )
    q = quantize_rtn(w, bits, gs, symmetric, clip_search=clip_search, signed_scale=signed_scale)
    return q, GPTQInfo(current / 10.0, True, int(dead.sum()), reason)


def _gptq_core(
    w: np.ndarray,
    u: Float64Array,
    perm: np.ndarray,
    bits: int,
    gs: int,
    symmetric: bool,
    block: int,
    static_groups: bool,
    clip_search: bool,
    signed_scale: bool,
) -> GroupQuantized | None:
    """The column loop in processing (permuted) order; None when values went non-finite."""
    n, k = w.shape
    g_count = num_groups(k, gs)
    qmax = float(code_max(bits))
    mid = float(1 << (bits - 1))
    inv_perm = np.empty_like(perm)
    inv_perm[perm] = np.arange(k)
    group_of = perm // gs  # group of the column at each processing position
    # Processing positions of each group's columns.
    group_positions = [inv_perm[g * gs : min((g + 1) * gs, k)] for g in range(g_count)]

    scales = np.zeros((n, g_count), dtype=np.float32)
    zeros = np.full((n, g_count), mid, dtype=np.float32)
    have = np.zeros(g_count, dtype=bool)
    if static_groups:
        for g in range(g_count):
            _set_group(w[:, g * gs : (g + 1) * gs], g, scales, zeros, bits, symmetric, clip_search, signed_scale)
        have[:] = True

    # float32 work arrays (half the memory traffic of float64; u is computed in float64).
    work = np.ascontiguousarray(w[:, perm], dtype=np.float32)
    u = u.astype(np.float32)
    codes = np.empty((n, k), dtype=np.uint8)  # processing order
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        w1 = work[:, b0:b1]  # view: updated in place
        err = np.zeros((n, b1 - b0), dtype=np.float32)
        u_blk = u[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            g = int(group_of[col])
            if not have[g]:
                cur = _current_group_values(work, w1, err, u, group_positions[g], b0, b1, i)
                _set_group(cur, g, scales, zeros, bits, symmetric, clip_search, signed_scale)
                have[g] = True
            wcol = w1[:, i]
            sc = scales[:, g]
            zp = zeros[:, g]
            q = np.clip(np.round(wcol / sc) + zp, 0.0, qmax)
            codes[:, col] = q.astype(np.uint8)
            e = (wcol - (q - zp) * sc) / u_blk[i, i]
            err[:, i] = e
            if i + 1 < b1 - b0:
                w1[:, i + 1 :] -= np.outer(e, u_blk[i, i + 1 :])
        if not np.all(np.isfinite(err)):
            return None
        if b1 < k:
            work[:, b1:] -= err @ u[b0:b1, b1:]
    if not np.all(np.isfinite(scales)):
        return None
    out_codes = np.empty_like(codes)
    out_codes[:, perm] = codes
    zps = None if symmetric else zeros.astype(np.uint8)
    return GroupQuantized(np.ascontiguousarray(out_codes), scales, zps, bits, gs)


def _current_group_values(
    work: np.ndarray,
    w1: np.ndarray,
    err: np.ndarray,
    u: np.ndarray,
    positions: np.ndarray,
    b0: int,
    b1: int,
    i: int,
) -> np.ndarray:
    """Current (compensated) values of a group's columns at processing position ``b0 + i``.

    Columns inside the block are current in ``w1``; columns after the block have not yet
    received this block's first ``i`` errors (lazy update), which are applied here.
    """
    cur = np.empty((work.shape[0], positions.size), dtype=work.dtype)
    inside = (positions >= b0) & (positions < b1)
    after = positions >= b1
    if np.any(inside):
        cur[:, inside] = w1[:, positions[inside] - b0]
    if np.any(after):
        p = positions[after]
        vals = work[:, p]
        if i > 0:
            vals = vals - err[:, :i] @ u[b0 : b0 + i, p]
        cur[:, after] = vals
    # No column of the group lies before b0 + i: the group is reached first here.
    return cur


def _set_group(
    values: np.ndarray,
    g: int,
    scales: np.ndarray,
    zeros: np.ndarray,
    bits: int,
    symmetric: bool,
    clip_search: bool,
    signed_scale: bool,
) -> None:
    s, z = group_params(
        np.asarray(values, dtype=np.float32), bits, symmetric, clip_search, signed_scale=signed_scale
    )
    scales[:, g] = s
    if z is not None:
        zeros[:, g] = z.astype(np.float32)
