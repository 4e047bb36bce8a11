"""ONNX Runtime's int4 kernels for quantized embedding tables: no table dequantized on every run.

:mod:`.embeddings` stores an int4 table behind a ``DequantizeLinear`` (``axis=1``, blocks along the hidden
axis). ONNX Runtime does not fold that DQ, so every run dequantizes the whole table to look up a few rows,
and a tied LM head (``MatMul(x, Transpose(table))``) multiplies by a table dequantized and transposed on every
run: on a decoder that is the whole vocabulary per generated token. This pass swaps

* ``DQ -> Gather(axis 0)`` for ``com.microsoft::GatherBlockQuantized`` on the same int4 table, scales and zero
  points (it dequantizes only the rows it gathers);
* ``DQ -> Transpose -> MatMul`` (a tied LM head) for ``com.microsoft::MatMulNBits`` on the same codes (the
  table's rows are the LM head's output columns, blocked along K as MatMulNBits wants; its packed layout is a
  second, int4-sized copy of the table: an ONNX initializer has one type and shape);

* ``DQ -> Slice`` of rows (a position table cut to the sequence length) for ``GatherBlockQuantized`` of
  ``Range(start, end)`` (the Slice's bounds, normalised as Slice does): a DQ of MiniLM's 512 x 384 position
  table was its int4 file's one remaining per-run dequantization;

which is what onnxruntime-genai's model builder emits for an int4 table. Other users keep the DQ.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from modelpress.plugin_api import GraphBuilder, Model, Out
from modelpress.plugins.quantize.embeddings import cuts_rows

__all__ = ["use_table_kernels"]


def _table_dq(node: ir.Node) -> tuple[ir.Value, int] | None:
    """``(int4 table, block size)`` when ``node`` dequantizes a constant uint4 ``[V, D]`` table in
    blocks along D with scales and zero points, else None."""
    if (
        node.op_type != "DequantizeLinear"
        or node.domain not in ("", "ai.onnx")
        or len(node.inputs) != 3
    ):
        return None
    table = node.inputs[0]
    if table is None or table.const_value is None or not table.is_initializer():
        return None
    if table.const_value.dtype != ir.DataType.UINT4 or len(table.const_value.shape) != 2:
        return None
    axis, block = node.attributes.get("axis"), node.attributes.get("block_size")
    if axis is None or axis.as_int() != 1 or block is None or block.as_int() < 16:
        return None
    if any(v is None or v.const_value is None for v in node.inputs[1:]):
        return None
    return table, block.as_int()


def _lookup(
    model: Model, b: GraphBuilder, dq: ir.Node, user: ir.Node, rows: ir.Value, base: str, block: int
) -> None:
    """``user`` replaced by ``GatherBlockQuantized`` of the int4 table behind ``dq`` at ``rows``,
    with the nodes ``b`` made to compute them."""
    out = b.op(
        "GatherBlockQuantized",
        [dq.inputs[0], rows, dq.inputs[1], dq.inputs[2]],
        {"gather_axis": 0, "quantize_axis": 1, "block_size": block},
        domain="com.microsoft",
        name=f"{base}_GatherBlockQuantized",
        out=Out(f"{base}_GatherBlockQuantized_output", ir.DataType.FLOAT),
    )
    model.replace_node(user, list(b.nodes), out)


def _gather(model: Model, dq: ir.Node, user: ir.Node, block: int) -> bool:
    axis = user.attributes.get("axis")
    if (
        user.op_type != "Gather"
        or user.inputs[0] is not dq.outputs[0]
        or (axis is not None and axis.as_int() != 0)
    ):
        return False
    assert user.inputs[1] is not None
    _lookup(model, model.builder(), dq, user, user.inputs[1], user.name or "embedding", block)
    return True


def _steps(user: ir.Node) -> list[int] | None:
    """A Slice's constant steps (``[1]`` when not given), else None."""
    if len(user.inputs) < 5 or user.inputs[4] is None:
        return [1]
    value = user.inputs[4].const_value
    return None if value is None else [int(x) for x in np.asarray(value.numpy()).ravel()]


def _slice(model: Model, dq: ir.Node, user: ir.Node, block: int) -> bool:
    """``DQ -> Slice(rows, step 1)`` (:func:`.embeddings.cuts_rows`) -> ``GatherBlockQuantized(Range(start,
    end))``, with Slice's bounds (a negative bound counts from the end, then both are clamped to
    ``[0, V]``): only the rows read are dequantized."""
    if not cuts_rows(user, dq.outputs[0]) or _steps(user) != [1]:
        return False
    rows = int(dq.inputs[0].const_value.shape[0])  # type: ignore[arg-type, union-attr]
    base = user.name or "position_slice"
    b = model.builder(base)
    zero, one, count = (
        b.initializer(np.array(x, np.int64), f"{base}_{n}")
        for x, n in ((0, "zero"), (1, "one"), (rows, "rows"))
    )
    axes = b.initializer(np.array([0], np.int64), f"{base}_axes")
    bounds = []
    for given in user.inputs[1:3]:
        x = b.op("Squeeze", [b.op("Cast", [given], {"to": ir.DataType.INT64}), axes])
        x = b.op("Where", [b.op("Less", [x, zero]), b.op("Add", [x, count]), x])
        bounds.append(b.op("Clip", [x, zero, count]))
    _lookup(model, b, dq, user, b.op("Range", [*bounds, one]), base, block)
    return True


