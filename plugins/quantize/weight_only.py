"""``int4-weight-only`` / ``int8-weight-only``: block-wise weight quantization of MatMul/Gemm.

A weight ``W[K, N]`` is cut into blocks of ``block_size`` rows along ``K``; each block of each
column gets its own scale (and zero point when asymmetric). Activations stay float. Emitted as

* ``format="qdq"`` (default): ``DequantizeLinear`` with a blocked int4/int8 weight (opset 21;
  the model's opset is raised with ONNX's version converter when lower). ONNX Runtime fuses it
  into its ``MatMulNBits`` kernel;
* ``format="matmulnbits"``: ORT's ``com.microsoft::MatMulNBits`` directly (int4 only).

Algorithms: ``rtn`` (round to nearest), ``mse`` (per-block search of the clipping range that
minimises the squared weight error, no data needed) and ``gptq`` (second-order error
compensation from calibration activations, Frantar et al.).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx
import onnx_ir as ir
from pydantic import Field

from modelpress.data import load_dataset
from modelpress.errors import DataError, OptionsError
from modelpress.layers import WeightedLayer
from modelpress.methods import Options, PassContext
from modelpress.model import Model
from modelpress.plugins.quantize.affine import QRange
from modelpress.plugins.quantize.embeddings import quantize_tables
from modelpress.runtime import make_session, with_outputs

__all__ = ["WeightOnlyOptions", "weight_only"]


class WeightOnlyOptions(Options):
    bits: Literal[4, 8] = Field(4, description="weight bits")
    block_size: Literal[16, 32, 64, 128, 256] = Field(128, description="rows of K sharing one scale (ORT's default, 128)")
    symmetric: bool = Field(False, description="symmetric blocks (zero point 0) instead of asymmetric")
    algorithm: Literal["rtn", "mse", "gptq"] = Field("rtn", description="rtn: round to nearest; mse: per-block clipping search (no data); gptq: error compensation with calibration data")
    format: Literal["qdq", "matmulnbits"] = Field("qdq", description="DequantizeLinear (opset 21) or ORT's MatMulNBits contrib op")
    accuracy_level: int = Field(0, ge=0, le=4, description="MatMulNBits accuracy_level (0: fp32 compute; 4: int8 activations)")
    op_types: list[str] = Field(default_factory=lambda: ["MatMul", "Gemm", "Conv", "Gather"], description="op types to quantize (Conv weights and Gather embedding tables: DQ in front, see embeddings.py)")
    exclude: list[str] = Field(default_factory=list, description="node names to keep in float")
    min_elements: int = Field(1024, ge=1, description="skip weights smaller than this")
    damp: float = Field(0.01, gt=0, description="GPTQ: dampening added to the Hessian diagonal (fraction of its mean)")
    max_samples: int = Field(256, ge=1, description="GPTQ: calibration samples used")


def _grid(opts: WeightOnlyOptions) -> QRange:
    return QRange(opts.bits, signed=opts.symmetric, restricted=opts.symmetric)


def _block_params(block: np.ndarray, grid: QRange, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point per column of ``block[rows, N]``."""
    if symmetric:
        absmax = np.abs(block).max(axis=0)
        scale = np.where(absmax > 0, absmax / grid.qmax, 1.0)
        return scale.astype(np.float32), np.zeros_like(scale)
    lo, hi = np.minimum(block.min(axis=0), 0), np.maximum(block.max(axis=0), 0)
    scale = np.where(hi > lo, (hi - lo) / (grid.qmax - grid.qmin), 1.0)
    zero = np.clip(np.round(grid.qmin - lo / scale), grid.qmin, grid.qmax)
    return scale.astype(np.float32), zero


