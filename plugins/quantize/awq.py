"""AWQ-style activation-aware scaling for low-bit weight-only quantization (Lin et al., 2023).

A few input channels of a layer carry much larger activations than the rest; their weight rows
matter most for the output, but round-to-nearest gives every row the same grid. AWQ multiplies
those rows by ``s_j = rms(x_j)^alpha`` before quantizing (so they get a finer grid relative to
their size) and divides the activation by ``s`` (a ``Mul`` on its edge, :mod:`.scaling`). ``alpha``
is searched per group of layers reading the same activation (Q/K/V share one ``s``) on a grid in
[0, 1], minimising the layer-output error ``tr(dW^T H dW)`` with ``H = 2 X^T X / n`` from the
calibration data (the same statistics GPTQ uses), where ``dW`` is the quantize-dequantize error of
the rescaled weight mapped back. ``alpha = 0`` (no scaling) is always a candidate, so a group is
only rescaled when it measurably lowers that error.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from modelpress.plugin_api import Model, PassContext
from modelpress.plugins.quantize.scaling import ScaleGroup, apply_scales

__all__ = ["awq_scale", "search_alpha"]


def search_alpha(
    w: np.ndarray, hessian: np.ndarray, fake_quantize: Callable[[np.ndarray], np.ndarray], grid: int
) -> tuple[float, np.ndarray, float, float]:
    """The ``alpha`` in ``linspace(0, 1, grid + 1)`` whose scales ``rms(x)^alpha`` minimise the
    output error of quantizing ``w[K, N]``; returns ``(alpha, s, error at alpha=0, error at alpha)``."""
    h = np.asarray(hessian, np.float64)
    rms = np.sqrt(np.maximum(np.diag(h) / 2.0, 0.0))
    rms = np.where(rms > 0, rms, max(float(rms.max()), 1e-8) if rms.max() > 0 else 1.0)
    w64 = w.astype(np.float64)

    def error(s: np.ndarray) -> float:
        d = fake_quantize((w * s[:, None]).astype(np.float32)).astype(np.float64) / s[:, None] - w64
        return float(np.einsum("kn,kn->", d, h @ d))

    ones = np.ones(len(rms))
    base = best_err = error(ones)
    best_alpha, best_s = 0.0, ones
    for alpha in np.linspace(0.0, 1.0, grid + 1)[1:]:
        s = rms**alpha
        s = s / np.sqrt(
            s.max() * s.min()
        )  # NOTE: centred in log space, so the weights' overall magnitude stays put
        err = error(s)
        if err < best_err:
            best_alpha, best_s, best_err = float(alpha), s, err
    return best_alpha, best_s, base, best_err


def awq_scale(
    model: Model,
    groups: list[ScaleGroup],
    hessians: dict[str, np.ndarray],
    fake_quantize: Callable[[np.ndarray], np.ndarray],
    grid: int,
    ctx: PassContext,
) -> dict[str, float]:
    """Search and apply AWQ scales to each group of ``model`` (edited in place); returns the chosen
    ``alpha`` per group input (groups left unscaled are absent). ``hessians`` gains the statistics
    of each rescaled input (``H / (s s^T)``, under the name of the ``Mul`` output the layers now
    read), so GPTQ can run on the rescaled weights (``algorithm="awq-gptq"``)."""
    chosen: dict[str, float] = {}
    gains: list[float] = []
    with ctx.progress("AWQ scale search", total=len(groups)) as advance:
        for group in groups:
            h = hessians.get(group.input)
            if h is not None:
                alpha, s, before, after = search_alpha(group.matrix(), h, fake_quantize, grid)
                if alpha > 0:
                    apply_scales(model, group, s, "awq")
                    scaled = group.layers[0].node.inputs[0]
                    if scaled is not None and scaled.name:
                        hessians[scaled.name] = h / np.outer(s, s)
                    chosen[group.input] = alpha
                    gains.append(after / max(before, 1e-30))
            advance(1)
    if gains:
        ctx.figures["awq_error_ratio"] = round(float(np.mean(gains)), 4)
    return chosen
