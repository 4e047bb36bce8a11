"""``int8-dynamic``: int8 weights, activations quantized at run time (MatMul/Gemm-heavy models).

Each MatMul/Gemm with a constant 2-D weight becomes ONNX Runtime's dynamic-quantization pattern
``DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul(x_scale * w_scale) [-> Add bias]``, which
ORT fuses into its ``DynamicQuantizeMatMul`` kernel. Weights are int8 symmetric, per output
column by default.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from pydantic import Field

from modelpress.errors import OptionsError
from modelpress.layers import WeightedLayer, recurrent_refusals
from modelpress.methods import Options, PassContext
from modelpress.model import Model
from modelpress.plugins.quantize.affine import QRange, quantize, symmetric_params
from modelpress.plugins.quantize.embeddings import quantize_tables
from modelpress.plugins.quantize.emit import replace_matmul

__all__ = ["Int8DynamicOptions", "int8_dynamic"]


class Int8DynamicOptions(Options):
    per_channel: bool = Field(True, description="one weight scale per output column (False: per tensor)")
    op_types: list[str] = Field(default_factory=lambda: ["MatMul", "Gemm", "Conv", "Gather"], description="op types to quantize (Conv weights and Gather embedding tables: int8 weight-only, DQ in front)")
    exclude: list[str] = Field(default_factory=list, description="node names to keep in float")
    min_elements: int = Field(256, ge=1, description="skip weights smaller than this")


def int8_dynamic(model: Model, opts: Int8DynamicOptions, ctx: PassContext) -> None:
    grid = QRange(8, True, restricted=True)
    done = 0
    skipped: dict[str, str] = {}
    layers = model.weighted_layers(frozenset(opts.op_types) & {"MatMul", "Gemm"}, subgraphs=True)
    quantized: dict[tuple[int, int], tuple[ir.Value, ir.Value, ir.Value]] = {}
    with ctx.progress("int8-dynamic", total=len(layers)) as advance:
        for layer in layers:
            done += _quantize_layer(model, layer, opts, grid, quantized, skipped)
            advance(1)
    tables = quantize_tables(model, bits=8, op_types=set(opts.op_types), min_elements=opts.min_elements, exclude=set(opts.exclude))
    if not done and not tables.done:
        skipped.update(recurrent_refusals(model.graph, "int8-dynamic"))
        raise OptionsError(f"int8-dynamic: no MatMul/Gemm/Conv/Gather with a constant float weight to quantize in {model.name!r} ({skipped or 'none found'})")
    ctx.figures.update({"quantized_nodes": done, "float_nodes": skipped, "tables_quantized": len(tables.done)})


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
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            return "Gemm with transA/alpha/beta is left in float"
    return None


def _quantize_weight(model: Model, layer: WeightedLayer, opts: Int8DynamicOptions, grid: QRange) -> tuple[ir.Value, ir.Value, ir.Value]:
    w = layer.weight_array()  # NOTE: a copy; the memory map is closed, nothing stays cached
    matrix = w.T if layer.out_axis == 0 else w  # [K, N]
    if opts.per_channel:
        scale, zero = symmetric_params(np.abs(matrix).max(axis=0), grid)
    else:
        scale, zero = symmetric_params(float(np.abs(matrix).max()), grid)
    wq = quantize(matrix, scale, zero, grid)
    base = layer.weight.name or layer.name
    return (model.add_initializer(f"{base}_quantized", wq), model.add_initializer(f"{base}_zero_point", zero),
            model.add_initializer(f"{base}_scale", scale))


def _quantize_layer(model: Model, layer: WeightedLayer, opts: Int8DynamicOptions, grid: QRange,
                    quantized: dict[tuple[int, int], tuple[ir.Value, ir.Value, ir.Value]], skipped: dict[str, str]) -> int:
    """Replace one layer (returns 1) or record why not (0); a weight shared by several layers is
    quantized and stored once."""
    reason = _skip_reason(layer, opts)
    if reason:
        skipped[layer.name] = reason
        return 0
    key = (id(layer.weight), layer.out_axis)
    if key not in quantized:
        quantized[key] = _quantize_weight(model, layer, opts, grid)
    wq_v, wz_v, ws_v = quantized[key]
    node = layer.node
    x = node.inputs[0]
    assert x is not None
    name = layer.name
    dq = model.new_node("DynamicQuantizeLinear", [x], name=f"{name}_DynamicQuantizeLinear", outputs=[
        (f"{x.name}_{name}_quantized", ir.DataType.UINT8), (f"{x.name}_{name}_scale", ir.DataType.FLOAT),
        (f"{x.name}_{name}_zero_point", ir.DataType.UINT8)])
    xq, xs, xz = dq.outputs
    mm = model.new_node("MatMulInteger", [xq, wq_v, xz, wz_v], name=f"{name}_MatMulInteger", outputs=[(f"{name}_MatMulInteger_output", ir.DataType.INT32)])
    cast = model.new_node("Cast", [mm.outputs[0]], {"to": ir.DataType.FLOAT}, name=f"{name}_Cast", outputs=[(f"{name}_Cast_output", ir.DataType.FLOAT)])
    combined = model.new_node("Mul", [xs, ws_v], name=f"{name}_scale_Mul", outputs=[(f"{name}_scale_Mul_output", ir.DataType.FLOAT)])
    mul = model.new_node("Mul", [cast.outputs[0], combined.outputs[0]], name=f"{name}_Mul", outputs=[(f"{name}_Mul_output", ir.DataType.FLOAT)])
    replace_matmul(model, node, [dq, mm, cast, combined, mul], mul.outputs[0], name)
    return 1
