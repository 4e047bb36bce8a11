"""Choosing a codec for each tensor: the smallest blob that decodes bit-exactly, slow decoders only
where they save ``SLOW_GAIN`` (``prefer="speed"``), and solid streams (one per dtype and role)
where they beat their members' separate blobs. A large tensor is not coded by every codec: each
codec's size is estimated (its ``estimate``, else a coded sample of the tensor) and only the
smallest estimates are coded in full. Within one pack, a codec that lost clearly on the first
tensors of a kind (same dtype and role, small or large) is not tried on the rest of that kind
(:class:`History`; ZipNN decides per chunk from the first ones in the same spirit)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from modelpress.base.errors import OptionsError
from modelpress.packing.format import STORED, given
from modelpress.packing.source import same_bytes
from modelpress.plugin.codec import Codec, ElementType, TensorInfo, numpy_dtype
from modelpress.plugin.registry import Registry

if TYPE_CHECKING:
    from modelpress.packing.source import Item

__all__ = [
    "CLOSE",
    "FAR",
    "LEARN",
    "SAMPLE_BYTES",
    "SLOW_GAIN",
    "SOLID_LIMIT",
    "History",
    "encode_best",
    "given",
    "select_codecs",
    "solid_streams",
]

SLOW_GAIN = (
    0.10  # a slow-to-decode codec must save this much over the best fast one (prefer="speed")
)
SOLID_LIMIT = (
    8 << 20
)  # NOTE: a solid stream is decoded whole (and packing codes a group twice): larger groups stay separate


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
            raise OptionsError(
                f"no installed plugin provides a codec {name!r}; installed codecs: {known}"
            )
        if codec is not None:
            chosen.append(codec)
    return chosen


SAMPLE_BYTES = (
    16 << 10
)  # NOTE: a tensor up to this size is coded in full by every codec (exact); larger ones are estimated
SAMPLE_SLICES = 4  # the sample: this many equal slices spread evenly over the tensor
CLOSE = 0.02  # codecs estimated within 2 % of the smallest are all coded in full and measured


LEARN = 4  # NOTE: tensors of a kind every codec is tried on before the clear losers are dropped
FAR = 1.1  # a codec whose blob (estimate) is this much larger than it needed to be to win lost clearly


@dataclass
class History:
    """What the codecs made of the tensors of each kind (dtype, role, small or large) so far in
    one pack: a codec that cannot code, or lost by ``FAR`` or more on, each of the first
    ``LEARN`` tensors of a kind is not tried on the rest (the packer's cost per tensor stays
    that of the few codecs that can win)."""

    seen: dict[tuple[Any, ...], int] = field(default_factory=dict)
    lost: dict[tuple[Any, ...], int] = field(default_factory=dict)

    @staticmethod
    def kind(data: bytes | memoryview, info: TensorInfo) -> tuple[Any, ...]:
        """Dtype, role, small or large, and what a spread sample of the elements shows: mostly
        zeros (pruned) or few distinct values (quantized, codebook): a pruned layer after dense
        ones of the same role is a kind of its own, so codecs dropped on those are tried on it."""
        return (int(info.dtype), info.role, len(data) > SAMPLE_BYTES, *_looks(data, info))

    def worth(self, kind: tuple[Any, ...], codec: Codec) -> bool:
        seen = self.seen.get(kind, 0)
        return seen < LEARN or self.lost.get((*kind, codec.name), 0) < seen

    def record(
        self, kind: tuple[Any, ...], tried: list[Codec], found: list[_Candidate], speed: bool
    ) -> None:
        if self.seen.get(kind, 0) >= LEARN:
            return
        self.seen[kind] = self.seen.get(kind, 0) + 1
        if not found:
            return  # NOTE: nothing shrank the tensor: no codec lost to another
        best = min(c.size for c in found)
        fast = min((c.size for c in found if c.codec.fast_decode), default=best)
        sizes = {c.codec.name: c.size for c in found}
        for codec in tried:
            size = sizes.get(codec.name)
            # NOTE: with prefer="speed" a slow decoder had to beat the best fast one by SLOW_GAIN
            needed = best if codec.fast_decode or not speed else (1 - SLOW_GAIN) * fast
            if size is None or size >= FAR * needed:
                key = (*kind, codec.name)
                self.lost[key] = self.lost.get(key, 0) + 1


def _looks(data: bytes | memoryview, info: TensorInfo) -> tuple[bool, bool]:
    """Whether a spread sample of the elements is a quarter or more zeros, and whether 512 of
    them hold at most 256 distinct values (both False for sub-byte types)."""
    dt = numpy_dtype(info.dtype)
    if dt is None or len(data) < dt.itemsize or len(data) % dt.itemsize:
        return False, False
    u = np.frombuffer(data, dt)
    sample = u[:: max(1, u.size // 4096)]
    few = np.sort(u[:: max(1, u.size // 512)])
    distinct = 1 + int(np.count_nonzero(few[1:] != few[:-1]))
    return 4 * int(np.count_nonzero(sample == 0)) >= sample.size, distinct <= 256


@dataclass
class _Candidate:
    codec: Codec
    size: float  # the estimate, then the blob's size once coded
    blob: bytes | None = None


def _sample(data: bytes, info: TensorInfo) -> tuple[bytes, TensorInfo]:
    """``SAMPLE_SLICES`` slices of whole elements spread over ``data`` and the info of a 1-D tensor of them."""
    width = max(info.dtype.bitwidth // 8, 1)
    element_bits = info.dtype.bitwidth
    step_bytes = (SAMPLE_BYTES // SAMPLE_SLICES) // width * width
    gap = (len(data) - step_bytes) // (SAMPLE_SLICES - 1) // width * width
    sample = b"".join(data[i * gap : i * gap + step_bytes] for i in range(SAMPLE_SLICES))
    count = len(sample) * 8 // element_bits if element_bits < 8 else len(sample) // width
    return sample, replace(info, shape=(count,))


def _estimate(
    codec: Codec, data: bytes, info: TensorInfo, sample: tuple[bytes, TensorInfo] | None
) -> _Candidate | None:
    """A candidate with the blob's estimated size (small tensors: coded in full, so exact)."""
    if sample is None:
        blob = codec.encode(given(codec, data), info)
        return None if blob is None else _Candidate(codec, len(blob), bytes(blob))
    if codec.estimate is not None:
        size = codec.estimate(given(codec, data), info)
        return None if size is None else _Candidate(codec, size)
    blob = codec.encode(*sample)
    return (
        None if blob is None else _Candidate(codec, len(blob) * len(data) / max(len(sample[0]), 1))
    )


