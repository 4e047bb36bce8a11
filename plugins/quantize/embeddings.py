"""Weight-only quantization of embedding tables (``Gather`` or ``Slice`` on a constant table) and Conv weights.

ONNX Runtime has no integer kernel to use here for weight-only formats, so the weight is stored as
int8/int4 behind a ``DequantizeLinear`` (``DQ -> Gather``, ``DQ -> Conv``). ORT does not fold a DQ of
a constant (it keeps it for its QDQ fusions), so that DQ runs on every inference: an int8 table read
by ``Gather`` is instead looked up first and only the rows read are dequantized (``Gather(int8) ->
Cast -> Mul(Gather(row scales))``). The file shrinks ~4x (int8) or ~6-7x (int4). Used by
``int4-weight-only`` / ``int8-weight-only``, ``int8-dynamic`` and ``int8-static`` so a transformer's
token/position tables and a CNN's convolutions are covered, not only its MatMul/Gemm.

* embedding table ``[V, D]`` (read by ``Gather``, or by ``Slice`` as a position table is): int8
  symmetric, one scale per row (``axis=0``); int4 asymmetric in blocks of ``block_size`` along ``D``
  (``axis=1``, opset 21);
* Conv weight ``[O, I, kH, kW]``: one scale per output channel (``axis=0``), int8 symmetric or
  int4 asymmetric (opset 21).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from modelpress.plugin_api import Model, Out
from modelpress.plugins.quantize.streaming import FileRows

__all__ = ["CHUNK_ELEMENTS", "TableReport", "embedding_tables", "quantize_table", "quantize_tables"]


@dataclass
class TableReport:
    done: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    bytes_before: int = 0
    bytes_after: int = 0
    errors: list[float] = field(default_factory=list)


def _tables(
    model: Model, op_types: set[str], min_elements: int, exclude: set[str], report: TableReport
) -> list[tuple[ir.Value, str]]:
    """(weight value, "embedding" | "conv") for each eligible constant, each value once."""
    found: dict[int, tuple[ir.Value, str]] = {}
    for node in model.nodes():
        # NOTE: a table sliced by rows (a transformer's position table: Slice -> Add) is an embedding table too
        wanted = node.op_type in op_types or (node.op_type == "Slice" and "Gather" in op_types)
        if node.domain not in ("", "ai.onnx") or not wanted or not node.inputs:
            continue
        index, kind = (1, "conv") if node.op_type == "Conv" else (0, "embedding")
        value = node.inputs[index] if len(node.inputs) > index else None
        if value is None or value.const_value is None or not value.is_initializer():
            continue
        name = node.name or value.name or node.op_type
        axis = node.attributes.get("axis")
        if node.name in exclude:
            report.skipped[name] = "excluded by option"
        elif value.const_value.dtype != ir.DataType.FLOAT:
            report.skipped[name] = "table is not float32"
        elif kind == "embedding" and (
            len(value.shape or ()) != 2 or (axis is not None and axis.as_int() != 0)
        ):
            report.skipped[name] = f"{node.op_type} is not a row lookup in a 2-D table"
        elif value.const_value.size < min_elements:
            report.skipped[name] = f"fewer than {min_elements} elements"
        else:
            found.setdefault(id(value), (value, kind))
    return list(found.values())


def embedding_tables(model: Model, min_elements: int, exclude: set[str]) -> bool:
    """Whether :func:`quantize_tables` with ``op_types={"Gather"}`` finds a table to quantize in ``model``."""
    return model.opset >= 13 and bool(
        _tables(model, {"Gather"}, min_elements, exclude, TableReport())
    )


def _int8_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int]]:
    flat = w.reshape(w.shape[0], -1)
    amax = np.abs(flat).max(axis=1).astype(np.float64)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    # NOTE: one float32 buffer, in place (a 30k x 384 vocabulary table took ~1 s in float64 copies)
    q = np.divide(flat, scale[:, None], dtype=np.float32)
    np.round(q, out=q)
    np.clip(q, -127, 127, out=q)
    return q.astype(np.int8).reshape(w.shape), scale, np.zeros(w.shape[0], np.int8), {"axis": 0}


def _uint4_blocks(
    w: np.ndarray, axis: int, block: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int]]:
    """Asymmetric uint4: per row (``axis=0``: one range per output channel) or per block of ``axis=1``."""
    if axis == 0:
        flat = w.reshape(w.shape[0], 1, -1).astype(np.float64)
    else:
        v, d = w.shape
        nb = -(-d // block)
        padded = np.pad(w.astype(np.float64), ((0, 0), (0, nb * block - d)), mode="edge")
        flat = padded.reshape(v, nb, block)
    lo, hi = np.minimum(flat.min(axis=2), 0), np.maximum(flat.max(axis=2), 0)
    scale = np.where(hi > lo, (hi - lo) / 15.0, 1.0)
    zero = np.clip(np.round(-lo / scale), 0, 15)
    q = np.clip(np.round(flat / scale[..., None] + zero[..., None]), 0, 15)
    if axis == 0:
        return q.reshape(w.shape), scale[:, 0].astype(np.float32), zero[:, 0], {"axis": 0}
    q = q.reshape(w.shape[0], -1)[:, : w.shape[1]]
    return q, scale.astype(np.float32), zero, {"axis": 1, "block_size": block}


def _dequantized(
    q: np.ndarray,
    scale: np.ndarray,
    zero: np.ndarray,
    attrs: dict[str, int],
    shape: tuple[int, ...],
) -> np.ndarray:
    axis = attrs["axis"]
    if "block_size" in attrs:
        s = np.repeat(scale, attrs["block_size"], axis=1)[:, : shape[1]]
        z = np.repeat(zero.astype(np.float64), attrs["block_size"], axis=1)[:, : shape[1]]
    else:
        bshape = [1] * len(shape)
        bshape[axis] = -1
        s, z = scale.reshape(bshape), zero.astype(np.float64).reshape(bshape)
    return ((q.astype(np.float64) - z) * s).astype(np.float32)


# NOTE: weights quantized per chunk of rows: the float64 temporaries of one chunk are ~8 MB each, whatever the
# table's size (a 0.5-2 GB vocabulary table is never copied whole); rows are independent, so the result is
# the same bit for bit as quantizing the table in one go.
CHUNK_ELEMENTS = 1 << 20


@dataclass
class _Table:
    """One table quantized and packed as stored: int8 ``[V, ...]``, or uint4 two per byte (flat, row-major)."""

    data: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    attrs: dict[str, int]
    squared_error: float = 0.0
    squared_norm: float = 0.0


def _chunk_rows(rows: int, cols: int) -> int:
    """Rows per chunk: about :data:`CHUNK_ELEMENTS` weights, an even count so each chunk's packed uint4 starts on a byte."""
    return max(2, CHUNK_ELEMENTS // max(cols, 1) // 2 * 2)


def _pack_into(out: np.ndarray, start: int, values: np.ndarray) -> None:
    """uint4 ``values`` packed two per byte (low nibble first) into ``out`` from element ``start`` (even)."""
    flat = values.reshape(-1).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    packed = (flat[0::2] & 0x0F) | ((flat[1::2] & 0x0F) << 4)
    out[start // 2 : start // 2 + len(packed)] = packed


def _empty_table(rows: int, cols: int, bits: int, kind: str, block: int) -> _Table:
    if bits == 8:
        return _Table(
            np.zeros((rows, cols), np.int8),
            np.zeros(rows, np.float32),
            np.zeros(rows, np.int8),
            {"axis": 0},
        )
    if kind == "conv":
        return _Table(
            np.zeros(-(-rows * cols // 2), np.uint8),
            np.zeros(rows, np.float32),
            np.zeros(-(-rows // 2), np.uint8),
            {"axis": 0},
        )
    nb = -(-cols // block)
    return _Table(
        np.zeros(-(-rows * cols // 2), np.uint8),
        np.zeros((rows, nb), np.float32),
        np.zeros(-(-rows * nb // 2), np.uint8),
        {"axis": 1, "block_size": block},
    )


def quantize_table(
    read: Callable[[int, int], np.ndarray],
    shape: tuple[int, ...],
    *,
    bits: int,
    kind: str,
    block: int = 32,
) -> _Table:
    """A float32 table of ``shape`` quantized chunk by chunk of rows: ``read(r0, r1)`` gives rows ``[r0, r1)``
    as ``[r1 - r0, prod(shape[1:])]`` (from the file for external data, nothing mapped), and only one chunk's
    temporaries exist at a time; the packed result and the squared error and norm of the whole table."""
    rows = int(shape[0])
    cols = int(np.prod(shape[1:], dtype=np.int64))
    table = _empty_table(rows, cols, bits, kind, block)
    step = _chunk_rows(rows, cols)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        chunk = np.asarray(read(r0, r1), np.float32)
        q, scale, zero, attrs = (
            _int8_rows(chunk)
            if bits == 8
            else _uint4_blocks(chunk, 1 if kind == "embedding" else 0, block)
        )
        recon = _dequantized(q, scale, zero, attrs, chunk.shape)
        recon -= chunk
        table.squared_error += float(np.einsum("ij,ij->", recon, recon))
        table.squared_norm += float(np.einsum("ij,ij->", chunk, chunk, dtype=np.float64))
        del recon
        table.scale[r0:r1] = scale
        if bits == 8:
            table.data[r0:r1], table.zero[r0:r1] = q, zero
        else:
            _pack_into(table.data, r0 * cols, q)
            _pack_into(table.zero, r0 * (zero.shape[1] if zero.ndim == 2 else 1), zero)
    return table


def _reader(tensor: ir.TensorProtocol) -> Callable[[int, int], np.ndarray]:
    """Rows of ``tensor`` as a 2-D float32 ``[rows, rest]``: read from the file for external data (``pread``,
    no memory map, so nothing stays charged to the process), else sliced from the array."""
    if isinstance(tensor, ir.ExternalTensor):
        rows = FileRows(tensor)
        return lambda r0, r1: rows[r0:r1]
    array = tensor.numpy()
    array = array.reshape(array.shape[0], -1)
    return lambda r0, r1: array[r0:r1]


def _row_lookups(value: ir.Value, bits: int) -> list[ir.Node]:
    """The main-graph ``Gather`` users of an int8 table that read rows (axis 0): they gather the int8 rows
    and dequantize only those (ORT never constant-folds a DequantizeLinear: a DQ in front of a 30k x 384
    vocabulary table dequantized all 11.7 M weights on every run, 5 ms of MiniLM's 14)."""
    if bits != 8:
        return []
    return [
        user
        for user, index in value.uses()
        if user.op_type == "Gather"
        and user.domain in ("", "ai.onnx")
        and index == 0
        and user.graph is value.graph
        and (user.attributes.get("axis") is None or user.attributes["axis"].as_int() == 0)
    ]


def cuts_rows(user: ir.Node, value: ir.Value) -> bool:
    """Whether ``user`` is a ``Slice`` of rows of the 2-D ``value``: one axis, ``0`` or ``-2`` (or no
    axes with one start). A position table is read that way, cut to the sequence length."""
    if user.op_type != "Slice" or user.domain not in ("", "ai.onnx") or len(user.inputs) < 3:
        return False
    if user.inputs[0] is not value or user.inputs[1] is None or user.inputs[2] is None:
        return False
    axes = user.inputs[3] if len(user.inputs) > 3 else None
    if axes is None:
        starts = user.inputs[1].shape
        return starts is not None and list(starts.dims) == [1]
    return axes.const_value is not None and [
        int(a) for a in np.asarray(axes.const_value.numpy()).ravel()
    ] in ([0], [-2])


def _row_slices(value: ir.Value, bits: int) -> list[ir.Node]:
    """The main-graph users of an int8 table that cut rows only (:func:`cuts_rows`). The same Slice of
    the int8 rows and of the row scales ``[V, 1]`` reads the same rows, so only those are dequantized
    (a DQ of MiniLM's 512 x 384 position table ran on every run)."""
    if bits != 8:
        return []
    return [
        user
        for user, _index in value.uses()
        if user.graph is value.graph and cuts_rows(user, value)
    ]


def _emit_lookup(model: Model, gather: ir.Node, q: ir.Value, scale: ir.Value) -> None:
    """``Gather(table)`` -> ``Gather(int8 table) -> Cast -> Mul(Gather(row scales [V, 1]))``: the same
    float32 values as a per-row DequantizeLinear of the whole table, for the rows read. A row
    ``Slice`` (:func:`_row_slices`) is done the same way, the same Slice of both."""
    out = gather.outputs[0]
    base = gather.name or gather.op_type
    b = model.builder(base)
    if gather.op_type == "Slice":
        cut = list(gather.inputs[1:])
        rows = b.op("Slice", [q, *cut], name=f"{base}_int8")
        scales = b.op("Slice", [scale, *cut], name=f"{base}_scale")
    else:
        ids = gather.inputs[1]
        assert ids is not None
        rows = b.op("Gather", [q, ids], {"axis": 0}, name=f"{base}_int8")
        scales = b.op("Gather", [scale, ids], {"axis": 0}, name=f"{base}_scale")
    rows_f = b.op("Cast", [rows], {"to": ir.DataType.FLOAT}, name=f"{base}_Cast")
    result = b.op("Mul", [rows_f, scales], name=f"{base}_dequantize")
    # NOTE: its scale rows are scales, not parameters (Model.parameter_count leaves them out)
    producer = result.producer()
    assert producer is not None
    producer.metadata_props["modelpress.role"] = "activation_scale"
    b.insert(before=gather)
    name = out.name
    out.replace_all_uses_with(result, replace_graph_outputs=True)
    model.graph.remove(gather, safe=True)
    result.name = name  # NOTE: the readers of the lookup keep the value name they had


def _emit(model: Model, value: ir.Value, table: _Table, bits: int, order: dict[int, int]) -> str:
    """The quantized table: its row lookups gather int8 rows (:func:`_row_lookups`); any other user reads it
    through a ``DequantizeLinear`` in front of it; the float table dropped."""
    import ml_dtypes  # noqa: F401  # NOTE: onnx-ir's int4 tensors need it

    graph = model.graph
    assert value.const_value is not None
    shape = tuple(int(d) for d in value.const_value.shape.numpy())
    base = value.name or "table"
    b = model.builder(base)
    if bits == 8:
        q_t, zero_t = ir.tensor(table.data.reshape(shape)), ir.tensor(table.zero)
    else:
        zero_shape = list(table.scale.shape)
        q_t = ir.PackedTensor(table.data, ir.DataType.UINT4, shape=list(shape))
        zero_t = ir.PackedTensor(table.zero, ir.DataType.UINT4, shape=zero_shape)
    q = b.initializer(q_t, f"{base}_q{bits}")
    lookups, slices = _row_lookups(value, bits), _row_slices(value, bits)
    if lookups or slices:
        rows_scale = b.initializer(table.scale.reshape(-1, 1), f"{base}_row_scale")
        for gather in lookups:
            _emit_lookup(model, gather, q, rows_scale)
        for cut in slices:
            _emit_lookup(model, cut, q, rows_scale)
    if list(value.uses()):
        scale, zero = (
            b.initializer(table.scale, f"{base}_scale"),
            b.initializer(zero_t, f"{base}_zero_point"),
        )
        _emit_dq(model, value, [q, scale, zero], table, order)
    if not list(value.uses()) and value.name in graph.initializers:
        graph.initializers.pop(value.name)
    return base


def _emit_dq(
    model: Model, value: ir.Value, inputs: list[ir.Value], table: _Table, order: dict[int, int]
) -> None:
    """``DequantizeLinear`` of the whole table in front of every remaining user of ``value``."""
    base = value.name or "table"
    shape = tuple(int(d) for d in inputs[0].shape or ())  # type: ignore[arg-type]
    out = model.builder(base).op(
        "DequantizeLinear",
        inputs,
        table.attrs,
        name=f"{base}_DequantizeLinear",
        out=Out(f"{base}_dequantized", ir.DataType.FLOAT, ir.Shape(shape)),
    )
    dq = out.producer()
    assert dq is not None
    first = min((u for u, _ in value.uses()), key=lambda n: order.get(id(n), 0))
    model.graph.insert_before(first, dq)
    for user, index in list(value.uses()):
        if user is not dq:
            user.replace_input_with(index, dq.outputs[0])


def quantize_tables(
    model: Model,
    *,
    bits: int,
    op_types: set[str],
    block_size: int = 32,
    min_elements: int = 1024,
    exclude: set[str] | None = None,
) -> TableReport:
    """Replace eligible embedding tables / Conv weights in ``model`` (in place) by int8/int4 + DQ, each
    quantized in chunks of rows (:func:`quantize_table`)."""
    report = TableReport()
    if model.opset < 13:
        report.skipped["*"] = f"opset {model.opset} < 13 has no per-axis DequantizeLinear"
        return report
    if bits == 4 and model.opset < 21:
        bits = 8  # NOTE: int4 DequantizeLinear needs opset 21; int8 still shrinks the table 4x
    order = {id(n): i for i, n in enumerate(model.graph)}
    for value, kind in _tables(
        model, op_types & {"Gather", "Conv"}, min_elements, exclude or set(), report
    ):
        tensor = value.const_value
        assert tensor is not None
        shape = tuple(int(d) for d in tensor.shape.numpy())
        table = quantize_table(_reader(tensor), shape, bits=bits, kind=kind, block=block_size)
        if isinstance(tensor, ir.ExternalTensor):
            tensor.release()
        report.errors.append(
            float(np.sqrt(table.squared_error) / max(np.sqrt(table.squared_norm), 1e-12))
        )
        report.done.append(_emit(model, value, table, bits, order))
        report.bytes_before += tensor.size * 4
        report.bytes_after += (
            table.data.nbytes + table.scale.nbytes + (table.zero.nbytes if bits == 4 else 0)
        )
    return report
