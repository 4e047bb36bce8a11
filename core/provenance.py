"""Where a model came from and what was done to it.

Provenance travels inside the exported ONNX file as ``metadata_props`` (key
``modelpress.provenance``, a JSON document), so a compressed model says which passes made it,
with which options and which plugin version, wherever it goes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["PROVENANCE_KEY", "PassRecord", "Provenance"]

PROVENANCE_KEY = "modelpress.provenance"


@dataclass(frozen=True)
class PassRecord:
    """One pass applied to a model."""

    kind: str
    method: str
    options: dict[str, Any]
    plugin: str
    plugin_version: str
    seconds: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Provenance:
    """The source framework of a model and every pass applied since it was imported."""

    source_framework: str = "onnx"
    source_version: str = ""
    source: str = ""
    importer: str = ""
    passes: tuple[PassRecord, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def with_pass(self, record: PassRecord) -> Provenance:
        return Provenance(
            source_framework=self.source_framework,
            source_version=self.source_version,
            source=self.source,
            importer=self.importer,
            passes=(*self.passes, record),
            extra=dict(self.extra),
        )

    def to_json(self) -> str:
        data = asdict(self)
        data["passes"] = [asdict(p) for p in self.passes]
        return json.dumps(data, sort_keys=True, default=_jsonable)

    @classmethod
    def from_json(cls, text: str) -> Provenance:
        data = json.loads(text)
        passes = tuple(PassRecord(**p) for p in data.pop("passes", ()))
        known = {k: data[k] for k in ("source_framework", "source_version", "source", "importer", "extra") if k in data}
        return cls(passes=passes, **known)


def _jsonable(obj: object) -> object:
    """Make numpy scalars, paths and other simple objects JSON-serialisable."""
    if hasattr(obj, "item"):
        return obj.item()  # numpy scalar
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)
