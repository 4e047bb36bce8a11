"""Entropy-coded byte streams: the back end every built-in codec writes its parts with.

A stream is one tag byte and a payload: ``0`` stored, ``1`` zstd (Huff0 literals + FSE, fast
to decode), ``2`` raw LZMA2 (adaptive binary range coding: best on small or very skewed data,
slower to decode). :func:`encode` measures the candidates and keeps the smallest.
"""

from __future__ import annotations

import lzma
import struct
import threading
from typing import Any

__all__ = [
    "LZMA_LIMIT",
    "PlaneReader",
    "decode",
    "decode_view",
    "encode",
    "encode_literals",
    "have_zstd",
    "lzma_encode",
    "pack_parts",
    "unpack_parts",
]

STORED, ZSTD, LZMA = 0, 1, 2
# NOTE: LZMA at preset 9e codes ~1-3 MB/s; past this size only zstd is tried.
LZMA_LIMIT = 32 << 20
_LZMA_FILTERS: list[dict[str, Any]] = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
_zstd: Any = None
# NOTE: a ZstdDecompressor allocates its context on creation (tens of microseconds, as long as
# decoding a small tensor); one per thread is kept, since one must not be used by two threads at once
_local = threading.local()


def lzma_encode(data: bytes | memoryview) -> bytes:
    """Raw LZMA2 at preset 9e, with a dictionary no larger than the data: it codes the same and
    skips the ~50 ms set-up of 9e's 64 MiB one (raw LZMA2 does not record the size: the decoder's
    64 MiB dictionary reads it)."""
    size = min(1 << 26, max(1 << 12, 1 << max(len(data) - 1, 1).bit_length()))
    return lzma.compress(
        data, format=lzma.FORMAT_RAW, filters=[{**_LZMA_FILTERS[0], "dict_size": size}]
    )


def have_zstd() -> bool:
    global _zstd
    if _zstd is None:
        try:
            import zstandard
        except ImportError:
            _zstd = False
        else:
            _zstd = zstandard
    return bool(_zstd)


def _zstd_module() -> Any:
    if not have_zstd():
        from modelpress.plugin_api import PluginError

        raise PluginError(
            "this pack uses zstd-coded streams; install the pack extra: pip install -c constraints.txt 'modelpress[pack]'",
            plugin="pack",
        )
    return _zstd


LZMA_SAMPLE = (
    1 << 20
)  # NOTE: a stream above this is coded by LZMA (~2 MB/s at 9e) only if a 64 KiB sample says it may win


def _lzma_may_win(data: bytes, level: int) -> bool:
    """For a large stream: whether LZMA codes a 64 KiB sample (four spread slices) at least 1 %
    smaller than zstd at ``level`` and than the sample itself (stored)."""
    if len(data) <= LZMA_SAMPLE:
        return True
    step, gap = 16 << 10, (len(data) - (16 << 10)) // 3
    sample = b"".join(data[i * gap : i * gap + step] for i in range(4))
    lz = len(lzma_encode(sample))
    zs = len(_compressor(level).compress(sample)) if have_zstd() else len(sample)
    return lz < 0.99 * min(zs, len(sample))


def encode(data: bytes | memoryview, *, fast: bool = False, level: int = 19) -> bytes:
    """The smallest of stored / zstd / (unless ``fast``) LZMA, with its tag byte."""
    data = bytes(data)
    best = bytes([STORED]) + data
    if len(data) < 16:
        return best
    if have_zstd():
        coded = bytes([ZSTD]) + _compressor(level).compress(data)
        if len(coded) < len(best):
            best = coded
    if not fast and len(data) <= LZMA_LIMIT and _lzma_may_win(data, level):
        coded = bytes([LZMA]) + lzma_encode(data)
        if len(coded) < len(best):
            best = coded
    return best


def _compressor(level: int) -> Any:
    """A per-thread ZstdCompressor for ``level`` (a new one sets up its tables each time: ~0.1 ms at level 19)."""
    cache = getattr(_local, "cctx", None)
    if cache is None:
        cache = _local.cctx = {}
    if level not in cache:
        cache[level] = _zstd.ZstdCompressor(level=level)
    return cache[level]


def _literal_compressor(window_log: int) -> Any:
    cache = getattr(_local, "literal_cctx", None)
    if cache is None:
        cache = _local.literal_cctx = {}
    cctx = cache.get(window_log)
    if cctx is None:
        cctx = cache[window_log] = _huffman_only(window_log) or _matching_literals(window_log)
    return cctx


