"""The built-in codecs. Every function is vectorised numpy; entropy coding is in :mod:`.streams`.

* ``bytegroup`` (fp32/fp16/bf16/fp64): rotate the sign bit to the bottom so one byte holds the
  exponent alone, split the values into byte planes and entropy-code each plane (ZipNN's idea:
  exponents are highly skewed, mantissas are noise and stay stored, which keeps decoding fast).
* ``codebook``: tensors with at most 256 distinct values (codebook-quantized floats, int8/uint8
  weights, codebook indices): a table of the values plus entropy-coded indices (nibble pairs
  when there are at most 16).
* ``sparse``: most elements equal one background value (zero after pruning, or the most common
  codebook index): relative indices of the others (gaps as bytes, 255 = "add 255 and go on",
  Deep Compression's filler entries) or a bitmask, plus the values coded by the best of the
  above.
* ``nibbles``: int4/uint4 tensors unpacked to one symbol per byte before entropy coding.
* ``zstd`` and ``lzma``: general-purpose fallbacks on the raw bytes.
"""

from __future__ import annotations

import lzma
import struct
from dataclasses import replace

import numpy as np

from modelpress.plugin_api import Codec, ElementType, TensorInfo, numpy_dtype

from . import streams

__all__ = ["CODECS"]

_FLOATS = (ElementType.FLOAT, ElementType.FLOAT16, ElementType.BFLOAT16, ElementType.DOUBLE)


def _fits(data: bytes, info: TensorInfo) -> np.ndarray | None:
    """``data`` as unsigned integers of the element width, or None if the size does not match."""
    dt = numpy_dtype(info.dtype)
    if dt is None or len(data) != info.size * dt.itemsize:
        return None
    return np.frombuffer(data, dtype=dt)


# -- bytegroup ---------------------------------------------------------------------------------


# NOTE: bytes per step (512 KiB: measured best for fp32 and bf16 with the 16-bit halves): one
# step's rotation, its temporaries and planes stay in the L2 cache
_CHUNK_BYTES = 1 << 19


def _bytegroup_encode(data: bytes, info: TensorInfo) -> bytes | None:
    u = _fits(data, info)
    if u is None or info.dtype not in _FLOATS or u.size == 0:
        return None
    width, t = u.dtype.itemsize, u.dtype.type
    chunk = _CHUNK_BYTES // width
    planes = np.empty((width, u.size), np.uint8)
    rotated, low = np.empty(min(chunk, u.size), u.dtype), np.empty(min(chunk, u.size), u.dtype)
    one, top, eight = t(1), t(width * 8 - 1), t(8)
    copy, shl, shr, bor = np.copyto, np.left_shift, np.right_shift, np.bitwise_or
    for start in range(0, u.size, chunk):
        part = u[start : start + chunk]
        end, r, tmp = start + part.size, rotated[: part.size], low[: part.size]
        shl(part, one, out=r)
        shr(part, top, out=tmp)
        bor(r, tmp, out=r)
        # NOTE: narrowing copies of the shifted value (contiguous) beat one transposing byte copy
        copy(planes[0, start:end], r, casting="unsafe")
        for i in range(1, width):
            shr(r, eight, out=r)
            copy(planes[i, start:end], r, casting="unsafe")
    # NOTE: the top plane holds the exponents (few values, skewed: large blocks pay fewer tables);
    # mantissa planes are noise except where a tensor's values are locally coarse (small blocks)
    return streams.pack_parts(
        [
            streams.literal_pieces(
                planes[i], block_log=17 if i == width - 1 else 14, matching=i < width - 1
            )
            for i in range(width)
        ]
    )


