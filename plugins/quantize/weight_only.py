"""``int4-weight-only`` / ``int8-weight-only``: block-wise weight quantization of MatMul/Gemm.

A weight ``W[K, N]`` is cut into blocks of ``block_size`` rows along ``K``; each block of each
column gets its own scale (and zero point when asymmetric). Activations stay float. Emitted as

* ``format="qdq"``: ``DequantizeLinear`` with a blocked int4/int8 weight (opset 21; the model's
  opset is raised with ONNX's version converter when lower). ONNX Runtime fuses it into its
  ``MatMulNBits`` kernel where its ``DQMatMulToMatMulNBits`` rule allows;
* ``format="matmulnbits"``: ORT's ``com.microsoft::MatMulNBits`` directly (int4 only);
* ``format="auto"`` (default): per weight, QDQ where ORT fuses it and ``MatMulNBits`` where it
  would not (:func:`_unfused`), so no weight is dequantized on every run.

Algorithms: ``rtn`` (round to nearest), ``mse`` (per-block search of the clipping range that
minimises the squared weight error, no data needed) and ``gptq`` (second-order error
compensation from calibration activations, Frantar et al.) and ``awq`` (activation-aware
per-input-channel scaling searched on calibration data, then round to nearest: :mod:`.awq`;
``awq-gptq``: the same scaling, then GPTQ). ``auto`` (default): ``gptq`` for int4 when
calibration data is given, ``rtn`` otherwise (:func:`_algorithm`); an unset ``block_size`` is 32 for
a data-aware algorithm and ORT's 128 otherwise (:func:`_block_size`). The ``MatMulNBits`` written
here run at ``accuracy_level`` 4 by default, as ORT runs the QDQ weights it fuses.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_ir as ir
from pydantic import Field

from modelpress.plugin_api import (
    DataError,
    Model,
    Options,
    OptionsError,
    Out,
    PassContext,
    WeightedLayer,
    ensure_opset,
    load_dataset,
    make_session,
    recurrent_refusals,
    with_outputs,
)
from modelpress.plugin_api import (
    run as run_session,
)
from modelpress.plugins.quantize.affine import QRange
from modelpress.plugins.quantize.awq import awq_scale
from modelpress.plugins.quantize.embeddings import quantize_tables
from modelpress.plugins.quantize.emit import replace_matmul
from modelpress.plugins.quantize.scaling import scale_groups
from modelpress.plugins.quantize.streaming import FileRows
from modelpress.plugins.quantize.table_kernels import use_table_kernels
from modelpress.plugins.quantize.tied import share_tied_lookups, tied_heads, tied_lookups

__all__ = ["WeightOnlyOptions", "weight_only"]


class WeightOnlyOptions(Options):
    bits: Literal[4, 8] = Field(4, description="weight bits")
    block_size: Literal[16, 32, 64, 128, 256] | None = Field(
        None,
        description="rows of K sharing one scale: 16, 32, 64, 128 or 256; unset: 32 when the algorithm reads "
        "calibration data (gptq, awq, awq-gptq; the onnxruntime-genai builder's block: all-MiniLM-L6-v2 embedding "
        "cosine 0.988 at 0.162x the size, 0.980 at block 128), else 128 (ONNX Runtime's MatMulNBitsQuantizer "
        "default: the same bytes as its file)",
    )
    symmetric: bool = Field(
        False, description="symmetric blocks (zero point 0) instead of asymmetric"
    )

    @property
    def block(self) -> int:
        """``block_size`` once :func:`_block_size` has resolved it (before any weight is cut)."""
        if self.block_size is None:
            raise AssertionError("int4-weight-only: block_size is resolved before weights are cut")
        return self.block_size

    algorithm: Literal["auto", "rtn", "mse", "gptq", "awq", "awq-gptq"] = Field(
        "auto",
        description="auto: gptq for int4 when calibration data is given, rtn otherwise; rtn: round to nearest; mse: "
        "per-block clipping search (no data); gptq: error compensation with calibration data; awq: "
        "activation-aware per-channel scaling searched on calibration data, then round to nearest; awq-gptq: "
        "AWQ scaling, then GPTQ",
    )
    format: Literal["auto", "qdq", "matmulnbits"] = Field(
        "auto",
        description="auto: per weight, DequantizeLinear where ONNX Runtime fuses it into MatMulNBits, MatMulNBits where "
        "it would not (a weight shared by several MatMuls, or inside control flow); qdq: DequantizeLinear "
        "(opset 21); matmulnbits: ORT's MatMulNBits contrib op (int4)",
    )
    accuracy_level: int | None = Field(
        None,
        ge=0,
        le=4,
        description="accuracy_level of the MatMulNBits this pass writes (0: fp32 compute; 4: int8 activations); "
        "unset: 4 for weights, as ONNX Runtime runs the QDQ weights it fuses (so every int4 MatMul runs the same "
        "kernel, faster than fp32 on CPU), 0 for a tied LM head (its QDQ form computes in float)",
    )
    op_types: list[str] = Field(
        default_factory=lambda: ["MatMul", "Gemm", "Conv", "Gather"],
        description="op types to quantize (Conv weights and Gather embedding tables: DQ in front, see embeddings.py)",
    )
    tables: Literal["quantize", "float"] = Field(
        "quantize",
        description="embedding / LM-head tables: quantize: lookup tables (Gather/Slice) are quantized too, and a "
        "tied LM head shares the table's int4 codes (as onnxruntime-genai's builder does with a tied table); "
        "float: tables stay float32 and only MatMul/Gemm weights are quantized, a tied LM head as its own "
        "weight (as optimum + ONNX Runtime's MatMulNBitsQuantizer do: the same bits as theirs)",
    )
    exclude: list[str] = Field(default_factory=list, description="node names to keep in float")
    min_elements: int = Field(1024, ge=1, description="skip weights smaller than this")
    damp: float = Field(
        0.01,
        gt=0,
        description="GPTQ: dampening added to the Hessian diagonal (fraction of its mean)",
    )
    max_samples: int = Field(256, ge=1, description="GPTQ/AWQ: calibration samples used")
    act_order: bool = Field(
        False,
        description="GPTQ: quantize the rows of each weight in order of decreasing Hessian diagonal (act-order, "
        "with the reference's static groups: block scales fixed from the float weights, so blocks stay "
        "contiguous). all-MiniLM-L6-v2 embedding cosine 0.990 against 0.988 in file order at block 32, but the "
        "tests' tiny Llama loses greedy tokens with it: off by default",
    )
    awq_grid: int = Field(
        20,
        ge=1,
        le=100,
        description="AWQ: points of the alpha grid searched in (0, 1] per group of layers sharing an input",
    )


def _grid(opts: WeightOnlyOptions) -> QRange:
    return QRange(opts.bits, signed=opts.symmetric, restricted=opts.symmetric)


def _blocked(k: int, n: int, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Empty results for ``W[k, n]`` quantized in blocks of ``block_size`` rows: the integers, and a
    scale and zero point per block and column."""
    nb = -(-k // block_size)
    return np.zeros((k, n), np.int32), np.zeros((nb, n), np.float32), np.zeros((nb, n), np.float64)


def _block_params(
    block: np.ndarray, grid: QRange, symmetric: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point per column of ``block[rows, N]``."""
    if symmetric:
        absmax = np.abs(block).max(axis=0)
        scale = np.where(absmax > 0, absmax / grid.qmax, 1.0)
        return scale.astype(np.float32), np.zeros_like(scale)
    lo, hi = np.minimum(block.min(axis=0), 0), np.maximum(block.max(axis=0), 0)
    scale = np.where(hi > lo, (hi - lo) / (grid.qmax - grid.qmin), 1.0)
    zero = np.clip(np.round(grid.qmin - lo / scale), grid.qmin, grid.qmax)
    return scale.astype(np.float32), zero


def _mse(
    w: np.ndarray, opts: WeightOnlyOptions, candidates: int = 20
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round to nearest with each block's range shrunk to the factor (0.5..1) that minimises the
    block's squared reconstruction error: outliers get clipped when that helps the rest. No data."""
    grid = _grid(opts)
    k, n = w.shape
    bs = opts.block
    q, scales, zeros = _blocked(k, n, bs)
    for b in range(len(scales)):
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
    return _unsigned(q, scales, zeros, opts)


def _inverse_factor(hessian: np.ndarray, work: np.ndarray, damp: float) -> np.ndarray | None:
    """The upper Cholesky factor of the damped inverse Hessian, in float32 as the reference computes it
    (rows of ``work`` whose input never fires are zeroed); None when the Hessian is not positive definite."""
    k = len(hessian)
    h = np.array(hessian, np.float32)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    work[dead, :] = 0.0
    h[np.diag_indices(k)] += np.float32(damp * float(np.mean(np.diag(h))))
    try:
        lower = np.linalg.cholesky(h)
        inverse = np.linalg.inv(lower)  # NOTE: H^-1 = L^-T L^-1, then its own Cholesky factor
        del lower, h
        return np.linalg.cholesky(inverse.T @ inverse).T.astype(np.float32)  # upper triangular
    except np.linalg.LinAlgError:
        return None


def _gptq(
    w: np.ndarray, hessian: np.ndarray, opts: WeightOnlyOptions
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ (Frantar et al.): quantize rows of W[K, N] in order, pushing each row's error onto
    the rows not yet quantized through the inverse Hessian of the layer's inputs. As the reference
    (IST-DASLab/gptq ``fasterquant``): float32, and lazy batch updates, one quantization block at a
    time (the rows after the block get its accumulated error in one matrix product). With
    ``opts.act_order`` the rows go in order of decreasing Hessian diagonal (the inputs that carry
    the most energy first), each on its own block's grid, which is fixed beforehand from the float
    weights (the reference's ``static_groups``), so the blocks stay contiguous in the file."""
    grid = _grid(opts)
    k, n = w.shape
    bs = opts.block
    q, scales, zeros = _blocked(k, n, bs)
    order = np.arange(k)
    if opts.act_order:
        for b, i0 in enumerate(range(0, k, bs)):
            scales[b], zeros[b] = _block_params(
                np.asarray(w[i0 : i0 + bs], np.float32), grid, opts.symmetric
            )
        order = np.argsort(-np.diag(hessian), kind="stable")
        hessian = hessian[np.ix_(order, order)]
    work = np.array(w[order], np.float32)
    hinv = _inverse_factor(hessian, work, opts.damp)
    if hinv is None:
        return _rtn(np.asarray(w, np.float32), opts)
    for i0 in range(0, k, bs):
        i1 = min(k, i0 + bs)
        block = work[i0:i1]  # NOTE: a view: updated in place
        if not opts.act_order:
            scales[i0 // bs], zeros[i0 // bs] = _block_params(block, grid, opts.symmetric)
        errors = np.zeros_like(block)
        for j in range(i1 - i0):
            row = order[i0 + j]
            s, z = scales[row // bs], zeros[row // bs]
            qi = np.clip(np.round(block[j] / s + z), grid.qmin, grid.qmax)
            q[row] = qi
            errors[j] = (block[j] - ((qi - z) * s).astype(np.float32)) / hinv[i0 + j, i0 + j]
            block[j + 1 :] -= np.outer(hinv[i0 + j, i0 + j + 1 : i1], errors[j])
        work[i1:] -= hinv[i0:i1, i1:].T @ errors
    return _unsigned(q, scales, zeros, opts)


def _unsigned(
    q: np.ndarray, scales: np.ndarray, zeros: np.ndarray, opts: WeightOnlyOptions
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes (int32) on the unsigned grid [0, 2^bits) with their zero points (a symmetric grid is shifted by
    2^(bits-1), as MatMulNBits stores it): ``(codes - zeros) * scales`` is the dequantized weight."""
    if opts.symmetric:
        mid = 2 ** (opts.bits - 1)
        return (q + mid).astype(np.int32), scales, np.full(scales.shape, mid, np.int32)
    return q.astype(np.int32), scales, zeros.astype(np.int32)


def _round_clip(x: np.ndarray, levels: np.float32) -> np.ndarray:
    """``clip(roundf(x), 0, levels)`` in float32, with C's ``roundf`` (halves away from zero), which
    ONNX Runtime's block quantizer uses: clipping first changes nothing, and on [0, levels] roundf is
    round-half-even plus one where ``x`` sat exactly on a half. ``x`` is overwritten."""
    np.clip(x, 0, levels, out=x)
    rounded = np.rint(x)
    x -= rounded
    rounded += x == np.float32(0.5)
    return rounded


def _rtn_blocks(
    blocks: np.ndarray, bits: int, symmetric: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round to nearest on float32 ``blocks[nb, block, N]``, with exactly ONNX Runtime's arithmetic
    (``MatMulNBitsQuantizer`` / ``quantize_matmul_4bits``) so the logits match it bit for bit:
    asymmetric: scale = (max - min) / (2^b - 1) with the range widened to 0, zero point rounded;
    symmetric: scale = (the value of largest magnitude) / -2^(b-1), zero point 2^(b-1).
    Returns codes uint8 [nb, block, N], scales float32 [nb, N], zero points uint8 [nb, N]."""
    levels = np.float32(2**bits - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        if symmetric:
            mid = np.float32(2 ** (bits - 1))
            index = np.abs(blocks).argmax(axis=1)[:, None, :]
            scale = np.take_along_axis(blocks, index, axis=1)[:, 0, :] / -mid
            recip = np.where(scale != 0, np.float32(1) / scale, np.float32(0)).astype(np.float32)
            codes = blocks * recip[:, None, :]
            codes += mid + np.float32(0.5)
            np.clip(codes, 0, levels, out=codes)
            np.trunc(codes, out=codes)
            zero = np.full(scale.shape, int(mid), np.uint8)
        else:
            lo = np.minimum(blocks.min(axis=1), np.float32(0))
            hi = np.maximum(blocks.max(axis=1), np.float32(0))
            scale = (hi - lo) / levels
            recip = np.where(scale != 0, np.float32(1) / scale, np.float32(0)).astype(np.float32)
            zf = _round_clip(
                np.where(scale != 0, np.float32(0) - lo / scale, lo).astype(np.float32), levels
            )
            scaled = blocks * recip[:, None, :]
            scaled += zf[:, None, :]
            codes = _round_clip(scaled, levels)
            zero = zf.astype(np.uint8)
    return codes.astype(np.uint8), scale.astype(np.float32), zero


def _block_rows(n: int, block: int) -> int:
    """Blocks per chunk: about 1 M weights, so the temporaries of one chunk stay around 30 MB."""
    return max(1, (1 << 20) // max(n * block, 1))


_Chunk = tuple[int, np.ndarray, np.ndarray, np.ndarray, float, float]


def _rtn_chunks(matrix: np.ndarray, opts: WeightOnlyOptions) -> Iterator[_Chunk]:
    """Yield ``(first block, codes[nbc * block, N], scales[nbc, N], zeros[nbc, N], squared error,
    squared norm)`` chunk by chunk, reading ``matrix[K, N]`` (a memory map) a few blocks of rows at a time."""
    k, n = matrix.shape
    bs = opts.block
    nb = -(-k // bs)
    step = _block_rows(n, bs)
    for b0 in range(0, nb, step):
        b1 = min(nb, b0 + step)
        r0, r1 = b0 * bs, min(k, b1 * bs)
        chunk = np.zeros(
            ((b1 - b0) * bs, n), np.float32
        )  # NOTE: zero rows never widen a block's range
        chunk[: r1 - r0] = matrix[r0:r1]
        blocks = chunk.reshape(b1 - b0, bs, n)
        codes, scales, zeros = _rtn_blocks(blocks, opts.bits, opts.symmetric)
        diff = (
            (codes.astype(np.float32) - zeros[:, None, :]) * scales[:, None, :] - blocks
        ).ravel()
        flat = chunk.ravel()
        yield (
            b0,
            codes.reshape(-1, n),
            scales,
            zeros,
            float(np.dot(diff, diff)),
            float(np.dot(flat, flat)),
        )


def _rtn(w: np.ndarray, opts: WeightOnlyOptions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round to nearest on ``w[K, N]``: codes [K, N] and zero points [nb, N] (int32), scales [nb, N]."""
    k = w.shape[0]
    parts = list(_rtn_chunks(w, opts))
    codes = np.concatenate([p[1] for p in parts])[:k]
    return (
        codes.astype(np.int32),
        np.concatenate([p[2] for p in parts]),
        np.concatenate([p[3] for p in parts]).astype(np.int32),
    )


def _fake_quantize(w: np.ndarray, opts: WeightOnlyOptions) -> np.ndarray:
    """``w[K, N]`` rounded to nearest on the block grid and dequantized (AWQ's search)."""
    codes, scales, zeros = _rtn(w, opts)
    bs = opts.block
    return (
        (codes - np.repeat(zeros, bs, axis=0)[: len(codes)])
        * np.repeat(scales, bs, axis=0)[: len(codes)]
    ).astype(np.float32)


def _pack_uint4(values: np.ndarray) -> np.ndarray:
    """Pack 4-bit values (last axis even) two per byte, low nibble first."""
    v = values.astype(np.uint8)
    return (v[..., 0::2] & 0x0F) | ((v[..., 1::2] & 0x0F) << 4)


def _pack_flat(codes: np.ndarray) -> np.ndarray:
    flat = codes.reshape(-1)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return _pack_uint4(flat)


@dataclass
class _Quantized:
    """One weight, quantized and already packed the way it is stored."""

    k: int
    n: int
    data: np.ndarray  # qdq: flat packed int4 / [K, N] int8; matmulnbits: [N, nb, block / 2]
    scales: np.ndarray  # [nb, N]
    zeros: np.ndarray  # [nb, N], unsigned codes
    squared_error: float
    squared_norm: float


def _stored(codes: np.ndarray, opts: WeightOnlyOptions) -> np.ndarray:
    """Unsigned codes as the QDQ initializer stores them: signed when symmetric (code - 2^(b-1))."""
    if opts.symmetric:
        codes = codes ^ np.uint8(
            2 ** (opts.bits - 1)
        )  # NOTE: two's complement of code - mid in b bits
        return codes if opts.bits == 4 else codes.view(np.int8)
    return codes


def _pack_layer(
    matrix: np.ndarray, chunks: Iterator[_Chunk], opts: WeightOnlyOptions
) -> _Quantized:
    """Consume ``chunks`` of codes, packing each at once (int4 two per byte) into one contiguous blob."""
    k, n = matrix.shape
    bs = opts.block
    nb = -(-k // bs)
    nbits = opts.format == "matmulnbits"
    if nbits:
        data = np.zeros((n, nb, bs // 2), np.uint8)
    elif opts.bits == 4:
        data = np.zeros(-(-(k * n) // 2), np.uint8)
    else:
        data = np.zeros((k, n), np.uint8 if not opts.symmetric else np.int8)
    scales = np.zeros((nb, n), np.float32)
    zeros = np.zeros((nb, n), np.uint8)
    err = norm = 0.0
    for b0, raw_codes, s, raw_zeros, chunk_err, chunk_norm in chunks:
        codes, z = raw_codes.astype(np.uint8, copy=False), raw_zeros.astype(np.uint8, copy=False)
        nbc = len(s)
        r0, r1 = b0 * bs, min(k, (b0 + nbc) * bs)
        rows = r1 - r0
        scales[b0 : b0 + nbc], zeros[b0 : b0 + nbc] = s, z
        if nbits:
            padded = np.zeros((nbc * bs, n), np.uint8)
            padded[:rows] = codes[:rows]
            data[:, b0 : b0 + nbc] = _pack_uint4(padded.T.reshape(n, nbc, bs))
        elif opts.bits == 4:
            packed = _pack_flat(_stored(codes[:rows], opts))
            data[r0 * n // 2 : r0 * n // 2 + len(packed)] = (
                packed  # NOTE: r0 is a multiple of the (even) block
            )
        else:
            data[r0:r1] = _stored(codes[:rows], opts)
        err, norm = err + chunk_err, norm + chunk_norm
    return _Quantized(k, n, data, scales, zeros, err, norm)


def _quantize_weight(
    layer: WeightedLayer, opts: WeightOnlyOptions, hessian: np.ndarray | None
) -> _Quantized:
    """Read one weight chunk by chunk (from its file when it is external data), quantize it in
    float32 and pack it: one layer in memory at a time, and the source model caches nothing."""
    tensor = layer.weight.const_value
    assert tensor is not None
    if (
        opts.algorithm in ("rtn", "awq")
        and isinstance(tensor, ir.ExternalTensor)
        and layer.out_axis == 1
        and len(tensor.shape) == 2
    ):
        rows = FileRows(tensor)
        return _pack_layer(rows, _rtn_chunks(rows, opts), opts)  # type: ignore[arg-type]
    array = tensor.numpy()
    matrix = array.T if layer.out_axis == 0 else array  # [K, N]
    try:
        if opts.algorithm in (
            "rtn",
            "awq",
        ):  # NOTE: awq's scales are already in the weight (awq.py)
            return _pack_layer(matrix, _rtn_chunks(matrix, opts), opts)
        full = np.array(
            matrix, np.float32
        )  # NOTE: a copy: the memory map of external data is released below
        if opts.algorithm in ("gptq", "awq-gptq"):
            assert hessian is not None
            q, s, z = _gptq(full, hessian, opts)
        else:
            q, s, z = _mse(full, opts)
        bs = opts.block
        recon = (q - np.repeat(z, bs, axis=0)[: len(q)]) * np.repeat(s, bs, axis=0)[: len(q)]
        err, norm = float(np.sum((recon - full) ** 2)), float(np.sum(full.astype(np.float64) ** 2))
        return _pack_layer(full, iter([(0, q, s, z, err, norm)]), opts)
    finally:
        del array, matrix
        if isinstance(tensor, ir.ExternalTensor):
            tensor.release()


def _hessians(
    model: Model, layers: list[WeightedLayer], ctx: PassContext, opts: WeightOnlyOptions
) -> dict[str, np.ndarray]:
    if ctx.calibration is None:
        raise DataError(
            f"int{opts.bits}-weight-only with algorithm={opts.algorithm!r} needs calibration data (calibration=..., --calib data.npz)"
        )
    data = load_dataset(ctx.calibration, model.signature, what="calibration").take(opts.max_samples)
    names = [layer.node.inputs[0].name or "" for layer in layers]
    session = make_session(with_outputs(model, names), spin=False)
    outputs = [o.name for o in session.get_outputs()]
    hessians: dict[str, np.ndarray] = {}
    batches = list(data.batches(64))
    with ctx.progress("GPTQ statistics", total=len(batches)) as advance:
        for feeds in batches:
            results = run_session(session, feeds)
            for name in names:
                # NOTE: float32, as the reference keeps it: [K, K] per distinct input, for every layer at once
                x = np.asarray(results[outputs.index(name)], np.float32)
                x = x.reshape(-1, x.shape[-1])
                hessians[name] = hessians.get(name, 0) + (2.0 / max(len(x), 1)) * (x.T @ x)
            advance(1)
    return hessians


def _qdq_dtype(opts: WeightOnlyOptions) -> ir.DataType:
    if opts.bits == 4:
        return ir.DataType.INT4 if opts.symmetric else ir.DataType.UINT4
    return ir.DataType.INT8 if opts.symmetric else ir.DataType.UINT8


def _emit_qdq(
    model: Model, layer: WeightedLayer, qw: _Quantized, opts: WeightOnlyOptions, before: ir.Node
) -> ir.Value:
    base = layer.weight.name or layer.name
    dtype = _qdq_dtype(opts)
    shape = [qw.k, qw.n]
    data = ir.PackedTensor(qw.data, dtype, shape=shape) if opts.bits == 4 else qw.data
    inputs = [
        model.add_initializer(f"{base}_q{opts.bits}", data),
        model.add_initializer(f"{base}_scale", qw.scales),
    ]
    if not opts.symmetric:
        zp = (
            ir.PackedTensor(_pack_flat(qw.zeros), dtype, shape=list(qw.zeros.shape))
            if opts.bits == 4
            else qw.zeros
        )
        inputs.append(model.add_initializer(f"{base}_zero_point", zp))
    dq = (
        model.builder()
        .op(
            "DequantizeLinear",
            inputs,
            {"axis": 0, "block_size": opts.block_size},
            name=f"{base}_DequantizeLinear",
            out=Out(f"{base}_dequantized", ir.DataType.FLOAT),
        )
        .producer()
    )
    assert dq is not None
    dq.outputs[0].shape = ir.Shape(shape)
    if (
        layer.scope
    ):  # NOTE: inside an If/Loop body: ORT's QDQ fusion wants the DQ and its weight in one graph
        model.graph.insert_before(model.graph[0], dq)
    else:
        model.graph.insert_before(before, dq)
    return dq.outputs[0]


def _nbits_initializers(
    model: Model, layer: WeightedLayer, qw: _Quantized, opts: WeightOnlyOptions
) -> list[ir.Value]:
    base = layer.weight.name or layer.name
    # NOTE: scales [N, nb] and zero points [N, ceil(nb / 2)], the layout ORT's MatMulNBitsQuantizer writes
    inputs = [
        model.add_initializer(f"{base}_nbits", qw.data),
        model.add_initializer(f"{base}_scale", np.ascontiguousarray(qw.scales.T)),
    ]
    if not opts.symmetric:
        zp = qw.zeros.T  # [N, nb]
        if zp.shape[1] % 2:
            zp = np.pad(zp, ((0, 0), (0, 1)))
        inputs.append(model.add_initializer(f"{base}_zero_point", _pack_uint4(zp)))
    return inputs


def _tied_head(layer: WeightedLayer) -> bool:
    """Whether ``layer`` is a tied LM head (its MatMul reads the embedding table through a Transpose)."""
    return layer.node.inputs[layer.weight_input] is not layer.weight


def _accuracy_level(layer: WeightedLayer, opts: WeightOnlyOptions) -> int:
    """``accuracy_level`` of a MatMulNBits written for ``layer``: the option, else 4 for a weight (int8
    activations, as ONNX Runtime runs the QDQ weights it fuses: ``session.qdq_matmulnbits_accuracy_level``
    defaults to 4) and 0 for a tied LM head (its QDQ form, ``DQ -> Transpose -> MatMul``, computes in float)."""
    if opts.accuracy_level is not None:
        return opts.accuracy_level
    return 0 if _tied_head(layer) else 4


def _replace(
    model: Model,
    layer: WeightedLayer,
    qw: _Quantized,
    opts: WeightOnlyOptions,
    shared: dict[tuple[int, int], list[ir.Value]],
) -> None:
    """Swap one MatMul/Gemm for its quantized form; a weight shared by several layers is stored once."""
    node = layer.node
    key = (id(layer.weight), layer.out_axis)
    if opts.format == "matmulnbits":
        if key not in shared:
            shared[key] = _nbits_initializers(model, layer, qw, opts)
        b = model.builder()
        out = b.op(
            "MatMulNBits",
            [node.inputs[0], *shared[key]],
            {
                "K": qw.k,
                "N": qw.n,
                "bits": 4,
                "block_size": opts.block_size,
                "accuracy_level": _accuracy_level(layer, opts),
            },
            domain="com.microsoft",
            name=f"{layer.name}_MatMulNBits",
            out=Out(f"{layer.name}_MatMulNBits_output", ir.DataType.FLOAT),
        )
    else:
        if key not in shared:
            shared[key] = [_emit_qdq(model, layer, qw, opts, node)]
        b = model.builder()
        out = b.op(
            "MatMul",
            [node.inputs[0], shared[key][0]],
            name=f"{layer.name}_MatMul",
            out=Out(f"{layer.name}_MatMul_output", ir.DataType.FLOAT),
        )
    replace_matmul(model, node, list(b.nodes), out, layer.name, weighted=out.producer())


def _drop_dead_transposes(model: Model) -> None:
    """Transposes a quantized tied LM head no longer reads (the table itself stays: the lookup reads it)."""
    for node in [n for n in model.ir.graph if n.op_type == "Transpose"]:
        if not list(node.outputs[0].uses()) and not node.outputs[0].is_graph_output():
            model.ir.graph.remove(node, safe=True)


def _select(result: Model, opts: WeightOnlyOptions) -> tuple[list[WeightedLayer], dict[str, str]]:
    layers: list[WeightedLayer] = []
    skipped: dict[str, str] = {}
    for layer in [
        *result.weighted_layers(frozenset(opts.op_types) & {"MatMul", "Gemm"}, subgraphs=True),
        *tied_heads(result, opts),
    ]:
        w = layer.weight.const_value
        assert w is not None
        attrs = {k: a.value for k, a in layer.node.attributes.items()}
        if layer.name in opts.exclude:
            skipped[layer.name] = "excluded by option"
        elif len(w.shape) != 2 or w.dtype != ir.DataType.FLOAT:
            skipped[layer.name] = "weight is not a float32 matrix"
        elif w.size < opts.min_elements:
            skipped[layer.name] = f"fewer than {opts.min_elements} elements"
        elif (
            attrs.get("transA", 0)
            or attrs.get("alpha", 1.0) != 1.0
            or attrs.get("beta", 1.0) != 1.0
        ):
            skipped[layer.name] = "Gemm with transA/alpha/beta"
        else:
            layers.append(layer)
    return layers, skipped


@dataclass
class _Totals:
    """Weight bytes before and after, and the relative error of each weight, over the quantized weights."""

    before: int = 0
    after: int = 0
    errors: list[float] = field(default_factory=list)
    weights: dict[tuple[int, int], list[ir.Value]] = field(default_factory=dict)


def _emit_all(
    result: Model,
    groups: list[list[WeightedLayer]],
    chosen: list[WeightOnlyOptions],
    hessians: dict[str, np.ndarray],
    ctx: PassContext,
) -> _Totals:
    """Quantize each weight with its options and swap every layer using it for the quantized form."""
    totals = _Totals()
    if not groups:
        return totals

    def work(i: int) -> _Quantized:
        # NOTE: a shared weight serves every input that reads it: GPTQ weighs their statistics together
        found = [
            hessians[name]
            for layer in groups[i]
            if (name := layer.node.inputs[0].name or "") in hessians
        ]
        return _quantize_weight(
            groups[i][0], chosen[i], sum(found[1:], found[0]) if found else None
        )

    shared = totals.weights
    # NOTE: numpy releases the GIL in its heavy loops, so a few threads quantize layers side by side;
    # map() yields in order, each worker holds one chunk of one layer in float32, and each result is
    # emitted (packed, small) as soon as it arrives.
    workers = max(1, min(8, os.cpu_count() or 1))
    with (
        ctx.progress(f"int{chosen[0].bits} weight-only", total=len(groups)) as advance,
        ThreadPoolExecutor(workers) as pool,
    ):
        for group, o, qw in zip(groups, chosen, pool.map(work, range(len(groups))), strict=True):
            totals.before += qw.k * qw.n * 4
            totals.after += (
                qw.data.nbytes
                + qw.scales.nbytes
                + (0 if o.symmetric else qw.zeros.size * o.bits // 8)
            )
            totals.errors.append(
                float(np.sqrt(qw.squared_error) / max(np.sqrt(qw.squared_norm), 1e-12))
            )
            for layer in group:
                _replace(result, layer, qw, o, shared)
            advance(1)
    return totals


# NOTE: what ``algorithm="auto"`` runs for int4 when calibration data is given: GPTQ beats RTN on every model
# measured, beats AWQ+GPTQ on the tests' encoder and trails it by 0.002 cosine on all-MiniLM-L6-v2 at block 32
# in 2/3 of the time, with no Mul added to the graph (docs/methods/int4-weight-only.md).
DATA_AWARE = "gptq"


# NOTE: the block ``block_size=None`` gives a data-aware algorithm: measured on all-MiniLM-L6-v2 (64 calibration
# sentences, 256 held out; GPTQ) block 32 reaches mean cosine 0.988 at 0.162x, 64 0.985 at 0.154x (and runs no
# faster than 32), 128 0.980 at 0.150x (docs/methods/int4-weight-only.md); without data the default stays ORT's 128
DATA_AWARE_BLOCK, PLAIN_BLOCK = 32, 128


def _block_size(opts: WeightOnlyOptions, algorithm: str) -> tuple[int, str]:
    """The block size to use and why: ``None`` is 32 for an algorithm that reads calibration data, else 128."""
    if opts.block_size is not None:
        return opts.block_size, "chosen by the user"
    if algorithm in ("gptq", "awq", "awq-gptq"):
        return (
            DATA_AWARE_BLOCK,
            f"{algorithm} reads calibration data: the finer blocks it pays off on",
        )
    return PLAIN_BLOCK, "ONNX Runtime's MatMulNBitsQuantizer default"


def _algorithm(opts: WeightOnlyOptions, ctx: PassContext) -> tuple[str, str]:
    """The algorithm to run and why: ``auto`` is data-aware for int4 when calibration data is given."""
    if opts.algorithm != "auto":
        return opts.algorithm, "chosen by the user"
    if ctx.calibration is None:
        return "rtn", "no calibration data"
    if opts.bits != 4:
        return "rtn", "int8 weights lose little to round to nearest"
    return DATA_AWARE, "calibration data given"


def _unfused(group: list[WeightedLayer]) -> str | None:
    """Why ONNX Runtime would not fuse ``DequantizeLinear -> MatMul`` of this weight into its int4 kernel, or
    None when it would. Its rule (``DQMatMulToMatMulNBits``, ``DQMatMulNodeGroupSelector`` in qdq_selectors.cc)
    wants a DQ with exactly one consumer, no graph output, feeding input B of a MatMul in the same graph, with
    int4 weights, float scales, axis 0, a block size that is a power of two >= 16, and constant rank-2 weight,
    scale and zero point of matching shapes. Every DQ this pass writes meets the type, block and shape
    conditions; the consumer and graph ones depend on the model."""
    if len(group) > 1:
        return f"shared by {len(group)} MatMuls: ORT fuses a DequantizeLinear with one consumer only, the rest dequantize on every run"
    if _tied_head(group[0]):
        return "a tied LM head (it reads the embedding table through a Transpose): MatMulNBits, whose int4 codes the lookup shares"
    if group[0].scope:
        return "inside control flow: its DequantizeLinear sits in the outer graph, where ORT does not fuse it"
    return None


def _formats(
    groups: list[list[WeightedLayer]], opts: WeightOnlyOptions, figures: dict[str, object]
) -> list[WeightOnlyOptions]:
    """The options each weight is emitted with: ``format="auto"`` picks QDQ or MatMulNBits per weight."""
    chosen: list[WeightOnlyOptions] = []
    why: dict[str, str] = {}
    for group in groups:
        fmt = opts.format
        if fmt == "auto":
            reason = _unfused(group) if opts.bits == 4 else None
            fmt = "qdq" if reason is None else "matmulnbits"
            if reason is not None:
                why[group[0].weight.name or group[0].name] = reason
        chosen.append(opts.model_copy(update={"format": fmt}))
    figures["weight_formats"] = {
        f: sum(1 for o in chosen if o.format == f) for f in ("qdq", "matmulnbits")
    }
    if why:
        figures["matmulnbits_weights"] = why
    return chosen


def _data_statistics(
    model: Model,
    result: Model,
    layers: list[WeightedLayer],
    hessians: dict[str, np.ndarray] | None,
    opts: WeightOnlyOptions,
    ctx: PassContext,
) -> dict[str, np.ndarray]:
    """The layer-input statistics GPTQ/AWQ need (``hessians`` reused where it has every layer's,
    measured on ``model`` otherwise; empty for the data-free algorithms); with AWQ, ``result``'s
    layers are scaled by them first."""
    if opts.algorithm not in ("gptq", "awq", "awq-gptq") or not layers:
        return {}
    if hessians is None or any(
        (layer.node.inputs[0].name or "") not in hessians for layer in layers
    ):
        hessians = _hessians(model, layers, ctx, opts)
    if opts.algorithm in ("awq", "awq-gptq"):
        ctx.figures["awq_alpha"] = awq_scale(
            result,
            scale_groups(layers),
            hessians,
            lambda w: _fake_quantize(w, opts),
            opts.awq_grid,
            ctx,
        )
    return hessians


def _finish_tables(
    result: Model,
    opts: WeightOnlyOptions,
    emitted: tuple[list[list[WeightedLayer]], list[WeightOnlyOptions]],
    totals: _Totals,
    tables_done: bool,
    ctx: PassContext,
) -> None:
    """After the weights are emitted: a tied head's lookups read its codes, the int4 tables ORT's kernels."""
    groups, chosen = emitted
    _drop_dead_transposes(result)
    ctx.figures["tied_lookups"] = share_tied_lookups(result, groups, chosen, totals.weights)
    if opts.bits == 4 and opts.format != "qdq" and tables_done:
        ctx.figures["table_kernels"] = use_table_kernels(result, accuracy_level=opts.accuracy_level)
    if (
        any(o.format == "matmulnbits" for o in chosen)
        and "com.microsoft" not in result.ir.opset_imports
    ):
        result.ir.opset_imports["com.microsoft"] = 1


def weight_only(
    model: Model,
    opts: WeightOnlyOptions,
    ctx: PassContext,
    *,
    hessians: dict[str, np.ndarray] | None = None,
) -> Model:
    """``hessians``: GPTQ/AWQ statistics of ``model``'s layer inputs already computed (by input name), e.g.
    by mixed-precision, which builds several candidates of one model; computed here when None."""
    if opts.format == "matmulnbits" and opts.bits != 4:
        raise OptionsError("format='matmulnbits' needs bits=4")
    algorithm, why = _algorithm(opts, ctx)
    block, block_why = _block_size(opts, algorithm)
    opts = opts.model_copy(update={"algorithm": algorithm, "block_size": block})
    ctx.figures["algorithm"] = f"{algorithm}: {why}"
    ctx.figures["block_size"] = f"{block}: {block_why}"
    result = model.clone()
    if opts.format != "matmulnbits":
        result = ensure_opset(
            result,
            21,
            why=f"blocked int{opts.bits} DequantizeLinear (format={opts.format!r})",
            figures=ctx.figures,
        )
    layers, skipped = _select(result, opts)
    tables = quantize_tables(
        result,
        bits=opts.bits,
        op_types=set(opts.op_types) - ({"Gather"} if opts.tables == "float" else set()),
        block_size=min(opts.block, 32),
        min_elements=opts.min_elements,
        exclude=set(opts.exclude) | tied_lookups(layers),
    )
    if not layers and not tables.done:
        skipped.update(recurrent_refusals(model.graph, f"{opts.bits}-bit weight-only"))
        raise OptionsError(
            f"{opts.bits}-bit weight-only: nothing to quantize in {model.name!r} ({skipped or 'no MatMul/Gemm/Conv/Gather with a constant weight'})"
        )
    hessians = _data_statistics(model, result, layers, hessians, opts, ctx)

    # NOTE: a weight shared by several layers (same tensor, same orientation) is quantized once.
    users: dict[tuple[int, int], list[WeightedLayer]] = {}
    for layer in layers:
        users.setdefault((id(layer.weight), layer.out_axis), []).append(layer)
    groups = list(users.values())
    chosen = _formats(groups, opts, ctx.figures)
    totals = _emit_all(result, groups, chosen, hessians, ctx)
    _finish_tables(result, opts, (groups, chosen), totals, bool(tables.done), ctx)
    before, after, errors = (
        totals.before + tables.bytes_before,
        totals.after + tables.bytes_after,
        totals.errors + tables.errors,
    )
    ctx.figures.update(
        {
            "quantized_nodes": len(layers),
            "float_nodes": skipped,
            "weight_bytes_before": before,
            "weight_bytes_after": after,
            "weight_compression": round(before / max(after, 1), 3),
            "mean_relative_weight_error": round(float(np.mean(errors)), 6),
            "tables_quantized": len(tables.done),
        }
    )
    return result
