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

__all__ = ["LZMA_LIMIT", "decode", "decode_view", "encode", "have_zstd", "pack_parts", "unpack_parts"]

STORED, ZSTD, LZMA = 0, 1, 2
# NOTE: LZMA at preset 9e codes ~1-3 MB/s; past this size only zstd is tried.
LZMA_LIMIT = 32 << 20
_LZMA_FILTERS: list[dict[str, Any]] = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
_zstd: Any = None
# NOTE: a ZstdDecompressor allocates its context on creation (tens of microseconds, as long as
# decoding a small tensor); one per thread is kept, since one must not be used by two threads at once
_local = threading.local()


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


def encode(data: bytes | memoryview, *, fast: bool = False, level: int = 19) -> bytes:
    """The smallest of stored / zstd / (unless ``fast``) LZMA, with its tag byte."""
    data = bytes(data)
    best = bytes([STORED]) + data
    if len(data) < 16:
        return best
    if have_zstd():
        coded = bytes([ZSTD]) + _zstd.ZstdCompressor(level=level).compress(data)
        if len(coded) < len(best):
            best = coded
    if not fast and len(data) <= LZMA_LIMIT:
        coded = bytes([LZMA]) + lzma.compress(data, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
        if len(coded) < len(best):
            best = coded
    return best


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


def pack_parts(parts: list[bytes]) -> bytes:
    """Concatenate parts behind a table of their lengths (u8 count, u32 lengths)."""
    head = struct.pack(f"<B{len(parts)}I", len(parts), *(len(p) for p in parts))
    return head + b"".join(parts)


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
