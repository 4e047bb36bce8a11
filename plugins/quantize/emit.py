"""Emitting quantized replacements of MatMul/Gemm nodes (shared by int8-dynamic and weight-only)."""

from __future__ import annotations

import onnx_ir as ir

from modelpress.plugin_api import Model, Out

__all__ = ["replace_matmul"]


def replace_matmul(
    model: Model,
    node: ir.Node,
    new_nodes: list[ir.Node],
    output: ir.Value,
    name: str,
    *,
    weighted: ir.Node | None = None,
) -> None:
    """Swap MatMul/Gemm ``node`` for ``new_nodes`` whose ``output`` computes ``x @ W``; a Gemm's
    bias (its third input) is added after them, so the replacement computes what the node did.
    ``weighted`` (the new node that holds the weight) takes the layer's name ``name``."""
    bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
    if bias is not None:
        b = model.builder()
        output = b.op(
            "Add",
            [output, bias],
            name=f"{name}_bias_Add",
            out=Out(f"{name}_bias_Add_output", ir.DataType.FLOAT),
        )
        new_nodes = [*new_nodes, *b.nodes]
    model.replace_node(node, new_nodes, output)
    if weighted is not None:
        # NOTE: the layer keeps its source name (`fc1`, not `fc1_MatMulInteger`): reports, inspect
        # --layers and exclude=/layers= show the same names before and after. The replaced node is
        # gone, so its name is free (and stays reserved); an unnamed node's layer name may be taken.
        weighted.name = name if node.name == name else model.fresh_name(name, node=True)
