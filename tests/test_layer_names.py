"""Layer names from the source framework (torch module paths, Keras layer names), the model named after
its file or class, not the exporter (issue #25: ``node_Conv_91`` and ``main_graph`` in reports and errors)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import modelpress
from modelpress.runtime.session import make_session, run


def _names(model: modelpress.Model) -> list[str]:
    return [layer.name for layer in model.weighted_layers()]


def _unique(model: modelpress.Model) -> bool:
    names = [n.name for n in model.nodes()]
    return len(names) == len(set(names))


def _torch_net():
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)) + x)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), Block())
            self.classifier = nn.Sequential()
            self.classifier.add_module("fc", nn.Linear(8 * 8 * 8, 16))
            self.shared = nn.Linear(16, 16)  # called twice: two nodes, one module
            self.proj = nn.Parameter(torch.randn(16, 10) * 0.1)

        def forward(self, x):
            h = self.classifier(self.features(x).flatten(1))
            return self.shared(torch.relu(self.shared(h))) @ self.proj

    torch.manual_seed(0)
    return Net().eval(), torch.randn(4, 1, 8, 8)


@pytest.mark.torch
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_torch_layers_are_named_after_their_modules(exporter):
    module, x = _torch_net()
    model = modelpress.load(module, example_inputs=x, exporter=exporter, show_progress=False)
    assert model.name == "Net" and model.ir.graph.name == "Net"
    names = _names(model)
    assert {"features.0", "features.2.conv", "classifier.fc", "shared", "proj"} <= set(names), names
    if (
        exporter == "dynamo"
    ):  # the TorchScript exporter may fold the second call into the first's node
        assert sorted(names) == sorted(
            ["features.0", "features.2.conv", "classifier.fc", "shared", "shared_1", "proj"]
        )
    assert _unique(model)


@pytest.mark.torch
def test_module_paths_are_what_options_and_errors_speak(tmp_path):
    module, x = _torch_net()
    model = modelpress.load(module, example_inputs=x, show_progress=False)
    pruned = modelpress.prune(
        model, "magnitude", sparsity=0.5, exclude=["classifier.fc"], min_elements=1
    )
    figures = pruned.provenance.passes[-1].figures
    assert (
        figures["skipped"]["classifier.fc"] == "excluded by option"
        and "features.0" in figures["layers"]
    )
    fc = next(x for x in pruned.weighted_layers() if x.name == "classifier.fc")
    assert np.count_nonzero(fc.weight_array() == 0) == 0
    only = modelpress.prune(
        model, "magnitude", sparsity=0.5, layers=["features.2.conv"], min_elements=1
    )
    assert list(only.provenance.passes[-1].figures["layers"]) == ["features.2.conv"]
    with pytest.raises(
        modelpress.OptionsError,
        match=r"no layer named 'features\.9' in 'Net'; layers: features\.0, features\.2\.conv",
    ):
        modelpress.prune(model, "magnitude", exclude=["features.9"])
    # renamed nodes still run, and the names survive export and reload
    out = tmp_path / "net.onnx"
    modelpress.export(pruned, out)
    again = modelpress.load(out)
    assert _names(again) == _names(pruned) and again.ir.graph.name == "Net"
    np.testing.assert_allclose(
        run(make_session(again), {"x": x.numpy()})[0],
        run(make_session(pruned), {"x": x.numpy()})[0],
        rtol=1e-5,
    )


@pytest.mark.torch
def test_a_torch_file_names_the_model(tmp_path):
    torch = pytest.importorskip("torch")
    module, x = _torch_net()
    path = tmp_path / "cnn.pt2"
    torch.export.save(torch.export.export(module, (x,)), path)
    model = modelpress.load(path, show_progress=False)
    assert model.name == "cnn" and "classifier.fc" in _names(model)


def _onnx_file(path, graph_name: str) -> None:
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="node_MatMul_0")],
        graph_name,
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 3])],
        [w],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


@pytest.mark.parametrize(
    ("graph_name", "expected"),
    [
        ("main_graph", "cnn"),
        ("torch_jit", "cnn"),
        ("tf2onnx", "cnn"),
        ("resnet18-v1", "resnet18-v1"),
    ],
)
def test_an_onnx_file_replaces_only_an_exporters_graph_name(tmp_path, graph_name, expected):
    _onnx_file(tmp_path / "cnn.onnx", graph_name)
    model = modelpress.load(tmp_path / "cnn.onnx")
    assert model.ir.graph.name == expected
    result = modelpress.prune(model, "magnitude", sparsity=0.5, min_elements=1)
    assert result.ir.graph.name == expected


@pytest.mark.tensorflow
def test_keras_layers_are_named_after_their_layers(tmp_path):
    keras = pytest.importorskip("keras")
    pytest.importorskip("tf2onnx")
    keras.utils.set_random_seed(0)
    # a Conv2D folded with its BatchNorm, two auto-named Dense layers ("dense", "dense_1"), a named head
    seq = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3, name="conv_a"),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Flatten(),
            keras.layers.Dense(16),
            keras.layers.Dense(12),
            keras.layers.Dense(10, activation="softmax", name="head"),
        ],
        name="digits_cnn",
    )
    dense = [
        layer.name
        for layer in seq.layers
        if isinstance(layer, keras.layers.Dense) and layer.name != "head"
    ]
    model = modelpress.load(seq, show_progress=False)
    assert (
        model.name == "digits_cnn"
        and _names(model) == ["conv_a", *dense, "head"]
        and _unique(model)
    )
    # a layer called twice and a nested model
    inner = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8, name="d_in")], name="block")
    inp = keras.Input((4,), name="feat")
    shared = keras.layers.Dense(8, name="shared")
    functional = keras.Model(
        inp, inner(shared(shared(keras.layers.Dense(8, name="enc")(inp)))), name="twoshared"
    )
    model = modelpress.load(functional, show_progress=False)
    assert model.name == "twoshared" and _names(model) == ["enc", "shared", "shared_1", "d_in"]
    quantized = modelpress.quantize(
        model, "int8-dynamic", exclude=["d_in"], min_elements=1, allow_no_gain=True
    )
    assert (
        quantized.provenance.passes[-1].figures["float_nodes"].get("d_in") == "excluded by option"
    )
    seq.save(tmp_path / "kcnn.keras")
    assert modelpress.load(tmp_path / "kcnn.keras", show_progress=False).name == "kcnn"
