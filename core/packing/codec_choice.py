"""Choosing a codec for each tensor: the smallest blob that decodes bit-exactly, slow decoders only
where they save ``SLOW_GAIN`` (``prefer="speed"``), and solid streams (one per dtype and role)
where they beat their members' separate blobs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import onnx_ir as ir

from modelpress.base.errors import OptionsError
from modelpress.packing.format import STORED
from modelpress.plugin.codec import Codec, TensorInfo
from modelpress.plugin.registry import Registry

if TYPE_CHECKING:
    from modelpress.packing.source import Item

__all__ = ["SLOW_GAIN", "SOLID_LIMIT", "encode_best", "select_codecs", "solid_streams"]

SLOW_GAIN = 0.10  # a slow-to-decode codec must save this much over the best fast one (prefer="speed")
SOLID_LIMIT = 8 << 20  # NOTE: a solid stream is decoded whole (and packing codes a group twice): larger groups stay separate


def select_codecs(registry: Registry, codecs: str | list[str]) -> list[Codec]:
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



def solid_streams(items: list[Item], codecs: list[Codec], skipped: dict[str, str], prefer: str) -> list[dict[str, Any]]:
    """Code each group of same-dtype, same-role tensors as one stream; keep the streams that are
    smaller than their members' blobs together (and mark those members)."""
    from modelpress.plugin.codec import numpy_dtype

    groups: dict[tuple[int, str], list[Item]] = {}
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
