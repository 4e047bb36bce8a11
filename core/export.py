"""Writing a model to ONNX atomically, and verifying it in ONNX Runtime."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from modelpress.criteria import infer_criteria
from modelpress.data import load_dataset, sample_inputs
from modelpress.errors import ExportError, InvalidModelError, ModelpressError, VerificationError
from modelpress.model import Model
from modelpress.registry import get_registry
from modelpress.runtime import INLINE_LIMIT_BYTES, make_session, run
from modelpress.verify import Comparison, compare_outputs

__all__ = ["ExportResult", "export", "verify"]


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export` wrote and measured."""

    path: Path
    size_bytes: int
    external_data: Path | None
    verification: Comparison | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "size_bytes": self.size_bytes,
            "external_data": str(self.external_data) if self.external_data else None,
            "verification": self.verification.to_dict() if self.verification else None,
        }


def verify(
    model: Model,
    *,
    session: Any = None,
    reference: Model | None = None,
    sample: Mapping[str, np.ndarray] | Any = None,
    atol: float | None = None,
    min_cosine: float | None = None,
    min_agreement: float | None = None,
    criteria: Mapping[str, str] | None = None,
) -> Comparison:
    """Run ``model`` (or its ``session``) and ``reference`` in ORT on the same inputs and compare.

    ``reference`` defaults to ``model.reference`` (the model as imported, before any pass), or
    the model itself. ``sample`` is any data :func:`modelpress.data.load_dataset` accepts; by
    default random inputs are generated from the signature. Non-finite outputs are always an
    error; the thresholds, when given, too. Each output is judged as :mod:`modelpress.criteria`
    decides (agreement for classifiers, cosine for embeddings and maps, relative error for
    regression; ``criteria`` overrides it per output name), the same definition the quantizer uses.
    """
    reference = reference or model.reference or model
    signature = model.signature
    feeds = (
        load_dataset(sample, signature, what="sample").inputs
        if sample is not None
        else sample_inputs(signature, batch=2)
    )
    session = session or make_session(model)
    actual = run(session, feeds)
    expected = actual if reference is model else run(make_session(reference), feeds)
    judged_by = infer_criteria(signature.output_names, expected, model=reference, overrides=criteria)
    comparison = compare_outputs(signature.output_names, expected, actual, judged_by)
    failures = []
    if not comparison.finite:
        failures.append("outputs contain NaN or infinite values")
    if atol is not None and comparison.max_abs_diff > atol:
        failures.append(f"max |diff| {comparison.max_abs_diff:.3g} > atol {atol:g}")
    if min_cosine is not None and comparison.cosine < min_cosine:
        failures.append(f"cosine {comparison.cosine:.6f} < {min_cosine:g}")
    if min_agreement is not None and (comparison.top1_agreement or 0.0) < min_agreement:
        failures.append(f"top-1 agreement {comparison.top1_agreement} < {min_agreement:g}")
    if failures:
        raise VerificationError(f"model {model.name!r} fails verification against its reference: {'; '.join(failures)}")
    return comparison


_verify = verify  # NOTE: export's `verify` flag shadows the function inside export().


def export(
    model: Model,
    path: str | os.PathLike[str],
    *,
    verify: bool = True,
    sample: Any = None,
    reference: Model | None = None,
    external_data: bool | None = None,
    atol: float | None = None,
    min_cosine: float | None = None,
    min_agreement: float | None = None,
) -> ExportResult:
    """Write ``model`` to ``path`` as ONNX, load it back in ONNX Runtime and check it numerically.

    The file is first written into a temporary folder beside ``path``; only when ORT loaded it
    (and the checks passed) is it moved into place with an atomic rename. On any failure nothing
    is left at ``path`` (an older file there stays untouched). Models whose weights exceed
    ~1.5 GB (or with ``external_data=True``) are written with their weights in ``<name>.data``.
    The provenance (source, passes, options, plugin versions) goes into ``metadata_props``.
    """
    target = Path(path)
    if target.is_dir():
        raise ExportError(f"cannot export to {str(target)!r}: it is a folder; give a file path ending in .onnx")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise ExportError(f"cannot export to {str(target)!r}: folder {str(parent)!r} does not exist")
    use_external = external_data if external_data is not None else model.weight_bytes() >= INLINE_LIMIT_BYTES
    data_name = target.name + ".data"

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    try:
        staged = tmp / target.name
        try:
            with model.stamped() as stamped:
                if use_external:
                    ir.save(stamped, staged, external_data=data_name, size_threshold_bytes=1024)
                else:
                    ir.save(stamped, staged)
        except (OSError, ValueError) as exc:
            raise ExportError(f"cannot write {str(target)!r}: {exc}") from exc

        try:
            session = make_session(staged)
        except InvalidModelError as exc:
            raise ExportError(f"{exc} — nothing was written to {str(target)!r}") from exc.__cause__

        comparison = None
        if verify:
            try:
                comparison = _verify(
                    model,
                    session=session,
                    reference=reference,
                    sample=sample,
                    atol=atol,
                    min_cosine=min_cosine,
                    min_agreement=min_agreement,
                )
            except ModelpressError as exc:
                raise type(exc)(f"{exc} — nothing was written to {str(target)!r}") from exc
        del session

        data_target = None
        if use_external and (tmp / data_name).exists():
            data_target = target.with_name(data_name)
            os.replace(tmp / data_name, data_target)
        os.replace(staged, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    result = ExportResult(
        path=target,
        size_bytes=target.stat().st_size + (data_target.stat().st_size if data_target else 0),
        external_data=data_target,
        verification=comparison,
    )
    get_registry().hook.modelpress_export_finish(model=model, result=result)
    return result
