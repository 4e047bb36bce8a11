"""Calibration: activation statistics from one ONNX Runtime session, and the range calibrators.

The statistics (min/max, per-channel means for bias correction and, for the histogram-based
calibrators, a 2048-bin histogram of ``|x|``) come from one streamed sweep over the calibration
data, with bounded memory: ``plugin_api.ActivationCollector`` (the same code behind
``plugin_api.activation_stats``, which other plugins use; :mod:`modelpress.runtime.activations`
documents the batching and the histogram). Calibrators then pick a clipping threshold ``T`` per
tensor; the range used is ``[max(min, -T), min(max, T)]``:

* ``minmax``: no clipping;
* ``percentile``: ``T`` is the given percentile of ``|x|`` (e.g. 99.99);
* ``entropy``: the ``T`` minimising the KL divergence between the histogram and its quantized
  version (TensorRT's algorithm, also ONNX Runtime's);
* ``mse``: the ``T`` minimising the expected squared quantization error (rounding inside the
  range, clipping outside), estimated from the histogram.
"""

from __future__ import annotations

import itertools

import numpy as np

from modelpress.plugin_api import (
    ActivationCollector,
    Dataset,
    Model,
    PassContext,
    TensorStats,
    calibration_batch,
)

__all__ = ["CALIBRATORS", "TensorStats", "calibration_batch", "choose_range", "collect_stats"]

CALIBRATORS = ("minmax", "percentile", "entropy", "mse")


def collect_stats(
    model: Model,
    names: list[str],
    data: Dataset,
    ctx: PassContext,
    *,
    histogram: bool,
    channel_axes: dict[str, int] | None = None,
    batch_size: int = 64,
) -> dict[str, TensorStats]:
    """Statistics of the named tensors over ``data``, from one ORT session.

    ``channel_axes`` names the axis whose per-channel means are kept (bias correction needs the
    mean of each input channel of a layer: axis 1 for Conv, the last axis for Gemm/MatMul).
    """
    collector = ActivationCollector(model, names)
    step = collector.batch(data, batch_size)
    ctx.figures["calibration_batch"] = step
    with ctx.progress("calibrating", total=data.batch_count(step)) as advance:
        return collector.collect(
            data, step, histogram=histogram, channel_axes=channel_axes, advance=advance
        )


def _entropy_threshold(hist: np.ndarray, absmax: float, levels: int) -> float:
    hist = hist.astype(np.float64)
    width = absmax / len(hist)
    best, best_kl = len(hist), np.inf
    for i in range(levels, len(hist) + 1, 16):
        reference = hist[:i].copy()
        reference[i - 1] += hist[i:].sum()
        nonzero = reference > 0
        # quantize the first i bins into `levels` bins, then expand back over the non-empty bins
        edges = np.linspace(0, i, levels + 1).astype(int)
        candidate = np.zeros(i)
        for a, b in itertools.pairwise(edges):
            chunk = hist[a:b]
            mask = nonzero[a:b]
            if mask.any():
                candidate[a:b][mask] = chunk.sum() / mask.sum()
        p = reference / reference.sum()
        q = candidate / max(candidate.sum(), 1e-12)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(nonzero & (q > 0), p * np.log(p / q), np.where(nonzero, np.inf, 0.0))
        kl = float(terms.sum())
        if kl < best_kl:
            best_kl, best = kl, i
    return (best + 0.5) * width


def _mse_threshold(stats: TensorStats, span: float, levels: int, symmetric: bool) -> float:
    """The clipping threshold ``T`` of least expected squared error: rounding (``step^2 / 12`` for each value
    inside) plus clipping (``(|x| - T)^2`` for each value outside), from the ``|x|`` histogram. The step is
    that of the range ``T`` gives: ``[max(min, -T), min(max, T)]`` (widened to hold 0) over ``levels``
    steps, or ``2T / levels`` when ``symmetric``."""
    hist = stats.hist.astype(np.float64)
    centers = (np.arange(len(hist)) + 0.5) * span / len(hist)
    # NOTE: every threshold at once: the values inside, and the clipping error of those above
    thresholds = np.linspace(span / 64, span, 128)
    above = centers[None, :] > thresholds[:, None]
    clip = np.where(above, hist * (centers[None, :] - thresholds[:, None]) ** 2, 0.0).sum(axis=1)
    inside = np.where(above, 0.0, hist).sum(axis=1)
    if symmetric:
        steps = 2 * thresholds / levels
    else:
        lo = np.minimum(np.maximum(stats.min, -thresholds), 0.0)
        hi = np.maximum(np.minimum(stats.max, thresholds), 0.0)
        steps = (hi - lo) / levels
    errors = inside * steps * steps / 12.0 + clip
    return float(thresholds[int(np.argmin(errors))])


def choose_range(
    stats: TensorStats,
    calibrator: str,
    *,
    percentile: float = 99.99,
    signed: bool = False,
    symmetric: bool = False,
) -> tuple[float, float]:
    """The ``[rmin, rmax]`` to quantize a tensor with, by ``calibrator``."""
    if calibrator == "minmax" or stats.absmax == 0 or not stats.hist.any():
        return stats.min, stats.max
    span = stats.hist_range or stats.absmax
    nonnegative = stats.min >= 0 and not signed
    if calibrator == "percentile":
        cdf = np.cumsum(stats.hist) / stats.hist.sum()
        idx = int(np.searchsorted(cdf, percentile / 100.0))
        threshold = (min(idx, len(cdf) - 1) + 1) * span / len(cdf)
    elif calibrator == "entropy":
        threshold = _entropy_threshold(stats.hist, span, 128 if not nonnegative else 255)
    elif calibrator == "mse":
        threshold = _mse_threshold(stats, span, 255, symmetric)
    else:
        raise ValueError(calibrator)
    return max(stats.min, -threshold), min(stats.max, threshold)
