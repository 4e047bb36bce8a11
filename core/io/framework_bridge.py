"""Bridges to the frameworks (torch), imported lazily so that ``import modelpress`` stays light."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from modelpress.base.errors import UnsupportedModelError

if TYPE_CHECKING:
    from modelpress.ir.model import Model

__all__ = ["fit", "to_torch", "update_weights"]


def _torch_part(module: str) -> Any:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise UnsupportedModelError(
            "this needs the torch extra: pip install -c constraints.txt 'modelpress[torch]'"
        ) from None
    import importlib

    return importlib.import_module(f"modelpress.adapters.{module}")


def to_torch(model: Model) -> Any:
    """Lower ``model`` to a trainable ``torch.nn.Module`` (see ``modelpress.adapters.torch_lowering``).

    Initializers become parameters and buffers that keep their ONNX names in
    ``module.onnx_names``; every op type the lowering lacks is listed in one error.
    """
    return _torch_part("torch_lowering").to_torch(model)


def update_weights(model: Model, module: Any) -> Model:
    """A copy of ``model`` holding ``module``'s trained weights (the module came from ``to_torch``)."""
    return _torch_part("torch_lowering").update_weights(model, module)  # type: ignore[no-any-return]


def fit(module: Any, inputs: Any, targets: Any, **options: Any) -> Any:
    """Train a torch module on numpy arrays (see ``modelpress.adapters.torch_training.fit``)."""
    return _torch_part("torch_training").fit(module, inputs, targets, **options)


def held_out_scores(module: Any, inputs: Any, labels: Any, **options: Any) -> tuple[float, float]:
    """``(loss, accuracy)`` on labelled held-out samples, the score to keep a fine-tuning
    epoch by (see ``modelpress.adapters.torch_training.held_out_scores``)."""
    return _torch_part("torch_training").held_out_scores(module, inputs, labels, **options)  # type: ignore[no-any-return]


def kd_loss(student: Any, teacher: Any, labels: Any = None, **options: Any) -> Any:
    """The one distillation loss (see ``modelpress.adapters.torch_training.kd_loss``)."""
    return _torch_part("torch_training").kd_loss(student, teacher, labels, **options)


def choose_loss(
    module: Any = None, inputs: Any = None, labels: Any = None, loss: str = "auto", **options: Any
) -> Any:
    """The loss fitting a module's output (see ``modelpress.adapters.torch_training.choose_loss``)."""
    return _torch_part("torch_training").choose_loss(module, inputs, labels, loss, **options)