def _matching_literals(window_log: int) -> Any:
    """Without zstd's sequence API (no ``cffi``): the shortest matches zstd allows (7) and tiny
    tables: it finds few matches in a byte plane of floats and spends its time on Huffman-coding
    the literals per block (its few matches in a low-entropy plane cost a little more than the
    literals they replace)."""
    z = _zstd_module()
    params = z.ZstdCompressionParameters(
        window_log=window_log,
        chain_log=6,
        hash_log=6,
        search_log=1,
        min_match=7,
        strategy=z.STRATEGY_FAST,
    )
    return z.ZstdCompressor(compression_params=params)


def _huffman_only(window_log: int) -> _HuffmanOnly | None:
    """The literals-only coder, or None where zstandard's CFFI backend is missing (no cffi:
    zstandard's C backend alone has no sequence API) or its zstd lacks the sequence API or
    does not give a probe back."""
    try:
        from zstandard import _cffi  # type: ignore[attr-defined]
    except ImportError:
        return None
    probe = bytes(range(64)) * 4
    try:
        coder = _HuffmanOnly(_cffi, window_log)
        if _zstd_module().ZstdDecompressor().decompress(coder.compress(probe)) == probe:
            return coder
    except (AttributeError, ValueError, TypeError, _cffi.ffi.error, _zstd_module().ZstdError):
        pass  # NOTE: an older zstandard whose backend lacks a name or rejects a parameter
    return None


class _HuffmanOnly:
    """A zstd frame of literals only, Huffman-coded per block of ``2**window_log`` bytes (at most
    128 KiB), through zstd's sequence API given no sequences: ZipNN's coder (it calls zstd's
    Huffman coder directly), with no match finder at all. An exponent plane codes ~0.3-0.6 %
    smaller than with zstd's matching on (its 4-7 byte matches in a 2.6-bit plane cost more than
    the literals they replace), and faster. Any zstd decoder reads it. Needs zstandard's CFFI
    backend (``cffi``, in the pack extra): without it :func:`_matching_literals`."""

    def __init__(self, backend: Any, window_log: int) -> None:
        self.lib, self.ffi = lib, ffi = backend.lib, backend.ffi
        self.cctx = ffi.gc(lib.ZSTD_createCCtx(), lib.ZSTD_freeCCtx)
        for key, value in (
            (lib.ZSTD_c_windowLog, window_log),
            (lib.ZSTD_c_strategy, 1),  # NOTE: fast (no match finder runs: no sequences are given)
            (lib.ZSTD_c_literalCompressionMode, 1),  # NOTE: ZSTD_ps_enable
        ):
            self._check(lib.ZSTD_CCtx_setParameter(self.cctx, key, value))
        self.none = ffi.new("ZSTD_Sequence[1]")
        self.alloc = ffi.new_allocator(should_clear_after_alloc=False)

    def _check(self, code: int) -> int:
        if self.lib.ZSTD_isError(code):
            raise ValueError(self.ffi.string(self.lib.ZSTD_getErrorName(code)).decode())
        return code

    def compress(self, data: Any) -> bytes:
        src = self.ffi.from_buffer(data)
        cap = self.lib.ZSTD_compressBound(len(src))
        dst = self.alloc("char[]", cap)
        n = self._check(
            self.lib.ZSTD_compressSequences(self.cctx, dst, cap, self.none, 0, src, len(src))
        )
        return self.ffi.buffer(dst, n)[:]


STRUCTURED = (
    0.8  # NOTE: a plane that codes below this is more than noise: a matching coder is tried too
)
_MATCHING_LIMIT = 2 << 20


def encode_literals(data: Any, *, block_log: int = 17, matching: bool = True) -> bytes:
    """:func:`literal_pieces` joined into one stream."""
    return b"".join(literal_pieces(data, block_log=block_log, matching=matching))


def literal_pieces(data: Any, *, block_log: int = 17, matching: bool = True) -> tuple[bytes, Any]:
    """Stored, or Huffman-coded in a zstd frame with one Huffman table per ``2**block_log``
    bytes (at most 17: smaller blocks follow local statistics, as in mantissa planes; larger ones
    pay fewer tables): literals only (:class:`_HuffmanOnly`, with cffi), else zstd with its
    matching all but off. With ``matching``, a plane that codes below
    ``STRUCTURED`` of its size (zero runs, repeats) is also coded with zstd's matching and the
    smaller kept. Any buffer (a numpy
    array is not copied first); read back by :func:`decode_view` or :class:`PlaneReader` like any
    zstd stream; without zstandard the plane is stored."""
    view = memoryview(data).cast("B")
    stored = (
        bytes([STORED]),
        view,
    )  # NOTE: the tag and the plane itself: the caller copies it once
    if len(view) < 16 or not have_zstd() or _noise(view, block_log):
        return stored
    coded = _literal_compressor(block_log).compress(view)
    if matching and len(coded) < STRUCTURED * len(view):
        level = 9 if len(view) <= _MATCHING_LIMIT else 3
        coded = min(coded, _compressor(level).compress(view), key=len)
    return (bytes([ZSTD]), coded) if len(coded) < len(view) else stored


