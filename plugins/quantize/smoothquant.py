"""SmoothQuant-style activation-to-weight scale migration for int8-static (Xiao et al., 2023).

Transformer activations have a few input channels far larger than the rest; one per-tensor
activation scale then wastes most of the int8 grid on them. SmoothQuant divides each input
channel ``j`` by ``s_j = max|x_j|^alpha / max|W_j|^(1-alpha)`` and multiplies the weight's row ``j``
by it (:mod:`.scaling`: a ``Mul`` on the activation edge; the float function is unchanged), moving
the difficulty into the per-channel weights. ``alpha`` is chosen per group of layers reading the
same activation by *measured error*: on a sample of calibration rows, the output of the group
with its activation quantized per tensor (uint8, min/max) and its weights per channel (int8) is
compared with the float output for ``alpha`` in ``{0, step, ..., max}``, walked down from ``max``
while the error falls; ``alpha = 0`` (no migration) is a candidate, so groups without outlier
channels are left alone.

The ``Mul`` by ``1/s`` is then folded into what computes the activation where that is exact
(:func:`.folding.fold_scale`: an attention output projection's scales go into the value projection's
output columns, a LayerNorm read by nothing else takes them in gamma and beta), so no Mul runs there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from modelpress.plugin_api import Dataset, Model, PassContext
from modelpress.plugins.quantize.affine import UINT8, QRange, fake_quantize, fake_quantize_weight
from modelpress.plugins.quantize.folding import fold_scale
from modelpress.plugins.quantize.gptq_int8 import feedback, one_blas_thread
from modelpress.plugins.quantize.scaling import ScaleGroup, apply_scales, sample_rows, scale_groups
from modelpress.plugins.quantize.static_plan import gptq_grid, gptq_layer

if TYPE_CHECKING:
    from modelpress.plugins.quantize.static import Int8StaticOptions

__all__ = ["smooth"]

# NOTE: a group with fewer weights than this is left alone: its Mul and the extra Q/DQ cost more bytes
# and time than the few weights gain (a 16x16 layer's scales and nodes are a tenth of its size).
MIN_ELEMENTS = 4096


def _fake_act(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``x`` fake-quantized per tensor to uint8 over ``[lo, hi]`` (widened to contain 0)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = np.float32((hi - lo) / 255 if hi > lo else 1.0)
    return fake_quantize(x, scale, np.round(-lo / scale), UINT8)


def _group_error(
    x: np.ndarray,
    w: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    s: np.ndarray,
    expected: np.ndarray,
) -> float:
    xq = _fake_act(x / s, float((lo / s).min()), float((hi / s).max()))
    diff = xq @ fake_quantize_weight(w * s[:, None])
    diff -= expected
    return float(np.einsum("ij,ij->", diff, diff, dtype=np.float64)) / max(diff.size, 1)


def _scales(alpha: float, act_max: np.ndarray, w_max: np.ndarray, live: np.ndarray) -> np.ndarray:
    s = (np.maximum(act_max, 1e-5) ** alpha / np.maximum(w_max, 1e-5) ** (1 - alpha)).astype(
        np.float32
    )
    # NOTE: a channel silent in calibration (a border pixel) keeps a typical scale: a tiny s would blow
    # up the values it does see later; all scales stay within 1e3 of the median.
    typical = float(np.median(s[live])) if live.any() else 1.0
    return np.clip(np.where(live, s, typical), typical / 1e3, typical * 1e3).astype(np.float32)


def _best_alpha(
    x: np.ndarray, w: np.ndarray, lo: np.ndarray, hi: np.ndarray, alphas: np.ndarray
) -> tuple[float, float, float, np.ndarray | None]:
    """(error without migration, best error, its alpha, its scales or None). The grid is walked down
    from the strongest ``alpha`` while the error keeps falling (it is unimodal in alpha in practice: the
    activation's error falls and the weights' rises with it), so a group usually costs 3 error
    evaluations, not one per grid point."""
    expected = x @ w
    act_max = np.maximum(np.abs(lo), np.abs(hi))
    w_max = np.abs(w).max(axis=1)
    live = act_max > 1e-6 * max(float(act_max.max()), 1e-30)
    base = _group_error(x, w, lo, hi, np.ones(len(w), np.float32), expected)
    best: tuple[float, float, np.ndarray | None] = (base, 0.0, None)
    for alpha in sorted(alphas, reverse=True):
        s = _scales(float(alpha), act_max, w_max, live)
        err = _group_error(x, w, lo, hi, s, expected)
        if err >= best[0] and best[2] is not None:
            break
        if err < best[0]:
            best = (err, float(alpha), s)
    return base, best[0], best[1], best[2]


def _gptq_group(
    group: ScaleGroup, rows: np.ndarray, grid: QRange | None, per_channel: bool, codes: dict
) -> None:
    """GPTQ codes for the group's layers (one ``H`` from the rows they read, as smoothed) into ``codes``."""
    if grid is None:
        return
    fb = feedback(rows)
    for layer in group.layers if fb is not None else []:
        found = gptq_layer(layer, fb, grid, per_channel)
        if found is not None:
            codes[layer.name] = found


