"""Refusing to write over a command's own input.

``modelpress quantize m.onnx -o m.onnx`` used to replace the input with the result. Every writer
(:func:`modelpress.export`, ``convert``, ``compress`` and every CLI command) calls
:func:`refuse_overwrite` first: an output that is the same file as an input (same real path, or
the same inode through a hard link or symlink), including the input model's external-data files,
is refused unless ``overwrite=True`` (``--overwrite``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import onnx_ir as ir

from modelpress.base.errors import ExportError
from modelpress.ir.model import Model

__all__ = ["model_files", "refuse_overwrite"]

PathLike = str | os.PathLike[str]


def model_files(model: Model) -> list[Path]:
    """The files a model was read from: its file, its reference's, and their external data."""
    files: list[Path] = []
    for m in (model, model.reference):
        if m is None:
            continue
        if m.path:
            files.append(Path(m.path))
        for graph in m.ir.graphs():
            for value in graph.initializers.values():
                tensor = value.const_value
                if isinstance(tensor, ir.ExternalTensor):
                    files.append(Path(tensor.path))
    return files


def _same_file(a: Path, b: Path) -> bool:
    try:
        if os.path.realpath(a) == os.path.realpath(b):
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def refuse_overwrite(
    outputs: Iterable[PathLike | None],
    inputs: Iterable[PathLike | None],
    *,
    overwrite: bool = False,
) -> None:
    """Raise :class:`ExportError` if any output is the same file as any input (unless ``overwrite``)."""
    if overwrite:
        return
    ins = [Path(p) for p in inputs if p is not None and os.fspath(p)]
    for out in outputs:
        if out is None or not os.fspath(out):
            continue
        for src in ins:
            if _same_file(Path(out), src):
                raise ExportError(
                    f"refusing to write {os.fspath(out)!r}: it is the input file {os.fspath(src)!r}, which modelpress never "
                    "modifies; choose another output path, or pass --overwrite (API: overwrite=True) to replace it"
                )
