"""A model's signature: the names, dtypes and shapes of its inputs and outputs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx_ir as ir

__all__ = ["Dim", "Signature", "TensorSpec"]

Dim = int | str | None
"""One dimension: a fixed size, a symbolic name (``"batch"``) or ``None`` (unknown)."""


@dataclass(frozen=True)
class TensorSpec:
    """Name, element type and shape of one model input or output."""

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...] | None

    @classmethod
    def from_value(cls, value: ir.Value) -> TensorSpec:
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype("float32")
        shape: tuple[Dim, ...] | None = None
        if value.shape is not None:
            dims: list[Dim] = []
            for d in value.shape:
                if isinstance(d, int):
                    dims.append(d)
                else:
                    dims.append(d.value)  # SymbolicDim: a name, or None when unknown
            shape = tuple(dims)
        return cls(name=value.name or "", dtype=np.dtype(dtype), shape=shape)

    def concrete_shape(self, *, dynamic_size: int = 1) -> tuple[int, ...]:
        """The shape with every symbolic or unknown dimension replaced by ``dynamic_size``."""
        if self.shape is None:
            raise ValueError(f"input {self.name!r} has no known rank; pass sample inputs")
        return tuple(d if isinstance(d, int) and d >= 0 else dynamic_size for d in self.shape)

    def describe(self) -> str:
        dims = (
            "?"
            if self.shape is None
            else ", ".join("?" if d is None else str(d) for d in self.shape)
        )
        return f"{self.name}: {self.dtype.name}[{dims}]"

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "dtype": self.dtype.name,
            "shape": list(self.shape) if self.shape is not None else None,
        }


@dataclass(frozen=True)
class Signature:
    """The inputs and outputs of a model, in graph order."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @classmethod
    def from_graph(cls, graph: ir.Graph) -> Signature:
        # NOTE: models with IR version < 4 also list initializers as graph inputs; they are weights.
        inputs = tuple(TensorSpec.from_value(v) for v in graph.inputs if not v.is_initializer())
        outputs = tuple(TensorSpec.from_value(v) for v in graph.outputs)
        return cls(inputs=inputs, outputs=outputs)

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]

    def input(self, name: str) -> TensorSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def to_dict(self) -> dict[str, Sequence[dict[str, object]]]:
        return {
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
        }