def _bytegroup_decode(blob: bytes, info: TensorInfo) -> memoryview:
    dt = numpy_dtype(info.dtype)
    assert dt is not None
    parts = streams.unpack_parts(blob)
    if len(parts) != dt.itemsize:
        raise ValueError(f"bytegroup blob has {len(parts)} byte planes, expected {dt.itemsize}")
    chunk = _CHUNK_BYTES // dt.itemsize
    step = min(chunk, max(info.size, 1))
    planes = [streams.PlaneReader(part, step, slot) for slot, part in enumerate(parts)]
    # NOTE: one pass over the output, a cache-sized step at a time: each plane's next slice is
    # decoded into a small buffer, shifted into place and the rotation undone there; the output
    # is handed back as a view (no copy into a bytes object)
    u = np.empty(info.size, dt)
    low = np.empty(step, dt)
    one, top = dt.type(1), dt.type(dt.itemsize * 8 - 1)
    shl, shr, bor = np.left_shift, np.right_shift, np.bitwise_or
    assemble = _Assemble4(step) if dt.itemsize == 4 else _Assemble(dt)
    for start in range(0, info.size, chunk):
        end = min(start + chunk, info.size)
        part, tmp = u[start:end], low[: end - start]
        assemble(part, tmp, planes)
        shr(part, one, out=tmp)
        shl(part, top, out=part)
        bor(part, tmp, out=part)
    return memoryview(u).cast("B")  # type: ignore[arg-type]


class _Assemble:
    """Puts the next slices of the byte planes together into ``part`` (rotated values):
    widening copies and shift-ors (contiguous, vectorised) beat a strided byte copy per plane by
    ~30 %."""

    def __init__(self, dt: np.dtype) -> None:
        self.eight = dt.type(8)

    def __call__(
        self, part: np.ndarray, tmp: np.ndarray, planes: list[streams.PlaneReader]
    ) -> None:
        n = part.size
        np.copyto(part, planes[-1].read(n))
        for plane in planes[-2::-1]:
            np.left_shift(part, self.eight, out=part)
            np.copyto(tmp, plane.read(n))
            np.bitwise_or(part, tmp, out=part)


class _Assemble4(_Assemble):
    """Four planes as two 16-bit halves first (half the bytes per operation): ~15 % faster."""

    def __init__(self, step: int) -> None:
        self.half, self.tmp16 = np.empty(step, np.uint16), np.empty(step, np.uint16)

    def _pair(self, high: np.ndarray, low: np.ndarray, n: int) -> np.ndarray:
        half, tmp = self.half[:n], self.tmp16[:n]
        np.copyto(half, high)
        np.left_shift(half, np.uint16(8), out=half)
        np.copyto(tmp, low)
        return np.bitwise_or(half, tmp, out=half)

    def __call__(
        self, part: np.ndarray, tmp: np.ndarray, planes: list[streams.PlaneReader]
    ) -> None:
        n = part.size
        np.copyto(part, self._pair(planes[3].read(n), planes[2].read(n), n))
        np.left_shift(part, np.uint32(16), out=part)
        np.copyto(tmp, self._pair(planes[1].read(n), planes[0].read(n), n))
        np.bitwise_or(part, tmp, out=part)


# -- codebook ----------------------------------------------------------------------------------


def _nibble_pack(idx: np.ndarray) -> bytes:
    padded = np.concatenate([idx, np.zeros(len(idx) % 2, np.uint8)])
    return (padded[0::2] | (padded[1::2] << 4)).astype(np.uint8).tobytes()


def _nibble_unpack(data: bytes, count: int) -> np.ndarray:
    b = np.frombuffer(data, np.uint8)
    out = np.empty(len(b) * 2, np.uint8)
    out[0::2] = b & 15
    out[1::2] = b >> 4
    return out[:count]


