"""``modelpress pack`` / ``unpack``: a lossless container for ONNX models (``.mpk``).

This module is the feature's public face; the work is split along its seams:
:mod:`~modelpress.pack.format` (layout, constants, checksums, manifest entries),
:mod:`~modelpress.pack.walk` (the tensors of a ``ModelProto``), :mod:`~modelpress.pack.source`
(the bytes to pack), :mod:`~modelpress.pack.strip` (``--strip``),
:mod:`~modelpress.pack.codec_choice` (codec per tensor, solid streams),
:mod:`~modelpress.pack.writer` (:func:`pack`), :mod:`~modelpress.pack.reader` (:func:`unpack`,
:func:`read_packed`), :mod:`~modelpress.pack.wire` (splicing tensor bytes into the stored graph)
and :mod:`~modelpress.pack.entropy` (``inspect --entropy``).

A ``.mpk`` holds the tensors' blobs (each tensor coded by the installed codec that makes it
smallest and decodes it bit-exactly, or several tensors of one dtype and role as one solid
stream), then the graph without those bytes and a manifest; unpacking gives the original file
back byte for byte. The layout, solid streams, the decode-speed preference and format 1 are
described in :mod:`modelpress.pack.format`.
"""

from __future__ import annotations

from modelpress.pack.codec_choice import encode_best
from modelpress.pack.entropy import tensor_report
from modelpress.pack.format import FORMAT, MAGIC, PackResult, TensorEntry
from modelpress.pack.reader import PackedModel, read_packed, unpack
from modelpress.pack.writer import pack

__all__ = ["FORMAT", "MAGIC", "PackResult", "PackedModel", "TensorEntry", "encode_best", "pack", "read_packed", "tensor_report", "unpack"]
