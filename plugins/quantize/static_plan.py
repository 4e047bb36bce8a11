"""``int8-static``'s plan: which tensors get which activation scale, and each node's int8 weight, int32
bias and int8 constants (:class:`~.qdq.Plan`), from the calibration statistics."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from modelpress.plugin_api import WeightedLayer
from modelpress.plugins.quantize.affine import (
    QRange,
    affine_params,
    dequantize,
    per_axis,
    quantize,
    symmetric_params,
)
from modelpress.plugins.quantize.calibrate import TensorStats, choose_range
from modelpress.plugins.quantize.cpu import resolve_reduce_range
from modelpress.plugins.quantize.gptq_int8 import gptq_codes
from modelpress.plugins.quantize.qdq import Plan

if TYPE_CHECKING:
    from modelpress.plugins.quantize.static import Int8StaticOptions

__all__ = [
    "act_params",
    "any_input_pairs",
    "any_input_scales",
    "constant_plan",
    "depthwise",
    "fused_output",
    "gemm_fused",
    "gptq_grid",
    "gptq_layer",
    "pair_ceiling",
    "pairs_kept",
    "unsaturated",
    "weight_grid",
    "weight_plan",
    "weight_scale",
]

_FUSABLE_ACTIVATIONS = {"Relu", "Clip"}


def fused_output(node: ir.Node) -> ir.Value:
    """The tensor to quantize after ``node``: its output, or that of a sole Relu/Clip consumer."""
    out = node.outputs[0]
    users = list(out.uses())
    if len(users) == 1 and not out.is_graph_output():
        user = users[0][0]
        if user.op_type in _FUSABLE_ACTIVATIONS and user.domain in ("", "ai.onnx"):
            return user.outputs[0]
    return out


def gemm_fused(node: ir.Node) -> bool:
    """Whether ONNX Runtime would fuse MatMul ``node`` and the Add of a constant after it (a Linear's bias, as
    exporters write it) into a *float* Gemm: its MatMulAddFusion runs before the QDQ fusions and takes a first
    input of rank 2, or of a static shape (reshaped), so the QDQ MatMul never becomes MatMulIntegerToFloat and
    its int8 weights are dequantized on every run (MTCNN's ONet: 2.1x fp32's latency; with the MatMul's output
    quantized, QLinearMatMul, 0.86x). Not where the Add's result is a model output: outputs stay float."""
    users = list(node.outputs[0].uses())
    x = node.inputs[0] if node.inputs else None
    if node.op_type != "MatMul" or len(users) != 1 or users[0][0].op_type != "Add" or x is None:
        return False
    add, index = users[0]
    other = add.inputs[1 - index] if len(add.inputs) == 2 else None
    if (
        other is None
        or other.const_value is None
        or len(other.const_value.shape) > 2
        or add.outputs[0].is_graph_output()
        or x.shape is None
    ):
        return False
    return len(x.shape) == 2 or all(isinstance(d, int) for d in x.shape)


