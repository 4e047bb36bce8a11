"""Built-in lossless codecs for ``modelpress pack`` (see :mod:`.codecs`).

Registered through the ``modelpress`` entry-point group like any third-party codec plugin.
zstd-based streams need the ``pack`` extra (``zstandard``); without it the codecs fall back to
LZMA (standard library) and a pack that holds zstd streams names the extra to install.
"""

from __future__ import annotations

from modelpress.plugin_api import hookimpl

from .codecs import CODECS

__all__ = ["CODECS"]


@hookimpl
def modelpress_register_codecs(register):  # type: ignore[no-untyped-def]
    for codec in CODECS:
        register(codec)
