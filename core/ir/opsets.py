"""Raising a model's opset when a method needs a newer one (per-channel QDQ: 13, blocked int4
DequantizeLinear: 21), with ONNX's version converter; a clear error naming the op when it cannot."""

from __future__ import annotations

from typing import Any

import onnx
import onnx_ir as ir

from modelpress.base.errors import UnsupportedModelError
from modelpress.ir.model import Model

__all__ = ["ensure_opset"]


def _blocking_op(model: Model, message: str) -> str | None:
    """The op type the converter's message names, if any (longest match first)."""
    for op in sorted(model.op_histogram(), key=len, reverse=True):
        if op and op in message:
            return op
    return None


def ensure_opset(
    model: Model, version: int, *, why: str, figures: dict[str, Any] | None = None
) -> Model:
    """``model`` if its default-domain opset is at least ``version``, else a converted copy.

    ``why`` names what needs it (e.g. "per-channel QDQ (int8-static)"); the conversion is
    recorded in ``figures["opset_converted"]``. Raises :class:`UnsupportedModelError` naming the
    op that blocks the conversion, and what to do, when ONNX's converter cannot convert.
    """
    if model.opset >= version:
        return model
    before = model.opset
    try:
        converted = onnx.version_converter.convert_version(model.to_proto(), version)
        # NOTE: the checker resolves external data against the working directory (an in-memory
        # proto has no folder); such a model is checked when ORT loads the method's result.
        if not any(
            isinstance(v.const_value, ir.ExternalTensor)
            for g in model.ir.graphs()
            for v in g.initializers.values()
        ):
            onnx.checker.check_model(converted)
    except Exception as exc:
        message = " ".join(str(exc).split())[:300]
        op = _blocking_op(model, message)
        blocker = f"op {op!r} cannot be converted" if op else f"the converter failed ({message})"
        raise UnsupportedModelError(
            f"{model.name!r}: {why} needs opset {version}, the model has opset {before}, and ONNX's version converter "
            f"cannot raise it: {blocker}. Re-export the model at opset {version} or newer, or choose an option that "
            f"works at opset {before}"
        ) from None
    upgraded = ir.serde.deserialize_model(converted)
    # NOTE: weights do not come back through the converter's copy: the converted graphs get the
    # original tensor objects (memory-mapped external data stays mapped, never read here).
    tensors = {
        (name, i): value.const_value
        for i, graph in enumerate(model.ir.graphs())
        for name, value in graph.initializers.items()
    }
    for i, graph in enumerate(upgraded.graphs()):
        for name, value in graph.initializers.items():
            original = tensors.get((name, i))
            if (
                original is not None
                and value.const_value is not None
                and tuple(original.shape) == tuple(value.const_value.shape)
            ):
                value.const_value = original
    result = Model(
        upgraded, provenance=model.provenance, path=model.path, reference=model.reference or model
    )
    if figures is not None:
        figures["opset_converted"] = (
            f"{before} -> {version} (for {why}, with ONNX's version converter)"
        )
    return result
