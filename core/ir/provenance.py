"""Where a model came from and what was done to it.

Provenance travels inside the exported ONNX file as ``metadata_props`` (key
``modelpress.ir.provenance``, a JSON document), so a compressed model says which passes made it,
with which options and which plugin version, wherever it goes.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["PROVENANCE_KEY", "PassRecord", "Provenance", "figure_problem", "modelpress_version"]


def modelpress_version() -> str:
    """The installed modelpress version (``modelpress.__version__``), without importing the package root
    (the IR must not depend on the layers above it)."""
    from importlib import metadata

    try:
        return metadata.version("modelpress")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare source tree
        return "0.0.0+unknown"


PROVENANCE_KEY = "modelpress.ir.provenance"


@dataclass(frozen=True)
class PassRecord:
    """One pass applied to a model.

    ``options`` holds every option of the pass; ``at_defaults`` names those the run left at the
    method's defaults, which a written file leaves out (its ``plugin_version`` says what they were):
    read back from a file, ``options`` holds the options that differed from the defaults.
    ``seconds`` (how long the pass ran) is not written either: the same pass on the same input writes
    the same bytes, and a record read back from a file has ``seconds`` 0.0."""

    kind: str
    method: str
    options: dict[str, Any]
    plugin: str
    plugin_version: str
    seconds: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)
    at_defaults: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    def written(self) -> dict[str, Any]:
        """The record as a file holds it: the options at the method's defaults and the run's
        duration left out (a file's bytes depend on what was done, not on how fast)."""
        data = {f: getattr(self, f) for f in _PASS_FIELDS if f != "seconds"}
        data["options"] = {k: v for k, v in self.options.items() if k not in self.at_defaults}
        return data

    @property
    def criteria_missed(self) -> str | None:
        """The method's own criteria summary when it judged its result and the result missed them
        (``PassContext.report_criteria(False, ...)``), else None."""
        if self.figures.get("criteria_met") is False:
            return " ".join(str(self.figures.get("criteria", "")).split()) or "criteria not met"
        return None


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
        """One compact JSON document (no spaces; each pass's options at their defaults and its
        duration left out: :meth:`PassRecord.written`), as the file's metadata entry holds it."""
        data = asdict(self)
        data["passes"] = [p.written() for p in self.passes]
        return json.dumps(data, sort_keys=True, separators=(",", ":"), default=_jsonable)

    @classmethod
    def from_json(cls, text: str | bytes) -> Provenance:
        """Parse what :meth:`to_json` wrote; anything else is a ``ValueError`` saying what is wrong."""
        try:
            data = json.loads(text)
        except (
            ValueError,
            TypeError,
            RecursionError,
        ) as exc:  # NOTE: JSONDecodeError, UnicodeDecodeError are ValueErrors
            raise ValueError(f"not JSON ({type(exc).__name__})") from None
        if not isinstance(data, dict):
            raise ValueError(f"a JSON {type(data).__name__}, not an object")
        raw_passes = data.get("passes", [])
        if not isinstance(raw_passes, list):
            raise ValueError("'passes' is not a list")
        passes = tuple(_pass_record(p, i) for i, p in enumerate(raw_passes))
        known: dict[str, Any] = {}
        for key in ("source_framework", "source_version", "source", "importer"):
            if key in data:
                if not isinstance(data[key], str):
                    raise ValueError(f"{key!r} is not a string")
                known[key] = data[key]
        if "extra" in data:
            if not isinstance(data["extra"], dict):
                raise ValueError("'extra' is not an object")
            known["extra"] = data["extra"]
        return cls(passes=passes, **known)


_PASS_FIELDS: dict[str, tuple[type, ...]] = {
    "kind": (str,),
    "method": (str,),
    "options": (dict,),
    "plugin": (str,),
    "plugin_version": (str,),
    "seconds": (int, float),
    "figures": (dict,),
}


def _pass_record(raw: Any, index: int) -> PassRecord:
    if not isinstance(raw, dict):
        raise ValueError(f"pass {index} is not an object")
    unknown = set(raw) - set(_PASS_FIELDS)
    missing = {"kind", "method", "options", "plugin", "plugin_version"} - set(raw)
    if unknown or missing:
        raise ValueError(
            f"pass {index} has unknown fields {sorted(unknown)} or lacks {sorted(missing)}"
        )
    for key, types in _PASS_FIELDS.items():
        if key in raw and (not isinstance(raw[key], types) or isinstance(raw[key], bool)):
            raise ValueError(f"pass {index} field {key!r} has the wrong type")
    return PassRecord(**raw)


def figure_problem(value: object) -> str | None:
    """Why ``value`` cannot be a figure (it must be JSON: numbers, strings, bools, None, lists and
    dicts of them; numpy scalars and paths are accepted), or None."""

    def strict(obj: object) -> object:
        if hasattr(obj, "item") and getattr(obj, "ndim", 0) == 0:
            return obj.item()  # numpy scalar
        if isinstance(obj, os.PathLike):
            return os.fspath(obj)
        if hasattr(obj, "shape") and hasattr(obj, "dtype"):
            raise TypeError(
                f"an array of shape {tuple(obj.shape)} ({obj.dtype}); report a number or a short list (.tolist())"
            )
        raise TypeError(f"a {type(obj).__module__}.{type(obj).__qualname__}, which is not JSON")

    try:
        json.dumps(value, default=strict)
    except (TypeError, ValueError) as exc:
        return str(exc)
    return None


def _jsonable(obj: object) -> object:
    """Make numpy scalars, paths and other simple objects JSON-serialisable."""
    if hasattr(obj, "item"):
        return obj.item()  # numpy scalar
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)
