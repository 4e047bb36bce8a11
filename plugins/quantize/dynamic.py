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
from modelpress.methods import Options, PassContext
from modelpress.model import Model
from modelpress.plugins.quantize.affine import QRange, quantize, symmetric_params
from modelpress.plugins.quantize.embeddings import quantize_tables

__all__ = ["Int8DynamicOptions", "int8_dynamic"]


class Int8DynamicOptions(Options):
    per_channel: bool = Field(True, description="one weight scale per output column (False: per tensor)")
    op_types: list[str] = Field(default_factory=lambda: ["MatMul", "Gemm", "Conv", "Gather"], description="op types to quantize (Conv weights and Gather embedding tables: int8 weight-only, DQ in front)")
    exclude: list[str] = Field(default_factory=list, description="node names to keep in float")
    min_elements: int = Field(256, ge=1, description="skip weights smaller than this")


def int8_dynamic(model: Model, opts: Int8DynamicOptions, ctx: PassContext) -> None:
    grid = QRange(8, True, restricted=True)
    done, skipped = 0, {}
    for layer in model.weighted_layers(frozenset(opts.op_types) & {"MatMul", "Gemm"}):
        node = layer.node
        w = layer.weight_array()
        reason = None
        if layer.name in opts.exclude:
            reason = "excluded by option"
        elif w.ndim != 2 or w.dtype != np.float32:
            reason = f"weight is {w.dtype}[{w.shape}], not a float32 matrix"
        elif w.size < opts.min_elements:
            reason = f"weight has fewer than {opts.min_elements} elements"
        elif node.op_type == "Gemm":
            attrs = {k: a.value for k, a in node.attributes.items()}
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                reason = "Gemm with transA/alpha/beta is left in float"
        if reason:
            skipped[layer.name] = reason
            continue
        matrix = w.T if layer.out_axis == 0 else w  # [K, N]
        if opts.per_channel:
            scale, zero = symmetric_params(np.abs(matrix).max(axis=0), grid)
        else:
            scale, zero = symmetric_params(float(np.abs(matrix).max()), grid)
        wq = quantize(matrix, scale, zero, grid)
        base = layer.weight.name or layer.name
        x = node.inputs[0]
        assert x is not None
        wq_v = model.add_initializer(f"{base}_quantized", wq)
        wz_v = model.add_initializer(f"{base}_zero_point", zero)
        ws_v = model.add_initializer(f"{base}_scale", scale)
        dq = ir.node("DynamicQuantizeLinear", [x], num_outputs=3, name=f"{layer.name}_DynamicQuantizeLinear")
        xq, xs, xz = dq.outputs
        for v, n, t in ((xq, "quantized", ir.DataType.UINT8), (xs, "scale", ir.DataType.FLOAT), (xz, "zero_point", ir.DataType.UINT8)):
            v.name = f"{x.name}_{layer.name}_{n}"
            v.dtype = t
        mm = ir.node("MatMulInteger", [xq, wq_v, xz, wz_v], name=f"{layer.name}_MatMulInteger")
        mm.outputs[0].dtype = ir.DataType.INT32
        cast = ir.node("Cast", [mm.outputs[0]], {"to": ir.DataType.FLOAT}, name=f"{layer.name}_Cast")
        cast.outputs[0].dtype = ir.DataType.FLOAT
        combined = ir.node("Mul", [xs, ws_v], name=f"{layer.name}_scale_Mul")
        combined.outputs[0].dtype = ir.DataType.FLOAT
        mul = ir.node("Mul", [cast.outputs[0], combined.outputs[0]], name=f"{layer.name}_Mul")
        mul.outputs[0].dtype = ir.DataType.FLOAT
        new_nodes = [dq, mm, cast, combined, mul]
        result = mul.outputs[0]
        bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
        if bias is not None:
            add = ir.node("Add", [result, bias], name=f"{layer.name}_bias_Add")
            add.outputs[0].dtype = ir.DataType.FLOAT
            new_nodes.append(add)
            result = add.outputs[0]
        model.replace_node(node, new_nodes, result)
        done += 1
    tables = quantize_tables(model, bits=8, op_types=set(opts.op_types), min_elements=opts.min_elements, exclude=set(opts.exclude))
    if not done and not tables.done:
        raise OptionsError(f"int8-dynamic: no MatMul/Gemm/Conv/Gather with a constant float weight to quantize in {model.name!r} ({skipped or 'none found'})")
    ctx.figures.update({"quantized_nodes": done, "float_nodes": skipped, "tables_quantized": len(tables.done)})
