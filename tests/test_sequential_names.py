"""Layers of an nn.Sequential are named after their index (``layer0``), not the exporter's ``node_conv2d``."""

from __future__ import annotations

import numpy as np
import pytest

import modelpress
from modelpress.adapters.naming import layer_name, rename_layers
from modelpress.testing import tiny_cnn


def test_an_index_path_becomes_a_layer_name():
    assert [layer_name(p) for p in ("0", "6", "0.conv", "features.0", "fc", "a b", None)] == [
        "layer0",
        "layer6",
        "layer0.conv",
        "features.0",
        "fc",
        None,
        None,
    ]
    model = tiny_cnn(channels=4)
    paths = iter(["0", "3", "6"])
    renamed = rename_layers(model, lambda layer: next(paths))
    assert sorted(renamed.values()) == ["layer0", "layer3", "layer6"]
    assert {layer.name for layer in model.weighted_layers()} == {"layer0", "layer3", "layer6"}


@pytest.mark.torch
def test_torch_sequential_layers_are_named_after_their_index():
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)
    ).eval()
    model = modelpress.load(net, example_inputs=torch.randn(2, 1, 8, 8), show_progress=False)
    assert [layer.name for layer in model.weighted_layers()] == ["layer0", "layer3"]
    quantized = modelpress.quantize(
        model, "int8-dynamic", exclude=["layer0"], show_progress=False, allow_no_gain=True
    )
    assert {n.name: n.op_type for n in quantized.nodes()}[
        "layer0"
    ] == "Conv"  # the name works in options
    assert np.isfinite(modelpress.verify(quantized).cosine)
