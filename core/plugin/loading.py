"""``modelpress.load``: import a model from any installed framework adapter."""

from __future__ import annotations

import os
import sys
import time
import warnings
from typing import Any

import numpy as np

from modelpress.base.errors import (
    InvalidModelError,
    ModelpressError,
    OptionsError,
    PluginError,
    PluginWarning,
    UnsupportedModelError,
    one_line,
)
from modelpress.base.progress import progress_bar
from modelpress.ir.model import Model
from modelpress.plugin.adapter import Adapter
from modelpress.plugin.registry import (
    STRICT_ENV,
    Registry,
    current_registry,
    strict_plugins,
    using_registry,
)

__all__ = ["load"]

# Graph names exporters write when the model has none of its own: a file's model is named after the file instead
_EXPORTER_GRAPH_NAMES = frozenset({"", "main_graph", "torch_jit", "torch-jit-export", "tf2onnx"})


def load(
    source: Any,
    *,
    framework: str | None = None,
    registry: Registry | None = None,
    show_progress: bool = True,
    **options: Any,
) -> Model:
    """Import ``source`` into a :class:`Model`.

    ``source`` is a path (``.onnx``; ``.pt2``/TorchScript, ``.keras``, SavedModel folders with the
    extras installed), ONNX bytes, an ``onnx.ModelProto``, an ``onnx_ir.Model``, or an in-memory
    framework model (``torch.nn.Module``, ``keras.Model``, ...). ``framework`` picks the adapter
    by name instead of asking each one. ``options`` go to the adapter (e.g. ``example_inputs``;
    ``task`` for a Hugging Face checkpoint: ``feature-extraction``, ``text-classification``,
    ``text-generation``, ``text-generation-with-past``; refused for a model that has no tasks).
    Loading a file shows progress (a live bar on a terminal, log lines in CI) when it takes long.
    """
    if isinstance(source, (str, os.PathLike)):
        started = time.perf_counter()
        with progress_bar(f"loading {os.path.basename(os.fspath(source))}", enabled=show_progress):
            model = _load(source, framework=framework, registry=registry, **options)
        if show_progress:
            _convert_once_hint(os.fspath(source), model, time.perf_counter() - started)
        return model
    return _load(source, framework=framework, registry=registry, **options)


_HINTED: set[str] = set()


def no_convert_hint(path: str | os.PathLike[str]) -> None:
    """Leave out the hint for ``path`` (``modelpress.convert`` is that conversion)."""
    _HINTED.add(os.fspath(path))


def _convert_once_hint(path: str, model: Model, seconds: float) -> None:
    """A framework file (``.pt2``, ``.keras``, ...) is exported to ONNX on every load: say once per
    process (only with progress shown: ``-q`` silences it) that converting it once saves that."""
    stem, suffix = os.path.splitext(path.rstrip("/\\"))
    if (
        model.provenance.source_framework == "onnx"
        or suffix.lower() in (".onnx", ".mpk")
        or path in _HINTED
    ):
        return
    _HINTED.add(path)
    sys.stderr.write(
        f"note: {os.path.basename(path)} was exported to ONNX in {seconds:.1f}s, as it will be by every command; "
        f"convert it once and use the .onnx: modelpress convert {path} -o {os.path.basename(stem)}.onnx\n"
    )


def _load(
    source: Any, *, framework: str | None, registry: Registry | None, **options: Any
) -> Model:
    if isinstance(source, Model):
        _check_task(source, options.get("task"))
        return source
    registry = registry or current_registry()
    # NOTE: the registry travels into the adapters (a .mpk is decoded with its codecs)
    with using_registry(registry):
        model = _load_with(source, registry, framework, options)
    _check_task(model, options.get("task"))
    if (
        isinstance(source, (str, os.PathLike))
        and (model.ir.graph.name or "") in _EXPORTER_GRAPH_NAMES
    ):
        model.ir.graph.name = os.path.splitext(os.path.basename(os.fspath(source).rstrip("/\\")))[0]
    return model


