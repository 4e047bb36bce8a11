"""Adapters: importers that turn a framework's model into a :class:`modelpress.Model`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modelpress.ir.model import Model

__all__ = ["Adapter"]


@dataclass(frozen=True)
class Adapter:
    """An importer for one source framework. See ``modelpress_register_adapters``."""

    name: str
    accepts: Callable[[Any], bool]
    load: Callable[..., Model]
    summary: str = ""
    priority: int = 0
    plugin: str = ""
    plugin_version: str = ""

    def attributed(self, plugin: str, plugin_version: str) -> Adapter:
        return replace(self, plugin=plugin, plugin_version=plugin_version)
