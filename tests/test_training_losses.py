"""The training loss follows what the model outputs (issue 25), and one KD loss serves prune,
distill and int8-qat (issue 22)."""

import numpy as np
import pytest

import modelpress
from modelpress.plugin_api import choose_loss, kd_loss
from modelpress.runtime.session import make_session, run
from modelpress.testing import tiny_mlp

torch = pytest.importorskip("torch", reason="needs the torch extra")
pytestmark = pytest.mark.torch
F = torch.nn.functional


def _softmax_mlp(softmax: torch.nn.Module | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)]
    return torch.nn.Sequential(*layers, *([softmax] if softmax is not None else [])).eval()


def _lowered(module: torch.nn.Module, x: np.ndarray) -> torch.nn.Module:
    return modelpress.to_torch(modelpress.load(module, example_inputs=x[:4]))


def _accuracy(model, x, y):
    return float(
        np.mean(run(make_session(model), {model.signature.input_names[0]: x})[0].argmax(1) == y)
    )


@pytest.mark.slow
def test_the_loss_fits_the_output(digits):
    x, y = digits["x_train"], digits["y_train"]
    softmax = choose_loss(_lowered(_softmax_mlp(torch.nn.Softmax(dim=1)), x), [x], y)
    assert (
        (softmax.name, softmax.reads)
        == (
            "nll",
            "probabilities",
        )
        and "a Softmax after layer 'layer2'" in softmax.reason
    )  # the user's name, not the exporter's node
    logits = choose_loss(
        modelpress.to_torch(tiny_mlp(in_features=64, hidden=32, classes=10, seed=1)), [x], y
    )
    assert (logits.name, logits.reads) == ("cross_entropy", "logits")
    log_softmax = choose_loss(_lowered(_softmax_mlp(torch.nn.LogSoftmax(dim=1)), x), [x], y)
    assert (log_softmax.name, log_softmax.reads) == ("nll", "log_probabilities")
    # without the graph, the values tell: non-negative rows that sum to 1 are probabilities
    probabilities = np.random.default_rng(0).dirichlet(np.ones(10), 32).astype(np.float32)
    assert (
        choose_loss(outputs=probabilities).name == "nll"
        and "sum to 1" in choose_loss(outputs=probabilities).reason
    )
    assert choose_loss(outputs=np.log(probabilities)).reads == "log_probabilities"
    assert choose_loss(outputs=probabilities * 3 - 1).name == "cross_entropy"
    # float targets that are not class indices are regression; an option overrides the choice
    assert (
        choose_loss(
            outputs=probabilities[:, :1], labels=np.linspace(0, 5, 32, dtype=np.float32)
        ).name
        == "mse"
    )
    forced = choose_loss(outputs=probabilities, labels=y[:32], loss="huber")
    assert (forced.name, forced.reads) == ("huber", "values") and "asked for" in forced.reason
    with pytest.raises(modelpress.OptionsError, match="loss must be one of"):
        choose_loss(outputs=probabilities, loss="hinge")


def test_nll_of_probabilities_is_cross_entropy_of_their_logits():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(16, 10, generator=g) * 3, torch.arange(16) % 10
    batch = {"labels": labels}
    nll = choose_loss(outputs=F.softmax(logits, 1).numpy(), labels=labels.numpy())
    assert float(nll(F.softmax(logits, 1), batch)) == pytest.approx(
        float(F.cross_entropy(logits, labels)), rel=1e-5
    )
    assert float(nll(torch.zeros(16, 10), batch)) == pytest.approx(
        -np.log(1e-7), rel=1e-5
    )  # clamped, finite


def _prune_kd_before(out, teacher, labels, weight, temperature):
    """plugins/prune's `_distill_loss` before issue 22 (`distill` weights the teacher)."""
    hard = F.cross_entropy(out, labels.long())
    soft = (
        F.kl_div(
            F.log_softmax(out / temperature, -1),
            F.log_softmax(teacher / temperature, -1),
            log_target=True,
            reduction="batchmean",
        )
        * temperature**2
    )
    return (1 - weight) * hard + weight * soft


def _distill_kd_before(student, teacher, labels, temperature, alpha):
    """plugins/distill's `kd_loss` before issue 22 (`alpha` weights the labels)."""
    soft = F.kl_div(
        F.log_softmax(student / temperature, dim=-1),
        F.softmax(teacher / temperature, dim=-1),
        reduction="batchmean",
    )
    loss = (1 - alpha) * temperature**2 * soft
    if alpha > 0:
        loss = loss + alpha * F.cross_entropy(student, labels.long())
    return loss


