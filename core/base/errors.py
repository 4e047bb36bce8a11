"""The exceptions modelpress raises.

Every error a user can cause is a :class:`ModelpressError` subclass whose message names the
file, node, op, plugin or option at fault and says what to do. The CLI prints the message as
one line; ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = [
    "AccuracyLossError",
    "DataError",
    "DuplicateMethodError",
    "ExportError",
    "InvalidModelError",
    "ModelpressError",
    "NoGainError",
    "OptionsError",
    "PluginError",
    "PluginWarning",
    "UnknownMethodError",
    "UnsafeExternalDataError",
    "UnsupportedModelError",
    "VerificationError",
    "one_line",
    "validation_problems",
]


class ModelpressError(Exception):
    """Base class of every error modelpress raises on purpose (``exit_code``: the CLI's exit status for it)."""

    exit_code: int = 1


class InvalidModelError(ModelpressError):
    """A model file or object is empty, truncated, corrupt or fails the ONNX checker."""


class UnsafeExternalDataError(InvalidModelError):
    """A model's external data points outside the model's folder (``../``, absolute path, symlink)."""


class UnsupportedModelError(ModelpressError):
    """No installed adapter can load this object, or it uses ops a lowering does not support."""


class PluginWarning(UserWarning):
    """A plugin fault that was contained (``MODELPRESS_STRICT_PLUGINS=1`` makes these errors): a
    plugin skipped because it failed to load, an observer hook that raised, an adapter that failed
    while another one loaded the model, an unknown name in the plugin switches."""


STRICT_ENV = "MODELPRESS_STRICT_PLUGINS"


def env_flag(value: str | None) -> bool:
    """Whether an environment switch's value means on (``1``, ``true``, ``yes``, ``on``)."""
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def strict_plugins() -> bool:
    """Whether ``MODELPRESS_STRICT_PLUGINS`` turns contained plugin faults (:class:`PluginWarning`)
    into errors (:class:`PluginError`)."""
    return env_flag(os.environ.get(STRICT_ENV))


class PluginError(ModelpressError):
    """A plugin failed to load, or raised while it ran; the message names the plugin."""

    def __init__(self, message: str, *, plugin: str | None = None, method: str | None = None):
        super().__init__(message)
        self.plugin = plugin
        self.method = method


class DuplicateMethodError(PluginError):
    """Two plugins registered a method under the same kind and name."""


class UnknownMethodError(ModelpressError):
    """No installed plugin provides the method asked for."""


class OptionsError(ModelpressError):
    """Options for a method (or a recipe) do not validate against its schema."""


class NoGainError(ModelpressError):
    """A method's result is not smaller than its input (size methods: quantize), or the method
    changed nothing. ``allow_no_gain=True`` (``--allow-no-gain``) accepts it; the figures say so."""


class DataError(ModelpressError):
    """Calibration, training or sample data is missing, empty, mis-shaped or not finite."""


class ExportError(ModelpressError):
    """Writing a model failed, or ONNX Runtime cannot load what was written (nothing is left)."""


class VerificationError(ExportError):
    """The exported model runs, but its outputs are outside the asked tolerance of the reference."""


class AccuracyLossError(VerificationError):
    """A result misses its accuracy floor (the one its methods declare) or its criteria; nothing was
    written. ``accept_loss=True`` (``--accept-loss``) keeps it; the CLI exits with status 4."""

    exit_code = 4


def one_line(text: object, limit: int = 300) -> str:
    """``text`` as one line of at most ``limit`` characters (a repr of a whole graph can be MBs).

    Error messages embed other objects' ``str``; this keeps them readable on a terminal."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 15] + " ...(truncated)"


def validation_problems(
    exc: Any, *, what: str = "", root: str = "", show_input: bool = False
) -> str:
    """A pydantic ``ValidationError``'s problems as one ``"; "``-joined line, the one way modelpress
    words them: ``<location>: <message>`` per error, the location dotted (``passes.0.method``),
    ``root`` where it is empty; with ``what`` the location is quoted after it (``option 'bits'``);
    with ``show_input`` the rejected value follows (`` (got 3)``)."""
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ())) or root
        if what:
            where = f"{what} {where!r}"
        got = f" (got {err.get('input')!r})" if show_input else ""
        problems.append(f"{where}: {err.get('msg', '')}{got}")
    return "; ".join(problems)