def _fold(
    model: Model, group: ScaleGroup, codes: dict[str, np.ndarray] | None, per_channel: bool
) -> int:
    """Fold the group's new ``Mul`` into its input's producer where exact (1: folded). GPTQ codes
    stay valid when a weight's output columns are rescaled only with per-channel scales: a weight
    with codes is left alone otherwise."""
    x = group.layers[0].node.inputs[0]
    mul = x.producer() if x is not None else None
    if mul is None or mul.op_type != "Mul":
        return 0
    frozen = frozenset() if per_channel else frozenset(_coded_weights(model, codes or {}))
    return int(fold_scale(model, mul, frozen))


def _coded_weights(model: Model, codes: dict[str, np.ndarray]) -> set[str]:
    return {
        layer.weight.name or ""
        for layer in model.weighted_layers(frozenset({"MatMul", "Gemm"}))
        if layer.name in codes
    }


def _groups(model: Model, op_types: set[str], exclude: set[str]) -> list[ScaleGroup]:
    """The MatMul/Gemm groups of ``model`` SmoothQuant considers: of ``op_types``, not in ``exclude``,
    with at least :data:`MIN_ELEMENTS` weights."""
    layers = [
        layer
        for layer in model.weighted_layers(frozenset(op_types) & {"MatMul", "Gemm"})
        if layer.name not in exclude
    ]
    return [
        g
        for g in scale_groups(layers)
        if sum(int(np.prod(layer.weight.shape or ())) for layer in g.layers) >= MIN_ELEMENTS
    ]


def smooth(
    model: Model,
    data: Dataset,
    opts: Int8StaticOptions,
    ctx: PassContext,
    codes: dict[str, np.ndarray] | None = None,
) -> Model:
    """A clone of ``model`` with SmoothQuant scales migrated into the weights of each MatMul/Gemm
    group (of ``opts.op_types`` less ``opts.exclude_op_types``, less the ``opts.exclude`` layers) where
    that lowers the measured int8 output error; ``alpha`` is searched on ``opts.smoothquant_steps``
    points of ``(0, opts.smoothquant_max_alpha]``. With ``codes`` (and ``opts.weight_rounding`` gptq),
    each group's int8 weight codes rounded by GPTQ against the rows sampled here are put in it, by layer
    name. Figures: ``smoothquant_alpha`` (per smoothed group, by its layers' names), ``smoothquant_error_ratio`` (mean
    error after / before over those groups) and ``smoothquant_folded`` (Muls folded away)."""
    op_types, exclude, batch_size = (
        set(opts.op_types) - set(opts.exclude_op_types),
        set(opts.exclude),
        opts.batch_size,
    )
    max_alpha, steps = opts.smoothquant_max_alpha, opts.smoothquant_steps
    grid = gptq_grid(opts) if codes is not None and opts.weight_rounding == "gptq" else None
    if not _groups(model, op_types, exclude):
        return model  # NOTE: not cloned to find nothing (a Conv-only model)
    result = model.clone()
    groups = _groups(result, op_types, exclude)
    lo, hi, samples = sample_rows(model, [g.input for g in groups], data, batch_size)
    chosen: dict[str, float] = {}
    ratios: list[float] = []
    folded = 0
    # NOTE: one BLAS thread: many mid-sized products and factorisations, where waking threads costs more
    with one_blas_thread(), ctx.progress("SmoothQuant scale search", total=len(groups)) as advance:
        for group in groups:
            x = samples.pop(group.input, None)
            if x is not None and len(x):
                base, error, alpha, scales = _best_alpha(
                    x,
                    group.matrix(),
                    lo[group.input],
                    hi[group.input],
                    np.linspace(0, max_alpha, steps + 1)[1:],
                )
                if scales is not None and error < 0.95 * base:
                    apply_scales(result, group, scales, "smooth")
                    folded += _fold(result, group, codes, opts.per_channel)
                    chosen[", ".join(layer.name for layer in group.layers)] = round(alpha, 3)
                    ratios.append(error / max(base, 1e-30))
                    x = x / scales
                _gptq_group(group, x, grid, opts.per_channel, codes if codes is not None else {})
            advance(1)
    ctx.figures["smoothquant_alpha"] = chosen
    if chosen:
        ctx.figures["smoothquant_folded"] = folded
    if ratios:
        ctx.figures["smoothquant_error_ratio"] = round(float(np.mean(ratios)), 4)
    return result if chosen else model
