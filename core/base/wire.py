"""The protobuf wire format, read: varints and the fields of one message (no protobuf runtime).

What a reader needs to walk a serialised message without parsing it: each field's number and
where its payload lies, so large payloads (a tensor's ``raw_data``) are skipped, never copied.
"""

from __future__ import annotations

from collections.abc import Iterator

__all__ = ["WireError", "fields", "string_entry", "tagged_fields", "varint"]


class WireError(ValueError):
    """The bytes are not a protobuf message this reader handles (truncated, or a group field)."""


def varint(buf: memoryview | bytes, pos: int) -> tuple[int, int]:
    """The unsigned varint at ``buf[pos]`` and the position after it."""
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise WireError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """``(field number, wire type, payload start, payload end)`` of each field of the message in
    ``buf[start:end]``. A varint's payload is the varint itself; a length-delimited field's excludes
    its length prefix; a fixed field's is its 4 or 8 bytes."""
    for number, wire, _tag, p0, p1 in tagged_fields(buf, start, end):
        yield number, wire, p0, p1


def tagged_fields(
    buf: memoryview, start: int, end: int
) -> Iterator[tuple[int, int, int, int, int]]:
    """:func:`fields` with where each field's key starts: ``(number, wire type, key start, payload
    start, payload end)`` (what a writer that re-encodes some fields and copies the rest needs)."""
    pos = start
    while pos < end:
        tag = pos
        key, pos = varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            p0 = pos
            _, pos = varint(buf, pos)
            yield number, wire, tag, p0, pos
        elif wire == 2:
            length, pos = varint(buf, pos)
            if pos + length > end:
                raise WireError("a field runs past its message")
            yield number, wire, tag, pos, pos + length
            pos += length
        elif wire in (1, 5):
            p0, pos = pos, pos + (8 if wire == 1 else 4)
            yield number, wire, tag, p0, pos
        else:
            raise WireError(f"wire type {wire}")
    if pos != end:
        raise WireError("a message overruns its length")


def signed(value: int) -> int:
    """An int64 read back from its varint (two's complement)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def int64s(buf: memoryview, wire: int, p0: int, p1: int) -> Iterator[int]:
    """A repeated int64 field's values, packed (wire type 2) or one per field (wire type 0), from
    the payload span :func:`fields` gives."""
    if wire == 0:
        yield signed(varint(buf, p0)[0])
        return
    pos = p0
    while pos < p1:
        value, pos = varint(buf, pos)
        yield signed(value)


def string_entry(buf: memoryview, start: int, end: int) -> tuple[str, str]:
    """A ``StringStringEntryProto`` (external-data locations, metadata): its key (field 1) and value
    (field 2), UTF-8 (``UnicodeDecodeError`` when not)."""
    key = value = ""
    for number, _wire, p0, p1 in fields(buf, start, end):
        if number == 1:
            key = bytes(buf[p0:p1]).decode("utf-8")
        elif number == 2:
            value = bytes(buf[p0:p1]).decode("utf-8")
    return key, value
