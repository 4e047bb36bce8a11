"""``modelpress.describe``: what ``modelpress inspect`` shows, as a dict.

Computed on the read-only graph view (:mod:`modelpress.ir.view`), so the same rules describe a
loaded :class:`~modelpress.Model` and the light reader's view of an ``.onnx`` file
(:mod:`modelpress.io.onnx_view`, what ``inspect`` uses without importing onnx); both carry
``name``, ``path``, ``ir`` (the view), ``signature`` and ``provenance``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelpress.ir.counting import (
    op_histogram,
    parameter_count,
    quantization_parameter,
    weight_bytes,
)
from modelpress.ir.layers import RECURRENT_OPS, find_weighted_layers
from modelpress.ir.view import BFLOAT16, FLOAT, FLOAT16

if TYPE_CHECKING:
    from modelpress.io.onnx_view import OnnxFileView
    from modelpress.ir.model import Model
    from modelpress.ir.view import NodeView, ValueView

__all__ = ["describe", "layer_rows", "size_on_disk"]


def size_on_disk(model: Model | OnnxFileView) -> int | None:
    """Bytes of the model file plus the external-data files it references (None if not from a file)."""
    if not model.path:
        return None
    path = Path(model.path)
    files = {path.resolve()}
    for value in model.ir.graph.initializers.values():
        location = _external_path(value.const_value)
        if location is not None:
            files.add(Path(location).resolve())
    return sum(f.stat().st_size for f in files if f.is_file())


def _external_path(tensor: Any) -> str | None:
    """The file an external tensor's data is in (onnx-ir's ``ExternalTensor`` and the light
    reader's tensors say ``path``; a tensor in the model file has none)."""
    from_file = getattr(tensor, "path", None)
    return from_file if isinstance(from_file, str) else None


def _elements(value: ValueView | None) -> int:
    if value is None or value.shape is None:
        return 0
    count = 1
    for dim in value.shape:
        count *= dim if isinstance(dim, int) else 0
    return count


def _shape(value: ValueView | None) -> list[int | None] | None:
    return (
        None
        if value is None or value.shape is None
        else [d if isinstance(d, int) else None for d in value.shape]
    )


def layer_rows(model: Model | OnnxFileView) -> list[dict[str, Any]]:
    """Each weighted layer (subgraphs included): name (what ``exclude``/``layers`` options take), op,
    weight shape, parameters (weight and bias elements) and scope ("" in the main graph); then, in
    the main graph, each LSTM/GRU/RNN and each embedding table (``Gather`` from a constant float
    matrix), which carry most of a recurrent or text model's weights. Reads no weight."""
    rows = []
    layers = find_weighted_layers(model.ir.graph, subgraphs=True)
    for layer in layers:
        rows.append(
            {
                "name": layer.name,
                "op": layer.op_type,
                "weight_shape": _shape(layer.weight),
                "parameters": _elements(layer.weight) + _elements(layer.bias),
                "scope": layer.scope,
            }
        )
    seen = {id(layer.node) for layer in layers}
    for node in model.ir.graph:
        if id(node) in seen:
            continue
        if node.op_type in _QUANTIZED_WEIGHT and len(node.inputs) > _QUANTIZED_WEIGHT[node.op_type]:
            row = _quantized_row(node)
            if row is not None:
                rows.append(row)
            continue
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type in RECURRENT_OPS and len(node.inputs) > 2:
            sources = _constant_sources(node.inputs[1:4])
            if sources:
                rows.append(
                    {
                        "name": node.name or node.op_type,
                        "op": node.op_type,
                        "weight_shape": _shape(node.inputs[1]),
                        "parameters": sum(_elements(v) for v in sources),
                        "scope": "",
                    }
                )
        elif node.op_type == "Gather" and node.inputs and _is_table(node.inputs[0]):
            rows.append(
                {
                    "name": node.name or node.op_type,
                    "op": "Gather",
                    "weight_shape": _shape(node.inputs[0]),
                    "parameters": _elements(node.inputs[0]),
                    "scope": "",
                }
            )
    return rows


# NOTE: where a quantized model keeps a layer's weight: the weight input of a float op behind a
# DequantizeLinear (QDQ), or of an integer op; (op, weight input index)
_QUANTIZED_WEIGHT = {
    "Conv": 1,
    "ConvTranspose": 1,
    "Gemm": 1,
    "MatMul": 1,
    "MatMulInteger": 1,
    "ConvInteger": 1,
    "QLinearConv": 3,
    "QLinearMatMul": 3,
    "QGemm": 3,
    "MatMulNBits": 1,
}
_BIAS = {"Conv": 2, "ConvTranspose": 2, "Gemm": 2, "QLinearConv": 8, "QGemm": 6, "MatMulNBits": 5}


