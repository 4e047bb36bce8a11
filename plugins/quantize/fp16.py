"""``fp16``: run the model in float16, keeping numerically fragile ops in float32.

Every node runs in float16 unless its op type is in ``keep_float32`` (by default the reductions
and exponentials whose range or accumulation float16 cannot hold: Softmax, LayerNormalization,
ReduceMean, Pow, Exp, ...) or it is named in ``exclude``. Float initializers used by float16 nodes
are stored as float16; a Cast is inserted wherever a tensor crosses between the two precisions.
With ``keep_io_types`` (default) the model's inputs and outputs stay float32.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from pydantic import Field

from modelpress.methods import Options, PassContext
from modelpress.model import Model

__all__ = ["Fp16Options", "fp16"]

KEEP_FLOAT32 = [
    "Softmax", "LogSoftmax", "LayerNormalization", "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2",
    "ReduceProd", "Pow", "Exp", "Log", "Sqrt", "Erf", "Range", "CumSum", "Resize", "TopK", "RandomNormal",
    "RandomUniform", "NonMaxSuppression", "Upsample", "Einsum",
]
_FLOAT = ir.DataType.FLOAT
_HALF = ir.DataType.FLOAT16
_CONTROL_FLOW = {"If", "Loop", "Scan"}


class Fp16Options(Options):
    keep_float32: list[str] = Field(default_factory=lambda: list(KEEP_FLOAT32), description="op types that stay float32")
    exclude: list[str] = Field(default_factory=list, description="node names that stay float32")
    keep_io_types: bool = Field(True, description="keep model inputs and outputs float32 (Casts at the boundary)")


def fp16(model: Model, opts: Fp16Options, ctx: PassContext) -> None:
    graph = model.ir.graph
    keep = set(opts.keep_float32)
    # NOTE: If/Loop/Scan bodies are typed inside their subgraphs; they run in float32, said by name.
    half_nodes = {id(n) for n in graph if n.domain in ("", "ai.onnx") and n.op_type not in keep and n.name not in opts.exclude and n.op_type not in _CONTROL_FLOW}
    in_subgraphs = model.subgraph_refusals(frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"}), "fp16", "does not convert control-flow bodies; they stay float32")
    casts: dict[tuple[int, ir.DataType], ir.Value] = {}
    converted: dict[str, ir.Value] = {}

    def cast(value: ir.Value, to: ir.DataType, before: ir.Node) -> ir.Value:
        key = (id(value), to)
        if key not in casts:
            node = ir.node("Cast", [value], {"to": to}, name=f"{value.name}_to_{to.name.lower()}")
            node.outputs[0].name = f"{value.name}_{to.name.lower()}"
            node.outputs[0].dtype = to
            node.outputs[0].shape = value.shape.copy() if value.shape is not None else None
            producer = value.producer()
            if producer is not None:
                graph.insert_after(producer, node)
            else:
                graph.insert_before(before, node)
            casts[key] = node.outputs[0]
        return casts[key]

    def half_initializer(value: ir.Value) -> ir.Value:
        if value.name not in converted:
            array = value.const_value.numpy()  # type: ignore[union-attr]
            converted[value.name or ""] = model.add_initializer(f"{value.name}_fp16", np.clip(array, -65504, 65504).astype(np.float16))
        return converted[value.name or ""]

    n_half = 0
    for node in list(graph):
        if node.op_type == "Cast" and node.name.endswith(("_to_float16", "_to_float")) and id(node) not in half_nodes:
            continue
        want = _HALF if id(node) in half_nodes else _FLOAT
        for i, value in enumerate(node.inputs):
            if value is None or value.dtype not in (_FLOAT, _HALF) or value.dtype == want:
                continue
            if value.const_value is not None and value.is_initializer() and want == _HALF:
                node.replace_input_with(i, half_initializer(value))
            else:
                node.replace_input_with(i, cast(value, want, node))
        if want == _HALF:
            n_half += 1
            for out in node.outputs:
                if out.dtype == _FLOAT:
                    out.dtype = _HALF
            if node.op_type == "Cast" and node.attributes.get("to") is not None and node.attributes["to"].as_int() == _FLOAT:
                node.attributes["to"] = ir.AttrInt64("to", int(_HALF))
            if node.op_type in ("Constant", "ConstantOfShape") and "value" in node.attributes:
                tensor = node.attributes["value"].as_tensor()
                if tensor.dtype == _FLOAT:
                    node.attributes["value"] = ir.AttrTensor("value", ir.tensor(tensor.numpy().astype(np.float16), name=tensor.name))
    if opts.keep_io_types:
        for i, out in enumerate(list(graph.outputs)):
            if out.dtype == _HALF:
                name = out.name
                node = ir.node("Cast", [out], {"to": _FLOAT}, name=f"{name}_to_float32_output")
                graph.append(node)
                out.name = f"{name}_fp16"
                node.outputs[0].name = name
                node.outputs[0].dtype = _FLOAT
                node.outputs[0].shape = out.shape.copy() if out.shape is not None else None
                graph.outputs[i] = node.outputs[0]
    stored_half = _store_subgraph_weights_half(model, graph)
    for value in list(graph.initializers.values()):
        if not list(value.uses()) and not value.is_graph_output():
            graph.initializers.pop(value.name)
    graph.sort()
    ctx.figures.update({"float16_nodes": n_half, "float32_nodes": len(graph) - n_half - len(casts), "casts": len(casts)})
    if in_subgraphs:
        ctx.figures["float32_layers_in_subgraphs"] = in_subgraphs
        ctx.figures["subgraph_weights_stored_float16"] = stored_half


def _store_subgraph_weights_half(model: Model, graph: ir.Graph) -> int:
    """Float32 weights used only inside If/Loop/Scan bodies: stored float16 and cast back to float32
    in the main graph (ORT folds the Cast at load), so the file still halves while the bodies
    compute in float32."""
    count = 0
    for value in list(graph.initializers.values()):
        uses = list(value.uses())
        tensor = value.const_value
        if tensor is None or tensor.dtype != _FLOAT or tensor.size < 16 or not uses or any(user.graph is graph for user, _ in uses):
            continue
        half = model.add_initializer(f"{value.name}_fp16", np.clip(tensor.numpy(), -65504, 65504).astype(np.float16))
        node = ir.node("Cast", [half], {"to": _FLOAT}, name=f"{value.name}_to_float")
        node.outputs[0].dtype = _FLOAT
        node.outputs[0].shape = value.shape.copy() if value.shape is not None else None
        if len(graph):
            graph.insert_before(graph[0], node)
        else:
            graph.append(node)
        value.replace_all_uses_with(node.outputs[0])
        node.outputs[0].name, value.name = value.name, f"{value.name}_float32_unused"
        count += 1
    return count
