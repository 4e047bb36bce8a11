"""Writing a ``.mpk``: the tensors' blobs, the solid streams, the external files' filler bytes,
then the head (manifest and graph) and the footer (layout: :mod:`modelpress.packing.format`)."""

from __future__ import annotations

import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelpress.base.errors import ExportError, OptionsError
from modelpress.packing import walk
from modelpress.packing.codec_choice import History, encode_best, select_codecs, solid_streams
from modelpress.packing.format import (
    END,
    FOOTER,
    FORMAT,
    MAGIC,
    PackResult,
    TensorEntry,
    checksum,
    checksum_name,
    lzma_compress,
)
from modelpress.packing.needs import codec_origins
from modelpress.packing.source import Item, Source, item, parse_source, reproduces
from modelpress.plugin.registry import Registry, current_registry

__all__ = ["pack"]


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
    registry = registry or current_registry()
    chosen = select_codecs(registry, codecs)
    src = parse_source(model, strip)
    target = Path(output)
    try:
        if not target.parent.is_dir():
            raise ExportError(
                f"cannot write {str(target)!r}: folder {str(target.parent)!r} does not exist"
            )
        result = _pack(src, target, chosen, registry, solid=solid, prefer=prefer)
    finally:
        src.close()
    registry.hook.modelpress_pack_finish(pack_id=str(target), source=src.label, result=result)
    return result


def _pack(
    src: Source, target: Path, chosen: list[Any], registry: Registry, *, solid: bool, prefer: str
) -> PackResult:
    skipped: dict[str, str] = {}
    externals: dict[str, list[tuple[int, int]]] = {}
    roles = walk.roles(src.proto.graph)
    items = [
        it
        for index, (name, tensor) in enumerate(walk.tensors(src.proto))
        if (it := item(index, name, tensor, roles, src, externals))
    ]
    check, history = checksum_name(), History()
    for it in items:
        it.codec, it.blob = encode_best(
            it.data, it.info, chosen, skipped, prefer=prefer, history=history
        )
        it.checksum = checksum(it.data, check)
    streams = solid_streams(items, chosen, skipped, prefer) if solid else []
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        _readable_as_written(tmp)
        with os.fdopen(fd, "wb") as out:
            out.write(MAGIC)
            entries = _write_blobs(items, streams, out)
            files = _pack_filler(externals, src.base, src.label, out)
            stripped = src.proto.SerializeToString()
            src.identical = src.identical or reproduces(stripped, items, src.data, src.raws)
            head = _Head(src, stripped, codec_origins(registry, chosen), check)
            _write_head(head, entries, streams, files, out)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    source_bytes = src.original + sum(f["size"] for f in files)
    return PackResult(
        target, target.stat().st_size, source_bytes, entries, src.identical, skipped, streams
    )


def _write_blobs(items: list[Item], streams: list[dict[str, Any]], out: Any) -> list[TensorEntry]:
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
            entries.append(
                _entry(
                    it, stream["codec"], stream["offset"], stream["size"], it.solid, ats[it.solid]
                )
            )
            ats[it.solid] += len(it.data)
        if it.external is None:
            it.tensor.ClearField("raw_data")
    entries.sort(key=lambda e: e.index)
    return entries


@dataclass
class _Head:
    """What the head says besides the tensors: the source, its graph without the packed bytes
    (``stripped``), where each codec came from, and the checksum the rows use."""

    src: Source
    stripped: bytes
    origins: dict[str, dict[str, str]]
    check: str


def _write_head(
    head: _Head,
    entries: list[TensorEntry],
    streams: list[dict[str, Any]],
    files: list[dict[str, Any]],
    out: Any,
) -> None:
    """Write the head (the manifest and the stripped graph, one LZMA stream) and the footer."""
    used = {e.codec for e in entries}
    src, stripped, origins = head.src, head.stripped, head.origins
    manifest = {
        "format": FORMAT,
        "checksum": head.check,
        "source": {
            "name": Path(src.label).name,
            "bytes": len(src.data),
            "bytes_identical": src.identical,
            **({"stripped": True} if src.strip else {}),
        },
        "graph": {"size": len(stripped), "checksum": checksum(stripped, head.check)},
        "codecs": {
            name: f"{o['plugin']} {o['version']}".strip()
            for name, o in origins.items()
            if name in used
        },
        "codec_plugins": {name: o for name, o in origins.items() if name in used},
        "tensors": [
            _row(e)
            for e in sorted(entries, key=lambda e: (e.solid is not None, e.solid or 0, e.index))
        ],
        "solids": [[s["codec"], s["size"], s["bytes"], s["dtype"], s["role"]] for s in streams],
        "external_files": files,
    }
    text = json.dumps(manifest, separators=(",", ":")).encode()
    blob = lzma_compress(struct.pack("<I", len(text)) + text + stripped)
    offset = out.tell()
    out.write(blob)
    out.write(FOOTER.pack(offset, len(blob), END))


def _entry(
    it: Item, codec: str, offset: int, size: int, solid: int | None = None, at: int = 0
) -> TensorEntry:
    return TensorEntry(
        index=it.index,
        name=it.info.name,
        dtype=int(it.info.dtype),
        shape=list(it.info.shape),
        role=it.info.role,
        codec=codec,
        offset=offset,
        size=size,
        bytes=len(it.data),
        checksum=it.checksum,
        external=it.external,
        solid=solid,
        at=at,
    )


def _row(e: TensorEntry) -> list[Any]:
    """A format-2 manifest row: what the graph does not already say."""
    row: list[Any] = [e.index, e.codec, e.size, e.checksum]
    return row if e.solid is None else [e.index, "", 0, e.checksum, e.solid]


def _pack_filler(
    externals: dict[str, list[tuple[int, int]]], base: Path | None, label: str, out: Any
) -> list[dict[str, Any]]:
    """Keep the bytes of each external-data file that no tensor covers (padding, alignment)."""
    files = []
    for location, spans in externals.items():
        assert base is not None
        path = walk.safe_location(base, location, label, location)
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
        blob = lzma_compress(filler) if filler else b""
        files.append(
            {
                "location": location,
                "size": size,
                "gaps": gaps,
                "offset": out.tell(),
                "blob": len(blob),
            }
        )
        out.write(blob)
    return files


def _readable_as_written(path: Path) -> None:
    """Give the temporary file (``mkstemp`` makes it 0600) the mode ``open()`` would: 0666 less
    the umask, as the ``.onnx`` files beside it have."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