def _ranked(
    data: bytes,
    info: TensorInfo,
    codecs: list[Codec],
    skipped: dict[str, str] | None,
    prefer: str,
    history: History | None = None,
) -> list[_Candidate]:
    """The applicable codecs with their estimates, smallest first (``prefer="speed"``: a slow
    decoder only where it is estimated ``SLOW_GAIN`` smaller than the best fast one)."""
    kind = History.kind(data, info) if history is not None else ()
    tried = _worth_trying(kind, info, codecs, skipped, history)
    if len(tried) == 1 and len(data) > SAMPLE_BYTES:
        return [_Candidate(tried[0], 0)]  # NOTE: nothing to rank: coded in full straight away
    sample = _sample(data, info) if len(data) > SAMPLE_BYTES else None
    found: list[_Candidate] = []
    for codec in tried:
        try:
            candidate = _estimate(codec, data, info, sample)
        except Exception as exc:
            if skipped is not None:
                skipped[codec.name] = f"raised on {info.name!r}: {type(exc).__name__}: {exc}"
            continue
        if candidate is not None and candidate.size < len(data):
            found.append(candidate)
    if history is not None:
        history.record(kind, tried, found, prefer == "speed")
    if prefer == "speed":
        fast = min([len(data), *(c.size for c in found if c.codec.fast_decode)])
        found = [c for c in found if c.codec.fast_decode or c.size <= (1 - SLOW_GAIN) * fast]
    return sorted(found, key=lambda c: c.size)


def _worth_trying(
    kind: tuple[Any, ...],
    info: TensorInfo,
    codecs: list[Codec],
    skipped: dict[str, str] | None,
    history: History | None,
) -> list[Codec]:
    """The codecs that apply to the tensor and (with a ``history``) may win on its ``kind``."""
    tried = []
    for codec in codecs:
        try:
            if (history is None or history.worth(kind, codec)) and codec.applies(info):
                tried.append(codec)
        except Exception as exc:
            if skipped is not None:
                skipped[codec.name] = f"raised on {info.name!r}: {type(exc).__name__}: {exc}"
    return tried


