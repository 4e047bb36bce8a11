"""The ``.mpk`` container format: its layout, constants, checksums and the manifest's tensor entries.

Layout of format 3 (all integers little-endian)::

    b"MPACK\\x00\\x03\\x00"                     8-byte magic, format version 3
    tensor blobs ...                            one per packed tensor, coded by its codec
    solid blobs ...                             one per solid stream (see below)
    external-file filler blobs ...              bytes of external-data files no tensor covers
    head                                        LZMA2 (raw) of: u32 manifest size, the manifest
                                                (UTF-8 JSON), the graph (the ModelProto with the
                                                packed tensors' bytes removed)
    u64 head offset, u64 head size, b"MPACKEND"

The manifest and the graph share one LZMA stream (they repeat the same tensor names). Everything
the graph already says (a tensor's name, dtype, shape, role, size, external file and offset) is
not repeated in the manifest (``format: "modelpress-pack/3"``): it holds the checksum every row
uses (``checksum``: ``"xxh3-64"`` where the ``xxhash`` package (the pack extra) is installed, else
``"crc32"``), the source's name and size, the graph's size and checksum, and one row per packed
tensor, ``[index, codec, blob size, checksum of the decoded bytes]`` plus, for a tensor of a solid
stream, the stream's number. ``index``
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
the manifest records whether it was. Every decoded tensor is checked against its checksum
(XXH3-64 runs at ~13 GB/s, CRC-32 at ~3: checking costs a few % of decoding): a damaged container
is an :class:`InvalidModelError` naming the tensor.

Older formats are still read. Format 2 (magic ``MPACK\\x00\\x02\\x00``, ``modelpress-pack/2``)
is format 3 with CRC-32 always (the manifest names none; the graph's is ``graph.crc32``). Format 1
(``MPACK\\x00\\x01\\x00``, ``modelpress-pack/1``): its manifest rows spell out every field
(name, dtype, shape, role, codec, offset, size, bytes, SHA-256, external), and it has no solid
streams. A format-2 reader refuses a format-3 pack as coming from a newer modelpress.
"""

from __future__ import annotations

import hashlib
import lzma
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelpress.plugin.codec import Codec, ElementType, TensorInfo

__all__ = [
    "CRC32",
    "DEFAULT_CHECKSUMS",
    "END",
    "FOOTER",
    "FORMAT",
    "FORMATS",
    "MAGIC",
    "MAGIC_V1",
    "MAGIC_V2",
    "MIN_PACKED_BYTES",
    "SHA256",
    "STORED",
    "VERSIONS",
    "XXH3",
    "PackResult",
    "TensorEntry",
    "checksum",
    "checksum_name",
    "given",
    "lzma_compress",
    "lzma_decompress",
]

FORMAT = "modelpress-pack/3"
MAGIC = b"MPACK\x00\x03\x00"
MAGIC_V1 = b"MPACK\x00\x01\x00"
MAGIC_V2 = b"MPACK\x00\x02\x00"
VERSIONS = {MAGIC_V1: 1, MAGIC_V2: 2, MAGIC: 3}
FORMATS = {1: "modelpress-pack/1", 2: "modelpress-pack/2", 3: FORMAT}
XXH3 = "xxh3-64"
CRC32 = "crc32"
SHA256 = "sha256"
# NOTE: the checksum a format implies when its manifest names none (format 3 names its own)
DEFAULT_CHECKSUMS = {1: SHA256, 2: CRC32}
END = b"MPACKEND"
STORED = "stored"
MIN_PACKED_BYTES = 128  # NOTE: smaller tensors cost more in the manifest than they save
FOOTER = struct.Struct("<QQ8s")
_LZMA_FILTERS: list[dict[str, Any]] = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


def lzma_compress(data: bytes) -> bytes:
    # NOTE: a dictionary no larger than the data codes the same and skips 9e's ~50 ms set-up of a
    # 64 MiB one; the reader's larger dictionary decodes it (raw LZMA2 does not record the size)
    size = min(1 << 26, max(1 << 12, 1 << max(len(data) - 1, 1).bit_length()))
    return lzma.compress(
        data, format=lzma.FORMAT_RAW, filters=[{**_LZMA_FILTERS[0], "dict_size": size}]
    )


def lzma_decompress(data: bytes | memoryview) -> bytes:
    return lzma.decompress(data, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)


def given(codec: Codec, data: bytes | memoryview) -> bytes | memoryview:
    """``data`` as ``codec`` takes it: a view as it is where the codec declares ``views``, else bytes."""
    return data if codec.views or isinstance(data, bytes) else bytes(data)


def checksum_name() -> str:
    """The checksum a new pack uses: XXH3-64 (``xxhash``, the pack extra: ~15 GB/s, 5x CRC-32's
    speed, so checking a tensor costs a few % of decoding it), else CRC-32."""
    try:
        import xxhash  # noqa: F401
    except ImportError:
        return CRC32
    return XXH3


def checksum(data: bytes | bytearray | memoryview, name: str = CRC32) -> str:
    """The hex digest of ``data`` by checksum ``name`` (``xxh3-64``, ``crc32`` or ``sha256``)."""
    if name == XXH3:
        import xxhash

        return xxhash.xxh3_64_hexdigest(data)
    if name == CRC32:
        return f"{zlib.crc32(data):08x}"
    return hashlib.sha256(data).hexdigest()


@dataclass
class TensorEntry:
    """One packed tensor (``index``: its place in the model's tensors). ``offset``/``size`` locate
    its blob in the file; for a member of solid stream ``solid`` they locate the stream's blob and
    the tensor's bytes start ``at`` bytes into the decoded stream. ``checksum``: the
    decoded bytes' checksum (XXH3-64 or CRC-32, as the manifest says; format 1: SHA-256)."""

    index: int
    name: str
    dtype: int
    shape: list[int]
    role: str
    codec: str
    offset: int
    size: int
    bytes: int
    checksum: str
    external: dict[str, Any] | None = None
    solid: int | None = None
    at: int = 0

    @property
    def info(self) -> TensorInfo:
        return TensorInfo(self.name, ElementType(self.dtype), tuple(self.shape), self.role)


@dataclass
class PackResult:
    """What :func:`pack` wrote: sizes, the codec chosen for each tensor, and the solid streams."""

    path: Path
    size_bytes: int
    source_bytes: int
    tensors: list[TensorEntry]
    bytes_identical: bool
    skipped_codecs: dict[str, str] = field(default_factory=dict)
    solids: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.source_bytes / max(self.size_bytes, 1)

    def codec_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.codec] = counts.get(t.codec, 0) + 1
        return counts
