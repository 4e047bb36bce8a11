"""Pruning: exact sparsity, N:M patterns, structured channel removal that is exact, fine-tuning."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import modelpress
from modelpress.runtime.session import make_session, run
from modelpress.testing import check_method, make_model, tiny_cnn, tiny_mlp
from tests.conftest import run_cli

rng = np.random.default_rng(0)
X = rng.standard_normal((4, 4, 6, 6)).astype(np.float32)


def _w(*shape, scale=0.5):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _conv(name, x, w, b=None, **attrs):
    return helper.make_node(
        "Conv", [x, w] + ([b] if b else []), [name], name=name, pads=[1, 1, 1, 1], **attrs
    )


def _model(nodes, inits, out_shape, in_shape=(None, 4, 6, 6), normalize=True):
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *in_shape[1:]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", *out_shape])],
        inits,
        normalize=normalize,
    )


def _strong_channels(count, strong):
    """Per-output-channel scales so that the L1 ranking is known: `strong` channels are large."""
    scale = np.full(count, 0.01, np.float32)
    scale[list(strong)] = 1.0
    return scale


def _zero_inputs(model, consumers_axis, removed):
    """The original model with the removed channels cut at their consumers (zero input weights)."""
    zeroed = model.clone()
    for name, axis in consumers_axis.items():
        w = zeroed.initializer(name).const_value.numpy().copy()
        index = [slice(None)] * w.ndim
        index[axis] = list(removed)
        w[tuple(index)] = 0
        zeroed.replace_initializer(name, w)
    return zeroed


def _same(a, b, feeds=None):
    feeds = feeds or {"x": X}
    np.testing.assert_allclose(
        run(make_session(a), feeds)[0], run(make_session(b), feeds)[0], rtol=1e-5, atol=1e-5
    )


def test_conv_bn_relu_conv_removes_the_weakest_channels():
    w1 = _w(8, 4, 3, 3) * _strong_channels(8, [1, 2, 5, 6])[:, None, None, None]
    inits = {
        "w1": w1,
        "b1": np.zeros(8, np.float32),
        "s": _w(8) + 1,
        "bb": _w(8),
        "m": _w(8),
        "v": np.abs(_w(8)) + 1,
        "w2": _w(5, 8, 3, 3),
        "b2": _w(5),
    }
    nodes = [
        _conv("c1", "x", "w1", "b1"),
        helper.make_node("BatchNormalization", ["c1", "s", "bb", "m", "v"], ["bn"], name="bn"),
        helper.make_node("Relu", ["bn"], ["r"], name="relu"),
        _conv("y", "r", "w2", "b2"),
    ]
    model = _model(
        nodes, inits, (5, 6, 6), normalize=False
    )  # NOTE: keep the BN (normalisation would fold it)
    pruned = check_method("channel", model, kind="prune", ratio=0.5)
    assert pruned.initializer("w1").const_value.shape == (4, 4, 3, 3)
    assert pruned.initializer("s").const_value.shape == (4,) and pruned.initializer(
        "w2"
    ).const_value.shape == (5, 4, 3, 3)
    np.testing.assert_array_equal(pruned.initializer("w1").const_value.numpy(), w1[[1, 2, 5, 6]])
    onnx.checker.check_model(pruned.to_proto(), full_check=True)
    _same(pruned, _zero_inputs(model, {"w2": 1}, [0, 3, 4, 7]))
    layers = pruned.provenance.passes[-1].figures["layers"]
    assert layers["c1"] == {
        "kind": "physical",
        "channels_before": 8,
        "channels_after": 4,
        "removed": 4,
        "criterion": "l1",
    }


def test_residual_channels_are_pruned_together():
    strong = _strong_channels(8, [0, 3, 4, 7])
    inits = {
        "w0": _w(8, 4, 3, 3) * strong[:, None, None, None],
        "w1": _w(6, 8, 3, 3),
        "w2": _w(8, 6, 3, 3) * strong[:, None, None, None],
        "w3": _w(3, 8, 3, 3),
    }
    nodes = [
        _conv("a", "x", "w0"),
        helper.make_node("Relu", ["a"], ["ar"], name="r0"),
        _conv("h", "ar", "w1"),
        helper.make_node("Relu", ["h"], ["hr"], name="r1"),
        _conv("b", "hr", "w2"),
        helper.make_node("Add", ["ar", "b"], ["s"], name="residual"),
        helper.make_node("Relu", ["s"], ["sr"], name="r2"),
        _conv("y", "sr", "w3"),
    ]
    model = _model(nodes, inits, (3, 6, 6))
    pruned = check_method("channel", model, kind="prune", ratio=0.5)
    figures = pruned.provenance.passes[-1].figures["layers"]
    assert figures["a+b"]["channels_after"] == 4 and figures["h"]["channels_after"] == 3
    assert (
        pruned.initializer("w0").const_value.shape[0]
        == pruned.initializer("w2").const_value.shape[0]
        == 4
    )
    onnx.checker.check_model(pruned.to_proto(), full_check=True)
    assert run(make_session(pruned), {"x": X})[0].shape == (4, 3, 6, 6)


def test_residual_with_an_unprunable_branch_is_left_alone():
    # the skip connection comes straight from the model input: its channels cannot change
    inits = {"w1": _w(4, 4, 3, 3), "w2": _w(3, 4, 3, 3)}
    nodes = [
        _conv("a", "x", "w1"),
        helper.make_node("Add", ["a", "x"], ["s"], name="residual"),
        _conv("y", "s", "w2"),
    ]
    model = _model(nodes, inits, (3, 6, 6))
    with pytest.raises(modelpress.OptionsError, match=r"nothing could be pruned.*model input"):
        modelpress.prune(model, "channel", ratio=0.5)


def test_skipped_layers_are_explained_in_the_users_layer_names_not_the_exporters_node_names():
    """Issue #25: on a Keras model, prune said "Transpose Transpose__30 consumes the channels; Softmax
    functional_1/probs_1/Softmax consumes the channels": node names tf2onnx made up. The weighted layers
    carry the user's names (given on import); other ops are said by what they are and the layers around them."""
    inits = {
        "w1": _w(8, 4, 3, 3),
        "shape": np.array([-1, 288], np.int64),
        "w_fc": _w(288, 16, scale=0.1),
        "w_probs": _w(16, 10),
    }
    nodes = [
        _conv(
            "conv_a", "x", "w1"
        ),  # NOTE: weighted layers: renamed after the Keras layers on import
        helper.make_node("Relu", ["conv_a"], ["r"], name="functional_1/conv_a_1/Relu"),
        helper.make_node("Transpose", ["r"], ["t"], name="Transpose__30", perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["t", "shape"], ["f"], name="functional_1/flat_1/Reshape"),
        helper.make_node("MatMul", ["f", "w_fc"], ["fc"], name="fc"),
        helper.make_node("Relu", ["fc"], ["fr"], name="functional_1/fc_1/Relu"),
        helper.make_node("MatMul", ["fr", "w_probs"], ["logits"], name="probs"),
        helper.make_node("Softmax", ["logits"], ["y"], name="functional_1/probs_1/Softmax"),
    ]
    model = _model(nodes, inits, (10,))
    pruned = modelpress.prune(model, "channel", ratio=0.5)
    figures = pruned.provenance.passes[-1].figures
    assert list(figures["layers"]) == ["fc"], figures
    assert figures["skipped"] == {
        "conv_a": "a Transpose between conv_a and fc needs every channel",
        "probs": "a Softmax after probs needs every channel",
    }, figures["skipped"]
    from modelpress.app.report import figure_text

    shown = figure_text(figures["skipped"])
    assert "__30" not in shown and "functional_1" not in shown, shown


