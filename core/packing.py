"""``modelpress pack`` / ``unpack``: a lossless container for ONNX models (``.mpk``).

Layout (all integers little-endian)::

    b"MPACK\\x00\\x01\\x00"                     8-byte magic, format version 1
    tensor blobs ...                            one per packed tensor, coded by its codec
    external-file filler blobs ...              bytes of external-data files no tensor covers
    head                                        LZMA2 (raw) of: u32 manifest size, the manifest
                                                (UTF-8 JSON), the graph (the ModelProto with the
                                                packed tensors' bytes removed)
    u64 head offset, u64 head size, b"MPACKEND"

The manifest and the graph share one LZMA stream (they repeat the same tensor names). The
manifest (``format: "modelpress-pack/1"``) gives the graph's size and SHA-256 and, per tensor, its name,
ONNX dtype, shape, role, the codec (``"stored"`` or a registered codec's name), offset and size
of its blob, its decoded size and the SHA-256 of its decoded bytes; external-data tensors also
carry their file and offset. Tensors are initializers (of the main graph and subgraphs) whose
bytes are in ``raw_data`` or in an external file; tensors stored in typed fields (``float_data``
...), strings and tiny tensors stay in the graph blob.

Unpacking refills each tensor's ``raw_data`` (or its external file at its offset) and
re-serialises the graph, which reproduces the original file byte for byte whenever the input's
serialisation was canonical (files written by onnx, onnx_ir, torch.onnx and modelpress are);
the manifest records whether it was. Every decoded tensor is checked against its SHA-256: a
damaged container is an :class:`InvalidModelError` naming the tensor.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import mmap
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from modelpress.codecs import Codec, TensorInfo
from modelpress.errors import (
    ExportError,
    InvalidModelError,
    OptionsError,
    PluginError,
    UnsafeExternalDataError,
)
from modelpress.registry import Registry, get_registry

__all__ = ["FORMAT", "PackResult", "TensorEntry", "pack", "read_packed", "unpack"]

FORMAT = "modelpress-pack/1"
MAGIC = b"MPACK\x00\x01\x00"
END = b"MPACKEND"
STORED = "stored"
MIN_PACKED_BYTES = 128  # NOTE: smaller tensors cost more in the manifest than they save
_FOOTER = struct.Struct("<QQ8s")
_LZMA_FILTERS: list[dict[str, Any]] = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
_WEIGHTED = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}


def _lzma(data: bytes) -> bytes:
    return lzma.compress(data, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)


def _unlzma(data: bytes | memoryview) -> bytes:
    return lzma.decompress(data, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)


@dataclass
class TensorEntry:
    """One packed tensor as the manifest lists it (``index``: its place in the model's tensors)."""

    index: int
    name: str
    dtype: int
    shape: list[int]
    role: str
    codec: str
    offset: int
    size: int
    bytes: int
    sha256: str
    external: dict[str, Any] | None = None

    @property
    def info(self) -> TensorInfo:
        return TensorInfo(self.name, ir.DataType(self.dtype), tuple(self.shape), self.role)


@dataclass
class PackResult:
    """What :func:`pack` wrote: sizes, and the codec chosen for each tensor."""

    path: Path
    size_bytes: int
    source_bytes: int
    tensors: list[TensorEntry]
    bytes_identical: bool
    skipped_codecs: dict[str, str] = field(default_factory=dict)

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


def encode_best(data: bytes, info: TensorInfo, codecs: list[Codec], skipped: dict[str, str] | None = None) -> tuple[str, bytes]:
    """The smallest blob among ``codecs`` that decodes back to ``data`` (else stored)."""
    candidates: list[tuple[int, str, bytes]] = []
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
            candidates.append((len(blob), codec.name, bytes(blob)))
    by_name = {c.name: c for c in codecs}
    for _, name, blob in sorted(candidates, key=lambda c: c[0]):
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
    from modelpress.model import Model

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


def pack(
    model: Any,
    output: str | os.PathLike[str],
    *,
    codecs: str | list[str] = "auto",
    registry: Registry | None = None,
) -> PackResult:
    """Pack an ONNX file (or a :class:`modelpress.Model`) into a ``.mpk`` container at ``output``.

    ``codecs`` is ``"auto"`` (every installed codec; each tensor gets the smallest blob that
    decodes bit-exactly) or a list of codec names (``"stored"`` alone stores every tensor as is).
    The file is written atomically.
    """
    registry = registry or get_registry()
    chosen = _select_codecs(registry, codecs)
    data, base, label = _source(model)
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as exc:
        raise InvalidModelError(f"{label}: not a valid ONNX model ({exc})") from None
    if not proto.HasField("graph"):
        raise InvalidModelError(f"{label}: not an ONNX model (no graph)")
    identical = proto.SerializeToString() == data
    roles = _roles(proto.graph)
    target = Path(output)
    if not target.parent.is_dir():
        raise ExportError(f"cannot write {str(target)!r}: folder {str(target.parent)!r} does not exist")

    entries: list[TensorEntry] = []
    skipped: dict[str, str] = {}
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(MAGIC)
            # NOTE: the graph is written last-but-one (once every tensor was stripped); reserve nothing
            # up front: offsets are absolute and the manifest says where everything is.
            externals: dict[str, list[tuple[int, int]]] = {}
            for index, (name, tensor) in enumerate(_tensors(proto)):
                entry = _pack_tensor(index, name, tensor, roles, base, label, chosen, skipped, externals, out)
                if entry is not None:
                    entries.append(entry)
            files = _pack_filler(externals, base, label, out)
            stripped = proto.SerializeToString()
            graph = {"size": len(stripped), "sha256": hashlib.sha256(stripped).hexdigest()}
            manifest = {
                "format": FORMAT,
                "source": {"name": Path(label).name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "bytes_identical": identical},
                "graph": graph,
                "codecs": {c.name: f"{c.plugin} {c.plugin_version}".strip() for c in chosen if any(e.codec == c.name for e in entries)},
                "tensors": [_entry_json(e) for e in entries],
                "external_files": files,
            }
            text = json.dumps(manifest, separators=(",", ":")).encode()
            blob = _lzma(struct.pack("<I", len(text)) + text + stripped)
            offset = out.tell()
            out.write(blob)
            out.write(_FOOTER.pack(offset, len(blob), END))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    source_bytes = len(data) + sum(f["size"] for f in files)
    return PackResult(target, target.stat().st_size, source_bytes, entries, identical, skipped)


def _entry_json(e: TensorEntry) -> dict[str, Any]:
    row: dict[str, Any] = {k: v for k, v in e.__dict__.items() if k != "external"}
    if e.external is not None:
        row["external"] = e.external
    return row


def _pack_tensor(
    index: int,
    name: str,
    tensor: onnx.TensorProto,
    roles: dict[str, str],
    base: Path | None,
    label: str,
    codecs: list[Codec],
    skipped: dict[str, str],
    externals: dict[str, list[tuple[int, int]]],
    out: Any,
) -> TensorEntry | None:
    """Code one initializer's bytes into ``out`` and strip them from the graph."""
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
    codec, blob = encode_best(data, info_, codecs, skipped)
    entry = TensorEntry(
        index=index, name=name, dtype=tensor.data_type, shape=list(info_.shape), role=info_.role, codec=codec,
        offset=out.tell(), size=len(blob), bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), external=external,
    )
    out.write(blob)
    if external is None:
        tensor.ClearField("raw_data")
    return entry


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
    """An opened ``.mpk``: the manifest, the graph, and tensors decoded one at a time."""

    def __init__(self, path: str | os.PathLike[str], registry: Registry | None = None) -> None:
        self.path = Path(path)
        self.label = str(self.path)
        self.registry = registry or get_registry()
        try:
            with open(self.path, "rb") as f:
                self._map: Any = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self.path.stat().st_size else b""
        except OSError as exc:
            raise InvalidModelError(f"{self.label}: cannot be read: {exc.strerror}") from None
        self.manifest = self._read_manifest()

    def _damaged(self, what: str) -> InvalidModelError:
        return InvalidModelError(f"{self.label}: damaged modelpress pack: {what}; the file is truncated or corrupt (pack the model again)")

    def _slice(self, offset: int, size: int, what: str) -> bytes:
        if offset < len(MAGIC) or size < 0 or offset + size > len(self._map) - _FOOTER.size:
            raise self._damaged(f"{what} lies outside the file")
        # NOTE: a copy of one blob (not a view): the map can then close while errors hold frames
        return bytes(self._map[offset : offset + size])

    def _read_manifest(self) -> dict[str, Any]:
        data = self._map
        if len(data) < len(MAGIC) + _FOOTER.size or bytes(data[: len(MAGIC)]) != MAGIC:
            if len(data) >= 5 and bytes(data[:5]) == MAGIC[:5]:
                raise self._damaged("the header or footer is missing")
            raise InvalidModelError(f"{self.label}: not a modelpress pack (.mpk); create one with `modelpress pack MODEL.onnx -o MODEL.mpk`")
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
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise InvalidModelError(f"{self.label}: unsupported pack format {manifest.get('format') if isinstance(manifest, dict) else '?'!r} (this modelpress reads {FORMAT})")
        return manifest

    @property
    def entries(self) -> list[TensorEntry]:
        return [TensorEntry(**row) for row in self.manifest["tensors"]]

    def graph(self) -> onnx.ModelProto:
        g = self.manifest["graph"]
        proto = onnx.ModelProto()
        data = self._graph
        if len(data) != g.get("size") or hashlib.sha256(data).hexdigest() != g.get("sha256"):
            raise self._damaged("the graph's SHA-256 does not match the manifest")
        proto.ParseFromString(data)
        return proto

    def tensor_bytes(self, entry: TensorEntry) -> bytes:
        """Decode one tensor and check its SHA-256."""
        blob = self._slice(entry.offset, entry.size, f"tensor {entry.name!r}")
        if entry.codec == STORED:
            data = blob
        else:
            codec = self.registry.codec(entry.codec)
            if codec is None:
                origin = self.manifest.get("codecs", {}).get(entry.codec, "an uninstalled plugin")
                raise PluginError(
                    f"{self.label}: tensor {entry.name!r} is coded with codec {entry.codec!r} ({origin}), which no installed plugin provides; "
                    "install that plugin to unpack this file",
                    plugin=origin,
                )
            try:
                data = codec.decode(blob, entry.info)
            except PluginError:
                raise
            except Exception as exc:
                raise self._damaged(f"tensor {entry.name!r} cannot be decoded by codec {entry.codec!r} ({type(exc).__name__}: {exc})") from None
        if len(data) != entry.bytes or hashlib.sha256(data).hexdigest() != entry.sha256:
            raise self._damaged(f"tensor {entry.name!r} decodes to bytes whose SHA-256 does not match the manifest")
        return data

    def filler(self, spec: dict[str, Any]) -> bytes:
        if not spec["blob"]:
            return b""
        try:
            return _unlzma(self._slice(spec["offset"], spec["blob"], f"filler of {spec['location']!r}"))
        except lzma.LZMAError:
            raise self._damaged(f"the filler bytes of external file {spec['location']!r} cannot be decoded") from None

    def close(self) -> None:
        if isinstance(self._map, mmap.mmap):
            self._map.close()

    def __enter__(self) -> PackedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fill(proto: onnx.ModelProto, packed: PackedModel, *, inline: bool, external_dir: Path | None) -> None:
    """Put every tensor's bytes back: into ``raw_data``, or (``external_dir``) into its external file."""
    tensors = list(_tensors(proto))
    handles: dict[str, Any] = {}
    try:
        if external_dir is not None:
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
            if not 0 <= entry.index < len(tensors) or tensors[entry.index][0] != entry.name:
                raise packed._damaged(f"tensor {entry.name!r} is in the manifest but not in the graph")
            tensor = tensors[entry.index][1]
            data = packed.tensor_bytes(entry)
            if entry.external is not None and not inline:
                handles[entry.external["location"]].seek(entry.external["offset"])
                handles[entry.external["location"]].write(data)
            else:
                if entry.external is not None:
                    del tensor.external_data[:]
                    tensor.data_location = onnx.TensorProto.DEFAULT
                tensor.raw_data = data
    finally:
        for handle in handles.values():
            handle.close()


