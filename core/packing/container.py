"""``modelpress pack`` / ``unpack``: a lossless container for ONNX models (``.mpk``).

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

import functools
import hashlib
import json
import lzma
import mmap
import os
import shutil
import struct
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from modelpress.base.errors import (
    ExportError,
    InvalidModelError,
    OptionsError,
    PluginError,
    UnsafeExternalDataError,
)
from modelpress.packing.wire import splice, tensor_spans
from modelpress.plugin.codec import Codec, TensorInfo
from modelpress.plugin.registry import Registry, current_registry

__all__ = ["FORMAT", "PackResult", "TensorEntry", "pack", "read_packed", "unpack"]

FORMAT = "modelpress-pack/2"
MAGIC = b"MPACK\x00\x02\x00"
MAGIC_V1 = b"MPACK\x00\x01\x00"
_VERSIONS = {MAGIC_V1: 1, MAGIC: 2}
_FORMATS = {1: "modelpress-pack/1", 2: FORMAT}
END = b"MPACKEND"
STORED = "stored"
MIN_PACKED_BYTES = 128  # NOTE: smaller tensors cost more in the manifest than they save
SLOW_GAIN = 0.10  # a slow-to-decode codec must save this much over the best fast one (prefer="speed")
SOLID_LIMIT = 8 << 20  # NOTE: a solid stream is decoded whole (and packing codes a group twice): larger groups stay separate
_FOOTER = struct.Struct("<QQ8s")
_LZMA_FILTERS: list[dict[str, Any]] = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
_WEIGHTED = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}


def _lzma(data: bytes) -> bytes:
    return lzma.compress(data, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)


def _unlzma(data: bytes | memoryview) -> bytes:
    return lzma.decompress(data, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)


def _checksum(data: bytes | memoryview, version: int = 2) -> str:
    """Format 2: CRC-32 (8 hex digits; fast, and any damage a codec lets through shows); format 1: SHA-256."""
    return f"{zlib.crc32(data):08x}" if version >= 2 else hashlib.sha256(data).hexdigest()


@dataclass
class TensorEntry:
    """One packed tensor (``index``: its place in the model's tensors). ``offset``/``size`` locate
    its blob in the file; for a member of solid stream ``solid`` they locate the stream's blob and
    the tensor's bytes start ``at`` bytes into the decoded stream. ``checksum``: CRC-32 of the
    decoded bytes (format 1: SHA-256)."""

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
        return TensorInfo(self.name, ir.DataType(self.dtype), tuple(self.shape), self.role)


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


# -- walking the model ----------------------------------------------------------------------------


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _graphs(attr.g)
            for g in attr.graphs:
                yield from _graphs(g)


def _roles(graph: onnx.GraphProto) -> dict[str, str]:
    roles: dict[str, str] = {}
    for g in _graphs(graph):
        for node in g.node:
            for i, name in enumerate(node.input):
                if node.op_type in _WEIGHTED and i == _WEIGHTED[node.op_type]:
                    roles.setdefault(name, "weight")
                elif node.op_type in ("Conv", "ConvTranspose", "Gemm") and i == 2:
                    roles.setdefault(name, "bias")
                elif node.op_type == "DequantizeLinear" and i == 0:
                    roles.setdefault(name, "quantized")
                elif node.op_type == "Gather":
                    roles.setdefault(name, "table" if i == 0 else "indices")
    return roles


def _tensors(proto: onnx.ModelProto) -> Iterator[tuple[str, onnx.TensorProto]]:
    """Every tensor a model holds, in a fixed order: each graph's initializers, then the tensors
    in its nodes' attributes (``Constant`` weights), with the name the graph knows it by."""
    for g in _graphs(proto.graph):
        for tensor in g.initializer:
            yield tensor.name, tensor
        for node in g.node:
            for attr in node.attribute:
                name = node.output[0] if node.op_type == "Constant" and node.output else tensor_name(node, attr)
                if attr.HasField("t"):
                    yield name, attr.t
                for t in attr.tensors:
                    yield name, t


def tensor_name(node: onnx.NodeProto, attr: onnx.AttributeProto) -> str:
    return f"{node.name or node.op_type}.{attr.name}"


def _external(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def _nbytes(tensor: onnx.TensorProto) -> int | None:
    count = 1
    for d in tensor.dims:
        count *= int(d)
    try:
        dtype = ir.DataType(tensor.data_type)
        bits = dtype.bitwidth
    except (ValueError, TypeError):
        return None
    return (count * bits + 7) // 8


def _safe_location(base: Path, location: str, label: str, tensor: str) -> Path:
    what = f"{label}: initializer {tensor!r} has external data at {location!r}"
    if not location or os.path.isabs(location) or location.startswith(("\\", "/")):
        raise UnsafeExternalDataError(f"{what}, an absolute path; external data must live beside the model")
    full = (base / location).resolve()
    if base.resolve() not in full.parents:
        raise UnsafeExternalDataError(f"{what}, which resolves outside the model's folder; refusing to read it")
    return full


# -- choosing codecs ------------------------------------------------------------------------------


def _select_codecs(registry: Registry, codecs: str | list[str]) -> list[Codec]:
    available = registry.codecs()
    if codecs == "auto":
        return available
    names = [codecs] if isinstance(codecs, str) else list(codecs)
    chosen = []
    for name in names:
        codec = registry.codec(name)
        if codec is None and name != STORED:
            known = ", ".join(c.name for c in available) or "none"
            raise OptionsError(f"no installed plugin provides a codec {name!r}; installed codecs: {known}")
        if codec is not None:
            chosen.append(codec)
    return chosen


def encode_best(
    data: bytes, info: TensorInfo, codecs: list[Codec], skipped: dict[str, str] | None = None, *, prefer: str = "speed",
) -> tuple[str, bytes]:
    """The smallest blob among ``codecs`` that decodes back to ``data`` (else stored). With
    ``prefer="speed"`` a codec marked ``fast_decode=False`` counts only where it saves at least
    ``SLOW_GAIN`` over the best fast candidate."""
    candidates: list[tuple[int, str, bytes, bool]] = []
    for codec in codecs:
        try:
            if not codec.applies(info):
                continue
            blob = codec.encode(data, info)
        except Exception as exc:
            if skipped is not None:
                skipped[codec.name] = f"raised on {info.name!r}: {type(exc).__name__}: {exc}"
            continue
        if blob is not None and len(blob) < len(data):
            candidates.append((len(blob), codec.name, bytes(blob), codec.fast_decode))
    if prefer == "speed":
        fast = min([len(data), *(c[0] for c in candidates if c[3])])
        candidates = [c for c in candidates if c[3] or c[0] <= (1 - SLOW_GAIN) * fast]
    by_name = {c.name: c for c in codecs}
    for _, name, blob, _fast in sorted(candidates, key=lambda c: c[0]):
        try:
            ok = by_name[name].decode(blob, info) == data
        except Exception as exc:
            ok = False
            if skipped is not None:
                skipped[name] = f"decode raised on {info.name!r}: {type(exc).__name__}: {exc}"
        if ok:
            return name, blob
        if skipped is not None:
            skipped.setdefault(name, f"did not decode {info.name!r} bit-exactly")
    return STORED, data


# -- pack -----------------------------------------------------------------------------------------


def _source(model: Any) -> tuple[bytes, Path | None, str]:
    """The ONNX bytes to pack, the folder external data is relative to, and a label."""
    from modelpress.ir.model import Model

    if isinstance(model, Model):
        if any(isinstance(v.const_value, ir.ExternalTensor) for v in model.ir.graph.initializers.values()):
            base = Path(model.path).parent if model.path else None
            proto = model.to_proto()
            return proto.SerializeToString(), base, model.name
        return model.to_proto().SerializeToString(), None, model.name
    path = Path(model)
    if not path.is_file():
        raise InvalidModelError(f"{str(path)!r}: no such file")
    return path.read_bytes(), path.parent, str(path)


@dataclass
class _Item:
    """One tensor to pack: where it is in the model, its bytes and what codecs are told."""

    index: int
    tensor: onnx.TensorProto
    data: bytes
    info: TensorInfo
    external: dict[str, Any] | None
    codec: str = STORED
    blob: bytes = b""
    solid: int | None = None


def pack(
    model: Any,
    output: str | os.PathLike[str],
    *,
    codecs: str | list[str] = "auto",
    solid: bool = True,
    prefer: str = "speed",
    strip: bool = False,
    registry: Registry | None = None,
) -> PackResult:
    """Pack an ONNX file (or a :class:`modelpress.Model`) into a ``.mpk`` container at ``output``.

    ``codecs`` is ``"auto"`` (every installed codec; each tensor gets the smallest blob that
    decodes bit-exactly) or a list of codec names (``"stored"`` alone stores every tensor as is).
    ``solid``: also try one stream per dtype and role and keep it where it is smaller (reading
    one of its tensors then decodes the whole stream). ``prefer``: ``"speed"`` (slow-to-decode
    codecs only where they save >= 10 %) or ``"size"`` (always the smallest). ``strip``: first
    drop what running the model does not need (metadata properties such as provenance or the
    exporter's per-node stack traces, doc strings, ``value_info`` shape annotations): unpacking then gives a model that computes the
    same but is not the same file. The file is written atomically.
    """
    if prefer not in ("speed", "size"):
        raise OptionsError(f"pack: prefer must be 'speed' or 'size', not {prefer!r}")
    chosen = _select_codecs(registry or current_registry(), codecs)
    src = _parse_source(model, strip)
    target = Path(output)
    if not target.parent.is_dir():
        raise ExportError(f"cannot write {str(target)!r}: folder {str(target.parent)!r} does not exist")
    skipped: dict[str, str] = {}
    externals: dict[str, list[tuple[int, int]]] = {}
    roles = _roles(src.proto.graph)
    items = [it for index, (name, tensor) in enumerate(_tensors(src.proto)) if (it := _item(index, name, tensor, roles, src.base, src.label, externals))]
    for it in items:
        it.codec, it.blob = encode_best(it.data, it.info, chosen, skipped, prefer=prefer)
    streams = _solids(items, chosen, skipped, prefer) if solid else []
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(MAGIC)
            entries = _write_blobs(items, streams, out)
            files = _pack_filler(externals, src.base, src.label, out)
            _write_head(src, chosen, entries, streams, files, out)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    source_bytes = src.original + sum(f["size"] for f in files)
    return PackResult(target, target.stat().st_size, source_bytes, entries, src.identical, skipped, streams)


@dataclass
class _Source:
    """The model to pack, parsed: its proto (stripped if asked), the bytes it came from, where its
    external data lives, and whether re-serialising the proto gives those bytes back."""

    proto: onnx.ModelProto
    data: bytes
    original: int
    base: Path | None
    label: str
    identical: bool
    strip: bool


def _parse_source(model: Any, strip: bool) -> _Source:
    data, base, label = _source(model)
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as exc:
        raise InvalidModelError(f"{label}: not a valid ONNX model ({exc})") from None
    if not proto.HasField("graph"):
        raise InvalidModelError(f"{label}: not an ONNX model (no graph)")
    original = len(data)
    if strip:
        _strip(proto)
        data = proto.SerializeToString()
    return _Source(proto, data, original, base, label, proto.SerializeToString() == data, strip)


def _write_blobs(items: list[_Item], streams: list[dict[str, Any]], out: Any) -> list[TensorEntry]:
    """Write the separate tensors' blobs, then the solid streams; clear the packed tensors'
    ``raw_data`` from the graph. The entries come back in tensor order."""
    entries: list[TensorEntry] = []
    for it in items:
        if it.solid is None:
            entries.append(_entry(it, it.codec, out.tell(), len(it.blob)))
            out.write(it.blob)
    ats = [0] * len(streams)
    for stream in streams:
        stream["offset"] = out.tell()
        out.write(stream.pop("blob"))
    for it in items:
        if it.solid is not None:
            stream = streams[it.solid]
            entries.append(_entry(it, stream["codec"], stream["offset"], stream["size"], it.solid, ats[it.solid]))
            ats[it.solid] += len(it.data)
        if it.external is None:
            it.tensor.ClearField("raw_data")
    entries.sort(key=lambda e: e.index)
    return entries


def _write_head(src: _Source, chosen: list[Codec], entries: list[TensorEntry], streams: list[dict[str, Any]], files: list[dict[str, Any]], out: Any) -> None:
    """Write the head (the manifest and the graph without the packed bytes, one LZMA stream) and the footer."""
    stripped = src.proto.SerializeToString()
    used = {e.codec for e in entries}
    manifest = {
        "format": FORMAT,
        "source": {"name": Path(src.label).name, "bytes": len(src.data), "bytes_identical": src.identical, **({"stripped": True} if src.strip else {})},
        "graph": {"size": len(stripped), "crc32": _checksum(stripped)},
        "codecs": {c.name: f"{c.plugin} {c.plugin_version}".strip() for c in chosen if c.name in used},
        "tensors": [_row(e) for e in sorted(entries, key=lambda e: (e.solid is not None, e.solid or 0, e.index))],
        "solids": [[s["codec"], s["size"], s["bytes"], s["dtype"], s["role"]] for s in streams],
        "external_files": files,
    }
    text = json.dumps(manifest, separators=(",", ":")).encode()
    blob = _lzma(struct.pack("<I", len(text)) + text + stripped)
    offset = out.tell()
    out.write(blob)
    out.write(_FOOTER.pack(offset, len(blob), END))


def _strip_body(body: onnx.GraphProto | onnx.FunctionProto) -> None:
    """A graph's or function's own doc string, metadata and shape annotations, and its nodes'."""
    body.ClearField("doc_string")
    del body.metadata_props[:]
    del body.value_info[:]
    for node in body.node:
        node.ClearField("doc_string")
        del node.metadata_props[:]


def _strip(proto: onnx.ModelProto) -> None:
    """Drop what ONNX Runtime does not read: metadata properties (of the model, its graphs, nodes,
    inputs/outputs, tensors and functions: exporters put stack traces and module paths there),
    doc strings, shape annotations."""
    del proto.metadata_props[:]
    proto.ClearField("doc_string")
    for function in proto.functions:
        _strip_body(function)
    for g in _graphs(proto.graph):
        _strip_body(g)
        for value in (*g.input, *g.output):
            value.ClearField("doc_string")
            del value.metadata_props[:]
    for _name, tensor in _tensors(proto):  # NOTE: initializers and Constant/attribute tensors, subgraphs included
        tensor.ClearField("doc_string")
        del tensor.metadata_props[:]


def _entry(it: _Item, codec: str, offset: int, size: int, solid: int | None = None, at: int = 0) -> TensorEntry:
    return TensorEntry(
        index=it.index, name=it.info.name, dtype=int(it.info.dtype), shape=list(it.info.shape), role=it.info.role, codec=codec,
        offset=offset, size=size, bytes=len(it.data), checksum=_checksum(it.data), external=it.external, solid=solid, at=at,
    )


def _row(e: TensorEntry) -> list[Any]:
    """A format-2 manifest row: what the graph does not already say."""
    row: list[Any] = [e.index, e.codec, e.size, e.checksum]
    return row if e.solid is None else [e.index, "", 0, e.checksum, e.solid]


def _solids(items: list[_Item], codecs: list[Codec], skipped: dict[str, str], prefer: str) -> list[dict[str, Any]]:
    """Code each group of same-dtype, same-role tensors as one stream; keep the streams that are
    smaller than their members' blobs together (and mark those members)."""
    from modelpress.plugin.codec import numpy_dtype

    groups: dict[tuple[int, str], list[_Item]] = {}
    for it in items:
        if numpy_dtype(it.info.dtype) is not None:
            groups.setdefault((int(it.info.dtype), it.info.role), []).append(it)
    streams: list[dict[str, Any]] = []
    for (dtype, role), members in groups.items():
        total = sum(len(it.data) for it in members)
        if len(members) < 2 or total > SOLID_LIMIT:
            continue
        width = ir.DataType(dtype).bitwidth // 8
        info = TensorInfo(f"solid stream of {len(members)} {ir.DataType(dtype).name.lower()} {role} tensors", ir.DataType(dtype), (total // width,), role)
        codec, blob = encode_best(b"".join(it.data for it in members), info, codecs, skipped, prefer=prefer)
        # NOTE: a member row costs about the same either way; the stream must beat the separate blobs
        if len(blob) >= sum(len(it.blob) for it in members):
            continue
        for it in members:
            it.solid = len(streams)
        streams.append({"codec": codec, "size": len(blob), "bytes": total, "dtype": dtype, "role": role, "tensors": len(members), "blob": blob})
    return streams


def _item(
    index: int, name: str, tensor: onnx.TensorProto, roles: dict[str, str], base: Path | None, label: str,
    externals: dict[str, list[tuple[int, int]]],
) -> _Item | None:
    """The bytes of one tensor worth packing (inline ``raw_data`` or external data), else None."""
    nbytes = _nbytes(tensor)
    if nbytes is None:
        return None
    external = None
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        info = _external(tensor)
        if base is None:
            raise InvalidModelError(f"{label}: initializer {tensor.name!r} has external data but the model has no folder")
        path = _safe_location(base, info.get("location", ""), label, tensor.name)
        offset = int(info.get("offset", 0) or 0)
        length = int(info.get("length", nbytes) or nbytes)
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(length)
        except OSError as exc:
            raise InvalidModelError(f"{label}: external data of initializer {tensor.name!r} cannot be read: {exc.strerror}") from None
        if len(data) != length:
            raise InvalidModelError(f"{label}: external data of initializer {tensor.name!r} is truncated ({len(data)} of {length} bytes)")
        external = {"location": info["location"], "offset": offset}
        externals.setdefault(info["location"], []).append((offset, length))
    elif tensor.HasField("raw_data") and len(tensor.raw_data) >= MIN_PACKED_BYTES:
        data = tensor.raw_data
        if len(data) != nbytes:
            return None  # NOTE: malformed size: leave it in the graph untouched
    else:
        return None
    info_ = TensorInfo(name, ir.DataType(tensor.data_type), tuple(int(d) for d in tensor.dims), roles.get(name, "other"))
    return _Item(index, tensor, data, info_, external)


def _pack_filler(externals: dict[str, list[tuple[int, int]]], base: Path | None, label: str, out: Any) -> list[dict[str, Any]]:
    """Keep the bytes of each external-data file that no tensor covers (padding, alignment)."""
    files = []
    for location, spans in externals.items():
        assert base is not None
        path = _safe_location(base, location, label, location)
        size = path.stat().st_size
        covered = sorted(spans)
        gaps, pos = [], 0
        for start, length in covered:
            if start > pos:
                gaps.append((pos, start - pos))
            pos = max(pos, start + length)
        if pos < size:
            gaps.append((pos, size - pos))
        filler = b""
        with open(path, "rb") as f:
            for start, length in gaps:
                f.seek(start)
                filler += f.read(length)
        blob = _lzma(filler) if filler else b""
        files.append({"location": location, "size": size, "gaps": gaps, "offset": out.tell(), "blob": len(blob)})
        out.write(blob)
    return files


# -- reading --------------------------------------------------------------------------------------


class PackedModel:
    """An opened ``.mpk``: the manifest, the graph, and tensors decoded one at a time (the
    members of a solid stream: one stream at a time)."""

    def __init__(self, path: str | os.PathLike[str], registry: Registry | None = None) -> None:
        self.path = Path(path)
        self.label = str(self.path)
        self.registry = registry or current_registry()
        try:
            with open(self.path, "rb") as f:
                self._map: Any = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self.path.stat().st_size else b""
        except OSError as exc:
            raise InvalidModelError(f"{self.label}: cannot be read: {exc.strerror}") from None
        self.version = 2
        self.manifest = self._read_manifest()
        self._entries: list[TensorEntry] | None = None
        # NOTE: decoded solid streams, each dropped once all its members were read (then decoded
        # again if asked for): writing tensors in file order interleaves the streams' members
        self._solids: dict[int, bytes] = {}
        self._solid_left: dict[int, int] = {}

    def _damaged(self, what: str) -> InvalidModelError:
        return InvalidModelError(f"{self.label}: damaged modelpress pack: {what}; the file is truncated or corrupt (pack the model again)")

    def _slice(self, offset: int, size: int, what: str) -> bytes:
        if offset < len(MAGIC) or size < 0 or offset + size > len(self._map) - _FOOTER.size:
            raise self._damaged(f"{what} lies outside the file")
        # NOTE: a copy of one blob (not a view): the map can then close while errors hold frames
        return bytes(self._map[offset : offset + size])

    def _read_manifest(self) -> dict[str, Any]:
        data = self._map
        if len(data) < len(MAGIC) + _FOOTER.size or bytes(data[: len(MAGIC)]) not in _VERSIONS:
            if len(data) >= 5 and bytes(data[:5]) == MAGIC[:5]:
                raise self._damaged("the header or footer is missing (or the file comes from a newer modelpress)")
            raise InvalidModelError(f"{self.label}: not a modelpress pack (.mpk); create one with `modelpress pack MODEL.onnx -o MODEL.mpk`")
        self.version = _VERSIONS[bytes(data[: len(MAGIC)])]
        offset, size, end = _FOOTER.unpack_from(data, len(data) - _FOOTER.size)
        if end != END:
            raise self._damaged("the footer is missing")
        try:
            head = _unlzma(self._slice(offset, size, "the manifest"))
            (length,) = struct.unpack_from("<I", head)
            manifest = json.loads(head[4 : 4 + length])
        except (lzma.LZMAError, ValueError, struct.error) as exc:
            raise self._damaged(f"the manifest cannot be read ({exc})") from None
        self._graph = head[4 + length :]
        if not isinstance(manifest, dict) or manifest.get("format") != _FORMATS[self.version]:
            raise InvalidModelError(f"{self.label}: unsupported pack format {manifest.get('format') if isinstance(manifest, dict) else '?'!r} (this modelpress reads {', '.join(_FORMATS.values())})")
        return manifest

    @property
    def entries(self) -> list[TensorEntry]:
        """Every packed tensor, in the manifest's order (format 2: filled in from the graph)."""
        if self._entries is None:
            if self.version == 1:
                self._entries = [TensorEntry(**{("checksum" if k == "sha256" else k): v for k, v in row.items()}) for row in self.manifest["tensors"]]
            else:
                self._entries = self._expand(self.graph())
        return self._entries

    def _expand(self, proto: onnx.ModelProto) -> list[TensorEntry]:
        tensors = list(_tensors(proto))
        roles = _roles(proto.graph)
        solids = self.manifest.get("solids", [])
        entries, offset = [], len(MAGIC)
        ats = [0] * len(solids)
        rows = self.manifest["tensors"]
        try:
            for row in rows:
                if len(row) == 4:
                    index, codec, size, check = row
                    solid = None
                else:
                    index, codec, size, check, solid = row
                if not 0 <= index < len(tensors):
                    raise self._damaged(f"manifest row {row!r} names no tensor of the graph")
                name, tensor = tensors[index]
                nbytes = _nbytes(tensor) or 0
                external = None
                if tensor.data_location == onnx.TensorProto.EXTERNAL:
                    info = _external(tensor)
                    external = {"location": info["location"], "offset": int(info.get("offset", 0) or 0)}
                    nbytes = int(info.get("length", nbytes) or nbytes)
                entry = TensorEntry(
                    index=index, name=name, dtype=tensor.data_type, shape=[int(d) for d in tensor.dims], role=roles.get(name, "other"),
                    codec=codec, offset=offset, size=size, bytes=nbytes, checksum=check, external=external,
                )
                if solid is None:
                    offset += size
                else:
                    entry.solid, entry.at = solid, ats[solid]
                    ats[solid] += nbytes
                entries.append(entry)
            starts = []
            for row in solids:
                starts.append(offset)
                offset += row[1]
            for entry in entries:
                if entry.solid is not None:
                    codec, size = solids[entry.solid][:2]
                    entry.codec, entry.offset, entry.size = codec, starts[entry.solid], size
        except (ValueError, TypeError, IndexError, KeyError) as exc:
            raise self._damaged(f"the manifest's tensor rows are malformed ({type(exc).__name__}: {exc})") from None
        return entries

    def graph(self) -> onnx.ModelProto:
        g = self.manifest["graph"]
        proto = onnx.ModelProto()
        data = self._graph
        check = g.get("sha256") if self.version == 1 else g.get("crc32")
        if len(data) != g.get("size") or _checksum(data, self.version) != check:
            raise self._damaged(f"the graph's {'SHA-256' if self.version == 1 else 'CRC-32'} does not match the manifest")
        proto.ParseFromString(data)
        return proto

    def _decode(self, codec_name: str, blob: bytes, info: TensorInfo, what: str) -> bytes:
        if codec_name == STORED:
            return bytes(blob)
        codec = self.registry.codec(codec_name)
        if codec is None:
            origin = self.manifest.get("codecs", {}).get(codec_name, "an uninstalled plugin")
            raise PluginError(
                f"{self.label}: {what} is coded with codec {codec_name!r} ({origin}), which no installed plugin provides; "
                "install that plugin to unpack this file",
                plugin=origin,
            )
        try:
            return codec.decode(blob, info)
        except PluginError:
            raise
        except Exception as exc:
            raise self._damaged(f"{what} cannot be decoded by codec {codec_name!r} ({type(exc).__name__}: {exc})") from None

    def _solid_bytes(self, entry: TensorEntry) -> bytes:
        """The decoded solid stream ``entry`` belongs to."""
        number = entry.solid
        assert number is not None
        data = self._solids.get(number)
        if data is None:
            codec, _size, nbytes, dtype, role = self.manifest["solids"][number]
            members = [e.name for e in self.entries if e.solid == number]
            what = f"tensor {entry.name!r} (in a solid stream with {len(members) - 1} other tensors)"
            width = max(ir.DataType(dtype).bitwidth // 8, 1)
            blob = self._slice(entry.offset, entry.size, what)
            data = self._decode(codec, blob, TensorInfo(f"solid stream {number}", ir.DataType(dtype), (nbytes // width,), role), what)
            if len(data) != nbytes:
                raise self._damaged(f"{what} decodes to {len(data)} bytes, not {nbytes}")
            self._solids[number] = data
            self._solid_left[number] = len(members)
        self._solid_left[number] -= 1
        if self._solid_left[number] <= 0:
            del self._solids[number]
        return data

    def tensor_bytes(self, entry: TensorEntry) -> bytes:
        """Decode one tensor and check its checksum."""
        if entry.solid is not None:
            whole = self._solid_bytes(entry)
            data = whole[entry.at : entry.at + entry.bytes]
        else:
            what = f"tensor {entry.name!r}"
            data = self._decode(entry.codec, self._slice(entry.offset, entry.size, what), entry.info, what)
        if len(data) != entry.bytes or _checksum(data, self.version) != entry.checksum:
            raise self._damaged(f"tensor {entry.name!r} decodes to bytes whose {'SHA-256' if self.version == 1 else 'CRC-32'} does not match the manifest")
        return data

    def filler(self, spec: dict[str, Any]) -> bytes:
        if not spec["blob"]:
            return b""
        try:
            return _unlzma(self._slice(spec["offset"], spec["blob"], f"filler of {spec['location']!r}"))
        except lzma.LZMAError:
            raise self._damaged(f"the filler bytes of external file {spec['location']!r} cannot be decoded") from None

    def close(self) -> None:
        self._solids.clear()
        if isinstance(self._map, mmap.mmap):
            self._map.close()

    def __enter__(self) -> PackedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _checked_tensors(proto: onnx.ModelProto, packed: PackedModel) -> list[tuple[str, onnx.TensorProto]]:
    """The graph's tensors, after checking that every manifest row names one of them."""
    tensors = list(_tensors(proto))
    for entry in packed.entries:
        if not 0 <= entry.index < len(tensors) or tensors[entry.index][0] != entry.name:
            raise packed._damaged(f"tensor {entry.name!r} is in the manifest but not in the graph")
    return tensors


def _write_external(packed: PackedModel, external_dir: Path) -> None:
    """Write the external-data files: their filler bytes, then each external tensor at its offset."""
    handles: dict[str, Any] = {}
    try:
        for spec in packed.manifest.get("external_files", []):
            path = _safe_location(external_dir, spec["location"], packed.label, spec["location"])
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = handles[spec["location"]] = open(path, "wb")
            handle.truncate(spec["size"])
            filler, pos = packed.filler(spec), 0
            for start, length in spec["gaps"]:
                handle.seek(start)
                handle.write(filler[pos : pos + length])
                pos += length
        for entry in packed.entries:
            if entry.external is not None:
                handle = handles[entry.external["location"]]
                handle.seek(entry.external["offset"])
                handle.write(packed.tensor_bytes(entry))
    finally:
        for handle in handles.values():
            handle.close()


def _fill(proto: onnx.ModelProto, packed: PackedModel, *, inline: bool) -> None:
    """Put the bytes of every tensor (``inline``: external ones too) back into its ``raw_data``."""
    tensors = _checked_tensors(proto, packed)
    for entry in packed.entries:
        if entry.external is not None and not inline:
            continue
        tensor = tensors[entry.index][1]
        data = packed.tensor_bytes(entry)
        if entry.external is not None:
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
        tensor.raw_data = data


def _write_graph(packed: PackedModel, proto: onnx.ModelProto, path: Path) -> None:
    """Write the model file: the stored graph's wire bytes with each inline tensor's ``raw_data``
    spliced in (:mod:`modelpress.packing.wire`: no protobuf re-serialisation, one tensor in memory at
    a time), or, where the walker does not follow the bytes, the proto filled and serialised."""
    tensors = _checked_tensors(proto, packed)
    spans = tensor_spans(packed._graph)
    if spans is not None and len(spans) == len(tensors):
        fills = {spans[e.index][0]: (e.bytes, functools.partial(packed.tensor_bytes, e)) for e in packed.entries if e.external is None}
        try:
            with open(path, "wb") as out:
                splice(packed._graph, fills, out)
            return
        except ValueError:
            pass  # NOTE: bytes the walker does not expect: the proto path below is always right
    _fill(proto, packed, inline=False)
    path.write_bytes(proto.SerializeToString())


def read_packed(path: str | os.PathLike[str], *, registry: Registry | None = None) -> onnx.ModelProto:
    """Decode a ``.mpk`` into an in-memory ``ModelProto`` with every weight inline (nothing is
    written to disk; tensors are decoded one at a time straight into the proto)."""
    with PackedModel(path, registry) as packed:
        proto = packed.graph()
        _fill(proto, packed, inline=True)
    return proto


def unpack(
    path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    registry: Registry | None = None,
) -> Path:
    """Restore the packed ONNX file (and its external-data files) at ``output``, bit-exactly.

    Everything is written into a temporary folder beside ``output`` and moved into place only
    when every tensor decoded and matched its checksum: a damaged pack leaves nothing behind.
    """
    target = Path(output)
    if not target.parent.is_dir():
        raise ExportError(f"cannot write {str(target)!r}: folder {str(target.parent)!r} does not exist")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        with PackedModel(path, registry) as packed:
            proto = packed.graph()
            _write_external(packed, tmp)
            _write_graph(packed, proto, tmp / target.name)
            files = [spec["location"] for spec in packed.manifest.get("external_files", [])]
        for location in files:
            dest = target.parent / location
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / location, dest)
        os.replace(tmp / target.name, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# -- inspection -----------------------------------------------------------------------------------


def _element_entropy(data: bytes, info: TensorInfo) -> float | None:
    """Order-0 entropy of the tensor's element values in bits per element (the bound a
    Huffman/ANS coder of single elements approaches); None for sub-byte types."""
    import numpy as np

    from modelpress.plugin.codec import numpy_dtype

    dt = numpy_dtype(info.dtype)
    if dt is None or not data:
        return None
    _, counts = np.unique(np.frombuffer(data, dt), return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def tensor_report(model: Any, *, registry: Registry | None = None) -> list[dict[str, Any]]:
    """Per packable tensor: dtype, shape, bytes, element width (``bits``), order-0 entropy of the
    element values (``entropy_bits``, bits/element) and the best codec's blob size and ratio."""
    registry = registry or current_registry()
    codecs = registry.codecs()
    data, base, label = _source(model)
    proto = onnx.ModelProto()
    proto.ParseFromString(data)
    roles = _roles(proto.graph)
    rows = []
    for index, (name, tensor) in enumerate(_tensors(proto)):
        item = _item(index, name, tensor, roles, base, label, {})
        if item is None:
            continue
        codec, blob = encode_best(item.data, item.info, codecs, prefer="size")
        info = item.info
        rows.append({
            "name": name, "dtype": info.dtype.name.lower(), "shape": list(info.shape), "role": info.role,
            "bytes": len(item.data), "bits": info.dtype.bitwidth, "entropy_bits": _element_entropy(item.data, info),
            "codec": codec, "packed_bytes": len(blob), "ratio": len(item.data) / max(len(blob), 1),
        })
    return rows
