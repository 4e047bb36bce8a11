"""Export's default verification never passes a cosine <= 0, even after a pass that declares no floor
(structural pruning, distillation change outputs by design): an int8 model with cosine -0.2 once passed."""

from __future__ import annotations

import numpy as np
import pytest

import modelpress
from modelpress.plugin_api import Kind, Method, Options
from modelpress.testing import tiny_mlp


def negate_last_layer(model, options, context):
    """Flips the sign of the last weighted layer's weight and bias: outputs opposite of the reference's."""
    layer = model.weighted_layers()[-1]
    for value in layer.node.inputs[1:]:
        if value is not None and value.const_value is not None:
            model.replace_initializer(value.name, -value.const_value.numpy())


class FlipPlugin:
    @modelpress.hookimpl
    def modelpress_register_kinds(self, register):
        register(Kind("reshape-outputs", "changes outputs by design", min_cosine=None))

    @modelpress.hookimpl
    def modelpress_register_methods(self, register):
        register(
            Method(
                name="flip",
                kind="reshape-outputs",
                apply=negate_last_layer,
                options=Options,
                min_cosine=None,
            )
        )


def test_a_cosine_at_or_below_zero_never_passes_export(tmp_path):
    registry = modelpress.create_registry(plugins=[FlipPlugin()])
    model = tiny_mlp(in_features=16, hidden=32, classes=8)
    x = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
    flipped = modelpress.apply(
        model, "flip", kind="reshape-outputs", registry=registry, show_progress=False
    )
    chain = modelpress.apply(flipped, "int8-dynamic", registry=registry, show_progress=False)
    with pytest.raises(
        modelpress.AccuracyLossError,
        match=r"floor: output 'logits' cosine -0\.9\d+ <= 0; reshape-outputs/flip declares no floor",
    ):
        modelpress.export(
            chain,
            tmp_path / "flipped.onnx",
            sample={"x": x},
            registry=registry,
            show_progress=False,
        )
    assert not (tmp_path / "flipped.onnx").exists()
    # accepted on request, and an explicit threshold is the caller's rule
    kept = modelpress.export(
        chain,
        tmp_path / "kept.onnx",
        sample={"x": x},
        registry=registry,
        accept_loss=True,
        show_progress=False,
    )
    assert kept.verification.cosine < 0 and "<= 0" in kept.verification.loss_accepted