def test_depthwise_block_follows_its_input():
    strong = _strong_channels(8, [0, 1, 2, 3])
    inits = {
        "w1": _w(8, 4, 3, 3) * strong[:, None, None, None],
        "dw": _w(8, 1, 3, 3),
        "dwb": _w(8),
        "w2": _w(5, 8, 1, 1),
    }
    nodes = [
        _conv("a", "x", "w1"),
        helper.make_node("Relu", ["a"], ["ar"], name="r0"),
        _conv("d", "ar", "dw", "dwb", group=8),
        helper.make_node("Relu", ["d"], ["dr"], name="r1"),
        helper.make_node("Conv", ["dr", "w2"], ["y"], name="pw"),
    ]
    model = _model(nodes, inits, (5, 6, 6))
    pruned = check_method("channel", model, kind="prune", ratio=0.5, layers=["a"])
    dw = next(n for n in pruned.nodes() if n.name == "d")
    assert dw.attributes["group"].as_int() == 4 and pruned.initializer("dw").const_value.shape == (
        4,
        1,
        3,
        3,
    )
    # removed channels' depthwise outputs carry the bias through relu: zero the pointwise inputs for them
    _same(pruned, _zero_inputs(model, {"w2": 1}, [4, 5, 6, 7]))


def test_conv_flatten_gemm_slices_blocks_of_rows():
    strong = _strong_channels(6, [1, 4, 5])
    inits = {
        "w1": _w(6, 4, 3, 3) * strong[:, None, None, None],
        "fc": _w(10, 6 * 3 * 3),
        "fb": _w(10),
    }
    nodes = [
        _conv("a", "x", "w1", strides=[2, 2]),
        helper.make_node("Relu", ["a"], ["ar"], name="r"),
        helper.make_node("Flatten", ["ar"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc", "fb"], ["y"], name="fc", transB=1),
    ]
    model = _model(nodes, inits, (10,))
    pruned = check_method("channel", model, kind="prune", ratio=0.5)
    assert pruned.initializer("fc").const_value.shape == (10, 27)
    fc = model.initializer("fc").const_value.numpy().reshape(10, 6, 9)
    np.testing.assert_array_equal(
        pruned.initializer("fc").const_value.numpy(), fc[:, [1, 4, 5]].reshape(10, 27)
    )
    zeroed = model.clone()
    cut = fc.copy()
    cut[:, [0, 2, 3]] = 0
    zeroed.replace_initializer("fc", cut.reshape(10, 54))
    _same(pruned, zeroed)


def test_channel_criteria_and_bad_inputs(digits):
    model = tiny_cnn(channels=8)
    for criterion in ("l2", "bn-scale", "activation"):
        data = {"x": rng.standard_normal((32, 1, 8, 8)).astype(np.float32)}
        result = modelpress.prune(
            model, "channel", ratio=0.25, criterion=criterion, data=data, show_progress=False
        )
        assert result.provenance.passes[-1].figures["layers"]["conv1"]["channels_after"] == 6
    with pytest.raises(modelpress.OptionsError, match=r"option 'ratio'.*less than 1"):
        modelpress.prune(model, "channel", ratio=1.0)
    with pytest.raises(
        modelpress.OptionsError, match=r"option 'ratio'.*greater than or equal to 0"
    ):
        modelpress.prune(model, "channel", ratio=-0.1)
    with pytest.raises(modelpress.OptionsError, match=r"no layer named 'conv9'"):
        modelpress.prune(model, "channel", layers=["conv9"])
    relu_only = make_model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        {},
    )
    with pytest.raises(modelpress.OptionsError, match="no prunable layers"):
        modelpress.prune(relu_only, "magnitude")
    with pytest.raises(modelpress.DataError, match="taylor criterion needs data"):
        modelpress.prune(model, "channel", criterion="taylor")


def test_magnitude_sparsity_is_exact_per_layer_and_global():
    model = tiny_mlp(in_features=64, hidden=50, classes=10)
    result = check_method("magnitude", model, kind="prune", sparsity=0.9)
    w = result.initializer("fc1.weight").const_value.numpy()
    original = np.abs(model.initializer("fc1.weight").const_value.numpy())
    assert np.sum(w == 0) == round(0.9 * w.size)
    assert (
        np.abs(original[w == 0]).max() <= np.abs(original[w != 0]).min()
    )  # the smallest ones went
    glob = modelpress.prune(model, "magnitude", sparsity=0.6, scope="global", show_progress=False)
    zeros = sum(int(np.sum(x.weight_array() == 0)) for x in glob.weighted_layers())
    assert zeros == round(0.6 * (64 * 50 + 50 * 10))
    median = modelpress.prune(model, "magnitude", rule="median", show_progress=False)
    assert median.provenance.passes[-1].figures["layers"]["fc1"]["sparsity"] == 0.5
    threshold = modelpress.prune(
        model, "magnitude", rule="threshold", threshold=0.1, show_progress=False
    )
    assert np.all(
        np.abs(threshold.initializer("fc1.weight").const_value.numpy()[original < 0.1]) == 0
    )


def test_n_m_pattern():
    model = tiny_mlp(in_features=64, hidden=32, classes=8)
    result = check_method("n:m", model, kind="prune", n=2, m=4)
    w = result.initializer(
        "fc1.weight"
    ).const_value.numpy()  # [out, in]: groups along the input dimension
    groups = (w != 0).reshape(32, 16, 4).sum(axis=-1)
    assert np.all(groups <= 2) and result.provenance.passes[-1].figures["pattern"] == "2:4"
    with pytest.raises(modelpress.OptionsError, match=r"n \(4\) must be smaller than m \(4\)"):
        modelpress.prune(model, "n:m", n=4, m=4)


@pytest.mark.slow
@pytest.mark.torch
def test_magnitude_fine_tuning_keeps_the_mask_and_recovers(digits_mlp_path, digits):
    model = modelpress.load(digits_mlp_path)
    train = {"x": digits["x_train"], "labels": digits["y_train"]}
    pruned = modelpress.prune(model, "magnitude", sparsity=0.8, show_progress=False)
    tuned = modelpress.prune(
        model,
        "magnitude",
        sparsity=0.8,
        data=train,
        fine_tune_epochs=6,
        lr=1e-2,
        show_progress=False,
    )

    def accuracy(m):
        return float(
            np.mean(run(make_session(m), {"x": digits["x_test"]})[0].argmax(1) == digits["y_test"])
        )

    for m in (tuned,):
        for layer in m.weighted_layers():
            w = layer.weight_array()
            assert np.sum(w == 0) == round(0.8 * w.size), layer.name
    assert accuracy(tuned) >= accuracy(pruned) and accuracy(tuned) >= accuracy(model) - 0.02
    assert tuned.provenance.passes[-1].figures["fine_tune_epochs"] == 6


@pytest.mark.torch
def test_distillation_loss_is_cross_entropy_plus_tempered_kl():
    import torch
    import torch.nn.functional as F

    from modelpress.plugin_api import kd_loss  # prune's distill=w is the teacher weight

    def _distill_loss(weight, temperature):
        return lambda out, batch: kd_loss(
            out, batch["teacher"], batch["labels"], temperature=temperature, teacher_weight=weight
        )

    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g) * 3
    batch = {"labels": torch.arange(8) % 10, "teacher": teacher}
    assert torch.allclose(
        _distill_loss(0.0, 4.0)(student, batch), F.cross_entropy(student, batch["labels"])
    )
    assert float(_distill_loss(1.0, 4.0)(teacher, batch)) == pytest.approx(0.0, abs=1e-6)
    t, s = (np.asarray(x, np.float64) / 2.0 for x in (teacher, student))
    log_p = t - np.log(np.exp(t).sum(1, keepdims=True))
    log_q = s - np.log(np.exp(s).sum(1, keepdims=True))
    kl = float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), 1))) * 2.0**2
    ce = float(F.cross_entropy(student, batch["labels"]))
    assert float(_distill_loss(0.25, 2.0)(student, batch)) == pytest.approx(
        0.75 * ce + 0.25 * kl, rel=1e-5
    )


