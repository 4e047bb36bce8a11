"""The training engine on lowered models: learns, is deterministic, keeps masks, stops early."""

import numpy as np
import pytest

import modelpress
from modelpress.runtime.session import make_session, run
from modelpress.testing import tiny_mlp

torch = pytest.importorskip("torch", reason="needs the torch extra")
pytestmark = pytest.mark.torch


def _digits_model():
    return tiny_mlp(in_features=64, hidden=32, classes=10, seed=1)


@pytest.mark.slow
def test_fit_trains_a_lowered_model_and_weights_go_back(digits):
    model = _digits_model()
    module = modelpress.to_torch(model)
    before = float(
        np.mean(run(make_session(model), {"x": digits["x_test"]})[0].argmax(1) == digits["y_test"])
    )
    result = modelpress.fit(
        module,
        [digits["x_train"]],
        {"labels": digits["y_train"]},
        epochs=8,
        lr=1e-2,
        validation=([digits["x_test"]], digits["y_test"]),
        show_progress=False,
    )
    trained = modelpress.update_weights(model, module)
    (logits,) = run(make_session(trained), {"x": digits["x_test"]})
    after = float(np.mean(logits.argmax(1) == digits["y_test"]))
    assert before < 0.3 and after > 0.9
    assert after == pytest.approx(result.best_metric, abs=1e-9)
    assert [h["epoch"] for h in result.history] == list(range(1, 9))


def test_fit_is_deterministic(digits):
    weights = []
    for _ in range(2):
        module = modelpress.to_torch(_digits_model())
        modelpress.fit(
            module,
            [digits["x_train"]],
            {"labels": digits["y_train"]},
            epochs=2,
            seed=3,
            show_progress=False,
        )
        weights.append(module.tensor("fc1.weight").detach().numpy().copy())
    np.testing.assert_array_equal(weights[0], weights[1])


def test_masks_keep_pruned_weights_zero(digits):
    module = modelpress.to_torch(_digits_model())
    name = next(k for k, v in module.onnx_names.items() if v == "fc1.weight")
    mask = (np.random.default_rng(0).random((32, 64)) > 0.7).astype(np.float32)
    modelpress.fit(
        module,
        [digits["x_train"]],
        {"labels": digits["y_train"]},
        epochs=2,
        masks={name: mask},
        show_progress=False,
    )
    weight = module.tensor("fc1.weight").detach().numpy()
    assert np.all(weight[mask == 0] == 0) and np.count_nonzero(weight[mask == 1]) == int(mask.sum())


@pytest.mark.slow
def test_early_stopping_and_interrupt_keep_the_best(digits):
    module = modelpress.to_torch(_digits_model())
    scores = iter([0.5, 0.9, 0.6, 0.55, 0.5, 0.4, 0.3])
    result = modelpress.fit(
        module,
        [digits["x_train"]],
        {"labels": digits["y_train"]},
        epochs=6,
        patience=2,
        metric=lambda m: next(scores),
        show_progress=False,
    )
    assert result.stopped_early and result.best_epoch == 1 and len(result.history) == 3

    def interrupt(epoch, logs):
        if epoch == 2:
            raise KeyboardInterrupt

    module = modelpress.to_torch(_digits_model())
    result = modelpress.fit(
        module,
        [digits["x_train"]],
        {"labels": digits["y_train"]},
        epochs=5,
        callbacks=[interrupt],
        validation=([digits["x_test"]], digits["y_test"]),
        show_progress=False,
    )
    assert result.interrupted and len(result.history) == 2 and result.best_epoch in (1, 2)


def test_fit_rejects_bad_data(digits):
    module = modelpress.to_torch(_digits_model())
    with pytest.raises(modelpress.DataError, match="1437 samples but 10 labels"):
        modelpress.fit(
            module,
            [digits["x_train"]],
            {"labels": digits["y_train"][:10]},
            epochs=1,
            show_progress=False,
        )
    with pytest.raises(modelpress.OptionsError, match="optimizer"):
        modelpress.fit(
            module,
            [digits["x_train"]],
            {"labels": digits["y_train"]},
            optimizer="lbfgs",
            show_progress=False,
        )
