"""Layer and model names from the source framework, given on import.

Exporters name nodes after ops (``node_Conv_91``, ``sequential_1/dense_1/MatMul``) and graphs after
themselves (``main_graph``, ``tf2onnx``). The framework adapters rename each weighted layer's node
after the module or layer that holds its weight (``features.0``, ``classifier.fc``, ``dense``),
uniquely (a module called twice gives ``enc`` and ``enc_1``), so reports, errors and the
``layers=`` / ``exclude=`` options speak the user's names. The adapters also name the graph after
the file or the model (``cnn``, ``Net``) instead of the exporter (``main_graph``, ``tf2onnx``).

A path that starts with a digit (the layers of a top-level ``nn.Sequential``: ``0``, ``6``, ``0.conv``)
gets the prefix ``layer`` (``layer0``, ``layer6``, ``layer0.conv``): a bare number reads as an index,
not a name, in ``-O exclude=0`` and recipes (YAML and JSON give the integer 0).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from modelpress.plugin_api import Model, WeightedLayer

__all__ = ["layer_name", "rename_layers"]

_VALID = re.compile(r"^[A-Za-z_][\w.\-/]*$")
_INDEXED = re.compile(r"^\d[\w.\-/]*$")  # NOTE: nn.Sequential children: 0, 6, 0.conv


def layer_name(wanted: str | None) -> str | None:
    """``wanted`` as a layer name: ``0`` -> ``layer0`` (see the module docstring); None where it cannot be one."""
    if wanted and _INDEXED.match(wanted):
        wanted = "layer" + wanted
    return wanted if wanted and _VALID.match(wanted) else None


def rename_layers(model: Model, name_of: Callable[[WeightedLayer], str | None]) -> dict[str, str]:
    """Rename every weighted layer's node (subgraphs included) to ``name_of(layer)`` made unique
    among the model's node names (``name``, ``name_1``, ...); ``None`` or an invalid name keeps the
    node's. Returns ``{old: new}`` for the nodes renamed."""
    renamed: dict[str, str] = {}
    for layer in model.weighted_layers(subgraphs=True):
        wanted = layer_name(name_of(layer))
        old = layer.node.name or ""
        if not wanted or wanted == old:
            continue
        new = model.fresh_name(wanted, node=True)
        layer.node.name = new
        renamed[old] = new
    return renamed