def _nbits_weights(model: Model, dq: ir.Node, block: int) -> list[ir.Value]:
    """The table's codes, scales and zero points in MatMulNBits' layout: B ``[V, D / block, block / 2]`` uint8,
    scales ``[V, D / block]``, zero points ``[V, ceil(D / block / 2)]`` uint8 (packed per row)."""
    from modelpress.plugins.quantize.weight_only import _pack_uint4

    assert dq.inputs[0] is not None and dq.inputs[1] is not None and dq.inputs[2] is not None
    codes = np.asarray(dq.inputs[0].const_value.numpy()).astype(np.uint8)  # type: ignore[union-attr]
    zeros = np.asarray(dq.inputs[2].const_value.numpy()).astype(np.uint8)  # type: ignore[union-attr]
    v, d = codes.shape
    if zeros.shape[1] % 2:
        zeros = np.pad(zeros, ((0, 0), (0, 1)))
    b = model.builder()
    base = dq.inputs[0].name or "table"
    return [
        b.initializer(_pack_uint4(codes).reshape(v, d // block, block // 2), f"{base}_nbits"),
        dq.inputs[1],
        b.initializer(_pack_uint4(zeros), f"{base}_nbits_zero_point"),
    ]


def _lm_heads(model: Model, dq: ir.Node, user: ir.Node, block: int, level: int) -> int:
    """Swap each ``MatMul(x, Transpose(DQ(table)))`` after ``user`` (the Transpose) for MatMulNBits; how many."""
    perm = user.attributes.get("perm")
    if user.op_type != "Transpose" or (perm is not None and list(perm.as_ints()) != [1, 0]):
        return 0
    heads = [
        n
        for n, i in user.outputs[0].uses()
        if n.op_type == "MatMul" and i == 1 and n.domain in ("", "ai.onnx")
    ]
    v, d = dq.inputs[0].const_value.shape  # type: ignore[union-attr]
    if not heads or d % block:  # type: ignore[operator]
        return 0
    weights = _nbits_weights(model, dq, block)
    for head in heads:
        b = model.builder()
        out = b.op(
            "MatMulNBits",
            [head.inputs[0], *weights],
            {"K": int(d), "N": int(v), "bits": 4, "block_size": block, "accuracy_level": level},  # type: ignore[arg-type]
            domain="com.microsoft",
            name=f"{head.name or 'lm_head'}_MatMulNBits",
            out=Out(f"{head.name or 'lm_head'}_MatMulNBits_output", ir.DataType.FLOAT),
        )
        model.replace_node(head, list(b.nodes), out)
    return len(heads)


def _drop_if_unused(model: Model, node: ir.Node) -> None:
    if any(list(out.uses()) or out.is_graph_output() for out in node.outputs):
        return
    graph = node.graph or model.ir.graph
    inputs = [v for v in node.inputs if v is not None]
    graph.remove(node, safe=True)
    for value in inputs:
        if value.is_initializer() and not list(value.uses()) and not value.is_graph_output():
            graph.initializers.pop(value.name or "")


def use_table_kernels(model: Model, *, accuracy_level: int | None = None) -> dict[str, int]:
    """Rewrite ``model`` in place (main graph); how many lookups, row slices and LM heads now run on int4
    kernels. ``accuracy_level``: the tied LM heads' MatMulNBits (default 0: float compute, the logits of the
    ``DQ -> Transpose -> MatMul`` it replaces)."""
    counts = {"gather_block_quantized": 0, "sliced_rows": 0, "tied_lm_head_matmulnbits": 0}
    level = 0 if accuracy_level is None else accuracy_level
    for dq in [n for n in model.ir.graph if _table_dq(n) is not None]:
        _, block = _table_dq(dq)  # type: ignore[misc]
        for user, _ in list(dq.outputs[0].uses()):
            if _gather(model, dq, user, block):
                counts["gather_block_quantized"] += 1
                continue
            if _slice(model, dq, user, block):
                counts["sliced_rows"] += 1
                continue
            heads = _lm_heads(model, dq, user, block, level)
            counts["tied_lm_head_matmulnbits"] += heads
            if heads:
                _drop_if_unused(model, user)
        _drop_if_unused(model, dq)
    if any(counts.values()) and "com.microsoft" not in model.ir.opset_imports:
        model.ir.opset_imports["com.microsoft"] = 1
    return counts
