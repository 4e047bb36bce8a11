"""Bad inputs to the torch and TensorFlow adapters, file formats, and `modelpress convert`."""

import numpy as np
import pytest

import modelpress
from modelpress.runtime.session import make_session, run
from tests.conftest import run_cli


@pytest.mark.torch
def test_torch_bad_inputs(torch_digits):
    pytest.importorskip("torch")
    module, _ = torch_digits["cnn"]
    with pytest.raises(
        modelpress.DataError, match=r"example inputs \(\(2, 3, 8, 8\)\) do not fit the model"
    ):
        modelpress.load(module, example_inputs=np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(modelpress.DataError, match="example_inputs are needed"):
        modelpress.load(module)
    with pytest.raises(
        modelpress.UnsupportedModelError,
        match=r"no installed adapter can load an object of type builtins\.int",
    ):
        modelpress.load(42)


@pytest.mark.torch
@pytest.mark.slow
def test_torch_unsupported_layer_names_both_exporters():
    torch = pytest.importorskip("torch")

    @torch.library.custom_op("modelpress_test::mystery", mutates_args=())
    def mystery(x: torch.Tensor) -> torch.Tensor:
        return x.clone() * 2

    @mystery.register_fake
    def _(x):
        return torch.empty_like(x)

    class Mystery(torch.nn.Module):
        def forward(self, x):
            return mystery(x) + 1

    with pytest.raises(
        modelpress.UnsupportedModelError,
        match=r"could not export.*dynamo exporter.*TorchScript exporter",
    ):
        modelpress.load(Mystery(), example_inputs=torch.randn(2, 3))


@pytest.mark.torch
def test_torchscript_file_and_pickle_guard(torch_digits, tmp_path, digits):
    torch = pytest.importorskip("torch")
    from tests.torch_models import torch_predict

    module, x_test = torch_digits["mlp"]
    scripted = torch.jit.trace(module, torch.from_numpy(x_test[:2]))
    scripted.save(str(tmp_path / "mlp.pt"))
    model = modelpress.load(tmp_path / "mlp.pt", example_inputs=x_test[:4])
    logits = run(make_session(model), {model.signature.input_names[0]: x_test})[0]
    assert np.mean(logits.argmax(1) == torch_predict(module, x_test).argmax(1)) >= 0.999

    torch.save(module, tmp_path / "full.pth")
    with pytest.raises(modelpress.InvalidModelError, match="trust_pickle=True"):
        modelpress.load(tmp_path / "full.pth", example_inputs=x_test[:4])
    trusted = modelpress.load(tmp_path / "full.pth", example_inputs=x_test[:4], trust_pickle=True)
    assert trusted.provenance.source_framework == "torch"

    torch.save(module.state_dict(), tmp_path / "weights.pth")
    for trust in (
        False,
        True,
    ):  # NOTE: read with weights_only: no code from the file runs either way
        with pytest.raises(
            modelpress.InvalidModelError,
            match=r"holds a state_dict \(\d+ tensors\).*architecture.*load_state_dict",
        ):
            modelpress.load(tmp_path / "weights.pth", example_inputs=x_test[:4], trust_pickle=trust)


@pytest.mark.torch
def test_exported_program_source(torch_digits):
    torch = pytest.importorskip("torch")
    module, x_test = torch_digits["cnn"]
    program = torch.export.export(module, (torch.from_numpy(x_test[:4]),))
    model = modelpress.load(program)
    assert model.provenance.source_framework == "torch"


@pytest.mark.tensorflow
@pytest.mark.slow
def test_keras_without_input_shape():
    keras = pytest.importorskip("keras")
    pytest.importorskip("tf2onnx")

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(3)

        def call(self, x):
            return self.dense(x)

    for model in (keras.Sequential([keras.layers.Dense(4)]), Subclassed()):
        with pytest.raises(modelpress.DataError, match=r"no defined input shape.*input_shape="):
            modelpress.load(model)
    imported = modelpress.load(Subclassed(), input_shape=(None, 6))
    assert imported.signature.inputs[0].shape == ("batch", 6)

    built = Subclassed()
    built.build(
        (None, 6)
    )  # NOTE: how users build a subclassed model: the shape is read from the build
    x = np.random.default_rng(0).standard_normal((5, 6)).astype(np.float32)
    imported = modelpress.load(built, example_inputs=x)
    assert imported.signature.inputs[0].shape == ("batch", 6)
    np.testing.assert_allclose(
        run(make_session(imported), {imported.signature.input_names[0]: x})[0],
        np.asarray(built(x)),
        rtol=1e-4,
        atol=1e-5,
    )


@pytest.mark.tensorflow
def test_keras_fully_convolutional_with_free_height_and_width():
    keras = pytest.importorskip("keras")
    pytest.importorskip("tf2onnx")
    net = keras.Sequential(
        [
            keras.Input((None, None, 3)),
            keras.layers.Conv2D(4, 3, strides=2, padding="same"),
            keras.layers.ReLU(),
            keras.layers.Conv2D(2, 3, padding="same"),
        ]
    )
    model = modelpress.load(
        net
    )  # NOTE: no example_inputs: free sizes get 32 x 32 for the import check
    height, width = model.signature.inputs[0].shape[1:3]
    assert (str(height), str(width)) == ("height", "width")  # not tf2onnx's unk__36, unk__37
    assert all(not str(d).startswith("unk__") for d in model.signature.outputs[0].shape)
    x = np.random.default_rng(1).standard_normal((1, 40, 24, 3)).astype(np.float32)
    out = run(make_session(model), {model.signature.input_names[0]: x})[0]
    np.testing.assert_allclose(out, np.asarray(net(x)), rtol=1e-4, atol=1e-4)


@pytest.mark.tensorflow
def test_keras_shape_error_keeps_tensorflow_s_message():
    keras = pytest.importorskip("keras")
    pytest.importorskip("tf2onnx")
    net = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(3)])
    wrong = np.zeros((2, 10, 10, 1), np.float32)
    with pytest.raises(modelpress.DataError) as caught:
        modelpress.load(net, example_inputs=wrong)
    message = str(caught.value)
    assert "do not fit the model" in message and "example_inputs=" in message
    assert "Graph execution error" not in message and len(message.split(": ", 2)[-1]) > 20, message


