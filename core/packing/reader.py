"""Reading a ``.mpk``: :class:`PackedModel` (the manifest, the graph, tensors decoded one at a
time and checked against their checksums), :func:`read_packed` (into memory) and :func:`unpack`
(back to the original files, bit-exactly)."""

from __future__ import annotations

import functools
import json
import lzma
import mmap
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelpress.base.errors import ExportError, InvalidModelError, PluginError
from modelpress.packing import walk
from modelpress.packing.format import (
    CRC32,
    DEFAULT_CHECKSUMS,
    END,
    FOOTER,
    FORMATS,
    MAGIC,
    SHA256,
    STORED,
    VERSIONS,
    XXH3,
    TensorEntry,
    checksum,
    given,
    lzma_decompress,
)
from modelpress.packing.needs import missing_codec_error
from modelpress.packing.wire import ModelTensors, WireTensor, model_tensors, splice
from modelpress.plugin.codec import ElementType, TensorInfo
from modelpress.plugin.registry import Registry, create_registry, current_registry, loaded_registry

if TYPE_CHECKING:
    import onnx

__all__ = ["PackedModel", "codec_registry", "read_packed", "unpack"]


class PackedModel:
    """An opened ``.mpk``: the manifest, the graph, and tensors decoded one at a time (the
    members of a solid stream: one stream at a time)."""

    def __init__(self, path: str | os.PathLike[str], registry: Registry | None = None) -> None:
        self.path = Path(path)
        self.label = str(self.path)
        self._registry = registry
        try:
            with open(self.path, "rb") as f:
                self._map: Any = (
                    mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                    if self.path.stat().st_size
                    else b""
                )
        except OSError as exc:
            raise InvalidModelError(f"{self.label}: cannot be read: {exc.strerror}") from None
        self.version = 3
        self.manifest = self._read_manifest()
        self.check = self._checksum_name()
        self._entries: list[TensorEntry] | None = None
        # NOTE: decoded solid streams, each dropped once all its members were read (then decoded
        # again if asked for): writing tensors in file order interleaves the streams' members
        self._solids: dict[int, bytes | bytearray | memoryview] = {}
        self._solid_left: dict[int, int] = {}
        self._tensors: ModelTensors | None = None

    @property
    def registry(self) -> Registry:
        """The registry whose codecs decode this pack: the one given, else the process's when
        something loaded it already, else one holding only the plugins the pack records as
        providing its codecs (:func:`codec_registry`)."""
        if self._registry is None:
            self._registry = loaded_registry() or codec_registry(self.manifest)
        return self._registry

    def _damaged(self, what: str) -> InvalidModelError:
        return InvalidModelError(
            f"{self.label}: damaged modelpress pack: {what}; the file is truncated or corrupt (pack the model again)"
        )

    def _slice(self, offset: int, size: int, what: str) -> memoryview:
        if offset < len(MAGIC) or size < 0 or offset + size > len(self._map) - FOOTER.size:
            raise self._damaged(f"{what} lies outside the file")
        # NOTE: a view of the map, not a copy (a copy of every blob cost as much as decoding it);
        # close() leaves a map with views still alive to be unmapped when the last one goes
        return memoryview(self._map)[offset : offset + size]

    def _checksum_name(self) -> str:
        name = self.manifest.get("checksum", DEFAULT_CHECKSUMS.get(self.version))
        if name not in (XXH3, CRC32, SHA256):
            raise InvalidModelError(
                f"{self.label}: unknown checksum {name!r} (this modelpress knows {XXH3}, {CRC32}, {SHA256}): "
                "the pack comes from a newer modelpress; upgrade modelpress to read it"
            )
        if name == XXH3:
            try:
                import xxhash  # noqa: F401
            except ImportError:
                raise PluginError(
                    f"{self.label}: this pack's tensors are checked with XXH3-64; install the pack extra: "
                    "pip install -c constraints.txt 'modelpress[pack]'",
                    plugin="pack",
                ) from None
        return str(name)

    def _read_manifest(self) -> dict[str, Any]:
        data = self._map
        if len(data) < len(MAGIC) + FOOTER.size or bytes(data[: len(MAGIC)]) not in VERSIONS:
            if len(data) >= 5 and bytes(data[:5]) == MAGIC[:5]:
                raise self._damaged(
                    "the header or footer is missing (or the file comes from a newer modelpress)"
                )
            raise InvalidModelError(
                f"{self.label}: not a modelpress pack (.mpk); create one with `modelpress pack MODEL.onnx -o MODEL.mpk`"
            )
        self.version = VERSIONS[bytes(data[: len(MAGIC)])]
        offset, size, end = FOOTER.unpack_from(data, len(data) - FOOTER.size)
        if end != END:
            raise self._damaged("the footer is missing")
        try:
            head = lzma_decompress(bytes(self._slice(offset, size, "the manifest")))
            (length,) = struct.unpack_from("<I", head)
            manifest = json.loads(head[4 : 4 + length])
        except (lzma.LZMAError, ValueError, struct.error) as exc:
            raise self._damaged(f"the manifest cannot be read ({exc})") from None
        self._graph = head[4 + length :]
        self._graph_checked = False
        if not isinstance(manifest, dict) or manifest.get("format") != FORMATS[self.version]:
            raise InvalidModelError(
                f"{self.label}: unsupported pack format "
                f"{manifest.get('format') if isinstance(manifest, dict) else '?'!r} (this modelpress reads "
                f"{', '.join(FORMATS.values())})"
            )
        return manifest

    @property
    def entries(self) -> list[TensorEntry]:
        """Every packed tensor, in the manifest's order (format 2: filled in from the graph)."""
        if self._entries is None:
            if self.version == 1:
                self._entries = [
                    TensorEntry(**{("checksum" if k == "sha256" else k): v for k, v in row.items()})
                    for row in self.manifest["tensors"]
                ]
            else:
                self._entries = self._expand(self.tensors())
        return self._entries

    def tensors(self) -> ModelTensors:
        """The graph's tensors and roles, read from its wire bytes (parsed with onnx only where
        the wire walker does not follow them)."""
        if self._tensors is None:
            self._tensors = model_tensors(self.graph_bytes()) or _parsed_tensors(self.graph())
        return self._tensors

    def _expand(self, found: ModelTensors) -> list[TensorEntry]:
        tensors, roles = found.tensors, found.roles
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
                tensor = tensors[index]
                nbytes = walk.byte_size(tensor.data_type, tensor.dims) or 0
                external = None
                if tensor.external is not None:
                    info = tensor.external
                    external = {
                        "location": info["location"],
                        "offset": int(info.get("offset", 0) or 0),
                    }
                    nbytes = int(info.get("length", nbytes) or nbytes)
                entry = TensorEntry(
                    index=index,
                    name=tensor.name,
                    dtype=tensor.data_type,
                    shape=list(tensor.dims),
                    role=roles.get(tensor.name, "other"),
                    codec=codec,
                    offset=offset,
                    size=size,
                    bytes=nbytes,
                    checksum=check,
                    external=external,
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
            raise self._damaged(
                f"the manifest's tensor rows are malformed ({type(exc).__name__}: {exc})"
            ) from None
        return entries

    def graph_bytes(self) -> bytes:
        """The stored graph's wire bytes (the packed tensors' ``raw_data`` cut out), checked
        against the manifest's checksum."""
        if not self._graph_checked:
            g = self.manifest["graph"]
            data = self._graph
            check = g.get({1: "sha256", 2: "crc32"}.get(self.version, "checksum"))
            if len(data) != g.get("size") or checksum(data, self.check) != check:
                raise self._damaged(
                    f"the graph's {self.check} checksum does not match the manifest"
                )
            self._graph_checked = True
        return self._graph

    def graph(self) -> onnx.ModelProto:
        """The stored graph, parsed (imports onnx)."""
        import onnx

        proto = onnx.ModelProto()
        proto.ParseFromString(self.graph_bytes())
        return proto

    def _decode(
        self, codec_name: str, blob: bytes, info: TensorInfo, what: str
    ) -> bytes | bytearray | memoryview:
        if codec_name == STORED:
            return blob
        codec = self.registry.codec(codec_name)
        if codec is None:
            raise missing_codec_error(self.label, what, codec_name, self.manifest)
        try:
            return codec.decode(given(codec, blob), info)
        except PluginError:
            raise
        except Exception as exc:
            raise self._damaged(
                f"{what} cannot be decoded by codec {codec_name!r} ({type(exc).__name__}: {exc})"
            ) from None

    def _solid_bytes(self, entry: TensorEntry) -> bytes | bytearray | memoryview:
        """The decoded solid stream ``entry`` belongs to."""
        number = entry.solid
        assert number is not None
        data = self._solids.get(number)
        if data is None:
            codec, _size, nbytes, dtype, role = self.manifest["solids"][number]
            members = [e.name for e in self.entries if e.solid == number]
            what = (
                f"tensor {entry.name!r} (in a solid stream with {len(members) - 1} other tensors)"
            )
            width = max(ElementType(dtype).bitwidth // 8, 1)
            blob = self._slice(entry.offset, entry.size, what)
            data = self._decode(
                codec,
                blob,  # type: ignore[arg-type]
                TensorInfo(f"solid stream {number}", ElementType(dtype), (nbytes // width,), role),
                what,
            )
            if len(data) != nbytes:
                raise self._damaged(f"{what} decodes to {len(data)} bytes, not {nbytes}")
            self._solids[number] = data
            self._solid_left[number] = len(members)
        self._solid_left[number] -= 1
        if self._solid_left[number] <= 0:
            del self._solids[number]
        return data

    def tensor_bytes(self, entry: TensorEntry) -> bytes | bytearray | memoryview:
        """Decode one tensor and check its checksum (bytes-like: a codec may hand back a view of
        the array it decoded into)."""
        if entry.solid is not None:
            whole = self._solid_bytes(entry)
            data = whole[entry.at : entry.at + entry.bytes]
        else:
            what = f"tensor {entry.name!r}"
            data = self._decode(
                entry.codec,
                self._slice(entry.offset, entry.size, what),  # type: ignore[arg-type]
                entry.info,
                what,
            )
        if len(data) != entry.bytes or checksum(data, self.check) != entry.checksum:
            raise self._damaged(
                f"tensor {entry.name!r} decodes to bytes whose {self.check} checksum does not match the manifest"
            )
        return data

    def filler(self, spec: dict[str, Any]) -> bytes:
        if not spec["blob"]:
            return b""
        try:
            return lzma_decompress(
                self._slice(spec["offset"], spec["blob"], f"filler of {spec['location']!r}")
            )
        except lzma.LZMAError:
            raise self._damaged(
                f"the filler bytes of external file {spec['location']!r} cannot be decoded"
            ) from None

    def close(self) -> None:
        self._solids.clear()
        if isinstance(self._map, mmap.mmap):
            try:
                self._map.close()
            except BufferError:
                pass  # NOTE: a tensor (or an error's frame) still holds a view: unmapped when it goes
            self._map = b""

    def __enter__(self) -> PackedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parsed_tensors(proto: onnx.ModelProto) -> ModelTensors:
    """:class:`ModelTensors` of a parsed graph (where the wire walker does not follow the bytes)."""
    found = ModelTensors(roles=walk.roles(proto.graph))
    for name, tensor in walk.tensors(proto):
        external = walk.external_info(tensor) if tensor.data_location == 1 else None
        found.tensors.append(
            WireTensor(name, tensor.data_type, [int(d) for d in tensor.dims], external, (-1, -1))
        )
    return found


def _check_names(names: list[str], packed: PackedModel) -> None:
    """Every manifest row names the graph's tensor at its index."""
    for entry in packed.entries:
        if not 0 <= entry.index < len(names) or names[entry.index] != entry.name:
            raise packed._damaged(f"tensor {entry.name!r} is in the manifest but not in the graph")


def _checked_tensors(
    proto: onnx.ModelProto, packed: PackedModel
) -> list[tuple[str, onnx.TensorProto]]:
    """The graph's tensors, after checking that every manifest row names one of them."""
    tensors = list(walk.tensors(proto))
    _check_names([name for name, _ in tensors], packed)
    return tensors


def codec_registry(manifest: dict[str, Any]) -> Registry:
    """A registry for decoding a pack when none was given and none is loaded: only the entry
    points the manifest records as providing its codecs are imported (the same switches apply; a
    third-party codec is found as a built-in one is). Where that does not give every codec the
    pack names (a plugin renamed or registered in code, a pack that records no plugin), the
    process-wide registry, with every plugin."""
    recorded = manifest.get("codec_plugins") or {}
    names = set(recorded) or set(manifest.get("codecs") or {})
    plugins = {_recorded_plugin(manifest, name) for name in names}
    if "" not in plugins:
        registry = create_registry(only=plugins)
        if all(registry.codec(name) is not None for name in names):
            return registry
    return current_registry()


def _recorded_plugin(manifest: dict[str, Any], codec: str) -> str:
    recorded = (manifest.get("codec_plugins") or {}).get(codec)
    if isinstance(recorded, dict):
        return str(recorded.get("plugin") or "")
    return str((manifest.get("codecs") or {}).get(codec, "")).partition(" ")[0]


def _writeexternal_info(packed: PackedModel, external_dir: Path) -> None:
    """Write the external-data files: their filler bytes, then each external tensor at its offset."""
    handles: dict[str, Any] = {}
    try:
        for spec in packed.manifest.get("external_files", []):
            path = walk.safe_location(
                external_dir, spec["location"], packed.label, spec["location"]
            )
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
    import onnx

    tensors = _checked_tensors(proto, packed)
    for entry in packed.entries:
        if entry.external is not None and not inline:
            continue
        tensor = tensors[entry.index][1]
        data = packed.tensor_bytes(entry)
        if entry.external is not None:
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
        tensor.raw_data = (
            data if isinstance(data, bytes) else bytes(data)
        )  # NOTE: protobuf takes bytes only


def _write_graph(packed: PackedModel, path: Path) -> None:
    """Write the model file: the stored graph's wire bytes with each inline tensor's ``raw_data``
    spliced in (:mod:`modelpress.packing.wire`: no protobuf parse or re-serialisation, no onnx
    import, one tensor in memory at a time), or, where the walker does not follow the bytes, the
    proto filled and serialised."""
    tensors = packed.tensors().tensors
    _check_names([t.name for t in tensors], packed)
    if all(t.span[0] >= 0 for t in tensors):
        fills = {
            tensors[e.index].span[0]: (e.bytes, functools.partial(packed.tensor_bytes, e))
            for e in packed.entries
            if e.external is None
        }
        try:
            with open(path, "wb") as out:
                splice(packed.graph_bytes(), fills, out)
            return
        except ValueError:
            pass  # NOTE: bytes the walker does not expect: the proto path below is always right
    proto = packed.graph()
    _fill(proto, packed, inline=False)
    path.write_bytes(proto.SerializeToString())


def read_packed(
    path: str | os.PathLike[str], *, registry: Registry | None = None
) -> onnx.ModelProto:
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
        raise ExportError(
            f"cannot write {str(target)!r}: folder {str(target.parent)!r} does not exist"
        )
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        with PackedModel(path, registry) as packed:
            packed.graph_bytes()
            _writeexternal_info(packed, tmp)
            _write_graph(packed, tmp / target.name)
            files = [spec["location"] for spec in packed.manifest.get("external_files", [])]
            registry = packed.registry
        for location in files:
            dest = target.parent / location
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / location, dest)
        os.replace(tmp / target.name, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    registry.hook.modelpress_unpack_finish(pack_id=str(path), output=target)
    return target
