"""Which element-wise nodes ``int8-static`` quantizes: only where both sides stay integer.

An Add/Mul gets Q/DQ when every non-constant input is already a quantized tensor (the output of
a quantized Conv/MatMul/Gemm, of another such element-wise node, or of a value-preserving op after
one) *and* its output feeds a quantized node: a ResNet's residual Add between two quantized
branches. A MatMul's bias Add in front of a float LayerNorm, an Add inside a decomposed
LayerNorm/GELU (see :mod:`.patterns`) or an attention-mask Add would only add rounding error
(and with a -10000 mask, destroy the scores), so they stay float.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import onnx_ir as ir

__all__ = ["TRANSPARENT", "feeds_quantized", "integer_elementwise"]

# Ops that only move or select values: a quantized input stays exactly on the same grid, so their
# outputs get Q/DQ with the input's scale (no accuracy cost) and ORT keeps them in int8; selection
# looks through them, and the QDQ emitter (:mod:`.qdq`) spreads Q/DQ through them.
TRANSPARENT = {
    "MaxPool",
    "Reshape",
    "Flatten",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Identity",
    "Slice",
    "Split",
    "Gather",
}


def integer_elementwise(
    graph: ir.Graph,
    candidates: Iterable[ir.Node],
    elementwise: list[ir.Node],
    fused_output: Callable[[ir.Node], ir.Value],
) -> tuple[list[ir.Node], dict[str, str]]:
    """The ``elementwise`` nodes to quantize, and a reason for each one left float."""
    quantized_nodes = {id(n) for n in candidates}
    reasons: dict[str, str] = {}
    pool = list(elementwise)
    while True:
        chosen = _integer_inputs(graph, quantized_nodes, pool, fused_output, reasons)
        selected = {id(n) for n in chosen}
        dropped = [
            n for n in chosen if not feeds_quantized(fused_output(n), quantized_nodes | selected)
        ]
        if not dropped:
            return chosen, reasons
        for node in dropped:
            reasons[node.name or ""] = "output feeds float ops"
        pool = [n for n in pool if n not in dropped]


def _integer_inputs(
    graph: ir.Graph,
    quantized_nodes: set[int],
    pool: list[ir.Node],
    fused_output: Callable[[ir.Node], ir.Value],
    reasons: dict[str, str],
) -> list[ir.Node]:
    integer: set[int] = set()  # ids of values that will carry Q/DQ

    def mark(value: ir.Value) -> None:
        integer.add(id(value))
        for user, index in value.uses():
            if user.op_type in TRANSPARENT and index == 0 and user.outputs:
                mark(user.outputs[0])

    for node in graph:
        if id(node) in quantized_nodes:
            mark(fused_output(node))
    chosen: list[ir.Node] = []
    for node in pool:  # graph order: an Add after a chosen Add sees its output as integer
        acts = [v for v in node.inputs if v is not None and v.const_value is None]
        if all(id(v) in integer for v in acts):
            chosen.append(node)
            mark(fused_output(node))
        else:
            reasons.setdefault(node.name or "", "float input")
    return chosen


def feeds_quantized(value: ir.Value, quantized: set[int]) -> bool:
    """Whether a node in ``quantized`` (ids) reads ``value``, directly or through value-preserving ops."""
    for user, index in value.uses():
        if id(user) in quantized:
            return True
        if (
            user.op_type in TRANSPARENT
            and index == 0
            and user.outputs
            and feeds_quantized(user.outputs[0], quantized)
        ):
            return True
    return False