def _many_values(u: np.ndarray, limit: int = 256) -> bool:
    """Whether a spread sample of ``u`` already holds more than ``limit`` distinct values (512
    elements first: a float tensor answers there; np.unique would also import numpy.ma)."""
    for count in (512, 4096):
        s = np.sort(u[:: max(1, u.size // count)])
        if 1 + int(np.count_nonzero(s[1:] != s[:-1])) > limit:
            return True
    return False


def _codebook_encode(data: bytes, info: TensorInfo) -> bytes | None:
    u = _fits(data, info)
    if u is None or u.size < 2 or _many_values(u):
        return None
    table, inverse = np.unique(u, return_inverse=True)
    if len(table) > 256:
        return None
    idx = inverse.reshape(-1).astype(np.uint8)
    best = b"\0" + streams.encode(idx.tobytes())
    if len(table) <= 16:
        packed = b"\1" + streams.encode(_nibble_pack(idx))
        best = min(best, packed, key=len)
    return streams.pack_parts([table.tobytes(), best])


def _codebook_decode(blob: bytes, info: TensorInfo) -> bytes:
    dt = numpy_dtype(info.dtype)
    assert dt is not None
    table_bytes, coded = streams.unpack_parts(blob)
    table = np.frombuffer(table_bytes, dt)
    raw = streams.decode(coded[1:])
    idx = _nibble_unpack(raw, info.size) if coded[0] == 1 else np.frombuffer(raw, np.uint8)
    return table[idx].tobytes()


# -- sparse ------------------------------------------------------------------------------------


def _gaps_encode(idx: np.ndarray) -> bytes:
    gaps = np.diff(idx, prepend=-1) - 1
    escapes = gaps // 255
    out = np.full(int(np.sum(escapes)) + len(gaps), 255, np.uint8)
    out[np.cumsum(escapes + 1) - 1] = (gaps % 255).astype(np.uint8)
    return out.tobytes()


def _gaps_decode(data: bytes) -> np.ndarray:
    b = np.frombuffer(data, np.uint8)
    ends = np.flatnonzero(b != 255)
    runs = np.diff(ends, prepend=-1) - 1
    gaps = runs.astype(np.int64) * 255 + b[ends]
    return np.cumsum(gaps + 1) - 1


def _values_encode(values: np.ndarray, info: TensorInfo) -> bytes:
    """The best of the value coders for the non-background elements."""
    sub = replace(info, shape=(values.size,))
    data = values.tobytes()
    best = b"\0" + streams.encode(data)
    for tag, coder in ((b"\1", _codebook_encode), (b"\2", _bytegroup_encode)):
        coded = coder(data, sub)
        if coded is not None and len(coded) + 1 < len(best):
            best = tag + coded
    return best


def _values_decode(blob: memoryview, info: TensorInfo) -> bytes:
    tag, payload = blob[0], bytes(blob[1:])
    if tag == 0:
        return streams.decode(payload)
    return (_codebook_decode if tag == 1 else _bytegroup_decode)(payload, info)  # type: ignore[return-value]


def _sparse_encode(data: bytes, info: TensorInfo) -> bytes | None:
    u = _fits(data, info)
    if u is None or u.size < 16:
        return None
    values, counts = np.unique(u[:: max(1, u.size // 4096)], return_counts=True)
    background = u.dtype.type(0)
    zeros = int(np.count_nonzero(u == 0))
    mode = values[np.argmax(counts)]
    if mode != 0:
        count = int(np.count_nonzero(u == mode))
        if count > zeros:
            background, zeros = mode, count
    if zeros < u.size // 2:
        return None
    best = _sparse_body(u, background, info, 0)
    if len(info.shape) == 2 and min(info.shape) > 1:
        # NOTE: column order too: dead inputs (always-zero pixels) are zero columns of a weight
        transposed = _sparse_body(u.reshape(info.shape).T.reshape(-1), background, info, 1)
        best = min(best, transposed, key=len)
    return best


def _sparse_body(u: np.ndarray, background: np.generic, info: TensorInfo, order: int) -> bytes:
    mask = u != background
    idx = np.flatnonzero(mask)
    gaps = b"\0" + streams.encode(_gaps_encode(idx))
    bitmask = b"\1" + streams.encode(np.packbits(mask).tobytes())
    positions = min(gaps, bitmask, key=len)
    header = struct.pack("<QB", idx.size, order) + np.asarray(background, u.dtype).tobytes()
    return streams.pack_parts([header, positions, _values_encode(u[mask], info)])


def _sparse_decode(blob: bytes, info: TensorInfo) -> bytes:
    dt = numpy_dtype(info.dtype)
    assert dt is not None
    header, positions, values = streams.unpack_parts(blob)
    count, order = struct.unpack_from("<QB", header)
    background = np.frombuffer(header[9:], dt)[0]
    raw = streams.decode(positions[1:])
    if positions[0] == 0:
        idx = _gaps_decode(raw)
    else:
        idx = np.flatnonzero(np.unpackbits(np.frombuffer(raw, np.uint8), count=info.size))
    if idx.size != count:
        raise ValueError(f"sparse positions decode to {idx.size} elements, expected {count}")
    out = np.full(info.size, background, dt)
    out[idx] = np.frombuffer(_values_decode(values, replace(info, shape=(count,))), dt)
    if order == 1:
        rows, cols = info.shape
        return out.reshape(cols, rows).T.tobytes()
    return out.tobytes()


# -- nibbles, zstd, lzma -------------------------------------------------------------------------

_INT4 = (ElementType.INT4, ElementType.UINT4)


def _nibbles_encode(data: bytes, info: TensorInfo) -> bytes | None:
    if info.dtype not in _INT4 or len(data) != (info.size + 1) // 2:
        return None
    return streams.encode(_nibble_unpack(data, len(data) * 2).tobytes())


def _nibbles_decode(blob: bytes, info: TensorInfo) -> bytes:
    return _nibble_pack(np.frombuffer(streams.decode(blob), np.uint8))


def _zstd_encode(data: bytes, info: TensorInfo) -> bytes | None:
    if not streams.have_zstd() or not data:
        return None
    coded = streams.encode(data, fast=True)
    return coded if coded[0] == streams.ZSTD else None


_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
# NOTE: the estimate codes a 4 KiB sample (LZMA codes ~10 MB/s) with a small dictionary (9e's 64 MiB one costs ~50 ms to set up)
_LZMA_SAMPLE_FILTERS = [
    {"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": 1 << 16}
]


def _spread(data: bytes, nbytes: int, slices: int = 4) -> bytes:
    """About ``nbytes`` of ``data`` in ``slices`` equal slices spread evenly over it."""
    if len(data) <= nbytes:
        return data
    step = nbytes // slices
    gap = (len(data) - step) // (slices - 1)
    return b"".join(data[i * gap : i * gap + step] for i in range(slices))


def _scaled(coded: int, sample: bytes, data: bytes) -> int:
    return int(coded * len(data) / max(len(sample), 1))


def _zstd_estimate(data: bytes, info: TensorInfo) -> int | None:
    """zstd level 3 on a 16 KiB sample: as small as level 19 on noise-like data within a few %, 30x faster."""
    if not streams.have_zstd() or not data:
        return None
    sample = _spread(data, 16 << 10)
    return _scaled(len(streams.encode(sample, fast=True, level=3)), sample, data)


def _lzma_estimate(data: bytes, info: TensorInfo) -> int | None:
    if not data or len(data) > streams.LZMA_LIMIT:
        return None
    sample = _spread(data, 4 << 10)
    return _scaled(
        len(lzma.compress(sample, format=lzma.FORMAT_RAW, filters=_LZMA_SAMPLE_FILTERS)),
        sample,
        data,
    )


def _lzma_encode(data: bytes, info: TensorInfo) -> bytes | None:
    if not data or len(data) > streams.LZMA_LIMIT:
        return None
    return streams.lzma_encode(data)


def _lzma_decode(blob: bytes, info: TensorInfo) -> bytes:
    return lzma.decompress(blob, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)


CODECS = [
    Codec(
        "bytegroup",
        _bytegroup_encode,
        _bytegroup_decode,
        applies=lambda info: info.dtype in _FLOATS,
        summary="floats split into byte planes, sign rotated out of the exponent byte, planes entropy-coded (ZipNN)",
        views=True,
    ),
    Codec(
        "codebook",
        _codebook_encode,
        _codebook_decode,
        applies=lambda info: numpy_dtype(info.dtype) is not None,
        summary="<= 256 distinct values: value table + entropy-coded indices (nibble pairs when <= 16)",
        views=True,
    ),
    Codec(
        "sparse",
        _sparse_encode,
        _sparse_decode,
        applies=lambda info: numpy_dtype(info.dtype) is not None,
        summary="mostly one value (zero): relative indices or bitmask + values coded by the best value coder",
        views=True,
    ),
    Codec(
        "nibbles",
        _nibbles_encode,
        _nibbles_decode,
        applies=lambda info: info.dtype in _INT4,
        summary="int4/uint4: one symbol per byte, entropy-coded",
        views=True,
    ),
    Codec(
        "zstd",
        _zstd_encode,
        lambda blob, info: streams.decode(blob),
        summary="zstd level 19 on the raw bytes (needs the pack extra)",
        views=True,
        estimate=_zstd_estimate,
    ),
    Codec(
        "lzma",
        _lzma_encode,
        _lzma_decode,
        summary="LZMA2 preset 9e on the raw bytes (xz's coder; slow to decode)",
        views=True,
        fast_decode=False,
        estimate=_lzma_estimate,
    ),
]