@pytest.mark.tensorflow
def test_tf_function_source():
    tf = pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")
    weights = tf.constant(np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec((None, 5), tf.float32, name="features")])
    def project(features):
        return tf.nn.relu(tf.matmul(features, weights))

    model = modelpress.load(project)
    x = np.random.default_rng(1).standard_normal((4, 5)).astype(np.float32)
    np.testing.assert_allclose(
        run(make_session(model), {"features": x})[0], project(x).numpy(), atol=1e-5
    )


@pytest.mark.slow
@pytest.mark.torch
def test_convert_cli_torchscript_to_onnx_and_torch(torch_digits, tmp_path, digits):
    torch = pytest.importorskip("torch")
    module, x_test = torch_digits["cnn"]
    torch.jit.trace(module, torch.from_numpy(x_test[:2])).save(str(tmp_path / "cnn.pt"))
    np.save(tmp_path / "example.npy", x_test[:4])
    out = run_cli(
        "convert",
        str(tmp_path / "cnn.pt"),
        "--example",
        str(tmp_path / "example.npy"),
        "-o",
        str(tmp_path / "cnn.onnx"),
    )
    assert out.returncode == 0, out.stderr
    assert (
        "import verified against torch" in out.stdout
        and "verified against the imported model" in out.stdout
    )
    result = run_cli("convert", str(tmp_path / "cnn.onnx"), "-o", str(tmp_path / "back.pt2"))
    assert result.returncode == 0, result.stderr
    program = torch.export.load(str(tmp_path / "back.pt2"))
    with torch.no_grad():
        logits = program.module()(torch.from_numpy(x_test[:16])).numpy()
    from tests.torch_models import torch_predict

    assert np.array_equal(logits.argmax(1), torch_predict(module, x_test[:16]).argmax(1))
    pickled = run_cli("convert", str(tmp_path / "cnn.onnx"), "-o", str(tmp_path / "back.pt"))
    assert pickled.returncode == 0, pickled.stderr
    assert isinstance(torch.load(tmp_path / "back.pt", weights_only=False), torch.nn.Module)


@pytest.mark.slow
def test_convert_cli_errors(tmp_path, digits_mlp_path):
    bad = run_cli("convert", str(digits_mlp_path), "-o", str(tmp_path / "x.pt2"), "--to", "onnx")
    assert bad.returncode == 0  # --to wins over the suffix
    missing = run_cli("convert", str(tmp_path / "nope.keras"), "-o", str(tmp_path / "o.onnx"))
    assert (
        missing.returncode != 0
        and missing.stderr.startswith("modelpress: error:")
        and "no such file" in missing.stderr
    )
    shape = run_cli(
        "convert", str(digits_mlp_path), "-o", str(tmp_path / "o.onnx"), "--input-shape", "a,b"
    )
    assert shape.returncode != 0 and "comma-separated integers" in shape.stderr
