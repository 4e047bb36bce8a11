"""Which codecs a pack needs, who provides them, and the error when one is not installed.

A pack records, for every codec its tensors use, the plugin that registered it, that plugin's
distribution (what ``pip install`` takes) and version (``codec_plugins`` in the manifest; packs
written before only have ``codecs``: ``{name: "plugin version"}``).
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from modelpress.base.errors import PluginError
from modelpress.packing.format import MAGIC, STORED, VERSIONS
from modelpress.plugin.codec import Codec
from modelpress.plugin.registry import Registry, current_registry

__all__ = [
    "codec_origins",
    "install_hint",
    "missing_codec_error",
    "missing_codecs_error",
    "needed_codecs",
    "pack_needs",
]

LOCAL = "local"  # the distribution of a plugin registered in code (create_registry(plugins=[...]))


def codec_origins(registry: Registry, codecs: list[Codec]) -> dict[str, dict[str, str]]:
    """``{codec name: {"plugin", "distribution", "version"}}`` for the manifest."""
    origins = {}
    for codec in codecs:
        info = registry.plugins.get(codec.plugin)
        origins[codec.name] = {
            "plugin": codec.plugin,
            "distribution": info.distribution if info is not None else "",
            "version": codec.plugin_version,
        }
    return origins


def _origin(manifest: dict[str, Any], name: str) -> dict[str, str]:
    recorded = manifest.get("codec_plugins", {}).get(name)
    if isinstance(recorded, dict):
        return {k: str(recorded.get(k) or "") for k in ("plugin", "distribution", "version")}
    plugin, _, version = str(manifest.get("codecs", {}).get(name, "")).partition(" ")
    return {"plugin": plugin, "distribution": "", "version": version}


def needed_codecs(
    manifest: dict[str, Any], used: dict[str, int], registry: Registry
) -> list[dict[str, Any]]:
    """One row per codec in ``used`` (``{codec name: tensors}``): the recorded origin, the number
    of tensors it codes, whether it is installed and by which plugin now."""
    rows = []
    for name in sorted(used):
        codec = registry.codec(name)
        info = registry.plugins.get(codec.plugin) if codec is not None else None
        rows.append(
            {
                "codec": name,
                **_origin(manifest, name),
                "tensors": used[name],
                "installed": codec is not None,
                "installed_from": f"{info.distribution} {info.version}".strip()
                if info is not None
                else None,
            }
        )
    return rows


def install_hint(origin: dict[str, str]) -> str:
    """What to do to get a codec from ``origin`` (a row of :func:`needed_codecs` or :func:`_origin`)."""
    dist, plugin = origin.get("distribution", ""), origin.get("plugin", "")
    if dist == LOCAL:
        return (
            f"it was registered in code by plugin {plugin!r} (no installed distribution): "
            f"read it with a registry that has that plugin (registry=modelpress.create_registry(plugins=[...]))"
        )
    if dist:
        version = origin.get("version", "")
        return (
            f"install distribution {dist!r} (pip install '{dist}=={version}')"
            if version
            else f"install distribution {dist!r} (pip install {dist})"
        )
    if plugin:
        return f"install the distribution that provides plugin {plugin!r} (its entry point in the 'modelpress' group)"
    return "install the plugin that provides it"


def missing_codec_error(label: str, what: str, name: str, manifest: dict[str, Any]) -> PluginError:
    """The error for ``what`` (a tensor, a solid stream) coded with codec ``name``, not installed."""
    origin = _origin(manifest, name)
    source = " ".join(
        filter(
            None,
            [
                f"plugin {origin['plugin']!r}" if origin["plugin"] else "",
                f"from {origin['distribution']} {origin['version']}".rstrip()
                if origin["distribution"] not in ("", LOCAL)
                else "",
            ],
        )
    )
    return PluginError(
        f"{label}: {what} is coded with codec {name!r}{f' ({source})' if source else ''}, which no installed plugin provides; "
        f"{install_hint(origin)} to read this file (`modelpress inspect {label}` lists every codec it needs)",
        plugin=origin["plugin"] or name,
    )


def pack_needs(
    path: str | os.PathLike[str], registry: Registry | None = None
) -> list[dict[str, Any]] | None:
    """The codecs the pack at ``path`` needs (rows of :func:`needed_codecs`); None when ``path``
    is not a modelpress pack. Reads the manifest and the graph, no tensor."""
    from modelpress.packing.reader import PackedModel

    try:
        with open(path, "rb") as f:
            if f.read(len(MAGIC)) not in VERSIONS:
                return None
    except OSError:
        return None
    with PackedModel(path, registry=registry or current_registry()) as packed:
        used = Counter(e.codec for e in packed.entries if e.codec != STORED)
        return needed_codecs(packed.manifest, dict(used), packed.registry)


def missing_codecs_error(label: str, rows: list[dict[str, Any]]) -> PluginError | None:
    """One error naming every codec of ``rows`` that is not installed, with what to install."""
    missing = [row for row in rows if not row["installed"]]
    if not missing:
        return None
    needs = "; ".join(
        f"codec {row['codec']!r} ({row['tensors']} tensor{'s' if row['tensors'] != 1 else ''}): {install_hint(row)}"
        for row in missing
    )
    return PluginError(
        f"{label}: {len(missing)} codec(s) this pack needs are not installed: {needs}",
        plugin=missing[0]["plugin"] or missing[0]["codec"],
    )
