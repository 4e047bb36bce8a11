"""Codecs: lossless coders of one tensor's bytes, used by ``modelpress pack``.

A :class:`Codec` turns the bytes of one tensor (exactly as ONNX stores them: little-endian,
int4/uint4 two to a byte) into a shorter blob and back, bit-exactly. Codecs come from plugins
(``modelpress_register_codecs``); the packer tries every codec that ``applies`` to a tensor and
keeps the smallest blob that decodes to the same bytes.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

__all__ = ["Codec", "ElementType", "TensorInfo", "numpy_dtype"]

# NOTE: bits per element of each ONNX element type (as onnx_ir.DataType.bitwidth gives them)
_BITS = {
    1: 32,
    2: 8,
    3: 8,
    4: 16,
    5: 16,
    6: 32,
    7: 64,
    9: 8,
    10: 16,
    11: 64,
    12: 32,
    13: 64,
    14: 64,
    15: 128,
    16: 16,
    17: 8,
    18: 8,
    19: 8,
    20: 8,
    21: 4,
    22: 4,
    23: 4,
    24: 8,
    25: 2,
    26: 2,
    27: 6,
    28: 6,
}


class ElementType(enum.IntEnum):
    """An ONNX element type, by its ``TensorProto.DataType`` number: what :class:`TensorInfo`
    carries as ``dtype`` (since modelpress 0.2; before, an ``onnx_ir.DataType``).

    Needs no onnx or onnx-ir (``modelpress unpack`` imports neither). A member compares and hashes
    equal to the ``onnx_ir.DataType`` (and the int) of the same number, so ``info.dtype in
    (ir.DataType.FLOAT, ir.DataType.FLOAT16)`` and ``ir.DataType(info.dtype)`` work as before;
    ``bitwidth`` and ``itemsize`` are its own, and any other attribute of ``onnx_ir.DataType``
    (``numpy()``, ``short_name()``, ``is_floating_point()`` ...) is that member's, importing onnx-ir
    on first use. ``isinstance(info.dtype, ir.DataType)`` is False: convert with ``ir.DataType(...)``.
    """

    UNDEFINED = 0
    FLOAT = 1
    UINT8 = 2
    INT8 = 3
    UINT16 = 4
    INT16 = 5
    INT32 = 6
    INT64 = 7
    STRING = 8
    BOOL = 9
    FLOAT16 = 10
    DOUBLE = 11
    UINT32 = 12
    UINT64 = 13
    COMPLEX64 = 14
    COMPLEX128 = 15
    BFLOAT16 = 16
    FLOAT8E4M3FN = 17
    FLOAT8E4M3FNUZ = 18
    FLOAT8E5M2 = 19
    FLOAT8E5M2FNUZ = 20
    UINT4 = 21
    INT4 = 22
    FLOAT4E2M1 = 23
    FLOAT8E8M0 = 24
    UINT2 = 25
    INT2 = 26
    FLOAT6E2M3 = 27
    FLOAT6E3M2 = 28

    @property
    def bitwidth(self) -> int:
        """Bits per element; ``TypeError`` for ``STRING`` and ``UNDEFINED`` (as onnx-ir)."""
        bits = _BITS.get(int(self))
        if bits is None:
            raise TypeError(f"bitwidth not available for ONNX data type {self.name}")
        return bits

    @property
    def itemsize(self) -> float:
        """Bytes per element (``0.5`` for int4)."""
        return self.bitwidth / 8

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        import onnx_ir as ir  # NOTE: the rest of onnx_ir.DataType's API, for codecs written against it

        return getattr(ir.DataType(int(self)), name)


@dataclass(frozen=True)
class TensorInfo:
    """What a codec is told about the tensor it codes.

    ``dtype`` is the ONNX element type (an :class:`ElementType`, which compares equal to the
    ``onnx_ir.DataType`` of the same number; built from either), ``shape`` the dims, ``role`` what the tensor is to the
    graph: ``"weight"`` (input 1 of Conv/ConvTranspose/Gemm/MatMul), ``"bias"``, ``"quantized"``
    (the integer input of DequantizeLinear), ``"indices"`` (integer input of Gather: codebook
    indices), ``"table"`` (the data of a Gather: a codebook) or ``"other"``.
    """

    name: str
    dtype: ElementType
    shape: tuple[int, ...]
    role: str = "other"

    def __post_init__(self) -> None:
        # NOTE: an onnx_ir.DataType (what codecs were given before) or an int is taken as it is
        if type(self.dtype) is not ElementType:
            object.__setattr__(self, "dtype", ElementType(self.dtype))

    @property
    def size(self) -> int:
        count = 1
        for d in self.shape:
            count *= int(d)
        return count


def numpy_dtype(dtype: ElementType | int) -> np.dtype | None:
    """A numpy dtype with the same width as ``dtype`` (an :class:`ElementType`, an
    ``onnx_ir.DataType`` or the number) whose values can be compared bit for bit (an unsigned
    integer for floats, so NaN payloads compare equal); None for sub-byte types and strings."""
    bits = _BITS.get(int(dtype), 0)
    if bits < 8 or bits % 8:
        return None
    import numpy as np

    return np.dtype(f"<u{bits // 8}")


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
