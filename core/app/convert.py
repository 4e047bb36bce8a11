"""``modelpress.convert``: between frameworks, through the IR, with every step verified."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelpress.base.errors import ExportError, OptionsError
from modelpress.data.samples import load_dataset, sample_inputs
from modelpress.evaluation.comparison import Comparison, compare_outputs
from modelpress.io.export import export
from modelpress.io.framework_bridge import to_torch
from modelpress.io.safety import model_files, refuse_overwrite
from modelpress.ir.model import Model
from modelpress.plugin.loading import load, no_convert_hint
from modelpress.runtime.session import make_session, run

__all__ = ["ConvertResult", "convert", "save_torch"]

TORCH_SUFFIXES = (".pt2", ".pt")


@dataclass(frozen=True)
class ConvertResult:
    path: Path
    target: str
    model: Model
    verification: Comparison | None
    note: str = ""


def _target_for(path: Path, to: str | None) -> str:
    if to is not None:
        if to not in ("onnx", "torch"):
            raise OptionsError(f"--to must be 'onnx' or 'torch', not {to!r}")
        return to
    return "torch" if path.suffix.lower() in TORCH_SUFFIXES else "onnx"


def _write_torch(module: Any, args: tuple[Any, ...], staged: Path, target: Path) -> tuple[Any, str]:
    """Write ``module`` to ``staged``, on its way to ``target`` (``.pt2``: a ``torch.export`` program, dynamic batch when
    it traces so, else the sample's; ``.pt``: pickled) and load it back; returns it and a note."""
    import torch

    if staged.suffix.lower() != ".pt2":
        torch.save(module, str(staged))
        return torch.load(str(staged), weights_only=False), "pickled nn.Module"
    failures = []
    for dynamic in (True, False):
        try:
            shapes = (
                {"args": tuple({0: torch.export.Dim("batch")} if a.dim() else None for a in args)}
                if dynamic
                else None
            )
            program = torch.export.export(module, args, dynamic_shapes=shapes, strict=False)
        except Exception as exc:
            failures.append(
                f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
            )
            continue
        torch.export.save(program, str(staged))
        note = (
            "dynamic batch"
            if dynamic
            else f"fixed batch {args[0].shape[0] if args and args[0].dim() else 1}"
        )
        return torch.export.load(str(staged)).module(), note
    raise ExportError(
        f"torch.export cannot trace the lowered model ({failures[-1]}); write a .pt file instead "
        f"(the pickled nn.Module), nothing was written to {str(target)!r}"
    )


def save_torch(
    model: Model, path: str | os.PathLike[str], *, sample: Any = None
) -> tuple[Comparison, str]:
    """Write ``model`` as PyTorch and check it against ONNX Runtime; returns the figures and a note.

    ``.pt2``: a ``torch.export`` program (dynamic batch when traceable, else fixed to the
    sample's batch size), loadable with ``torch.export.load`` without modelpress. ``.pt``: the
    lowered ``nn.Module`` pickled with ``torch.save`` (load with
    ``torch.load(path, weights_only=False)``; needs modelpress installed).
    """
    import torch

    target = Path(path)
    if target.suffix.lower() not in TORCH_SUFFIXES:
        raise OptionsError(
            f"{str(target)!r}: a PyTorch output must end in .pt2 (torch.export program) or .pt (pickled module)"
        )
    feeds = (
        load_dataset(sample, model.signature, what="sample").inputs
        if sample is not None
        else sample_inputs(model.signature, batch=2)
    )
    names = model.signature.input_names
    args = tuple(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in names)
    module = to_torch(model).eval()
    folder = target.parent if str(target.parent) else Path(".")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=folder))
    except OSError as exc:
        raise ExportError(
            f"cannot write {str(target)!r}: cannot create a file in folder {str(folder)!r} ({exc.strerror}); check it exists and is writable"
        ) from None
    try:
        staged = tmp / target.name
        reloaded, note = _write_torch(module, args, staged, target)
        with torch.no_grad():
            outs = reloaded(*args)
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        expected = run(make_session(model), feeds)
        comparison = compare_outputs(
            model.signature.output_names, expected, [o.numpy() for o in outs]
        )
        os.replace(staged, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return comparison, note


def convert(
    source: Any,
    output: str | os.PathLike[str],
    *,
    to: str | None = None,
    sample: Any = None,
    overwrite: bool = False,
    verify: bool = True,
    external_data: bool | str = "auto",
    **load_options: Any,
) -> ConvertResult:
    """Import ``source`` (any format an adapter accepts) and write it as ONNX or PyTorch.

    ``to`` defaults from ``output``'s suffix (``.onnx`` -> ONNX; ``.pt2``/``.pt`` -> PyTorch).
    ``load_options`` go to the adapter (``example_inputs``, ``input_shape``, ``trust_pickle``...).
    The import itself is verified against the source framework; the written file is verified
    against the imported model (ONNX: in ONNX Runtime; PyTorch: the reloaded module vs ORT);
    ``verify=False`` skips the ONNX check; ``external_data`` is as in :func:`modelpress.export`.
    Writing over ``source`` is refused unless ``overwrite=True``.
    """
    path = Path(output)
    target = _target_for(path, to)
    if isinstance(source, (str, os.PathLike)):
        refuse_overwrite([path], [source], overwrite=overwrite)
        no_convert_hint(source)
    model = load(source, **load_options)
    refuse_overwrite([path], model_files(model), overwrite=overwrite)
    if target == "onnx":
        result = export(
            model,
            path,
            sample=sample,
            verify=verify,
            external_data=external_data,
            overwrite=overwrite,
        )
        return ConvertResult(path, target, model, result.verification)
    comparison, note = save_torch(model, path, sample=sample)
    return ConvertResult(path, target, model, comparison, note)