def _check_task(model: Model, task: str | None) -> None:
    """``task=`` is for adapters that export a model per task (Hugging Face checkpoints) and record
    it as ``provenance.extra["task"]``; any other model would silently ignore it."""
    if task is None or model.provenance.extra.get("task") == task:
        return
    had = model.provenance.extra.get("task")
    how = (
        f"is already exported for {had!r}"
        if had
        else f"was loaded by the {model.provenance.source_framework or 'ONNX'} importer, which has no tasks"
    )
    raise OptionsError(
        f"task {task!r}: {model.name!r} {how}; --task / task= chooses what a Hugging Face checkpoint is exported for"
    )


def _load_with(
    source: Any, registry: Registry, framework: str | None, options: dict[str, Any]
) -> Model:
    adapters = registry.adapters()
    if framework is not None:
        chosen = [a for a in adapters if a.name == framework]
        if not chosen:
            names = ", ".join(a.name for a in adapters)
            raise UnsupportedModelError(
                f"no adapter named {framework!r} is installed; installed: {names}"
            )
        return _adapter_load(chosen[0], source, options)
    if isinstance(source, (str, os.PathLike)) and not os.path.exists(source):
        raise InvalidModelError(f"{os.fspath(source)!r}: no such file or folder")
    faults: list[PluginError] = []
    for adapter in adapters:
        try:
            if not _adapter_accepts(adapter, source):
                continue
            model = _adapter_load(adapter, source, options)
        except PluginError as exc:
            # NOTE: a faulty adapter must not stop the others (ONNX included) from loading the source.
            if strict_plugins():
                raise
            faults.append(exc)
            continue
        for fault in faults:
            warnings.warn(
                f"{fault} (another adapter, {adapter.name!r}, loaded the model; {STRICT_ENV}=1 makes this an error)",
                PluginWarning,
                stacklevel=3,
            )
        return model
    if faults:
        raise (
            faults[0]
            if len(faults) == 1
            else PluginError(
                "; ".join(str(f) for f in faults), plugin=", ".join(str(f.plugin) for f in faults)
            )
        )
    names = ", ".join(a.name for a in adapters)
    what = (
        repr(os.fspath(source))
        if isinstance(source, (str, os.PathLike))
        else f"an object of type {type(source).__module__}.{type(source).__name__}"
    )
    raise UnsupportedModelError(
        f"no installed adapter can load {what} (adapters: {names}); for PyTorch or Keras models "
        f"install the extra: pip install -c constraints.txt 'modelpress[torch]' or 'modelpress[tensorflow]'"
    )


def _label(adapter: Adapter) -> str:
    return f"adapter {adapter.name!r} (plugin {' '.join(filter(None, [adapter.plugin or 'local', adapter.plugin_version]))})"


def _adapter_accepts(adapter: Adapter, source: Any) -> bool:
    """``adapter.accepts(source)``; an exception or a non-bool answer is a PluginError naming the plugin."""
    try:
        answer = adapter.accepts(source)
    except Exception as exc:
        raise PluginError(
            f"{_label(adapter)} failed in accepts(): {type(exc).__name__}: {one_line(exc)}",
            plugin=adapter.plugin,
        ) from exc
    if not isinstance(answer, (bool, np.bool_)):
        raise PluginError(
            f"{_label(adapter)}: accepts() returned {type(answer).__name__}, not a bool",
            plugin=adapter.plugin,
        )
    return bool(answer)


def _adapter_load(adapter: Adapter, source: Any, options: dict[str, Any]) -> Model:
    """``adapter.load(source, **options)``, checked: an unexpected exception or a result that is not a
    Model is a PluginError naming the plugin; a ModelpressError (a clear refusal) passes through."""
    try:
        model = adapter.load(source, **options)
    except ModelpressError:
        raise
    except Exception as exc:
        raise PluginError(
            f"{_label(adapter)} failed in load(): {type(exc).__name__}: {one_line(exc)}",
            plugin=adapter.plugin,
        ) from exc
    if not isinstance(model, Model):
        raise PluginError(
            f"{_label(adapter)}: load() returned {type(model).__name__}, not a modelpress.Model",
            plugin=adapter.plugin,
        )
    return model
