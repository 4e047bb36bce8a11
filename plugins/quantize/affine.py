"""Uniform (affine) quantization arithmetic shared by the quantize methods.

For ``b`` bits and a real range ``[min, max]`` (widened to contain 0, so that 0 is exact):

* unsigned, asymmetric: ``scale = (max - min) / (2^b - 1)``,
  ``zero_point = clamp(round(-min / scale), 0, 2^b - 1)``;
* signed, symmetric (weights): ``scale = max(|min|, |max|) / (2^(b-1) - 1)``, ``zero_point = 0``,
  integers in ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (the restricted range: -128 is never used, so
  the grid is symmetric around 0 as integer kernels expect);
* ``q = clamp(round(x / scale) + zero_point)`` (round half to even, like ONNX Runtime) and
  ``dequantize(q) = (q - zero_point) * scale``; for values inside the range the round-trip error
  is at most ``scale / 2``.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "INT8_WEIGHTS",
    "UINT8",
    "QRange",
    "affine_params",
    "dequantize",
    "fake_quantize",
    "fake_quantize_weight",
    "quantize",
    "symmetric_params",
]


class QRange:
    """An integer grid: ``bits`` and signedness give ``qmin``/``qmax`` and the numpy dtype."""

    def __init__(self, bits: int, signed: bool, *, restricted: bool = False):
        self.bits, self.signed = bits, signed
        if signed:
            self.qmax = 2 ** (bits - 1) - 1
            self.qmin = -self.qmax if restricted else -(2 ** (bits - 1))
        else:
            self.qmin, self.qmax = 0, 2**bits - 1
        self.dtype = np.dtype(np.int8 if signed else np.uint8) if bits <= 8 else np.dtype(np.int32)


INT8_WEIGHTS = QRange(8, True, restricted=True)  # symmetric int8 weights: [-127, 127]
UINT8 = QRange(8, False)


def affine_params(
    rmin: np.ndarray | float, rmax: np.ndarray | float, grid: QRange
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point mapping ``[rmin, rmax]`` (widened to include 0) onto ``grid``."""
    rmin = np.minimum(np.asarray(rmin, np.float64), 0.0)
    rmax = np.maximum(np.asarray(rmax, np.float64), 0.0)
    scale = (rmax - rmin) / (grid.qmax - grid.qmin)
    scale = np.where(scale > 0, scale, 1.0)
    zero = np.clip(np.round(grid.qmin - rmin / scale), grid.qmin, grid.qmax)
    return scale.astype(np.float32), zero.astype(grid.dtype)


def symmetric_params(absmax: np.ndarray | float, grid: QRange) -> tuple[np.ndarray, np.ndarray]:
    """Scale (zero point 0) for a symmetric signed grid covering ``[-absmax, absmax]``."""
    absmax = np.asarray(absmax, np.float64)
    scale = np.where(absmax > 0, absmax / grid.qmax, 1.0)
    return scale.astype(np.float32), np.zeros(scale.shape, grid.dtype)


def quantize(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, grid: QRange) -> np.ndarray:
    q = np.round(x.astype(np.float64) / scale) + zero.astype(np.float64)
    return np.clip(q, grid.qmin, grid.qmax).astype(grid.dtype)


def dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    return ((q.astype(np.float64) - zero.astype(np.float64)) * scale).astype(np.float32)


def fake_quantize(
    x: np.ndarray, scale: np.ndarray | float, zero: np.ndarray | float, grid: QRange
) -> np.ndarray:
    """``dequantize(quantize(x))`` without the integers: ``clip(round(x / scale), qmin - zero, qmax - zero) * scale``
    (equal, as ``zero`` is whole), in float32 on one buffer: the error searches (SmoothQuant's
    alpha, ``calibrator="auto"``) run it on ~1024 x K rows several times per tensor. ``scale`` and
    ``zero`` broadcast against ``x``."""
    scale = np.asarray(scale, np.float32)
    zero = np.asarray(zero, np.float32)
    q = np.divide(x, scale, dtype=np.float32)
    np.round(q, out=q)
    np.clip(q, grid.qmin - zero, grid.qmax - zero, out=q)
    q *= scale
    return q


def fake_quantize_weight(w: np.ndarray) -> np.ndarray:
    """``w[K, N]`` fake-quantized per output channel (its columns), symmetric int8 as the methods store weights."""
    scale, _ = symmetric_params(np.abs(w).max(axis=0), INT8_WEIGHTS)
    return fake_quantize(w, scale, 0.0, INT8_WEIGHTS)


def per_axis(param: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """Reshape a per-channel vector to broadcast along ``axis`` of an ``ndim`` tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return param.reshape(shape)
