"""Error-compensating rounding of int8 MatMul/Gemm weights for ``int8-static`` (GPTQ, Frantar et al., 2023).

Rounding each weight to the nearest step of its channel's grid ignores the inputs it meets. GPTQ rounds
the rows of ``W[K, N]`` (input channels) in order and moves each row's rounding error onto the rows not
yet rounded, through the inverse of ``H = X^T X`` of the layer's calibration inputs, so that ``X @ W``
rather than ``W`` itself stays close. The scales are unchanged (per output channel, from ``max |W|``):
only which integer each weight gets. On MiniLM's layers, after SmoothQuant has moved the activations'
outlier channels into the weights, the weight part of the output error falls by 30-60 % and the int8
output error by 10-30 %.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager

import numpy as np

from modelpress.plugins.quantize.affine import QRange

__all__ = ["DAMP", "feedback", "feedback_gram", "gptq_codes", "one_blas_thread"]

DAMP = 0.01  # NOTE: the dampening GPTQ uses: 1 % of the mean diagonal of H added to it
_BLOCK = 128  # rows whose errors are pushed on together (the lazy batch update of the paper)


def one_blas_thread() -> AbstractContextManager[object]:
    """BLAS limited to one thread where ``threadpoolctl`` is installed (else unchanged): GPTQ's many small
    factorisations and products spent most of their time waking BLAS threads (MiniLM: 8 s of wall time in
    24 Cholesky factorisations on a loaded 2-core machine, 1 s on one thread)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _cholesky_in_place(a: np.ndarray) -> None:
    """``a``'s lower triangle (with its diagonal) becomes its lower Cholesky factor, by blocks of
    :data:`_BLOCK` rows (small factorisations and matrix products; the strict upper triangle is left as
    it was). LAPACK's factorisation of a whole 1152-wide ``H`` raised the process's peak RSS by 21 MB
    (OpenBLAS's work buffers and copies); this holds no second matrix."""
    n = len(a)
    for b0 in range(0, n, _BLOCK):
        b1 = min(n, b0 + _BLOCK)
        done = a[b0:b1, :b0]
        a[b0:b1, b0:b1] = np.linalg.cholesky(a[b0:b1, b0:b1] - done @ done.T)
        if b1 < n:
            rest = a[b1:, b0:b1] - a[b1:, :b0] @ done.T
            a[b1:, b0:b1] = rest @ np.linalg.inv(a[b0:b1, b0:b1]).T


def feedback(rows: np.ndarray) -> np.ndarray | None:
    """GPTQ's error feedback for inputs ``rows`` ``[M, K]``, float32 ``[K, K]`` of which only the strict upper
    triangle is meaningful (and read): ``F[j, i]`` is how much of row ``j``'s rounding error row ``i > j``
    takes on; None when ``H`` (``X^T X``, dampened) is not positive definite.

    GPTQ walks the Cholesky factor ``U`` of ``H^-1``; the same rounding follows from ``H = R R^T`` with
    ``R`` upper triangular (the LDL form, Chee et al. 2023): ``w~_i = w_i + sum_{j<i} R[j, i] / R[i, i]
    (w_j - q_j)``. With ``J`` the reversal, ``R = J L J`` for ``L`` the lower Cholesky factor of
    ``J H J``: one factorisation, no inverse (an inverse and a second factorisation cost 6 of MiniLM's
    8 GPTQ seconds), and no second ``K x K`` matrix."""
    x = np.ascontiguousarray(np.asarray(rows, np.float32)[:, ::-1])
    h = x.T @ x  # NOTE: J H J, the inputs in reversed order
    del x
    return _factor(h)


def feedback_gram(gram: np.ndarray) -> np.ndarray | None:
    """:func:`feedback` from ``H = X^T X`` (``[K, K]``, summed over batches of rows) rather than the rows."""
    return _factor(np.ascontiguousarray(np.asarray(gram, np.float32)[::-1, ::-1]))


def _factor(h: np.ndarray) -> np.ndarray | None:
    """The feedback of :func:`feedback` from ``J H J`` (overwritten)."""
    diag = np.diag(h).copy()
    diag[diag <= 0] = 1.0
    diag += DAMP * float(np.mean(diag))
    h[np.diag_indices(len(h))] = diag
    try:
        _cholesky_in_place(h)
    except np.linalg.LinAlgError:
        return None
    lower_diag = np.diag(h).copy()
    if not (np.all(np.isfinite(h)) and np.all(lower_diag > 0)):
        return None
    h /= lower_diag[
        None, :
    ]  # NOTE: L[p, q] / L[q, q] is R[j, i] / R[i, i] with p, q the reversed j, i
    return h[::-1, ::-1]


def gptq_codes(w_kn: np.ndarray, fb: np.ndarray, scale: np.ndarray, grid: QRange) -> np.ndarray:
    """Integer codes (``grid.dtype``, ``[K, N]``) for ``w_kn`` on a symmetric grid of ``scale`` (one per
    output channel ``N``, or one), each row rounded after the errors of the rows before it are fed
    back through ``fb`` (:func:`feedback` of its inputs), blocks of rows at a time.

    Within a block, a row's feedback from the block's earlier rows is summed in float32 in their order,
    one product at a time (as NumPy's own loop sums ``fb[b0:i, i] @ diff[b0:i]`` for the reversed view
    :func:`feedback` returns, which BLAS cannot take): each row's error is pushed onto the rows after
    it as soon as it is known, a whole block of rows per NumPy call (not one call per row and row
    before it), into buffers made once."""
    k, n = w_kn.shape
    step = np.broadcast_to(np.asarray(scale, np.float32).reshape(1, -1), (1, n))[0]
    w = np.asarray(w_kn, np.float32)
    diff = np.empty((k, n), np.float32)  # w_j - q_j, the rounding error of each row done
    codes = np.empty((k, n), grid.dtype)
    row, q = np.empty(n, np.float32), np.empty(n, np.float32)
    # NOTE: acc[r]: the feedback row r of the block has had from the block's rows before it so far
    acc, pushed = (
        np.empty((min(k, _BLOCK), n), np.float32),
        np.empty((min(k, _BLOCK), n), np.float32),
    )
    for b0 in range(0, k, _BLOCK):
        b1 = min(k, b0 + _BLOCK)
        target = w[b0:b1] + fb[:b0, b0:b1].T @ diff[:b0] if b0 else w[b0:b1].copy()
        acc[: b1 - b0] = 0
        for i in range(b0, b1):
            r = i - b0
            if r:
                np.add(target[r], acc[r], out=row)
            else:
                row[...] = target[0]
            np.divide(row, step, out=q)
            np.round(q, out=q)
            np.clip(q, grid.qmin, grid.qmax, out=q)
            codes[i] = q
            np.multiply(q, step, out=row)
            np.subtract(w[i], row, out=diff[i])
            if i + 1 < b1:
                later = pushed[: b1 - i - 1]
                np.multiply(fb[i, i + 1 : b1, None], diff[i][None, :], out=later)
                np.add(acc[r + 1 : b1 - b0], later, out=acc[r + 1 : b1 - b0])
    return codes
