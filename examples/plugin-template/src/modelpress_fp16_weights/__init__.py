"""modelpress plugin: store float32 weights as float16, with a Cast back to float32."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from pydantic import Field

import modelpress
from modelpress import Method, Model, Options, PassContext

__version__ = "0.1.0"


class Fp16WeightsOptions(Options):
    min_elements: int = Field(
        16, ge=1, description="convert only weights with at least this many elements"
    )
    exclude: list[str] = Field(
        default_factory=list, description="initializer names to keep in float32"
    )


def apply(model: Model, options: Fp16WeightsOptions, context: PassContext) -> None:
    converted = 0
    saved = 0
    worst = 0.0
    for name, value in list(model.graph.initializers.items()):
        tensor = value.const_value
        if (
            tensor is None
            or tensor.dtype != ir.DataType.FLOAT
            or tensor.size < options.min_elements
            or name in options.exclude
        ):
            continue
        weights = tensor.numpy()
        half = weights.astype(np.float16)
        if not np.all(np.isfinite(half)):
            continue  # NOTE: values beyond float16's range would become inf; keep them in float32
        worst = max(
            worst, float(np.max(np.abs(half.astype(np.float32) - weights))) if weights.size else 0.0
        )
        model.replace_initializer(name, half)
        model.insert_after(
            value, "Cast", attributes={"to": ir.DataType.FLOAT}, name=f"{name}/to_float32"
        )
        converted += 1
        saved += weights.nbytes - half.nbytes
    context.figures.update(
        {"converted": converted, "bytes_saved": saved, "max_weight_error": worst}
    )


@modelpress.hookimpl
def modelpress_register_methods(register):
    register(
        Method(
            name="fp16-weights",
            kind="quantize",
            apply=apply,
            options=Fp16WeightsOptions,
            mutates=True,
            summary="store float32 weights as float16 (file halves; compute stays float32)",
        )
    )
