"""Counting a model as users count it: parameters (weights, not scales or shape constants),
weight bytes and the op histogram, over the read-only graph view (:mod:`modelpress.ir.view`):
an onnx-ir model, or the light reader's view of an ``.onnx`` file. Reads no weight."""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any

from modelpress.ir.view import INT64, GraphView, ModelView, NodeView, TensorView, ValueView

__all__ = [
    "ROLE_KEY",
    "SCALE_ROLE",
    "constant_tensors",
    "op_histogram",
    "parameter_count",
    "quantization_parameter",
    "weight_bytes",
]

# NOTE: inputs that hold no weight, by (op, input index): quantization scales and zero points,
# shapes, axes, pads, indices. A constant used only there is not a parameter (see parameter_count).
_QPARAMS = {
    "QuantizeLinear": (1, 2),
    "DequantizeLinear": (1, 2),
    "MatMulNBits": (2, 3, 4),
    "QLinearConv": (1, 2, 4, 5, 6, 7),
    "QLinearMatMul": (1, 2, 4, 5, 6, 7),
    "QGemm": (1, 2, 4, 5, 7, 8),
    "MatMulInteger": (2, 3),
    "ConvInteger": (2, 3),
    "GatherBlockQuantized": (2, 3),
    "DynamicQuantizeLSTM": (5, 6, 7, 8),
}
_SHAPE_INPUTS = {
    "Reshape": (1,),
    "Slice": (1, 2, 3, 4),
    "Squeeze": (1,),
    "Unsqueeze": (1,),
    "Expand": (1,),
    "Tile": (1,),
    "Pad": (1, 3),
    "Resize": (1, 2, 3),
    "Upsample": (1,),
    "ConstantOfShape": (0,),
    "Range": (0, 1, 2),
    "Split": (1,),
    "TopK": (1,),
    "OneHot": (1,),
    "CumSum": (1,),
    "Gather": (1,),
    "GatherElements": (1,),
    "GatherND": (1,),
    "ReduceSum": (1,),
    "ReduceMean": (1,),
    "ReduceMax": (1,),
    "ReduceMin": (1,),
    "ReduceProd": (1,),
    "ReduceL2": (1,),
}
# NOTE: rotary position tables (cos/sin caches) are computed from the config, not learned: users (and
# transformers' num_parameters) do not count them.
_ROTARY_TABLES = {
    "GroupQueryAttention": (7, 8),
    "RotaryEmbedding": (2, 3),
}
# NOTE: an int64 constant this small is a shape, an axis or an index wherever it goes.
_SMALL_INT64 = 64


# NOTE: a node a method inserts to rescale an activation (SmoothQuant's Mul) says so in its metadata:
# its constant inputs are scales, not parameters (the float model had none).
ROLE_KEY, SCALE_ROLE = "modelpress.role", "activation_scale"


# NOTE: ops a quantized constant passes through unchanged in meaning (input 0): a scale stored
# quantized (``scale_q -> DequantizeLinear -> Mul``) is still a scale.
# A table of row scales read by ``Gather`` or ``Slice`` (an int8 embedding's lookup: ``Gather(scales, ids)``
# into a scale-role Mul) is scales too.
_PASS_THROUGH = ("DequantizeLinear", "Cast", "Gather", "Slice")
# NOTE: a Mul that rescales an integer product (ORT's dynamic quantization: ``Cast(MatMulInteger)
# * (activation scale * weight scale)``) multiplies by scales: its constants are no parameters.
_INTEGER_PRODUCTS = ("DynamicQuantizeLinear", "MatMulInteger", "ConvInteger")
_DEPTH = 4


def _is_integer_product(value: Any, depth: int = _DEPTH) -> bool:
    producer = value.producer() if value is not None else None
    if producer is None or depth == 0:
        return False
    if producer.op_type in _INTEGER_PRODUCTS:
        return True
    return producer.op_type in ("Cast", "Mul") and any(
        _is_integer_product(v, depth - 1) for v in producer.inputs if v is not None
    )


def _rescales_integers(node: Any, idx: int) -> bool:
    if node.op_type != "Mul":
        return False
    return any(
        i != idx and v is not None and _is_integer_product(v) for i, v in enumerate(node.inputs)
    )