def act_params(
    stats: TensorStats, opts: Int8StaticOptions, grid: QRange
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of one activation tensor, by the calibrator and symmetry options."""
    rmin, rmax = choose_range(
        stats,
        opts.calibrator,
        percentile=opts.percentile,
        signed=grid.signed,
        symmetric=opts.symmetric_activations,
    )
    if opts.symmetric_activations:
        bound = max(abs(rmin), abs(rmax))
        if grid.signed:
            return symmetric_params(bound, grid)
        scale = np.float32(max(bound, 1e-12) * 2 / (grid.qmax - grid.qmin))
        return np.asarray(scale, np.float32), np.asarray(128, grid.dtype)
    scale, zero = affine_params(rmin, rmax, grid)
    return np.asarray(scale, np.float32), np.asarray(zero, grid.dtype)


# ORT's u8 x s8 kernels without VNNI (vpmaddubsw) add the products of two neighbouring inputs along K
# (k = 2i, 2i+1) into an int16 that saturates at this.
_INT16_MAX = 32767
# An input's calibrated excursion above its zero point is widened by this before it bounds a pair:
# data not calibrated on may go a little further.
_PAIR_MARGIN = 1.25


def pairs_kept(opts: Int8StaticOptions, saturates: bool) -> bool:
    """Whether MatMul/Gemm and (ungrouped) Conv weights keep 8-bit scales on a CPU whose u8 x s8
    kernels saturate (``saturates``: ``reduce_range`` resolved from the CPU, not set by option;
    activations uint8): an output channel's scale is widened only as far as its codes need so that no
    pair of them can saturate (:func:`weight_plan`), instead of every weight losing a bit
    (all-MiniLM-L6-v2 on an AVX2 EPYC: mean sentence cosine 0.9983 against 0.9971 with 7-bit weights
    and 0.9958 with plain 8-bit ones, which saturate)."""
    return saturates and opts.reduce_range is None and opts.activation_type == "uint8"


def gptq_grid(opts: Int8StaticOptions) -> QRange:
    """The grid GPTQ rounds weights on: 8-bit where :func:`pairs_kept`."""
    reduce = resolve_reduce_range(opts.reduce_range)[0]
    return weight_grid(reduce and not pairs_kept(opts, reduce))


def any_input_pairs(layer: WeightedLayer) -> bool:
    """Whether ``layer``'s pairs are kept from saturating on *any* input (codes up to 255) rather than
    on its calibrated ones: an ungrouped Conv, whose scales GPTQ must round on before the
    activations' ranges are known (:func:`weight_scale`)."""
    return layer.op_type == "Conv" and layer.group == 1


def depthwise(layer: WeightedLayer) -> bool:
    """Whether ``layer`` is a depthwise Conv (one input and one output channel per group), whose
    products ORT's u8 x s8 depthwise kernel sums in int32, with no int16 pairs to saturate: on an
    AVX2 EPYC a QLinearConv of such a Conv is exact with codes of 127 on inputs of 255, where the
    same Conv with two output channels per group (ORT's grouped path) overflows by 55 output codes.
    Its weights keep full 8 bits wherever :func:`pairs_kept`."""
    w = layer.weight.shape
    return (
        layer.op_type == "Conv"
        and layer.group > 1
        and w is not None
        and len(w) >= 2
        and w[1] == 1
        and w[0] == layer.group
    )


def _k_rows(layer: WeightedLayer, w: np.ndarray) -> np.ndarray:
    """``w`` as the ``[K, M]`` matrix ORT's u8 x s8 kernels run: a MatMul/Gemm weight with K first; a
    Conv's ``[M, C, kh, kw]`` with K in (kh, kw, c) order (checked on QLinearConv: its pairs are
    neighbouring input channels at one kernel position)."""
    if layer.op_type == "Conv":
        return np.moveaxis(w, (0, 1), (-1, -2)).reshape(-1, w.shape[0])
    return np.moveaxis(w, 1 - layer.out_axis, 0)


def _from_k_rows(layer: WeightedLayer, rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of :func:`_k_rows` for a weight of ``shape``."""
    if layer.op_type == "Conv":
        return np.moveaxis(rows.reshape(*shape[2:], shape[1], shape[0]), (-1, -2), (0, 1))
    return np.moveaxis(rows, 0, 1 - layer.out_axis)


def pair_ceiling(
    layer: WeightedLayer, stats: TensorStats | None, act: tuple[np.ndarray, np.ndarray]
) -> np.ndarray | None:
    """The largest uint8 code each row of :func:`_k_rows` meets: 255 for :func:`any_input_pairs`;
    for a 2-D MatMul/Gemm, its input channel's excursion above the zero point on the calibration
    data widened by ``_PAIR_MARGIN`` (at most 255), from the per-channel maxima of the input. None
    where they are not known, and for other layers."""
    w = layer.node.inputs[1] if len(layer.node.inputs) > 1 else None
    if w is None or w.shape is None or not all(isinstance(d, int) for d in w.shape):
        return None
    shape = tuple(int(d) for d in w.shape)
    if any_input_pairs(layer):
        return np.full(int(np.prod(shape)) // shape[0], 255.0)
    if layer.op_type not in ("MatMul", "Gemm") or len(shape) != 2:
        return None
    top = stats.channel_max if stats is not None else None
    if top is None or top.shape != (shape[1 - layer.out_axis],):
        return None
    scale, zero = float(act[0]), float(act[1])
    above = np.maximum(top.astype(np.float64), 0.0) * _PAIR_MARGIN / max(scale, 1e-30)
    return np.minimum(np.ceil(zero + above), 255.0)


def _pair_loads(rows: np.ndarray, ceiling: np.ndarray) -> np.ndarray:
    """``[K // 2, M]``: the largest int16 sum each pair of neighbouring rows can reach on inputs up to
    ``ceiling`` (0 for pairs of opposite signs: their sum stays under one product)."""
    even = rows.shape[0] // 2 * 2
    a, b = rows[0:even:2].astype(np.float64), rows[1:even:2].astype(np.float64)
    load = ceiling[0:even:2, None] * np.abs(a) + ceiling[1:even:2, None] * np.abs(b)
    return np.where(a * b > 0, load, 0.0)


def _unsaturating_scales(
    rows: np.ndarray, ceiling: np.ndarray, scale: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``scale`` (per output channel, or one) widened just enough that no same-signed pair of the
    codes of ``rows`` (:func:`_k_rows` of the float weight) can pass the int16 range on inputs up to
    ``ceiling`` (a code may round half a step up: that is kept free), and which were widened. At
    most the 7-bit scale: ``255 * 63 * 2`` fits."""
    even = rows.shape[0] // 2 * 2
    slack = 0.5 * (ceiling[0:even:2] + ceiling[1:even:2])[:, None]
    need = (_pair_loads(rows, ceiling) / (_INT16_MAX - slack)).max(axis=0, initial=0.0)
    need = need if scale.ndim else np.asarray(need.max(initial=0.0))
    wider = need > scale.astype(np.float64)
    return np.maximum(scale.astype(np.float64), need).astype(np.float32), wider


def any_input_scales(
    layer: WeightedLayer, w: np.ndarray, scale: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_unsaturating_scales` of a weight ``w`` (its stored layout) on *any* uint8 input (codes
    up to 255: int8-dynamic's activations, quantized at run time over their whole range, and an
    :func:`any_input_pairs` Conv's), and which channels were widened; codes rounded to nearest on
    the result cannot saturate.

    With one ceiling for every row it is ``255 * max |w[2i] + w[2i+1]| / (32767 - 255)`` per output
    channel: for a same-signed pair ``|a + b|`` is the pair's load, and an opposite-signed pair's
    ``|a + b|`` (at most ``max |w|``) asks less than the 8-bit scale already gives. Rows are taken a
    block at a time, so a large weight is not copied whole."""
    rows = _k_rows(layer, w)
    even = rows.shape[0] // 2 * 2
    widest = np.zeros(rows.shape[1], np.float32)
    step = max(2, (1 << 21) // max(rows.shape[1], 1) // 2 * 2)
    for r0 in range(0, even, step):
        block = rows[r0 : min(r0 + step, even)]
        np.maximum(widest, np.abs(block[0::2] + block[1::2]).max(axis=0), out=widest)
    need = widest.astype(np.float64) * 255.0 / (_INT16_MAX - 255.0)
    need = need if scale.ndim else np.asarray(need.max(initial=0.0))
    wider = need > scale.astype(np.float64)
    return np.maximum(scale.astype(np.float64), need).astype(np.float32), wider


def unsaturated(
    layer: WeightedLayer, codes: np.ndarray, ceiling: np.ndarray
) -> tuple[np.ndarray, int]:
    """``codes`` (int8) with each pair of same-signed neighbours along K (``k = 2i, 2i+1`` of
    :func:`_k_rows`) whose products with inputs up to ``ceiling`` could pass the int16 range shrunk
    in proportion until they cannot, and how many pairs were."""
    rows = _k_rows(layer, codes).astype(np.int32)
    load = _pair_loads(rows, ceiling)
    over = load > _INT16_MAX
    if not over.any():
        return codes, 0
    even = rows.shape[0] // 2 * 2
    shrink = _INT16_MAX / load[over]
    for half in (rows[0:even:2], rows[1:even:2]):
        half[over] = np.sign(half[over]) * np.floor(np.abs(half[over]) * shrink)
    return _from_k_rows(layer, rows, codes.shape).astype(codes.dtype), int(over.sum())


def weight_plan(
    layer: WeightedLayer,
    stats: dict[str, TensorStats],
    act: tuple[np.ndarray, np.ndarray],
    opts: Int8StaticOptions,
    act_out: str | None,
    *,
    reduce_range: bool = False,
    codes: np.ndarray | None = None,
) -> Plan:
    """A weighted node's plan: int8 symmetric weight (per output channel by default; 7-bit, [-63, 63],
    with ``reduce_range``; the GPTQ ``codes`` of :func:`gptq_layer` when given; where
    :func:`pairs_kept` and the input's ceilings are known, :func:`pair_ceiling`, 8-bit with each
    channel's scale widened as far as :func:`_unsaturating_scales` says and any pair still over
    shrunk, :func:`unsaturated`), ``act`` being the input's (scale, zero point),
    int32 bias at ``input scale x weight scale`` (optionally corrected for the mean error the weights
    cause)."""
    w = layer.weight_array().astype(np.float32)
    act_in = layer.node.inputs[0].name or ""
    paired = pairs_kept(opts, reduce_range)
    ceiling = pair_ceiling(layer, stats.get(act_in), act) if paired else None
    whole = paired and depthwise(layer)  # NOTE: nothing to saturate: full 8 bits
    if paired and ceiling is None and not whole:
        codes = None  # NOTE: GPTQ rounded it on 8 bits (gptq_grid); it goes on 7
    grid = weight_grid(reduce_range and ceiling is None and not whole)
    scale, zero = weight_scale(layer, w, grid, opts.per_channel)
    wider = None
    if ceiling is not None and any_input_pairs(layer):
        # NOTE: the scales conv_codes' GPTQ rounded on (weight_scale with pairs), to the bit
        scale, wider = any_input_scales(layer, w, scale)
    elif ceiling is not None:
        scale, wider = _unsaturating_scales(_k_rows(layer, w), ceiling, scale)
    s_b, z_b = scale, zero
    if opts.per_channel:
        s_b = per_axis(scale, w.ndim, layer.out_axis)
        z_b = per_axis(zero, w.ndim, layer.out_axis)
    # NOTE: GPTQ rounded a MatMul/Gemm on the 8-bit scales (its rows were sampled before the
    # calibrated ceilings were known); a Conv's codes are on the scales of any input (weight_scale)
    stale = wider if wider is not None and not any_input_pairs(layer) else None
    wq = _rounded(layer, w, (s_b, z_b, grid), codes, stale)
    saturation = (0, 0) if whole else None
    if ceiling is not None:
        wq, shrunk = unsaturated(layer, wq, ceiling)
        saturation = (int(wider.sum()) if wider is not None else 0, shrunk)
    bias = layer.bias_array()
    bias_q = bias_scale = bias_fix = None
    mean = (
        stats[act_in].channel_mean
        if opts.bias_correction and stats.get(act_in) is not None
        else None
    )
    if bias is not None:
        bias = bias.astype(np.float32)
        if (
            mean is not None
            and (shift := _mean_error(layer, dequantize(wq, s_b, z_b) - w, mean)) is not None
        ):
            bias = bias - shift
        bias_scale = (act[0].astype(np.float64) * scale.astype(np.float64)).astype(np.float32)
        bias_q = np.clip(np.round(bias / bias_scale), -(2**31), 2**31 - 1).astype(np.int32)
    elif mean is not None and (following := _following_bias(layer)) is not None:
        shift = _mean_error(layer, dequantize(wq, s_b, z_b) - w, mean)
        if shift is not None and shift.shape == following[1].shape:
            bias_fix = (following[0], (following[1] - shift).astype(np.float32))
    return Plan(
        layer,
        [act_in],
        act_out,
        weight_q=wq,
        weight_scale=scale,
        weight_zero=zero,
        bias_q=bias_q,
        bias_scale=bias_scale,
        bias_fix=bias_fix,
        saturation=saturation,
    )


def _rounded(
    layer: WeightedLayer,
    w: np.ndarray,
    on: tuple[np.ndarray, np.ndarray, QRange],
    codes: np.ndarray | None,
    stale: np.ndarray | None,
) -> np.ndarray:
    """``w``'s int8 codes on ``on`` (scale and zero point, broadcast to ``w``, and grid): GPTQ's
    ``codes`` where given, but rounded to nearest where not and on the output channels ``stale``
    marks (their scale widened since GPTQ rounded them; one flag for a per-tensor scale)."""
    if codes is None or codes.shape != w.shape:
        return quantize(w, *on)
    if stale is None or not stale.any():
        return codes
    at = per_axis(stale, w.ndim, layer.out_axis) if stale.ndim else stale
    return np.where(at, quantize(w, *on), codes)


def weight_grid(reduce_range: bool) -> QRange:
    """The symmetric int8 weight grid ([-127, 127]; [-63, 63] with ``reduce_range``)."""
    return QRange(7 if reduce_range else 8, True, restricted=True)


def weight_scale(
    layer: WeightedLayer, w: np.ndarray, grid: QRange, per_channel: bool, *, pairs: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of a weight: one per output channel (or one), from ``max |w|``; with
    ``pairs``, for :func:`any_input_pairs`, widened so that no pair of codes can saturate on any
    input (as :func:`weight_plan` widens them)."""
    if per_channel:
        axes = tuple(a for a in range(w.ndim) if a != layer.out_axis)
        scale, zero = symmetric_params(np.abs(w).max(axis=axes), grid)
    else:
        scale, zero = symmetric_params(float(np.abs(w).max()), grid)
    if pairs and any_input_pairs(layer):
        scale = any_input_scales(layer, w, scale)[0]
    return scale, zero


def gptq_layer(
    layer: WeightedLayer, fb: np.ndarray, grid: QRange, per_channel: bool
) -> np.ndarray | None:
    """GPTQ codes (:mod:`.gptq_int8`) of a 2-D MatMul/Gemm weight, in the weight's own layout, on the
    scales :func:`weight_plan` gives it; None for other layers."""
    w = layer.weight_array().astype(np.float32)
    if w.ndim != 2 or layer.op_type not in ("MatMul", "Gemm"):
        return None
    w_kn = w if layer.out_axis == 1 else w.T
    if fb.shape != (w_kn.shape[0], w_kn.shape[0]):
        return None
    scale, _ = weight_scale(layer, w, grid, per_channel)
    codes = gptq_codes(w_kn, fb, scale, grid)
    return codes if layer.out_axis == 1 else np.ascontiguousarray(codes.T)


def _mean_error(layer: WeightedLayer, error: np.ndarray, mean: np.ndarray) -> np.ndarray | None:
    """The expected output error per output channel that the weight ``error`` causes: the sum over
    inputs (and kernel) of error x input mean; None if the mean does not match the weight's inputs."""
    moved = np.moveaxis(error, (layer.out_axis, layer.in_axis), (0, 1))
    per_in = moved.reshape(moved.shape[0], moved.shape[1], -1).sum(axis=2)
    return (per_in @ mean).astype(np.float32) if per_in.shape[1] == mean.shape[0] else None


def _following_bias(layer: WeightedLayer) -> tuple[str, np.ndarray] | None:
    """A MatMul's bias as exporters write a Linear: the constant ``[N]`` of the sole Add reading its
    output (used by that Add alone), as (initializer name, values)."""
    users = list(layer.node.outputs[0].uses())
    if layer.op_type != "MatMul" or len(users) != 1 or users[0][0].op_type != "Add":
        return None
    add = users[0][0]
    other = add.inputs[1 - users[0][1]] if len(add.inputs) == 2 else None
    if (
        other is None
        or other.const_value is None
        or not other.is_initializer()
        or not other.name
        or len(list(other.uses())) != 1
    ):
        return None
    values = other.const_value.numpy()
    return (
        (other.name, values.astype(np.float32))
        if values.ndim == 1 and values.dtype == np.float32
        else None
    )


def constant_plan(node: ir.Node, grid: QRange, act_out: str | None) -> Plan:
    """An element-wise node's plan: its activation inputs, and each constant input int8 (min/max)."""
    constants = {}
    for index, value in enumerate(node.inputs):
        if value is not None and value.const_value is not None:
            array = value.const_value.numpy().astype(np.float32)
            scale, zero = affine_params(float(array.min()), float(array.max()), grid)
            constants[index] = (
                quantize(array, scale, zero, grid),
                np.asarray(scale, np.float32),
                np.asarray(zero, grid.dtype),
            )
    act_ins = [v.name or "" for v in node.inputs if v is not None and v.const_value is None]
    return Plan(None, act_ins, act_out, constants=constants)
