"""``modelpress pack`` / ``unpack``: a lossless container for ONNX models (``.mpk``).

This module is the feature's public face; the work is split along its seams:
:mod:`~modelpress.packing.format` (layout, constants, checksums, manifest entries),
:mod:`~modelpress.packing.walk` (the tensors of a ``ModelProto``), :mod:`~modelpress.packing.source`
(the bytes to pack), :mod:`~modelpress.packing.strip` (``--strip``),
:mod:`~modelpress.packing.codec_choice` (codec per tensor, solid streams),
:mod:`~modelpress.packing.writer` (:func:`pack`), :mod:`~modelpress.packing.reader` (:func:`unpack`,
:func:`read_packed`), :mod:`~modelpress.packing.wire` (splicing tensor bytes into the stored graph)
and :mod:`~modelpress.packing.entropy` (``inspect --entropy``).

A ``.mpk`` holds the tensors' blobs (each tensor coded by the installed codec that makes it
smallest and decodes it bit-exactly, or several tensors of one dtype and role as one solid
stream), then the graph without those bytes and a manifest; unpacking gives the original file
back byte for byte. The layout, solid streams, the decode-speed preference and format 1 are
described in :mod:`modelpress.packing.format`.
"""

from __future__ import annotations

from modelpress.packing.codec_choice import encode_best
from modelpress.packing.entropy import tensor_report
from modelpress.packing.format import FORMAT, MAGIC, PackResult, TensorEntry
from modelpress.packing.reader import PackedModel, read_packed, unpack
from modelpress.packing.writer import pack

__all__ = [
    "FORMAT",
    "MAGIC",
    "PackResult",
    "PackedModel",
    "TensorEntry",
    "encode_best",
    "pack",
    "read_packed",
    "tensor_report",
    "unpack",
]
