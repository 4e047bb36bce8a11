"""The ``.mpk`` adapter: ``modelpress.load("model.mpk")`` decodes a pack in memory.

Tensors are decoded one at a time straight into an in-memory ONNX model (no ONNX file is
written), which then goes through the ONNX adapter's validation. Models above protobuf's 2 GB
limit must be unpacked to a file instead (``modelpress unpack``).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from modelpress.plugin_api import PACK_MAGIC as MAGIC
from modelpress.plugin_api import (
    Adapter,
    Model,
    PluginError,
    UnsupportedModelError,
    current_registry,
    hookimpl,
    read_packed,
)

from .onnx import load_onnx

__all__ = ["load_mpk"]


def _accepts(source: Any) -> bool:
    if not isinstance(source, (str, os.PathLike)):
        return False
    path = Path(source)
    if path.suffix.lower() == ".mpk":
        return True
    try:
        with open(path, "rb") as f:
            # NOTE: every format version shares the first six bytes; read_packed checks the version.
            return f.read(6) == MAGIC[:6]
    except OSError:
        return False


def load_mpk(source: Any, *, check: bool = True, **_: Any) -> Model:
    """Decode a ``.mpk`` pack and load it like an ONNX model, with the codecs of the registry
    ``modelpress.load`` was given (``registry=``), else the process-wide one."""
    try:
        proto = read_packed(source, registry=current_registry())
    except PluginError as exc:
        # NOTE: a codec no installed plugin provides is the file's requirement, not this adapter's
        # fault: say so, rather than let the ONNX adapter try the pack as a protobuf
        raise UnsupportedModelError(str(exc)) from None
    model = load_onnx(proto, check=check)
    model.path = os.fspath(source)
    if model.provenance.source in ("ModelProto", ""):
        model.provenance = dataclasses.replace(model.provenance, source=os.fspath(source))
    return model


@hookimpl
def modelpress_register_adapters(register):  # type: ignore[no-untyped-def]
    # NOTE: above the ONNX adapter, which accepts any file with an unknown suffix.
    register(
        Adapter(
            name="mpk",
            accepts=_accepts,
            load=load_mpk,
            summary="modelpress packs (.mpk), decoded in memory",
            priority=10,
        )
    )