NOISE_SAMPLE = 16 << 10  # bytes in each of the 4 slices a large plane is first judged by
NOISE = (
    0.995  # NOTE: a sample that codes no smaller than this is noise (a float's low mantissa bytes)
)


def _noise(view: memoryview, block_log: int) -> bool:
    """Whether a plane of more than 16 sample slices codes to no less than ``NOISE`` of its size
    on 4 slices spread over it (ZipNN likewise stops coding a plane whose first chunks do not
    shrink): such a plane is stored without coding it whole."""
    if len(view) <= 16 * NOISE_SAMPLE:
        return False
    gap = (len(view) - NOISE_SAMPLE) // 3
    coder = _literal_compressor(block_log)
    coded = sum(len(coder.compress(view[i * gap : i * gap + NOISE_SAMPLE])) for i in range(4))
    return coded >= NOISE * 4 * NOISE_SAMPLE


def _decompressor() -> Any:
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = _zstd_module().ZstdDecompressor()
    return dctx


def decode(blob: bytes | memoryview) -> bytes:
    return bytes(decode_view(blob))


def decode_view(blob: bytes | memoryview) -> bytes | memoryview:
    """Like :func:`decode`, but a stored payload comes back as a view of ``blob`` (no copy):
    for callers that only read the bytes (the byte planes of a float tensor are mostly stored)."""
    tag, payload = blob[0], memoryview(blob)[1:]
    if tag == STORED:
        return payload
    if tag == ZSTD:
        return _decompressor().decompress(payload)
    if tag == LZMA:
        return lzma.decompress(payload, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    raise ValueError(f"unknown stream tag {tag}")


def _plane_decompressor(slot: int) -> Any:
    pool = getattr(_local, "planes", None)
    if pool is None:
        pool = _local.planes = {}
    if slot not in pool:
        pool[slot] = _zstd_module().ZstdDecompressor()
    return pool[slot]


class PlaneReader:
    """Reads one stream in consecutive slices, each decoded into a small reused buffer (a zstd
    stream is decoded as it is read, so a large plane is never held whole; a stored one is read
    where it lies). Streams read side by side need different ``slot`` numbers."""

    def __init__(self, blob: bytes | memoryview, step: int, slot: int = 0) -> None:
        import numpy as np

        self._source = memoryview(blob)[1:]  # NOTE: kept alive: the zstd reader does not hold it
        tag = blob[0]
        self._reader: Any = None
        if tag == ZSTD:
            # NOTE: one decompression context per stream open at once (``slot``: a context cannot
            # serve two), kept per thread: creating one costs as much as decoding a small plane
            self._reader = _plane_decompressor(slot).stream_reader(self._source)
            self._buffer = np.empty(step, np.uint8)
            self._plane = None
        else:
            self._plane = np.frombuffer(decode_view(blob), np.uint8)
        self._pos = 0

    def read(self, count: int) -> Any:
        """The next ``count`` bytes as a numpy uint8 array (valid until the next call)."""
        start, self._pos = self._pos, self._pos + count
        if self._plane is not None:
            if self._pos > len(self._plane):
                raise ValueError("a byte plane is shorter than the tensor")
            return self._plane[start : self._pos]
        view, got = self._buffer[:count], 0
        while got < count:
            n = self._reader.readinto(view[got:])
            if n <= 0:
                raise ValueError("a byte plane is shorter than the tensor")
            got += n
        return view


def pack_parts(parts: list[Any]) -> bytes:
    """Concatenate parts behind a table of their lengths (u8 count, u32 lengths). A part is a
    bytes-like object or a tuple of them (a stream from :func:`literal_pieces`): copied once, here."""
    pieces = [p if isinstance(p, tuple) else (p,) for p in parts]
    lengths = [sum(len(memoryview(x).cast("B")) for x in p) for p in pieces]
    head = struct.pack(f"<B{len(parts)}I", len(parts), *lengths)
    return b"".join([head, *(memoryview(x).cast("B") for p in pieces for x in p)])


def unpack_parts(blob: bytes | memoryview) -> list[memoryview]:
    view = memoryview(blob)
    count = view[0]
    lengths = struct.unpack_from(f"<{count}I", view, 1)
    pos = 1 + 4 * count
    parts = []
    for n in lengths:
        if pos + n > len(view):
            raise ValueError("truncated part")
        parts.append(view[pos : pos + n])
        pos += n
    if pos != len(view):
        raise ValueError("trailing bytes after the last part")
    return parts
