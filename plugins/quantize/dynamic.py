"""``int8-dynamic``: int8 weights, activations quantized at run time (MatMul/Gemm-heavy models).

Each MatMul/Gemm with a constant 2-D weight becomes ONNX Runtime's dynamic-quantization pattern
``DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul(x_scale * w_scale) [-> Add bias]``, which
ORT fuses into its ``DynamicQuantizeMatMul`` kernel. Weights are int8 symmetric, per output
column by default. On x86 CPUs without VNNI, whose u8 x s8 kernels add two products into a saturating
int16 (:mod:`.cpu`), the weights keep 8-bit scales where they can: each output column's scale is
widened just as far as needed so that no pair of its codes can saturate on any input (the run-time
codes reach 255), never past 7-bit's (ORT's ``reduce_range``, which every weight would otherwise
pay). Setting ``reduce_range`` takes the choice: True, 7-bit; False, plain 8-bit.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx_ir as ir
from pydantic import Field

from modelpress.plugin_api import (
    Model,
    Options,
    OptionsError,
    Out,
    PassContext,
    WeightedLayer,
    recurrent_refusals,
)
from modelpress.plugins.quantize.affine import QRange, symmetric_params
from modelpress.plugins.quantize.cpu import REDUCE_RANGE_HELP, resolve_reduce_range
from modelpress.plugins.quantize.embeddings import quantize_tables
from modelpress.plugins.quantize.emit import replace_matmul
from modelpress.plugins.quantize.static_plan import any_input_scales
from modelpress.plugins.quantize.streaming import read_weight

__all__ = ["Int8DynamicOptions", "int8_dynamic"]


class Int8DynamicOptions(Options):
    per_channel: bool = Field(
        True, description="one weight scale per output column (False: per tensor)"
    )
    op_types: list[str] = Field(
        default_factory=lambda: ["MatMul", "Gemm", "Conv", "Gather"],
        description="op types to quantize (Conv weights and Gather embedding tables: int8 weight-only, DQ in front)",
    )
    exclude: list[str] = Field(default_factory=list, description="node names to keep in float")
    min_elements: int = Field(256, ge=1, description="skip weights smaller than this")
    reduce_range: bool | None = Field(
        None,
        description="MatMul/Gemm weights "
        + REDUCE_RANGE_HELP
        + "; where None chooses 7 bits, the weights keep 8-bit scales instead, each output column's widened "
        "only as far as its codes need so that no pair can saturate on any input",
    )


def int8_dynamic(model: Model, opts: Int8DynamicOptions, ctx: PassContext) -> None:
    reduce, why = resolve_reduce_range(opts.reduce_range)
    # NOTE: pair-safe 8-bit scales where the CPU decided (an explicit reduce_range is the user's)
    paired = reduce and opts.reduce_range is None
    grid = QRange(7 if reduce and not paired else 8, True, restricted=True)
    skipped: dict[str, str] = {}
    # NOTE: a weight shared by several layers (same tensor, same orientation) is quantized and stored once.
    users: dict[tuple[int, int], list[WeightedLayer]] = {}
    for layer in model.weighted_layers(
        frozenset(opts.op_types) & {"MatMul", "Gemm"}, subgraphs=True
    ):
        reason = _skip_reason(layer, opts)
        if reason:
            skipped[layer.name] = reason
        else:
            users.setdefault((id(layer.weight), layer.out_axis), []).append(layer)
    widened = _quantize_groups(model, users, opts, grid, paired, ctx)
    done = sum(len(group) for group in users.values())
    tables = quantize_tables(
        model,
        bits=8,
        op_types=set(opts.op_types),
        min_elements=opts.min_elements,
        exclude=set(opts.exclude),
    )
    if not done and not tables.done:
        skipped.update(recurrent_refusals(model.graph, "int8-dynamic"))
        raise OptionsError(
            f"int8-dynamic: no MatMul/Gemm/Conv/Gather with a constant float weight to quantize in {model.name!r} ({skipped or 'none found'})"
        )
    ctx.figures.update(
        {
            "quantized_nodes": done,
            "float_nodes": skipped,
            "tables_quantized": len(tables.done),
            "reduce_range": why
            + (
                f"; but 8-bit scales for {len(users)} MatMul/Gemm weight(s), {widened} output channel(s) "
                "widened so that u8 x s8 int16 sums cannot saturate on any input"
                if paired and users
                else ""
            ),
        }
    )


def _quantize_groups(
    model: Model,
    users: dict[tuple[int, int], list[WeightedLayer]],
    opts: Int8DynamicOptions,
    grid: QRange,
    paired: bool,
    ctx: PassContext,
) -> int:
    """Each weight of ``users`` (its layers) quantized once and every layer reading it replaced;
    returns how many output channels :func:`_int8_weight` widened."""
    widened = 0
    # NOTE: as in weight-only: a few threads quantize weights side by side (numpy releases the GIL),
    # each reading one weight from its file and dropping the float copy; results are emitted in order.
    workers = max(1, min(8, os.cpu_count() or 1))
    with (
        ctx.progress("int8-dynamic", total=len(users)) as advance,
        ThreadPoolExecutor(workers) as pool,
    ):
        for group, quantized in zip(
            users.values(),
            pool.map(lambda g: _int8_weight(g[0], opts, grid, paired), users.values()),
            strict=True,
        ):
            base = group[0].weight.name or group[0].name
            wq, scale, zero, wider = quantized
            widened += wider
            values = (
                model.add_initializer(f"{base}_quantized", wq),
                model.add_initializer(f"{base}_zero_point", zero),
                model.add_initializer(f"{base}_scale", scale),
            )
            del quantized, wq
            for layer in group:
                _replace_layer(model, layer, values)
            advance(1)
    return widened


def _skip_reason(layer: WeightedLayer, opts: Int8DynamicOptions) -> str | None:
    w = layer.weight.const_value
    assert w is not None
    if layer.name in opts.exclude:
        return "excluded by option"
    if len(w.shape) != 2 or w.dtype != ir.DataType.FLOAT:
        return f"weight is {w.dtype.name}{list(w.shape)}, not a float32 matrix"
    if w.size < opts.min_elements:
        return f"weight has fewer than {opts.min_elements} elements"
    if layer.node.op_type == "Gemm":
        attrs = {k: a.value for k, a in layer.node.attributes.items()}
        if (
            attrs.get("transA", 0)
            or attrs.get("alpha", 1.0) != 1.0
            or attrs.get("beta", 1.0) != 1.0
        ):
            return "Gemm with transA/alpha/beta is left in float"
    return None


def _int8_weight(
    layer: WeightedLayer, opts: Int8DynamicOptions, grid: QRange, paired: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """int8 weight ``[K, N]`` (symmetric), scale and zero point of one layer, in float32 a few rows at
    a time: one float copy of the weight (read from its file when external) is all it holds; with
    ``paired``, the scales widened so that no pair of codes can saturate (and how many were)."""
    w = read_weight(layer)  # stored layout: [K, N], or [N, K] for a Gemm with transB
    rows_are_channels = layer.out_axis == 0
    if opts.per_channel:
        axis = 1 if rows_are_channels else 0
        scale, zero = symmetric_params(np.maximum(w.max(axis=axis), -w.min(axis=axis)), grid)
    else:
        scale, zero = symmetric_params(max(float(w.max()), -float(w.min()), 0.0), grid)
    wider = 0
    if paired:
        scale, widened = any_input_scales(layer, w, scale)
        wider = int(np.count_nonzero(widened))
    divisor = scale.reshape(-1, 1) if opts.per_channel and rows_are_channels else scale
    q = np.empty(w.shape, np.int8)
    step = max(1, (1 << 20) // max(w.shape[1], 1))
    for r0 in range(0, w.shape[0], step):
        rows = slice(r0, r0 + step)
        x = w[rows] / (divisor[rows] if divisor.ndim == 2 else divisor)
        np.rint(x, out=x)  # NOTE: half to even, as ONNX Runtime rounds
        np.clip(x, grid.qmin, grid.qmax, out=x)
        q[rows] = x
    del w
    return (np.ascontiguousarray(q.T) if rows_are_channels else q), scale, zero, wider


def _replace_layer(
    model: Model, layer: WeightedLayer, weight: tuple[ir.Value, ir.Value, ir.Value]
) -> None:
    """Swap one MatMul/Gemm for ORT's dynamic-quantization pattern on the int8 ``weight`` (values)."""
    wq_v, wz_v, ws_v = weight
    node = layer.node
    x = node.inputs[0]
    assert x is not None
    name = layer.name
    b = model.builder()
    xq, xs, xz = b.op_multi_out(
        "DynamicQuantizeLinear",
        [x],
        name=f"{name}_DynamicQuantizeLinear",
        outs=[
            Out(f"{x.name}_{name}_quantized", ir.DataType.UINT8),
            Out(f"{x.name}_{name}_scale", ir.DataType.FLOAT),
            Out(f"{x.name}_{name}_zero_point", ir.DataType.UINT8),
        ],
    )
    mm = b.op(
        "MatMulInteger",
        [xq, wq_v, xz, wz_v],
        name=f"{name}_MatMulInteger",
        out=Out(f"{name}_MatMulInteger_output", ir.DataType.INT32),
    )
    cast = b.op(
        "Cast",
        [mm],
        {"to": ir.DataType.FLOAT},
        name=f"{name}_Cast",
        out=Out(f"{name}_Cast_output", ir.DataType.FLOAT),
    )
    combined = b.op(
        "Mul",
        [xs, ws_v],
        name=f"{name}_scale_Mul",
        out=Out(f"{name}_scale_Mul_output", ir.DataType.FLOAT),
    )
    mul = b.op(
        "Mul",
        [cast, combined],
        name=f"{name}_Mul",
        out=Out(f"{name}_Mul_output", ir.DataType.FLOAT),
    )
    replace_matmul(model, node, list(b.nodes), mul, name, weighted=mm.producer())