def _not_weight(use: Any, depth: int = _DEPTH) -> bool:
    node, op = use.node, use.node.op_type
    if node.metadata_props.get(ROLE_KEY) == SCALE_ROLE and use.idx > 0:
        return True
    if use.idx in _QPARAMS.get(op, ()) or use.idx in _SHAPE_INPUTS.get(op, ()):
        return True
    if use.idx in _ROTARY_TABLES.get(op, ()):
        return True
    if _rescales_integers(node, use.idx):
        return True
    # NOTE: a Mul of scales is a scale (int8-static writes a bias's scale as input scale x weight scale)
    if ((op in _PASS_THROUGH and use.idx == 0) or op == "Mul") and depth > 0:
        uses = list(node.outputs[0].uses())
        return bool(uses) and all(_not_weight(u, depth - 1) for u in uses)
    return False


def quantization_parameter(node: NodeView) -> bool:
    """Whether ``node`` computes nothing but quantization parameters: a ``Mul`` whose every
    output is read only as a QuantizeLinear/DequantizeLinear (or QLinear*) scale or zero point
    (int8-static writes a bias's scale as input scale x weight scale). Import normalisation keeps it
    as written, like the DequantizeLinear it feeds: ONNX Runtime folds it before its QDQ fusions."""
    if node.op_type != "Mul" or node.domain not in ("", "ai.onnx") or not node.outputs:
        return False
    for out in node.outputs:
        uses = list(out.uses())
        if not uses or not all(u.idx in _QPARAMS.get(u.node.op_type, ()) for u in uses):
            return False
    return True


def _weight_elements(tensor: TensorView, value: ValueView | None) -> int:
    """How many parameters a constant holds as users count them: its elements when it is a weight;
    a MatMulNBits weight (4-bit, packed two to a byte) as its ``N x K`` elements; 0 for a scale,
    a zero point, or a shape, axes or indices constant."""
    uses = list(value.uses()) if value is not None else []
    if tensor.dtype == INT64 and int(tensor.size) <= _SMALL_INT64:
        return 0
    if uses and all(_not_weight(u) for u in uses):
        return 0
    for use in uses:
        if use.node.op_type == "MatMulNBits" and use.idx == 1:
            attrs = use.node.attributes
            return int(attrs["N"].as_int()) * int(attrs["K"].as_int())
    return int(tensor.size)


def _constant_node_tensor(node: NodeView) -> TensorView | None:
    """The tensor of a ``Constant`` node's ``value`` attribute (None for other nodes and forms)."""
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    attr = node.attributes.get("value")
    if attr is None or attr.type != _TENSOR:
        return None
    return attr.value  # type: ignore[no-any-return]


_TENSOR = 4  # ONNX AttributeProto.TENSOR


def constant_tensors(model: ModelView) -> Iterator[tuple[TensorView, ValueView | None]]:
    """Every weight wherever it lives, with the value that holds it: initializers of all graphs
    and Constant-node tensors."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield value.const_value, value
        for node in graph:
            tensor = _constant_node_tensor(node)
            if tensor is not None:
                yield tensor, node.outputs[0]


def parameter_count(model: ModelView) -> int:
    """Parameters as users count them, in every graph (no weight is read: shapes only): the
    elements of weight tensors (a quantized weight once, as its integer tensor; a bias as
    stored), not quantization scales and zero points nor shape, axes and index constants,
    so quantizing a model leaves its count unchanged."""
    return sum(_weight_elements(tensor, value) for tensor, value in constant_tensors(model))


def weight_bytes(model: ModelView) -> int:
    """Bytes of all weights as stored, in every graph (no weight is read)."""
    return sum(int(tensor.nbytes) for tensor, _ in constant_tensors(model))


def op_histogram(graph: GraphView) -> dict[str, int]:
    """``{op: count}`` over the graph and its subgraphs, most frequent first (``domain::op`` outside
    the ONNX domain)."""
    counts = collections.Counter(
        f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
        for n in graph.all_nodes()
    )
    return dict(counts.most_common())