def _rtn(w: np.ndarray, opts: WeightOnlyOptions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round to nearest: q[K, N], scales[nb, N], zeros[nb, N]."""
    grid = _grid(opts)
    k, n = w.shape
    nb = -(-k // opts.block_size)
    q = np.zeros((k, n), np.int32)
    scales = np.zeros((nb, n), np.float32)
    zeros = np.zeros((nb, n), np.float64)
    for b in range(nb):
        rows = slice(b * opts.block_size, min(k, (b + 1) * opts.block_size))
        s, z = _block_params(w[rows], grid, opts.symmetric)
        q[rows] = np.clip(np.round(w[rows] / s) + z, grid.qmin, grid.qmax)
        scales[b], zeros[b] = s, z
    return q, scales, zeros


def _mse(w: np.ndarray, opts: WeightOnlyOptions, candidates: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round to nearest with each block's range shrunk to the factor (0.5..1) that minimises the
    block's squared reconstruction error: outliers get clipped when that helps the rest. No data."""
    grid = _grid(opts)
    k, n = w.shape
    bs = opts.block_size
    nb = -(-k // bs)
    q = np.zeros((k, n), np.int32)
    scales = np.zeros((nb, n), np.float32)
    zeros = np.zeros((nb, n), np.float64)
    for b in range(nb):
        rows = slice(b * bs, min(k, (b + 1) * bs))
        block = w[rows].astype(np.float64)
        best_err = np.full(n, np.inf)
        for factor in np.linspace(1.0, 0.5, candidates):
            s, z = _block_params(block * factor, grid, opts.symmetric)
            s = s.astype(np.float64)
            qb = np.clip(np.round(block / s + z), grid.qmin, grid.qmax)
            err = (((qb - z) * s - block) ** 2).sum(axis=0)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            scales[b] = np.where(better, s, scales[b])
            zeros[b] = np.where(better, z, zeros[b])
            q[rows] = np.where(better[None, :], qb, q[rows])
    return q, scales, zeros


def _gptq(w: np.ndarray, hessian: np.ndarray, opts: WeightOnlyOptions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ (Frantar et al.): quantize rows of W[K, N] in order, pushing each row's error onto
    the rows not yet quantized through the inverse Hessian of the layer's inputs."""
    grid = _grid(opts)
    k, n = w.shape
    h = hessian.astype(np.float64).copy()
    work = w.astype(np.float64).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    work[dead, :] = 0.0
    h[np.diag_indices(k)] += opts.damp * float(np.mean(np.diag(h)))
    try:
        hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper triangular
    except np.linalg.LinAlgError:
        return _rtn(w, opts)
    bs = opts.block_size
    nb = -(-k // bs)
    q = np.zeros((k, n), np.int32)
    scales = np.zeros((nb, n), np.float32)
    zeros = np.zeros((nb, n), np.float64)
    for i in range(k):
        if i % bs == 0:
            b = i // bs
            s, z = _block_params(work[i : min(k, i + bs)], grid, opts.symmetric)
            scales[b], zeros[b] = s, z
        b = i // bs
        row = work[i]
        qi = np.clip(np.round(row / scales[b] + zeros[b]), grid.qmin, grid.qmax)
        q[i] = qi
        error = (row - (qi - zeros[b]) * scales[b]) / hinv[i, i]
        work[i + 1 :] -= np.outer(hinv[i, i + 1 :], error)
    return q, scales, zeros


def _hessians(model: Model, layers: list[WeightedLayer], ctx: PassContext, opts: WeightOnlyOptions) -> dict[str, np.ndarray]:
    if ctx.calibration is None:
        raise DataError("int4-weight-only with algorithm='gptq' needs calibration data (calibration=..., --calib data.npz)")
    data = load_dataset(ctx.calibration, model.signature, what="calibration").take(opts.max_samples)
    names = [layer.node.inputs[0].name or "" for layer in layers]
    session = make_session(with_outputs(model, names))
    outputs = [o.name for o in session.get_outputs()]
    hessians: dict[str, np.ndarray] = {}
    batches = list(data.batches(64))
    with ctx.progress("GPTQ statistics", total=len(batches)) as advance:
        for feeds in batches:
            results = session.run(None, feeds)
            for name in names:
                x = np.asarray(results[outputs.index(name)], np.float64)
                x = x.reshape(-1, x.shape[-1])
                hessians[name] = hessians.get(name, 0) + 2.0 * x.T @ x / max(len(x), 1)
            advance(1)
    return hessians


def _pack_uint4(values: np.ndarray) -> np.ndarray:
    """Pack unsigned 4-bit values (last axis even) two per byte, low nibble first."""
    v = values.astype(np.uint8)
    return (v[..., 0::2] & 0x0F) | ((v[..., 1::2] & 0x0F) << 4)


def _emit_qdq(model: Model, layer: WeightedLayer, q: np.ndarray, scales: np.ndarray, zeros: np.ndarray, opts: WeightOnlyOptions) -> ir.Value:
    import ml_dtypes

    base = layer.weight.name or layer.name
    if opts.bits == 4:
        qtype = ml_dtypes.int4 if opts.symmetric else ml_dtypes.uint4
        dtype = ir.DataType.INT4 if opts.symmetric else ir.DataType.UINT4
    else:
        qtype = np.int8 if opts.symmetric else np.uint8
        dtype = ir.DataType.INT8 if opts.symmetric else ir.DataType.UINT8
    wq = model.add_initializer(f"{base}_q{opts.bits}", q.astype(qtype))
    wq.const_value = ir.tensor(q.astype(qtype), dtype=dtype, name=wq.name)
    wq.dtype = dtype
    ws = model.add_initializer(f"{base}_scale", scales)
    inputs = [wq, ws]
    if not opts.symmetric:
        wz = model.add_initializer(f"{base}_zero_point", zeros.astype(qtype))
        wz.const_value = ir.tensor(zeros.astype(qtype), dtype=dtype, name=wz.name)
        wz.dtype = dtype
        inputs.append(wz)
    dq = ir.node("DequantizeLinear", inputs, {"axis": 0, "block_size": opts.block_size}, name=f"{base}_DequantizeLinear")
    dq.outputs[0].name = f"{base}_dequantized"
    dq.outputs[0].dtype = ir.DataType.FLOAT
    dq.outputs[0].shape = ir.Shape(q.shape)
    model.graph.insert_before(layer.node, dq)
    return dq.outputs[0]


def _emit_matmulnbits(model: Model, layer: WeightedLayer, q: np.ndarray, scales: np.ndarray, zeros: np.ndarray, opts: WeightOnlyOptions) -> ir.Node:
    k, n = q.shape
    bs = opts.block_size
    nb = scales.shape[0]
    unsigned = q + 8 if opts.symmetric else q  # MatMulNBits stores unsigned values (default zero point 8)
    padded = np.pad(unsigned, ((0, nb * bs - k), (0, 0)))
    blob = _pack_uint4(padded.T.reshape(n, nb, bs))  # [N, nb, bs/2]
    base = layer.weight.name or layer.name
    inputs = [
        layer.node.inputs[0],
        model.add_initializer(f"{base}_nbits", blob),
        model.add_initializer(f"{base}_scale", np.ascontiguousarray(scales.T).reshape(-1)),
    ]
    if not opts.symmetric:
        zp = zeros.T.astype(np.uint8)  # [N, nb]
        if nb % 2:
            zp = np.pad(zp, ((0, 0), (0, 1)))
        inputs.append(model.add_initializer(f"{base}_zero_point", _pack_uint4(zp).reshape(-1)))
    node = ir.node(
        "MatMulNBits", inputs,
        {"K": k, "N": n, "bits": 4, "block_size": bs, "accuracy_level": opts.accuracy_level},
        domain="com.microsoft", name=f"{layer.name}_MatMulNBits",
    )
    node.outputs[0].dtype = ir.DataType.FLOAT
    return node


def weight_only(model: Model, opts: WeightOnlyOptions, ctx: PassContext) -> Model:
    if opts.format == "matmulnbits" and opts.bits != 4:
        raise OptionsError("format='matmulnbits' needs bits=4")
    result = model.clone()
    if opts.format == "qdq" and result.opset < 21:
        upgraded = onnx.version_converter.convert_version(result.to_proto(), 21)
        result = Model(ir.serde.deserialize_model(upgraded), provenance=model.provenance, path=model.path, reference=model.reference or model)
    layers: list[WeightedLayer] = []
    skipped: dict[str, str] = {}
    for layer in result.weighted_layers(frozenset(opts.op_types) & {"MatMul", "Gemm"}):
        w = layer.weight.const_value
        assert w is not None
        attrs = {k: a.value for k, a in layer.node.attributes.items()}
        if layer.name in opts.exclude:
            skipped[layer.name] = "excluded by option"
        elif len(w.shape) != 2 or w.dtype != ir.DataType.FLOAT:
            skipped[layer.name] = "weight is not a float32 matrix"
        elif w.size < opts.min_elements:
            skipped[layer.name] = f"fewer than {opts.min_elements} elements"
        elif attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            skipped[layer.name] = "Gemm with transA/alpha/beta"
        else:
            layers.append(layer)
    tables = quantize_tables(result, bits=opts.bits, op_types=set(opts.op_types), block_size=min(opts.block_size, 32),
                             min_elements=opts.min_elements, exclude=set(opts.exclude))
    if not layers and not tables.done:
        raise OptionsError(f"{opts.bits}-bit weight-only: nothing to quantize in {model.name!r} ({skipped or 'no MatMul/Gemm/Conv/Gather with a constant weight'})")
    hessians = _hessians(model, layers, ctx, opts) if opts.algorithm == "gptq" and layers else {}

    before = after = 0
    errors: list[float] = []
    with ctx.progress(f"int{opts.bits} weight-only", total=len(layers)) as advance:
        for layer in layers:
            w = layer.weight_array().astype(np.float32)
            matrix = w.T if layer.out_axis == 0 else w  # [K, N]
            if opts.algorithm == "gptq":
                q, scales, zeros = _gptq(matrix, hessians[layer.node.inputs[0].name or ""], opts)
            elif opts.algorithm == "mse":
                q, scales, zeros = _mse(matrix, opts)
            else:
                q, scales, zeros = _rtn(matrix, opts)
            recon = (q - np.repeat(zeros, opts.block_size, axis=0)[: len(q)]) * np.repeat(scales, opts.block_size, axis=0)[: len(q)]
            errors.append(float(np.linalg.norm(recon - matrix)) / max(float(np.linalg.norm(matrix)), 1e-12))
            node = layer.node
            before += matrix.nbytes
            after += q.size * opts.bits // 8 + scales.nbytes + (0 if opts.symmetric else zeros.size * opts.bits // 8)
            bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
            if opts.format == "matmulnbits":
                new = _emit_matmulnbits(result, layer, q, scales, zeros, opts)
                replacement = [new]
            else:
                weight = _emit_qdq(result, layer, q, scales, zeros, opts)
                new = ir.node("MatMul", [node.inputs[0], weight], name=f"{layer.name}_MatMul")
                new.outputs[0].dtype = ir.DataType.FLOAT
                replacement = [new]
            out = new.outputs[0]
            if bias is not None:
                add = ir.node("Add", [out, bias], name=f"{layer.name}_bias_Add")
                add.outputs[0].dtype = ir.DataType.FLOAT
                replacement.append(add)
                out = add.outputs[0]
            result.replace_node(node, replacement, out)
            advance(1)
    if opts.format == "matmulnbits" and "com.microsoft" not in result.ir.opset_imports:
        result.ir.opset_imports["com.microsoft"] = 1
    before, after, errors = before + tables.bytes_before, after + tables.bytes_after, errors + tables.errors
    ctx.figures.update({
        "quantized_nodes": len(layers), "float_nodes": skipped, "weight_bytes_before": before, "weight_bytes_after": after,
        "weight_compression": round(before / max(after, 1), 3), "mean_relative_weight_error": round(float(np.mean(errors)), 6),
        "tables_quantized": len(tables.done),
    })
    return result
