"""Walking a ``ModelProto`` for the tensors a pack holds: every graph (subgraphs included), each
tensor's role (weight, bias, quantized, table, indices), its size, and its external data."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from modelpress.base.errors import UnsafeExternalDataError
from modelpress.plugin.codec import ElementType

if TYPE_CHECKING:
    import onnx

__all__ = [
    "byte_size",
    "external_info",
    "graphs",
    "input_role",
    "nbytes",
    "roles",
    "safe_location",
    "tensor_name",
    "tensors",
]

_WEIGHTED = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}


def graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from graphs(attr.g)
            for g in attr.graphs:
                yield from graphs(g)


def input_role(op_type: str, i: int) -> str | None:
    """What input ``i`` of an ``op_type`` node is to a codec (``None``: nothing particular)."""
    if op_type in _WEIGHTED and i == _WEIGHTED[op_type]:
        return "weight"
    if op_type in ("Conv", "ConvTranspose", "Gemm") and i == 2:
        return "bias"
    if op_type == "DequantizeLinear" and i == 0:
        return "quantized"
    if op_type == "Gather":
        return "table" if i == 0 else "indices"
    return None


def roles(graph: onnx.GraphProto) -> dict[str, str]:
    roles: dict[str, str] = {}
    for g in graphs(graph):
        for node in g.node:
            for i, name in enumerate(node.input):
                role = input_role(node.op_type, i)
                if role is not None:
                    roles.setdefault(name, role)
    return roles


def tensors(proto: onnx.ModelProto) -> Iterator[tuple[str, onnx.TensorProto]]:
    """Every tensor a model holds, in a fixed order: each graph's initializers, then the tensors
    in its nodes' attributes (``Constant`` weights), with the name the graph knows it by."""
    for g in graphs(proto.graph):
        for tensor in g.initializer:
            yield tensor.name, tensor
        for node in g.node:
            for attr in node.attribute:
                name = (
                    node.output[0]
                    if node.op_type == "Constant" and node.output
                    else tensor_name(node, attr)
                )
                if attr.HasField("t"):
                    yield name, attr.t
                for t in attr.tensors:
                    yield name, t


def tensor_name(node: onnx.NodeProto, attr: onnx.AttributeProto) -> str:
    return f"{node.name or node.op_type}.{attr.name}"


def external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def nbytes(tensor: onnx.TensorProto) -> int | None:
    return byte_size(tensor.data_type, tensor.dims)


def byte_size(data_type: int, dims: Iterable[int]) -> int | None:
    """The bytes a tensor of ONNX element type ``data_type`` and shape ``dims`` takes in ``raw_data``
    (``None`` for strings and element types this modelpress does not know)."""
    count = 1
    for d in dims:
        count *= int(d)
    try:
        bits = ElementType(data_type).bitwidth
    except (ValueError, TypeError):
        return None
    return (count * bits + 7) // 8


def safe_location(base: Path, location: str, label: str, tensor: str) -> Path:
    what = f"{label}: initializer {tensor!r} has external data at {location!r}"
    if not location or os.path.isabs(location) or location.startswith(("\\", "/")):
        raise UnsafeExternalDataError(
            f"{what}, an absolute path; external data must live beside the model"
        )
    full = (base / location).resolve()
    if base.resolve() not in full.parents:
        raise UnsafeExternalDataError(
            f"{what}, which resolves outside the model's folder; refusing to read it"
        )
    return full
