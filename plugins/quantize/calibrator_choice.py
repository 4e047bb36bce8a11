"""``calibrator="auto"`` for int8-static: each activation's range chosen by the error it causes.

One calibrator rarely suits every tensor: ``percentile`` keeps a GELU output's long tail, ``entropy``
clips it hard, ``minmax`` wastes the grid on one outlier. For every activation that feeds weighted
MatMul/Gemm layers, each calibrator's range (``minmax``, ``percentile``, ``entropy``, ``mse``,
from the histograms calibration already collected) is tried on a sample of calibration rows, and
the one with the smallest error *of the layers' outputs* (activation quantized with that range,
weights int8 per channel) wins. Other tensors (Conv inputs, attention MatMul operands,
element-wise inputs, outputs) keep ``percentile``. Figures: ``calibrators_chosen`` (how many tensors took each).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from modelpress.plugin_api import Dataset, Model, PassContext, WeightedLayer
from modelpress.plugins.quantize.affine import QRange, fake_quantize, fake_quantize_weight
from modelpress.plugins.quantize.calibrate import CALIBRATORS, TensorStats
from modelpress.plugins.quantize.scaling import sample_rows

__all__ = ["Ranges", "choose_calibrators"]

Params = tuple[np.ndarray, np.ndarray]


def _as_kn(layer: WeightedLayer) -> np.ndarray | None:
    """The layer's weight as ``[K, N]`` for a row-wise product with its input's last axis, or None
    for a Conv (its input channels are not the last axis: its input keeps ``percentile``)."""
    if layer.op_type == "Conv":
        return None
    w = layer.weight_array().astype(np.float32)
    if w.ndim != 2:
        return None
    return w.T if layer.out_axis == 0 else w


@dataclass(frozen=True)
class Ranges:
    """The ranges to choose from: each tensor's calibration statistics, ``params(stats, calibrator)``
    (the scale and zero point a calibrator gives) and the activations' integer grid."""

    stats: dict[str, TensorStats]
    params: Callable[[TensorStats, str], Params]
    grid: QRange


def choose_calibrators(
    model: Model,
    layers: list[WeightedLayer],
    data: Dataset,
    act: dict[str, Params],
    ranges: Ranges,
    ctx: PassContext,
    *,
    batch_size: int,
) -> dict[str, Params]:
    """``act`` with the inputs of ``layers`` re-ranged by the calibrator of smallest output error
    (on a sample of ``data``'s rows, read ``batch_size`` samples at a time)."""
    stats, params, grid = ranges.stats, ranges.params, ranges.grid
    groups: dict[str, list[np.ndarray]] = {}
    for layer in layers:
        x = layer.node.inputs[0]
        w = _as_kn(layer)
        if (
            x is not None
            and x.name
            and x.name in stats
            and w is not None
            and stats[x.name].hist.any()
        ):
            groups.setdefault(x.name, []).append(w)
    if not groups:
        return act
    _, _, samples = sample_rows(model, list(groups), data, batch_size)
    chosen: dict[str, str] = {}
    result = dict(act)
    with ctx.progress("choosing calibrators", total=len(groups)) as advance:
        for name, weights in groups.items():
            x = samples.get(name)
            if x is None or not len(x) or x.shape[1] != weights[0].shape[0]:
                advance(1)
                continue
            w = np.concatenate(weights, axis=1)
            expected = x @ w
            wq = fake_quantize_weight(w)
            best: tuple[float, str, Params] | None = None
            for calibrator in CALIBRATORS:
                candidate = params(stats[name], calibrator)
                err = float(
                    np.mean(
                        (fake_quantize(x, *candidate, grid) @ wq - expected).astype(np.float64) ** 2
                    )
                )
                if best is None or err < best[0]:
                    best = (err, calibrator, candidate)
            assert best is not None
            result[name] = best[2]
            chosen[name] = best[1]
            advance(1)
    ctx.figures["calibrators_chosen"] = dict(Counter(chosen.values()))
    return result
