"""``modelpress.load``: import a model from any installed framework adapter."""

from __future__ import annotations

import os
from typing import Any

from modelpress.errors import InvalidModelError, UnsupportedModelError
from modelpress.model import Model
from modelpress.progress import progress_bar
from modelpress.registry import Registry, get_registry

__all__ = ["load"]


def load(source: Any, *, framework: str | None = None, registry: Registry | None = None, show_progress: bool = True, **options: Any) -> Model:
    """Import ``source`` into a :class:`Model`.

    ``source`` is a path (``.onnx``; ``.pt2``/TorchScript, ``.keras``, SavedModel folders with the
    extras installed), ONNX bytes, an ``onnx.ModelProto``, an ``onnx_ir.Model``, or an in-memory
    framework model (``torch.nn.Module``, ``keras.Model``, ...). ``framework`` picks the adapter
    by name instead of asking each one. ``options`` go to the adapter (e.g. ``example_inputs``).
    Loading a file shows progress (a live bar on a terminal, log lines in CI) when it takes long.
    """
    if isinstance(source, (str, os.PathLike)):
        with progress_bar(f"loading {os.path.basename(os.fspath(source))}", enabled=show_progress):
            return _load(source, framework=framework, registry=registry, **options)
    return _load(source, framework=framework, registry=registry, **options)


def _load(source: Any, *, framework: str | None, registry: Registry | None, **options: Any) -> Model:
    if isinstance(source, Model):
        return source
    registry = registry or get_registry()
    adapters = registry.adapters()
    if framework is not None:
        chosen = [a for a in adapters if a.name == framework]
        if not chosen:
            names = ", ".join(a.name for a in adapters)
            raise UnsupportedModelError(f"no adapter named {framework!r} is installed; installed: {names}")
        return chosen[0].load(source, **options)
    if isinstance(source, (str, os.PathLike)) and not os.path.exists(source):
        raise InvalidModelError(f"{os.fspath(source)!r}: no such file or folder")
    for adapter in adapters:
        if adapter.accepts(source):
            return adapter.load(source, **options)
    names = ", ".join(a.name for a in adapters)
    what = repr(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else f"an object of type {type(source).__module__}.{type(source).__name__}"
    raise UnsupportedModelError(
        f"no installed adapter can load {what} (adapters: {names}); for PyTorch or Keras models "
        f"install the extra: pip install -c constraints.txt 'modelpress[torch]' or 'modelpress[tensorflow]'"
    )