@pytest.mark.slow
@pytest.mark.torch
def test_magnitude_fine_tuning_distills_from_the_unpruned_model(digits_mlp_path, digits):
    model = modelpress.load(digits_mlp_path)
    train = {"x": digits["x_train"], "labels": digits["y_train"]}
    tuned = modelpress.prune(
        model,
        "magnitude",
        sparsity=0.8,
        data=train,
        fine_tune_epochs=4,
        lr=1e-2,
        distill=0.7,
        temperature=4.0,
        show_progress=False,
    )
    for layer in tuned.weighted_layers():
        w = layer.weight_array()
        assert np.sum(w == 0) == round(0.8 * w.size), layer.name
    teacher = run(make_session(model), {"x": digits["x_test"]})[0].argmax(1)
    student = run(make_session(tuned), {"x": digits["x_test"]})[0].argmax(1)
    assert (
        np.mean(student == teacher) >= 0.95
        and np.mean(student == digits["y_test"]) >= np.mean(teacher == digits["y_test"]) - 0.02
    )
    with pytest.raises(modelpress.OptionsError, match="distill"):
        modelpress.prune(model, "magnitude", sparsity=0.8, distill=1.5)


@pytest.mark.torch
def test_channel_pruning_with_taylor_and_iterative_fine_tuning(torch_digits, digits):
    from tests.models import images

    module, x_test = torch_digits["cnn"]
    model = modelpress.load(module, example_inputs=x_test[:4])
    train = {"x": images(digits["x_train"], "nchw"), "labels": digits["y_train"]}
    result = modelpress.prune(
        model,
        "channel",
        ratio=0.5,
        criterion="taylor",
        data=train,
        fine_tune_epochs=1,
        schedule="iterative",
        steps=2,
        show_progress=False,
    )
    figures = result.provenance.passes[-1].figures
    assert figures["parameters_after"] < 0.5 * figures["parameters_before"]
    accuracy = float(
        np.mean(run(make_session(result), {"x": x_test})[0].argmax(1) == digits["y_test"])
    )
    assert accuracy > 0.9


@pytest.mark.slow
def test_prune_cli(digits_mlp_path, tmp_path):
    out = tmp_path / "p.onnx"
    result = run_cli(
        "prune",
        str(digits_mlp_path),
        "-o",
        str(out),
        "--method",
        "magnitude",
        "--sparsity",
        "0.5",
        "-q",
    )
    assert result.returncode == 0, result.stderr
    assert "prune/magnitude" in result.stdout and "verified in ONNX Runtime" in result.stdout
    bad = run_cli(
        "prune",
        str(digits_mlp_path),
        "-o",
        str(tmp_path / "q.onnx"),
        "--method",
        "channel",
        "--ratio",
        "1.5",
    )
    assert bad.returncode != 0 and "ratio" in bad.stderr and not (tmp_path / "q.onnx").exists()
