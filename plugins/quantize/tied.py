"""A tied LM head (``MatMul(x, Transpose(table))``, the embedding table read again as the output projection).

``int4-weight-only`` quantizes such a head as a weight of its own, ``[V, D]`` read as ``W[K=D, N=V]``
(:func:`tied_heads`), with whatever algorithm the pass runs (GPTQ sees the head's inputs). Then:

* ``tables="float"``: the lookup keeps the float32 table; the head has its own int4 copy (what optimum +
  ONNX Runtime's MatMulNBitsQuantizer produce);
* ``tables="quantize"`` (int4, blocks dividing D): the table is stored once, as the head's ``MatMulNBits``
  codes, and every lookup reads them through ``Reshape -> com.microsoft::GatherBlockQuantized``
  (:func:`share_tied_lookups`), as onnxruntime-genai's builder emits a tied table; the float table is dropped.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from modelpress.plugin_api import Model, Out, WeightedLayer

__all__ = ["share_tied_lookups", "tied_heads", "tied_lookups"]


def _transposed_table(node: ir.Node) -> ir.Value | None:
    """The 2-D float initializer ``node`` (a MatMul) reads as ``Transpose(table)``, else None."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    producer = node.inputs[1].producer() if node.inputs[1] is not None else None
    if (
        producer is None
        or producer.op_type != "Transpose"
        or producer.domain not in ("", "ai.onnx")
    ):
        return None
    perm, table = producer.attributes.get("perm"), producer.inputs[0]
    if perm is not None and list(perm.as_ints()) != [1, 0]:
        return None
    if table is None or not table.is_initializer() or table.const_value is None:
        return None
    if len(table.const_value.shape) != 2 or table.const_value.dtype != ir.DataType.FLOAT:
        return None
    return table


def _lookups(table: ir.Value) -> list[ir.Node]:
    return [
        n
        for n, i in table.uses()
        if n.op_type == "Gather"
        and i == 0
        and (n.attributes.get("axis") is None or n.attributes["axis"].as_int() == 0)
    ]


def _shareable(table: ir.Value, opts: Any) -> bool:
    """Whether the head's MatMulNBits codes can serve the lookups of ``table`` too (``tables="quantize"``)."""
    d = int(table.const_value.shape[1])  # type: ignore[arg-type, union-attr]
    others = [n for n, _ in table.uses() if n.op_type != "Transpose" and n not in _lookups(table)]
    return (
        opts.bits == 4
        and opts.format != "qdq"
        and "Gather" in opts.op_types
        and d % opts.block_size == 0
        and not others
        and all(n.name for n in _lookups(table))
    )


def tied_heads(model: Model, opts: Any) -> list[WeightedLayer]:
    """Each tied LM head of the main graph as a layer whose weight is the table, ``[N, K]`` (out_axis 0); with
    ``tables="quantize"`` only where its codes can serve the lookups (else the table is quantized as a table
    and the head reads it dequantized: :mod:`.table_kernels`)."""
    if "MatMul" not in opts.op_types:
        return []
    heads = []
    for node in model.ir.graph:
        table = _transposed_table(node)
        if table is not None and (opts.tables == "float" or _shareable(table, opts)):
            heads.append(WeightedLayer(node, table, None, 1, 0, 1))
    return heads


def _is_tied(layer: WeightedLayer) -> bool:
    return layer.node.inputs[layer.weight_input] is not layer.weight


def tied_lookups(layers: list[WeightedLayer]) -> set[str]:
    """Names of the lookups reading a tied head's table: the table quantizer leaves them to this module."""
    return {n.name for layer in layers if _is_tied(layer) for n in _lookups(layer.weight) if n.name}


def _share(model: Model, layer: WeightedLayer, weights: list[ir.Value], block: int) -> int:
    """Swap each lookup of ``layer``'s table for GatherBlockQuantized on the head's MatMulNBits codes."""
    v, d = (int(x) for x in layer.weight.const_value.shape)  # type: ignore[union-attr]
    nb = d // block
    b = model.builder()
    if len(weights) > 2:
        zeros = weights[2]
    else:  # NOTE: symmetric: MatMulNBits' implied zero point 8, written out for the lookup
        zeros = b.initializer(
            np.full((v, -(-nb // 2)), 0x88, np.uint8), f"{layer.weight.name}_nbits_zero_point"
        )
    shape = b.initializer(np.asarray([v, d // 2], np.int64), f"{layer.weight.name}_lookup_shape")
    count = 0
    for lookup in _lookups(layer.weight):
        b = model.builder()
        packed = b.op(
            "Reshape",
            [weights[0], shape],
            name=f"{lookup.name}_Reshape",
            out=Out(f"{lookup.name}_codes", ir.DataType.UINT8),
        )
        out = b.op(
            "GatherBlockQuantized",
            [packed, lookup.inputs[1], weights[1], zeros],
            {"gather_axis": 0, "quantize_axis": 1, "block_size": block, "bits": 4},
            domain="com.microsoft",
            name=f"{lookup.name}_GatherBlockQuantized",
            out=Out(f"{lookup.name}_GatherBlockQuantized_output", ir.DataType.FLOAT),
        )
        model.replace_node(lookup, list(b.nodes), out)
        count += 1
    return count


def share_tied_lookups(
    model: Model,
    groups: list[list[WeightedLayer]],
    chosen: list[Any],
    weights: dict[tuple[int, int], list[ir.Value]],
) -> int:
    """After the heads are emitted: the lookups of each table whose head is MatMulNBits with ``tables="quantize"``
    read its codes; the float table is dropped when nothing else reads it. How many lookups were swapped."""
    count = 0
    for group, opts in zip(groups, chosen, strict=True):
        layer = group[0]
        if not _is_tied(layer) or opts.tables != "quantize" or opts.format != "matmulnbits":
            continue
        count += _share(model, layer, weights[(id(layer.weight), layer.out_axis)], opts.block_size)
        table = layer.weight
        if not list(table.uses()) and not table.is_graph_output():
            model.ir.graph.initializers.pop(table.name or "", None)
    if count and "com.microsoft" not in model.ir.opset_imports:
        model.ir.opset_imports["com.microsoft"] = 1
    return count
