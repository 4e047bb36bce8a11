"""Reading a checkpoint's ``.safetensors`` files without torch: the header, then one tensor's rows at a time.

The format: 8 bytes (little-endian ``uint64``) giving the header's length, a JSON header naming each
tensor's ``dtype``, ``shape`` and ``data_offsets`` (``[begin, end)`` after the header), then the raw
bytes. A sharded checkpoint lists its files in ``model.safetensors.index.json``. ``BF16`` becomes
float32 by shifting its 16 bits into the high half; ``F16`` by NumPy's conversion.

Plain NumPy and JSON.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modelpress.plugin_api import InvalidModelError, UnsupportedModelError, one_line

__all__ = ["SafetensorsIndex", "TensorEntry"]

_DTYPES = {"F32": (np.float32, 4), "F16": (np.float16, 2), "BF16": (np.uint16, 2)}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are: the file, the absolute offset, its stored type and shape."""

    path: Path
    offset: int
    dtype: str
    shape: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        width = _DTYPES[self.dtype][1]
        return int(np.prod(self.shape[1:], dtype=np.int64)) * width if self.shape else width


def _header(path: Path) -> dict[str, TensorEntry]:
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error) as exc:
        raise InvalidModelError(
            f"{str(path)!r}: not a readable safetensors file: {one_line(exc)}"
        ) from None
    size, end = path.stat().st_size, 8 + length
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise UnsupportedModelError(
                f"{str(path)!r}: tensor {name!r} is stored as {info['dtype']}; only F32, F16 and BF16 are read"
            )
        begin, stop = info["data_offsets"]
        if end + stop > size:
            raise InvalidModelError(
                f"{str(path)!r} is cut short: tensor {name!r} ends at byte {end + stop:,}, the file has {size:,}"
            )
        entries[name] = TensorEntry(path, 8 + length + begin, info["dtype"], tuple(info["shape"]))
    return entries


class SafetensorsIndex:
    """Every tensor of a checkpoint folder by name (``model.safetensors`` or the shards an index lists)."""

    def __init__(self, folder: Path) -> None:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = [p.name for p in sorted(folder.glob("*.safetensors"))]
        self.entries: dict[str, TensorEntry] = {}
        for name in files:
            self.entries.update(_header(folder / name))

    @classmethod
    def has_weights(cls, folder: Path) -> bool:
        return (folder / "model.safetensors.index.json").is_file() or any(
            folder.glob("*.safetensors")
        )

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entry(name).shape

    def entry(self, name: str) -> TensorEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise InvalidModelError(f"the checkpoint has no tensor {name!r}") from None

    def rows(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` of tensor ``name`` (its first axis) as float32; all of it by default."""
        entry = self.entry(name)
        stop = (entry.shape[0] if entry.shape else 1) if stop is None else stop
        kind, _ = _DTYPES[entry.dtype]
        count = (stop - start) * entry.row_bytes // np.dtype(kind).itemsize
        with open(entry.path, "rb") as f:
            f.seek(entry.offset + start * entry.row_bytes)
            raw = np.fromfile(f, dtype=kind, count=count)
        shape = (stop - start, *entry.shape[1:]) if entry.shape else ()
        if entry.dtype == "BF16":
            return (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)
        return raw.astype(np.float32, copy=False).reshape(shape)
