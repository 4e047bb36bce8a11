"""The ONNX adapter's import step: :func:`~modelpress.data.normalize.normalize`, then the
normalised model checked against the original in ONNX Runtime (:func:`check_equivalent`); a
normalised model whose outputs differ is not kept."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from modelpress.data.normalize import normalize
from modelpress.ir.model import Model
from modelpress.runtime.session import (
    bound_malloc,
    make_session,
    proto_weight_bytes,
    release_free_memory,
    run,
    weight_bytes,
)

__all__ = ["check_equivalent", "normalize_on_import"]


def check_equivalent(
    original: onnx.ModelProto, normalised: ir.Model, feeds: dict[str, np.ndarray]
) -> dict[str, Any]:
    """Run both in ONNX Runtime on ``feeds``; the worst absolute and relative difference."""
    sessions = _Sessions(original, normalised)
    try:
        return sessions.compare(feeds)
    finally:
        sessions.close()


class _Sessions:
    """The check's two sessions, each built on first use and kept for the next inputs tried (a
    model that refuses random inputs of one size is tried on others with the same session), never
    both alive at once: the original's is dropped before the normalised model's is built.

    NOTE: both get their large weights by reference (no serialised copy), run a few samples (no
    pre-packed copies: prepack=False, no constant folding: fold=False) and hold no arena (spin=False)."""

    def __init__(self, original: onnx.ModelProto, normalised: ir.Model) -> None:
        self.original, self.normalised = original, normalised
        self.before: Any = None
        self.after: Any = None

    def _session(self, which: str) -> Any:
        other = "after" if which == "before" else "before"
        setattr(self, other, None)
        if getattr(self, which) is None:
            model = self.original if which == "before" else Model(self.normalised)
            setattr(self, which, make_session(model, prepack=False, spin=False, fold=False))
        return getattr(self, which)

    def compare(self, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
        """Both models' outputs on ``feeds``, compared; an ORT failure on either raises."""
        expected = run(self._session("before"), feeds)
        actual = run(self._session("after"), feeds)
        return _differences(expected, actual)

    def close(self) -> None:
        """Drop both sessions and hand what they freed back now, whether the check ran or not:
        the model's next steps (a method's passes, export) start from the loaded model, not from
        its check's high-water mark."""
        self.before = self.after = None
        release_free_memory()


def _differences(expected: list[np.ndarray], actual: list[np.ndarray]) -> dict[str, Any]:
    worst_abs = worst_rel = 0.0
    for ref, out in zip(expected, actual, strict=True):
        ref, out = np.asarray(ref), np.asarray(out)
        if ref.shape != out.shape:
            return {"equal": False, "why": f"output shape {out.shape} != {ref.shape}"}
        if ref.size == 0 or not np.issubdtype(ref.dtype, np.number):
            continue
        diff = float(np.max(np.abs(ref.astype(np.float64) - out.astype(np.float64))))
        scale = max(float(np.max(np.abs(ref.astype(np.float64)))), 1e-6)
        worst_abs, worst_rel = max(worst_abs, diff), max(worst_rel, diff / scale)
    return {"equal": bool(worst_rel <= 1e-4), "max_abs_diff": worst_abs, "max_rel_diff": worst_rel}


# NOTE: past this, the ORT check would hold two more copies of a big model; it is skipped and said so.
_CHECK_LIMIT_BYTES = 1_000_000_000


def _check_inputs(signature: Any) -> Iterator[dict[str, np.ndarray]]:
    """Random inputs to try, smallest first. Every dynamic dim gets the same size; 2 is too small
    for many image or audio models, and 256 samples of 256x256 would cost memory: 2, then 64 and
    256 cut to two samples, then 64 and 256 whole while the inputs stay under 16 MB."""
    from modelpress.data.samples import sample_inputs

    yield sample_inputs(signature, batch=2)
    sizes = {
        size: sum(int(np.prod(s.concrete_shape(dynamic_size=size))) * 8 for s in signature.inputs)
        for size in (64, 256)
    }
    for size, nbytes in sizes.items():
        if nbytes < 64 * 2**20:
            yield {
                k: v[:2] if v.ndim else v for k, v in sample_inputs(signature, batch=size).items()
            }
    for size, nbytes in sizes.items():
        if nbytes < 16 * 2**20:
            yield sample_inputs(signature, batch=size)


def normalize_on_import(
    model: ir.Model,
    original: onnx.ModelProto,
    label: str,
    sample: dict[str, np.ndarray] | None = None,
) -> tuple[ir.Model, dict[str, Any]]:
    """What the ONNX adapter runs: :func:`normalize`, then :func:`check_equivalent` on sample
    inputs (``sample``, else random ones). A normalised model whose outputs differ is not kept: the model is deserialised again
    from ``original`` and the figures say why. Returns the model and the figures for the provenance."""
    from modelpress.ir.signature import Signature

    # NOTE: before normalize's folding sessions, the process's first: its model decides
    bound_malloc(weight_bytes(model))
    report = normalize(model)
    figures: dict[str, Any] = report.to_dict()
    if not report.modified:
        return model, figures
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in original.graph.initializer)
    if external or proto_weight_bytes(original.graph) > _CHECK_LIMIT_BYTES:
        figures["check"] = "not run (external data or over 1 GB)"
        return model, figures
    signature = Signature.from_graph(model.graph)
    tries = [sample] if sample is not None else _check_inputs(signature)
    check = _first_check(_Sessions(original, model), tries, figures)
    if check is None:
        return model, figures
    figures["check"] = check
    if not check.get("equal"):
        figures["kept_original"] = (
            f"{label}: the normalised model's outputs differed from the original's; the original graph is kept"
        )
        return ir.serde.deserialize_model(original), figures
    return model, figures


def _first_check(
    sessions: _Sessions, tries: Iterable[dict[str, np.ndarray]], figures: dict[str, Any]
) -> dict[str, Any] | None:
    """The comparison on the first of ``tries`` both models run on (None: none; ``figures["check"]``
    then says why), with one session per model for all the inputs tried, freed at the end."""
    tried: set[tuple] = set()  # type: ignore[type-arg]
    try:
        for feeds in tries:
            # NOTE: inputs whose dynamic axes are not the batch give the same shapes: tried once
            shapes = tuple((k, v.shape) for k, v in feeds.items())
            if shapes in tried:
                continue
            tried.add(shapes)
            try:
                return sessions.compare(feeds)
            except Exception as exc:  # NOTE: e.g. random inputs outside what the model accepts
                text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                text = (
                    text if len(text) <= 300 else text[:300].rsplit(" ", 1)[0] + " ..."
                )  # NOTE: never cut mid-word
                figures["check"] = (
                    f"not run: ONNX Runtime cannot run the original on sample inputs ({type(exc).__name__}: {text}); pass sample= to load()"
                )
        return None
    finally:
        sessions.close()