def test_one_kd_loss_gives_what_prune_and_distill_computed():
    g = torch.Generator().manual_seed(0)
    student, teacher, labels = (
        torch.randn(8, 10, generator=g),
        torch.randn(8, 10, generator=g) * 3,
        torch.arange(8) % 10,
    )
    # prune distill=0.25, T=2: the same operations, the same number
    assert float(kd_loss(student, teacher, labels, temperature=2.0, teacher_weight=0.25)) == float(
        _prune_kd_before(student, teacher, labels, 0.25, 2.0)
    )
    # distill alpha=0.3, T=4 is teacher weight 0.7 (KL written with log-targets: equal to float precision)
    assert float(
        kd_loss(student, teacher, labels, temperature=4.0, teacher_weight=0.7)
    ) == pytest.approx(float(_distill_kd_before(student, teacher, labels, 4.0, 0.3)), rel=1e-6)
    assert float(
        kd_loss(student, teacher, None, temperature=4.0, teacher_weight=1.0)
    ) == pytest.approx(float(_distill_kd_before(student, teacher, None, 4.0, 0.0)), rel=1e-6)
    # probability outputs: the tempered softmax of log p, i.e. the same loss as on the logits
    on_probabilities = kd_loss(
        F.softmax(student, 1),
        F.softmax(teacher, 1),
        labels,
        temperature=4.0,
        teacher_weight=0.7,
        reads="probabilities",
    )
    assert float(on_probabilities) == pytest.approx(
        float(kd_loss(student, teacher, labels, temperature=4.0, teacher_weight=0.7)), rel=1e-5
    )
    with pytest.raises(modelpress.DataError, match="needs labels"):
        kd_loss(student, teacher, None, teacher_weight=0.5)


def _train_softmax_torch(digits) -> torch.nn.Module:
    """A digits MLP ending in nn.Softmax, trained with NLL of the log (plain torch)."""
    module = _softmax_mlp(torch.nn.Softmax(dim=1)).train()
    opt = torch.optim.Adam(module.parameters(), lr=3e-3)
    x, y = torch.from_numpy(digits["x_train"]), torch.from_numpy(digits["y_train"])
    g = torch.Generator().manual_seed(0)
    for _ in range(15):
        order = torch.randperm(len(x), generator=g)
        for start in range(0, len(x), 64):
            idx = order[start : start + 64]
            loss = F.nll_loss(torch.log(module(x[idx]).clamp_min(1e-7)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return module.eval()


def _prune_and_check(model, digits):
    name = model.signature.input_names[0]
    source = _accuracy(model, digits["x_test"], digits["y_test"])
    tuned = modelpress.prune(
        model,
        "channel",
        ratio=0.6,
        data={name: digits["x_train"], "labels": digits["y_train"]},
        fine_tune_epochs=2,
        lr=3e-3,
        show_progress=False,
    )
    figures = tuned.provenance.passes[-1].figures
    assert figures["loss"] == "nll" and "a Softmax after layer" in figures["loss_reason"]
    assert _accuracy(tuned, digits["x_test"], digits["y_test"]) >= 0.95 * source
    return tuned


@pytest.mark.slow
def test_softmax_torch_model_recovers_after_pruning(digits):
    model = modelpress.load(_train_softmax_torch(digits), example_inputs=digits["x_test"][:4])
    _prune_and_check(model, digits)
    data = {model.signature.input_names[0]: digits["x_train"], "labels": digits["y_train"]}
    distilled = modelpress.prune(
        model,
        "channel",
        ratio=0.6,
        data=data,
        fine_tune_epochs=1,
        lr=3e-3,
        distill=0.5,
        show_progress=False,
    )
    figures = distilled.provenance.passes[-1].figures
    assert (
        figures["loss"] == "kd+nll"
        and "teacher's outputs are read as probabilities" in figures["loss_reason"]
    )


@pytest.mark.slow
@pytest.mark.tensorflow
def test_softmax_keras_model_recovers_after_pruning(digits):
    pytest.importorskip("tensorflow", reason="needs the tensorflow extra")
    pytest.importorskip("tf2onnx", reason="needs the tensorflow extra")
    import keras

    keras.utils.set_random_seed(0)
    net = keras.Sequential(
        [
            keras.Input((64,), name="pixels"),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    net.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    net.fit(digits["x_train"], digits["y_train"], epochs=10, batch_size=64, verbose=0)
    _prune_and_check(modelpress.load(net), digits)