def _verified(
    candidate: _Candidate, data: bytes, info: TensorInfo, skipped: dict[str, str] | None
) -> bool:
    name = candidate.codec.name
    try:
        ok = candidate.blob is not None and same_bytes(
            candidate.codec.decode(given(candidate.codec, candidate.blob), info), data
        )
    except Exception as exc:
        if skipped is not None:
            skipped[name] = f"decode raised on {info.name!r}: {type(exc).__name__}: {exc}"
        return False
    if not ok and skipped is not None:
        skipped.setdefault(name, f"did not decode {info.name!r} bit-exactly")
    return ok


def encode_best(
    data: bytes,
    info: TensorInfo,
    codecs: list[Codec],
    skipped: dict[str, str] | None = None,
    *,
    prefer: str = "speed",
    history: History | None = None,
) -> tuple[str, bytes]:
    """The smallest blob among ``codecs`` that decodes back to ``data`` (else stored).

    A tensor up to ``SAMPLE_BYTES`` is coded by every codec. A larger one is coded in full only
    by the codecs whose estimate (``Codec.estimate``, else a coded sample) is within ``CLOSE``
    of the smallest, then, if none of those decodes bit-exactly, by the next ones in order:
    every codec is judged the same way, built-in or not. With ``prefer="speed"`` a codec marked
    ``fast_decode=False`` counts only where it saves at least ``SLOW_GAIN`` over the best fast one.
    With a ``history`` (one per pack), codecs that lost clearly on the first tensors of this
    kind are not tried.
    """
    ranked = _ranked(data, info, codecs, skipped, prefer, history)
    while ranked:
        close = [c for c in ranked if c.size <= ranked[0].size * (1 + CLOSE)]
        ranked = ranked[len(close) :]
        for c in close:
            if c.blob is None:
                c.blob = _full(c.codec, data, info, skipped)
                c.size = len(c.blob) if c.blob is not None else float("inf")
        if prefer == "speed" and any(c.codec.fast_decode for c in close):
            fast = min(c.size for c in close if c.codec.fast_decode)
            close = [c for c in close if c.codec.fast_decode or c.size <= (1 - SLOW_GAIN) * fast]
        for c in sorted(close, key=lambda c: c.size):
            if c.blob is not None and len(c.blob) < len(data) and _verified(c, data, info, skipped):
                return c.codec.name, c.blob
    return STORED, data


def _full(
    codec: Codec, data: bytes, info: TensorInfo, skipped: dict[str, str] | None
) -> bytes | None:
    try:
        blob = codec.encode(given(codec, data), info)
    except Exception as exc:
        if skipped is not None:
            skipped[codec.name] = f"raised on {info.name!r}: {type(exc).__name__}: {exc}"
        return None
    return None if blob is None else bytes(blob)


def solid_streams(
    items: list[Item], codecs: list[Codec], skipped: dict[str, str], prefer: str
) -> list[dict[str, Any]]:
    """Code each group of same-dtype, same-role tensors as one stream; keep the streams that are
    smaller than their members' blobs together (and mark those members)."""

    groups: dict[tuple[int, str], list[Item]] = {}
    for it in items:
        if numpy_dtype(it.info.dtype) is not None:
            groups.setdefault((int(it.info.dtype), it.info.role), []).append(it)
    streams: list[dict[str, Any]] = []
    for (dtype, role), members in groups.items():
        total = sum(len(it.data) for it in members)
        if len(members) < 2 or total > SOLID_LIMIT:
            continue
        width = ElementType(dtype).bitwidth // 8
        info = TensorInfo(
            f"solid stream of {len(members)} {ElementType(dtype).name.lower()} {role} tensors",
            ElementType(dtype),
            (total // width,),
            role,
        )
        codec, blob = encode_best(
            b"".join(it.data for it in members), info, codecs, skipped, prefer=prefer
        )
        # NOTE: a member row costs about the same either way; the stream must beat the separate blobs
        if len(blob) >= sum(len(it.blob) for it in members):
            continue
        for it in members:
            it.solid = len(streams)
        streams.append(
            {
                "codec": codec,
                "size": len(blob),
                "bytes": total,
                "dtype": dtype,
                "role": role,
                "tensors": len(members),
                "blob": blob,
            }
        )
    return streams
