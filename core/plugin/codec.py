"""Codecs: lossless coders of one tensor's bytes, used by ``modelpress pack``.

A :class:`Codec` turns the bytes of one tensor (exactly as ONNX stores them: little-endian,
int4/uint4 two to a byte) into a shorter blob and back, bit-exactly. Codecs come from plugins
(``modelpress_register_codecs``); the packer tries every codec that ``applies`` to a tensor and
keeps the smallest blob that decodes to the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import onnx_ir as ir

__all__ = ["Codec", "TensorInfo", "numpy_dtype"]


@dataclass(frozen=True)
class TensorInfo:
    """What a codec is told about the tensor it codes.

    ``dtype`` is the ONNX element type, ``shape`` the dims, ``role`` what the tensor is to the
    graph: ``"weight"`` (input 1 of Conv/ConvTranspose/Gemm/MatMul), ``"bias"``, ``"quantized"``
    (the integer input of DequantizeLinear), ``"indices"`` (integer input of Gather: codebook
    indices), ``"table"`` (the data of a Gather: a codebook) or ``"other"``.
    """

    name: str
    dtype: ir.DataType
    shape: tuple[int, ...]
    role: str = "other"

    @property
    def size(self) -> int:
        count = 1
        for d in self.shape:
            count *= int(d)
        return count


def numpy_dtype(dtype: ir.DataType) -> np.dtype | None:
    """A numpy dtype with the same width as ``dtype`` whose values can be compared bit for bit
    (an unsigned integer for floats, so NaN payloads compare equal); None for sub-byte types."""
    if dtype in (ir.DataType.STRING, ir.DataType.UNDEFINED) or dtype.bitwidth < 8:
        return None
    return np.dtype(f"<u{dtype.bitwidth // 8}")


@dataclass(frozen=True)
class Codec:
    """A lossless tensor coder. See ``modelpress_register_codecs``.

    ``name``: how packs and ``pack(codecs=[...])`` name it (stored in every pack that uses it, so
    keep it stable). ``encode(data, info) -> bytes | None`` codes ``data`` (a ``bytes`` object with
    the tensor's raw little-endian bytes; ``info`` a :class:`TensorInfo`); returning ``None``
    means "I cannot code this one". ``decode(blob, info)`` must give back exactly ``data`` (the
    packer checks) as a bytes-like object: ``bytes``, or a ``bytearray``/``memoryview`` of the
    buffer it decoded into (one copy of the tensor fewer). ``applies(info) -> bool`` is asked
    first, so a codec for int8 weights is never tried on a float bias. ``estimate(data, info) ->
    int | None``: optional, a cheap guess of the blob's size (``None``: cannot code it); the
    packer codes a large tensor in full only with the codec(s) estimated smallest, so without
    ``estimate`` it codes a sample of the tensor (``SAMPLE_BYTES`` spread over it, the same for
    every codec) and scales the size up. Give one where coding a sample is slow (LZMA). ``summary``: one line for ``modelpress plugins``.
    ``fast_decode=False`` marks a codec whose decoding is slow (LZMA: tens of MB/s instead of
    hundreds): with ``pack(prefer="speed")`` (the default) the packer picks it only when it saves
    at least 10 % over the best fast codec; ``prefer="size"`` always takes the smallest.
    ``views=True`` says ``encode``, ``estimate`` and ``decode`` take any bytes-like object (a
    read-only ``memoryview`` of the model file or of the pack) where they are otherwise given
    ``bytes``: packing and unpacking then copy no tensor before coding it.
    ``plugin`` and ``plugin_version`` are filled in by the registry (the registering plugin);
    leave them unset.
    """

    name: str
    encode: Callable[[bytes, TensorInfo], bytes | None]
    decode: Callable[[bytes, TensorInfo], bytes | bytearray | memoryview]
    applies: Callable[[TensorInfo], bool] = lambda info: True
    summary: str = ""
    fast_decode: bool = True
    estimate: Callable[[bytes, TensorInfo], int | None] | None = None
    views: bool = False
    plugin: str = ""
    plugin_version: str = ""

    def attributed(self, plugin: str, plugin_version: str) -> Codec:
        return replace(self, plugin=plugin, plugin_version=plugin_version)
