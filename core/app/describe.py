"""``modelpress.describe``: what ``modelpress inspect`` shows, as a dict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx_ir as ir

from modelpress.ir.layers import RECURRENT_OPS
from modelpress.ir.model import Model

__all__ = ["describe", "layer_rows", "size_on_disk"]


def size_on_disk(model: Model) -> int | None:
    """Bytes of the model file plus the external-data files it references (None if not from a file)."""
    if not model.path:
        return None
    path = Path(model.path)
    files = {path.resolve()}
    for value in model.ir.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            files.add(Path(tensor.path).resolve())
    return sum(f.stat().st_size for f in files if f.is_file())


def _elements(value: ir.Value | None) -> int:
    if value is None or value.shape is None:
        return 0
    count = 1
    for dim in value.shape:
        count *= dim if isinstance(dim, int) else 0
    return count


def _shape(value: ir.Value | None) -> list[int | None] | None:
    return None if value is None or value.shape is None else [d if isinstance(d, int) else None for d in value.shape]


def layer_rows(model: Model) -> list[dict[str, Any]]:
    """Each weighted layer (subgraphs included): name (what ``exclude``/``layers`` options take), op,
    weight shape, parameters (weight and bias elements) and scope ("" in the main graph); then, in
    the main graph, each LSTM/GRU/RNN and each embedding table (``Gather`` from a constant float
    matrix), which carry most of a recurrent or text model's weights. Reads no weight."""
    rows = []
    for layer in model.weighted_layers(subgraphs=True):
        rows.append({"name": layer.name, "op": layer.op_type, "weight_shape": _shape(layer.weight),
                     "parameters": _elements(layer.weight) + _elements(layer.bias), "scope": layer.scope})
    for node in model.ir.graph:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type in RECURRENT_OPS and len(node.inputs) > 2:
            sources = _constant_sources(node.inputs[1:4])
            if sources:
                rows.append({"name": node.name or node.op_type, "op": node.op_type, "weight_shape": _shape(node.inputs[1]),
                             "parameters": sum(_elements(v) for v in sources), "scope": ""})
        elif node.op_type == "Gather" and node.inputs and _is_table(node.inputs[0]):
            rows.append({"name": node.name or node.op_type, "op": "Gather", "weight_shape": _shape(node.inputs[0]),
                         "parameters": _elements(node.inputs[0]), "scope": ""})
    return rows


def _is_table(value: ir.Value | None) -> bool:
    return (value is not None and value.const_value is not None and value.dtype == ir.DataType.FLOAT
            and value.shape is not None and len(value.shape) == 2)


def _constant_sources(values: Any, depth: int = 8) -> list[ir.Value]:
    """The float constants that ``values`` are computed from (a torch-exported LSTM's ``W`` is
    ``Concat`` of ``Slice``s of ``weight_ih``); none when one of them depends on a graph input."""
    found: dict[int, ir.Value] = {}
    stack = [(v, 0) for v in values if v is not None]
    while stack:
        value, level = stack.pop()
        if value.const_value is not None:
            if value.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
                found[id(value)] = value
            continue
        producer = value.producer()
        if producer is None or level >= depth:
            return []
        stack.extend((v, level + 1) for v in producer.inputs if v is not None)
    return list(found.values())


def describe(model: Model) -> dict[str, Any]:
    """Op histogram, parameter count, sizes, opset, signature, weighted layers and provenance. Reads no weight."""
    sig = model.signature
    layers = layer_rows(model)
    return {
        "name": model.name,
        "path": model.path,
        "opset": model.opset,
        "opset_imports": dict(model.ir.opset_imports),
        "ir_version": model.ir.ir_version,
        "producer": f"{model.ir.producer_name or ''} {model.ir.producer_version or ''}".strip(),
        "nodes": len(model.ir.graph),
        "nodes_in_subgraphs": sum(len(g) for g in model.ir.graphs()) - len(model.ir.graph),
        "parameters": model.parameter_count(),
        "weight_bytes": model.weight_bytes(),
        "size_on_disk": size_on_disk(model),
        "inputs": [s.to_dict() for s in sig.inputs],
        "outputs": [s.to_dict() for s in sig.outputs],
        "ops": model.op_histogram(),
        "weighted_layers": len(layers),
        "weighted_layers_in_subgraphs": sum(1 for layer in layers if layer["scope"]),
        "layers": layers,
        "normalize": model.provenance.extra.get("normalize"),
        "source_framework": model.provenance.source_framework,
        "passes": [f"{p.kind}/{p.method}" for p in model.provenance.passes],
    }
