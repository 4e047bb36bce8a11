"""``modelpress.describe``: what ``modelpress inspect`` shows, as a dict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx_ir as ir

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


def layer_rows(model: Model) -> list[dict[str, Any]]:
    """Each weighted layer (subgraphs included): name (what ``exclude``/``layers`` options take), op,
    weight shape, parameters (weight and bias elements) and scope ("" in the main graph). Reads no weight."""
    rows = []
    for layer in model.weighted_layers(subgraphs=True):
        shape = None if layer.weight.shape is None else [d if isinstance(d, int) else None for d in layer.weight.shape]
        rows.append({"name": layer.name, "op": layer.op_type, "weight_shape": shape,
                     "parameters": _elements(layer.weight) + _elements(layer.bias), "scope": layer.scope})
    return rows


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
