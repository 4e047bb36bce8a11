"""Weight-only quantization of embedding tables (``Gather`` or ``Slice`` on a constant table) and Conv weights.

ONNX Runtime has no integer kernel to use here for weight-only formats, so the weight is stored as
int8/int4 behind a ``DequantizeLinear`` (``DQ -> Gather``, ``DQ -> Conv``); ORT folds the DQ into a
float constant when it loads the model. The file shrinks ~4x (int8) or ~6-7x (int4); compute is
unchanged. Used by ``int4-weight-only`` / ``int8-weight-only`` and ``int8-dynamic`` so a transformer's
token/position tables and a CNN's convolutions are covered, not only its MatMul/Gemm.

* embedding table ``[V, D]`` (read by ``Gather``, or by ``Slice`` as a position table is): int8
  symmetric, one scale per row (``axis=0``); int4 asymmetric in blocks of ``block_size`` along ``D``
  (``axis=1``, opset 21);
* Conv weight ``[O, I, kH, kW]``: one scale per output channel (``axis=0``), int8 symmetric or
  int4 asymmetric (opset 21).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from modelpress.plugin_api import Model, Out

__all__ = ["TableReport", "quantize_tables"]


@dataclass
class TableReport:
    done: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    bytes_before: int = 0
    bytes_after: int = 0
    errors: list[float] = field(default_factory=list)


def _tables(model: Model, op_types: set[str], min_elements: int, exclude: set[str], report: TableReport) -> list[tuple[ir.Value, str]]:
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
        elif kind == "embedding" and (len(value.shape or ()) != 2 or (axis is not None and axis.as_int() != 0)):
            report.skipped[name] = f"{node.op_type} is not a row lookup in a 2-D table"
        elif value.const_value.size < min_elements:
            report.skipped[name] = f"fewer than {min_elements} elements"
        else:
            found.setdefault(id(value), (value, kind))
    return list(found.values())


def _int8_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int]]:
    flat = w.reshape(w.shape[0], -1)
    amax = np.abs(flat).max(axis=1).astype(np.float64)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    # NOTE: one float32 buffer, in place (a 30k x 384 vocabulary table took ~1 s in float64 copies)
    q = np.divide(flat, scale[:, None], dtype=np.float32)
    np.round(q, out=q)
    np.clip(q, -127, 127, out=q)
    return q.astype(np.int8).reshape(w.shape), scale, np.zeros(w.shape[0], np.int8), {"axis": 0}


def _uint4_blocks(w: np.ndarray, axis: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int]]:
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


def _relative_error(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, attrs: dict[str, int], w: np.ndarray, rows: int = 2048) -> float:
    """``||dequantized - w|| / ||w||``, ``rows`` rows at a time: no float64 copies of a whole table
    (a 30k x 384 vocabulary took ~300 MB of them). Scales and zero points are per row (axis 0) or per
    block of a row, so each slice of rows has its own."""
    err = ref = 0.0
    for r0 in range(0, w.shape[0], rows):
        part = slice(r0, r0 + rows)
        z = zero[part] if zero.ndim and zero.shape[0] == w.shape[0] else zero
        recon = _dequantized(q[part], scale[part], z, attrs, w[part].shape)
        err += float(np.sum((recon.astype(np.float64) - w[part]) ** 2))
        ref += float(np.sum(w[part].astype(np.float64) ** 2))
    return float(np.sqrt(err) / max(float(np.sqrt(ref)), 1e-12))


def _dequantized(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, attrs: dict[str, int], shape: tuple[int, ...]) -> np.ndarray:
    axis = attrs["axis"]
    if "block_size" in attrs:
        s = np.repeat(scale, attrs["block_size"], axis=1)[:, : shape[1]]
        z = np.repeat(zero.astype(np.float64), attrs["block_size"], axis=1)[:, : shape[1]]
    else:
        bshape = [1] * len(shape)
        bshape[axis] = -1
        s, z = scale.reshape(bshape), zero.astype(np.float64).reshape(bshape)
    return ((q.astype(np.float64) - z) * s).astype(np.float32)


def quantize_tables(model: Model, *, bits: int, op_types: set[str], block_size: int = 32, min_elements: int = 1024, exclude: set[str] | None = None) -> TableReport:
    """Replace eligible embedding tables / Conv weights in ``model`` (in place) by int8/int4 + DQ."""
    import ml_dtypes

    report = TableReport()
    if model.opset < 13:
        report.skipped["*"] = f"opset {model.opset} < 13 has no per-axis DequantizeLinear"
        return report
    if bits == 4 and model.opset < 21:
        bits = 8  # NOTE: int4 DequantizeLinear needs opset 21; int8 still shrinks the table 4x
    graph = model.graph
    order = {id(n): i for i, n in enumerate(graph)}
    for value, kind in _tables(model, op_types & {"Gather", "Conv"}, min_elements, exclude or set(), report):
        assert value.const_value is not None
        w = np.asarray(value.const_value.numpy(), dtype=np.float32)
        if bits == 8:
            q, scale, zero, attrs = _int8_rows(w)
        else:
            q, scale, zero, attrs = _uint4_blocks(w, 1 if kind == "embedding" else 0, block_size)
        report.errors.append(_relative_error(q, scale, zero, attrs, w))
        base = value.name or kind
        b = model.builder(base)
        q_t, zero_t = ((ir.tensor(a.astype(np.int8)) if bits == 8 else ir.tensor(a.astype(ml_dtypes.uint4), dtype=ir.DataType.UINT4)) for a in (q, zero))
        inputs = [b.initializer(q_t, f"{base}_q{bits}"), b.initializer(scale, f"{base}_scale"), b.initializer(zero_t, f"{base}_zero_point")]
        out = b.op("DequantizeLinear", inputs, attrs, name=f"{base}_DequantizeLinear",
                   out=Out(f"{base}_dequantized", ir.DataType.FLOAT, ir.Shape(w.shape)))
        dq = out.producer()
        assert dq is not None
        first = min((u for u, _ in value.uses()), key=lambda n: order.get(id(n), 0))
        graph.insert_before(first, dq)
        for user, index in list(value.uses()):
            if user is not dq:
                user.replace_input_with(index, dq.outputs[0])
        if not list(value.uses()) and value.name in graph.initializers:
            graph.initializers.pop(value.name)
        report.done.append(base)
        report.bytes_before += w.nbytes
        report.bytes_after += q.size * bits // 8 + scale.nbytes + (zero.size * bits // 8 if bits == 4 else 0)
    return report