def _weight_sources(values: Any) -> list[ValueView]:
    """The constants ``values`` are computed from that hold weights, not the scales and zero points
    of a Q/DQ (its inputs 1 and 2), nor the scales a Mul of scales reads (a bias's scale)."""
    sources = _constant_sources(values, dtypes=None)
    return [
        v
        for v in sources
        if any(
            not (u.node.op_type in ("DequantizeLinear", "QuantizeLinear") and u.idx > 0)
            and not quantization_parameter(u.node)
            for u in v.uses()
        )
    ]


def _quantized_row(node: NodeView) -> dict[str, Any] | None:
    """A weighted layer of a quantized model (weight behind a DequantizeLinear, or an integer op)."""
    index = _QUANTIZED_WEIGHT[node.op_type]
    weights = _weight_sources([node.inputs[index]])
    if not weights:
        return None
    bias_index = _BIAS.get(node.op_type)
    bias = (
        _weight_sources([node.inputs[bias_index]])
        if bias_index is not None and len(node.inputs) > bias_index
        else []
    )
    if node.op_type == "MatMulNBits":
        count = int(node.attributes["N"].as_int()) * int(node.attributes["K"].as_int())
        shape: list[int | None] | None = [
            int(node.attributes["N"].as_int()),
            int(node.attributes["K"].as_int()),
        ]
    else:
        count, shape = sum(_elements(v) for v in weights), _shape(weights[0])
    return {
        "name": node.name or node.op_type,
        "op": node.op_type,
        "weight_shape": shape,
        "parameters": count + sum(_elements(v) for v in bias),
        "scope": "",
    }


def _is_table(value: ValueView | None) -> bool:
    return (
        value is not None
        and value.const_value is not None
        and value.dtype == FLOAT
        and value.shape is not None
        and len(value.shape) == 2
    )


_FLOATS = (FLOAT, FLOAT16, BFLOAT16)


def _constant_sources(
    values: Any, depth: int = 8, dtypes: tuple[int, ...] | None = _FLOATS
) -> list[ValueView]:
    """The float constants that ``values`` are computed from (a torch-exported LSTM's ``W`` is
    ``Concat`` of ``Slice``s of ``weight_ih``); none when one of them depends on a graph input."""
    found: dict[int, ValueView] = {}
    stack = [(v, 0) for v in values if v is not None]
    while stack:
        value, level = stack.pop()
        if value.const_value is not None:
            if dtypes is None or value.dtype in dtypes:
                found[id(value)] = value
            continue
        producer = value.producer()
        if producer is None or level >= depth:
            return []
        stack.extend((v, level + 1) for v in producer.inputs if v is not None)
    return list(found.values())


def _producer(model: Model | OnnxFileView) -> str:
    """``name version``; tf2onnx writes its version as ``"1.17.0 None"`` (the git hash it was built
    without) or ``"None"``: the ``None`` words are dropped."""
    parts = [model.ir.producer_name, model.ir.producer_version]
    return " ".join(w for p in parts if p for w in p.split() if w != "None")


def describe(model: Model | OnnxFileView) -> dict[str, Any]:
    """Op histogram, parameter count, sizes, opset, signature, weighted layers and provenance. Reads no weight."""
    sig = model.signature
    layers = layer_rows(model)
    return {
        "name": model.name,
        "path": model.path,
        "opset": int(model.ir.opset_imports.get("", 0)),
        "opset_imports": dict(model.ir.opset_imports),
        "ir_version": model.ir.ir_version,
        "producer": _producer(model),
        "nodes": len(model.ir.graph),
        "nodes_in_subgraphs": sum(len(g) for g in model.ir.graphs()) - len(model.ir.graph),
        "parameters": parameter_count(model.ir),
        "weight_bytes": weight_bytes(model.ir),
        "size_on_disk": size_on_disk(model),
        "inputs": [s.to_dict() for s in sig.inputs],
        "outputs": [s.to_dict() for s in sig.outputs],
        "ops": op_histogram(model.ir.graph),
        "weighted_layers": len(layers),
        "weighted_layers_in_subgraphs": sum(1 for layer in layers if layer["scope"]),
        "layers": layers,
        "normalize": model.provenance.extra.get("normalize"),
        "source_framework": model.provenance.source_framework,
        "passes": [f"{p.kind}/{p.method}" for p in model.provenance.passes],
    }