def read_packed(path: str | os.PathLike[str], *, registry: Registry | None = None) -> onnx.ModelProto:
    """Decode a ``.mpk`` into an in-memory ``ModelProto`` with every weight inline (nothing is
    written to disk; tensors are decoded one at a time straight into the proto)."""
    with PackedModel(path, registry) as packed:
        proto = packed.graph()
        _fill(proto, packed, inline=True, external_dir=None)
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
            _fill(proto, packed, inline=False, external_dir=tmp)
            files = [spec["location"] for spec in packed.manifest.get("external_files", [])]
        (tmp / target.name).write_bytes(proto.SerializeToString())
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

    from modelpress.codecs import numpy_dtype

    dt = numpy_dtype(info.dtype)
    if dt is None or not data:
        return None
    _, counts = np.unique(np.frombuffer(data, dt), return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def tensor_report(model: Any, *, registry: Registry | None = None) -> list[dict[str, Any]]:
    """Per packable tensor: dtype, shape, bytes, element width (``bits``), order-0 entropy of the
    element values (``entropy_bits``, bits/element) and the best codec's blob size and ratio."""
    registry = registry or get_registry()
    codecs = registry.codecs()
    data, base, label = _source(model)
    proto = onnx.ModelProto()
    proto.ParseFromString(data)
    roles = _roles(proto.graph)
    rows = []
    for index, (name, tensor) in enumerate(_tensors(proto)):
        raw: bytes | None = bytes(tensor.raw_data) if tensor.HasField("raw_data") else None
        with tempfile.TemporaryFile() as sink:
            entry = _pack_tensor(index, name, tensor, roles, base, label, codecs, {}, {}, sink)
        if entry is None:
            continue
        if entry.external is not None:
            with open(_safe_location(base or Path("."), entry.external["location"], label, name), "rb") as f:  # type: ignore[index]
                f.seek(entry.external["offset"])  # type: ignore[index]
                raw = f.read(entry.bytes)
        entropy = _element_entropy(raw or b"", entry.info)
        width = ir.DataType(entry.dtype).bitwidth
        rows.append({
            "name": name, "dtype": ir.DataType(entry.dtype).name.lower(), "shape": entry.shape, "role": entry.role,
            "bytes": entry.bytes, "bits": width, "entropy_bits": entropy,
            "codec": entry.codec, "packed_bytes": entry.size, "ratio": entry.bytes / max(entry.size, 1),
        })
    return rows
