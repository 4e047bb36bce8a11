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
from modelpress.plugins.quantize.gptq_int8 import gptq_codes
from modelpress.plugins.quantize.qdq import Plan

if TYPE_CHECKING:
    from modelpress.plugins.quantize.static import Int8StaticOptions

__all__ = [
    "act_params",
    "constant_plan",
    "fused_output",
    "gemm_fused",
    "gptq_layer",
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


def weight_plan(
    layer: WeightedLayer,
    stats: dict[str, TensorStats],
    act_scale: np.ndarray,
    opts: Int8StaticOptions,
    act_out: str | None,
    *,
    reduce_range: bool = False,
    codes: np.ndarray | None = None,
) -> Plan:
    """A weighted node's plan: int8 symmetric weight (per output channel by default; 7-bit, [-63, 63],
    with ``reduce_range``; the GPTQ ``codes`` of :func:`gptq_layer` when given),
    int32 bias at ``input scale x weight scale`` (optionally corrected for the mean error the weights
    cause)."""
    w = layer.weight_array().astype(np.float32)
    grid = weight_grid(reduce_range)
    scale, zero = weight_scale(layer, w, grid, opts.per_channel)
    s_b, z_b = scale, zero
    if opts.per_channel:
        s_b = per_axis(scale, w.ndim, layer.out_axis)
        z_b = per_axis(zero, w.ndim, layer.out_axis)
    wq = codes if codes is not None and codes.shape == w.shape else quantize(w, s_b, z_b, grid)
    bias = layer.bias_array()
    bias_q = bias_scale = bias_fix = None
    act_in = layer.node.inputs[0].name or ""
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
        bias_scale = (act_scale.astype(np.float64) * scale.astype(np.float64)).astype(np.float32)
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
    )


def weight_grid(reduce_range: bool) -> QRange:
    """The symmetric int8 weight grid ([-127, 127]; [-63, 63] with ``reduce_range``)."""
    return QRange(7 if reduce_range else 8, True, restricted=True)


def weight_scale(
    layer: WeightedLayer, w: np.ndarray, grid: QRange, per_channel: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of a weight: one per output channel (or one), from ``max |w|``."""
    if per_channel:
        axes = tuple(a for a in range(w.ndim) if a != layer.out_axis)
        return symmetric_params(np.abs(w).max(axis=axes), grid)
    return symmetric_params(float(np.abs(w).max()), grid)


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
