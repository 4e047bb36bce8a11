import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.neural_network import MLPClassifier, MLPRegressor

import modelpress
from modelpress.testing import check_adapter


def test_classifier_imports_and_matches_predict_proba():
    x, y = load_digits(return_X_y=True)
    x = (x / 16).astype(np.float32)
    mlp = MLPClassifier(hidden_layer_sizes=(32,), max_iter=60, random_state=0).fit(
        x[:1000], y[:1000]
    )
    model = check_adapter(
        mlp, feeds={"x": x[1000:1100]}, expected=[mlp.predict_proba(x[1000:1100])]
    )
    assert model.provenance.source_framework == "sklearn"
    assert model.signature.output_names == ["probabilities"]
    small = modelpress.quantize(model, "int8-dynamic", show_progress=False)
    assert small.weight_bytes() < model.weight_bytes() / 2


def test_regressor_and_binary_classifier():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 5)).astype(np.float32)
    reg = MLPRegressor(hidden_layer_sizes=(8,), activation="tanh", max_iter=50, random_state=0).fit(
        x, x[:, 0] * 2
    )
    check_adapter(reg, feeds={"x": x[:20]}, expected=[reg.predict(x[:20]).reshape(-1, 1)])
    binary = MLPClassifier(hidden_layer_sizes=(8,), max_iter=50, random_state=0).fit(x, x[:, 0] > 0)
    check_adapter(binary, feeds={"x": x[:20]}, expected=[binary.predict_proba(x[:20])])


def test_an_unfitted_model_is_refused_by_name():
    with pytest.raises(modelpress.UnsupportedModelError, match="not fitted"):
        modelpress.load(MLPClassifier())
