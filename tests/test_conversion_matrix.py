"""Real trained models, source -> IR -> ONNX (ORT) -> torch: the same predictions at every step."""

import numpy as np
import pytest

import modelpress
from modelpress.runtime.session import make_session, run

MIN_AGREEMENT = 0.999


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a.argmax(1) == b.argmax(1)))


def _through_every_step(source_logits, model, x_test, y_test, tmp_path):
    import torch

    # IR (as imported) run in ORT
    ir_logits = run(make_session(model), {model.signature.input_names[0]: x_test})[0]
    # written ONNX file, reloaded, run in ORT
    exported = modelpress.export(
        model, tmp_path / "model.onnx", sample={model.signature.input_names[0]: x_test[:64]}
    )
    reloaded = modelpress.load(exported.path)
    onnx_logits = run(make_session(exported.path), {model.signature.input_names[0]: x_test})[0]
    # lowered to a torch module
    module = modelpress.to_torch(reloaded).eval()
    with torch.no_grad():
        torch_logits = module(torch.from_numpy(x_test)).numpy()
    steps = {"ir": ir_logits, "onnx": onnx_logits, "torch": torch_logits}
    source_accuracy = float(np.mean(source_logits.argmax(1) == y_test))
    for step, logits in steps.items():
        assert _agreement(source_logits, logits) >= MIN_AGREEMENT, step
        assert float(np.mean(logits.argmax(1) == y_test)) == pytest.approx(
            source_accuracy, abs=1e-9
        ), step
    np.testing.assert_allclose(torch_logits, onnx_logits, atol=1e-4, rtol=1e-4)
    return reloaded


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize("name", ["cnn", "mlp", "transformer"])
def test_torch_models(torch_digits, digits, tmp_path, name):
    from tests.torch_models import torch_predict

    module, x_test = torch_digits[name]
    model = modelpress.load(module, example_inputs=x_test[:4])
    assert model.provenance.source_framework == "torch"
    assert model.provenance.importer == "torch.onnx.export(dynamo=True)"
    assert model.provenance.extra["import_check"]["max_rel_diff"] <= 1e-4
    assert model.signature.inputs[0].shape[0] == "batch"
    _through_every_step(torch_predict(module, x_test), model, x_test, digits["y_test"], tmp_path)


@pytest.mark.slow
@pytest.mark.tensorflow
@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_keras_models(keras_digits, digits, tmp_path, name):
    keras_model, x_test = keras_digits[name]
    model = modelpress.load(keras_model)
    assert model.provenance.source_framework == "keras"
    assert model.signature.inputs[0].shape == (
        "batch",
        *x_test.shape[1:],
    )  # NHWC kept at the boundary
    _through_every_step(
        keras_model.predict(x_test, verbose=0), model, x_test, digits["y_test"], tmp_path
    )


@pytest.mark.tensorflow
def test_keras_file_and_savedmodel(keras_digits, digits, tmp_path):
    keras_model, x_test = keras_digits["cnn"]
    keras_model.save(tmp_path / "cnn.keras")
    keras_model.export(str(tmp_path / "saved"), verbose=False)
    expected = keras_model.predict(x_test, verbose=0)
    for source in (tmp_path / "cnn.keras", tmp_path / "saved"):
        model = modelpress.load(source)
        logits = run(make_session(model), {model.signature.input_names[0]: x_test})[0]
        assert _agreement(expected, logits) >= MIN_AGREEMENT, source


@pytest.mark.tensorflow
@pytest.mark.torch
def test_tensorflow_to_torch_pt2_via_convert(keras_digits, digits, tmp_path):
    """TF -> ONNX -> torch: a Keras model becomes a torch.export program loadable without modelpress."""
    import torch

    keras_model, x_test = keras_digits["cnn"]
    keras_model.save(tmp_path / "cnn.keras")
    result = modelpress.convert(
        tmp_path / "cnn.keras", tmp_path / "cnn.pt2", sample={"image": x_test[:32]}
    )
    assert result.target == "torch" and result.verification.max_abs_diff < 1e-4
    program = torch.export.load(str(tmp_path / "cnn.pt2"))
    with torch.no_grad():
        logits = program.module()(torch.from_numpy(x_test[:32])).numpy()
    assert _agreement(keras_model.predict(x_test[:32], verbose=0), logits) == 1.0
