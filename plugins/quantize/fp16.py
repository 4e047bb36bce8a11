"""``fp16``: run the model in float16, keeping numerically fragile ops in float32.

Every node runs in float16 unless its op type is in ``keep_float32`` (by default the reductions
and exponentials whose range or accumulation float16 cannot hold: Softmax, LayerNormalization,
ReduceMean, Pow, Exp, ...) or it is named in ``exclude``. Float initializers used by float16 nodes
are stored as float16; a Cast is inserted wherever a tensor crosses between the two precisions.
With ``keep_io_types`` (default) the model's inputs and outputs stay float32.

Control flow (If, Loop, Scan) and the nodes inside their bodies stay float32: a body reads
outer-scope tensors by name, so every outer tensor a body uses that became float16 gets a Cast
back to float32 in the outer graph, and the bodies' own weights and ops are left as they are.
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
CONTROL_FLOW = frozenset({"If", "Loop", "Scan", "SequenceMap"})
_FLOAT = ir.DataType.FLOAT
_HALF = ir.DataType.FLOAT16


class Fp16Options(Options):
    keep_float32: list[str] = Field(default_factory=lambda: list(KEEP_FLOAT32), description="op types that stay float32")
    exclude: list[str] = Field(default_factory=list, description="node names that stay float32")
    keep_io_types: bool = Field(True, description="keep model inputs and outputs float32 (Casts at the boundary)")


def _captured(graph: ir.Graph) -> list[tuple[ir.Node, int, ir.Value]]:
    """(node, input index, value) for every use inside a subgraph of a value of ``graph`` itself."""
    found = []
    for node in graph.all_nodes():
        if node.graph is graph:
            continue
        for i, value in enumerate(node.inputs):
            if value is None:
                continue
            producer = value.producer()
            owner = producer.graph if producer is not None else value.graph
            if owner is graph:
                found.append((node, i, value))
    return found


def fp16(model: Model, opts: Fp16Options, ctx: PassContext) -> None:
    graph = model.ir.graph
    keep = set(opts.keep_float32) | CONTROL_FLOW
    captured = _captured(graph)
    half_nodes = {id(n) for n in graph if n.domain in ("", "ai.onnx") and n.op_type not in keep and n.name not in opts.exclude}
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
    for user, i, value in captured:
        if value.dtype == _HALF:
            # NOTE: a body node reading an outer tensor that is now float16: give it float32 back.
            first_user = next(n for n in graph if any(sub is user.graph for sub in _subgraphs(n)))
            user.replace_input_with(i, cast(value, _FLOAT, first_user))
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
    for value in list(graph.initializers.values()):
        if not list(value.uses()) and not value.is_graph_output():
            graph.initializers.pop(value.name)
    graph.sort()
    ctx.figures.update({"float16_nodes": n_half, "float32_nodes": len(graph) - n_half - len(casts), "casts": len(casts)})
    inner = sum(1 for n in graph.all_nodes() if n.graph is not graph)
    if inner:
        ctx.figures["float32_subgraph_nodes"] = inner


def _subgraphs(node: ir.Node) -> list[ir.Graph]:
    """Every graph nested (at any depth) in ``node``'s attributes."""
    found: list[ir.Graph] = []
    for attr in node.attributes.values():
        graphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else list(attr.value) if attr.type == ir.AttributeType.GRAPHS else []
        for g in graphs:
            found.append(g)
            for inner in g:
                found.extend(_subgraphs(inner))
    return found
