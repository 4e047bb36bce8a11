"""``modelpress pack`` / ``unpack``: a lossless container for ONNX models (``.mpk``).

This module is the feature's public face; the work is split along its seams:
:mod:`~modelpress.pack.format` (layout, constants, checksums, manifest entries),
:mod:`~modelpress.pack.walk` (the tensors of a ``ModelProto``), :mod:`~modelpress.pack.source`
(the bytes to pack), :mod:`~modelpress.pack.strip` (``--strip``),
:mod:`~modelpress.pack.codec_choice` (codec per tensor, solid streams),
:mod:`~modelpress.pack.writer` (:func:`pack`), :mod:`~modelpress.pack.reader` (:func:`unpack`,
:func:`read_packed`), :mod:`~modelpress.pack.wire` (splicing tensor bytes into the stored graph)
and :mod:`~modelpress.pack.entropy` (``inspect --entropy``).

Layout of format 2 (all integers little-endian)::

    b"MPACK\\x00\\x02\\x00"                     8-byte magic, format version 2
    tensor blobs ...                            one per packed tensor, coded by its codec
    solid blobs ...                             one per solid stream (see below)
    external-file filler blobs ...              bytes of external-data files no tensor covers
    head                                        LZMA2 (raw) of: u32 manifest size, the manifest
                                                (UTF-8 JSON), the graph (the ModelProto with the
                                                packed tensors' bytes removed)
    u64 head offset, u64 head size, b"MPACKEND"

The manifest and the graph share one LZMA stream (they repeat the same tensor names). Everything
the graph already says (a tensor's name, dtype, shape, role, size, external file and offset) is
not repeated in the manifest (``format: "modelpress-pack/2"``): it holds the source's name and
size, the graph's size and CRC-32, and one row per packed tensor, ``[index, codec, blob size,
CRC-32 of the decoded bytes]`` plus, for a tensor of a solid stream, the stream's number. ``index``
is the tensor's place in the model's tensors (initializers of the main graph and subgraphs, then
``Constant`` tensors, in graph order); blobs follow each other in row order from byte 8, so their
offsets are implied. Tensors are those whose bytes are in ``raw_data`` (at least
``MIN_PACKED_BYTES``) or in an external file; tensors stored in typed fields (``float_data`` ...),
strings and tiny tensors stay in the graph blob.

**Solid streams** (``solid=True``, the default): the tensors of one dtype and role (all INT8
weights, all INT32 biases, ...) are also coded as one concatenated stream, and the stream replaces
their separate blobs when it is smaller (an LZ coder then finds repeats across tensors, as ``xz``
on the whole file does). A manifest ``solids`` row is ``[codec, blob size, decoded size, dtype,
role]``; the stream's members follow each other in it in row order. The trade-off: reading one
member decodes the whole stream (``unpack`` and ``load`` decode each stream once); pack with
``solid=False`` to keep every tensor separately decodable.

**Decode speed** (``prefer="speed"``, the default): a codec that is slow to decode (``lzma``:
tens of MB/s) is chosen only when its blob is at least ``SLOW_GAIN`` (10 %) smaller than the best
fast one (hundreds of MB/s); ``prefer="size"`` always keeps the smallest blob.

Unpacking refills each tensor's ``raw_data`` (or its external file at its offset) and
re-serialises the graph, which reproduces the original file byte for byte whenever the input's
serialisation was canonical (files written by onnx, onnx_ir, torch.onnx and modelpress are);
the manifest records whether it was. Every decoded tensor is checked against its CRC-32 (format
1: SHA-256): a damaged container is an :class:`InvalidModelError` naming the tensor.

Format 1 (magic ``MPACK\\x00\\x01\\x00``, ``modelpress-pack/1``) is still read: its manifest
rows spell out every field (name, dtype, shape, role, codec, offset, size, bytes, SHA-256,
external), and it has no solid streams.
"""

from __future__ import annotations

from modelpress.pack.codec_choice import encode_best
from modelpress.pack.entropy import tensor_report
from modelpress.pack.format import FORMAT, MAGIC, PackResult, TensorEntry
from modelpress.pack.reader import PackedModel, read_packed, unpack
from modelpress.pack.writer import pack

__all__ = ["FORMAT", "MAGIC", "PackResult", "PackedModel", "TensorEntry", "encode_best", "pack", "read_packed", "tensor_report", "unpack"]
