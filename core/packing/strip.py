"""``pack --strip``: drop what running a model does not need before it is packed."""

from __future__ import annotations

import onnx

from modelpress.packing import walk

__all__ = ["strip"]


def _strip_body(body: onnx.GraphProto | onnx.FunctionProto) -> None:
    """A graph's or function's own doc string, metadata and shape annotations, and its nodes'."""
    body.ClearField("doc_string")
    del body.metadata_props[:]
    del body.value_info[:]
    for node in body.node:
        node.ClearField("doc_string")
        del node.metadata_props[:]


def strip(proto: onnx.ModelProto) -> None:
    """Drop what ONNX Runtime does not read: metadata properties (of the model, its graphs, nodes,
    inputs/outputs, tensors and functions: exporters put stack traces and module paths there),
    doc strings, shape annotations."""
    del proto.metadata_props[:]
    proto.ClearField("doc_string")
    for function in proto.functions:
        _strip_body(function)
    for g in walk.graphs(proto.graph):
        _strip_body(g)
        for value in (*g.input, *g.output):
            value.ClearField("doc_string")
            del value.metadata_props[:]
    for _name, tensor in walk.tensors(
        proto
    ):  # NOTE: initializers and Constant/attribute tensors, subgraphs included
        tensor.ClearField("doc_string")
        del tensor.metadata_props[:]
