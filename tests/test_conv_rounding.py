"""GPTQ rounding of int8-static's Conv weights (:mod:`modelpress.plugins.quantize.conv_rounding`): the
im2col patches are the Conv's own inputs (checked against ONNX Runtime's Conv for every padding form), and
on a small CNN over smooth images the rounding lowers the output error on images not calibrated on."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

import modelpress
from modelpress.runtime.session import make_session, run
from modelpress.testing import make_model


def _conv(attributes: dict, shape: tuple[int, ...], seed: int = 0) -> modelpress.Model:
    rng = np.random.default_rng(seed)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", **attributes)
    return make_model(
        [node],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", *shape[1:]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5, "h", "w"])],
        {
            "w": rng.normal(0, 0.3, (5, shape[1], 3, 2)).astype(np.float32),
            "b": rng.normal(0, 0.1, 5).astype(np.float32),
        },
    )


@pytest.mark.parametrize(
    "attributes",
    [
        {},
        {"pads": [1, 0, 2, 1], "strides": [2, 1]},
        {"dilations": [2, 2], "strides": [1, 2]},
        {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
        {"auto_pad": "SAME_LOWER"},
        {"auto_pad": "VALID", "strides": [3, 1]},
    ],
)
def test_patch_rows_times_the_weight_are_the_conv_s_outputs(attributes):
    from modelpress.plugins.quantize.conv_rounding import patch_rows

    shape = (2, 3, 9, 8)
    model = _conv(attributes, shape)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    (y,) = run(make_session(model), {"x": x})
    (layer,) = model.weighted_layers()
    # NOTE: more rows asked than there are: all of them, in (n, h, w) order
    rows = patch_rows(layer, x, 10**6, np.random.default_rng(0))
    w = layer.weight_array()
    got = rows @ w.reshape(len(w), -1).T + layer.bias_array()
    np.testing.assert_allclose(got, np.moveaxis(y, 1, -1).reshape(-1, len(w)), atol=1e-4)
    some = patch_rows(layer, x, 7, np.random.default_rng(0))
    assert some.shape == (7, rows.shape[1]) and all(any((r == rows).all(1)) for r in some)


def _images(n: int, seed: int) -> np.ndarray:
    """Smooth colour images: random fields blurred (neighbouring pixels and channels correlated, as in photos)."""
    rng = np.random.default_rng(seed)
    grey = rng.standard_normal((n, 1, 44, 44))
    for axis in (2, 3):
        for _ in range(3):
            grey = (grey + np.roll(grey, 1, axis) + np.roll(grey, -1, axis)) / 3
    tint = rng.uniform(0.6, 1.0, (n, 3, 1, 1))
    x = grey[:, :, 2:42, 2:42] * tint + 0.05 * rng.standard_normal((n, 3, 40, 40))
    return (x / np.abs(x).max()).astype(np.float32)


def _small_cnn() -> modelpress.Model:
    """Conv 3->8 (3x3, padded) -> Relu -> Conv 8->4 (3x3, stride 2): a dense map out."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2", "b2"], ["y"], name="conv2", strides=[2, 2]),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 40, 40])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 19, 19])],
        {
            "w1": rng.normal(0, 0.4, (8, 3, 3, 3)).astype(np.float32),
            "b1": rng.normal(0, 0.05, 8).astype(np.float32),
            "w2": rng.normal(0, 0.2, (4, 8, 3, 3)).astype(np.float32),
            "b2": rng.normal(0, 0.05, 4).astype(np.float32),
        },
    )


def test_int8_static_rounds_conv_weights_by_gptq_and_lowers_held_out_error(tmp_path):
    """With 16 calibration images both Convs have far more patches than weights per output channel
    (16 x 1600 for 27, 16 x 361 for 72): GPTQ rounds both, and the output on 16 other images is closer
    to float's than with every weight rounded to nearest (the activations' rounding, untouched, is most of
    the error left)."""
    model = _small_cnn()
    calibration, held_out = {"x": _images(16, 0)}, {"x": _images(16, 1)}
    (reference,) = run(make_session(model), held_out)
    errors, rounded = {}, {}
    for rounding in ("gptq", "nearest"):
        result = modelpress.quantize(
            model,
            "int8-static",
            calibration=calibration,
            weight_rounding=rounding,
            show_progress=False,
        )
        figures = result.provenance.passes[-1].figures
        assert figures["quantized_nodes"] == 2
        rounded[rounding] = figures["gptq_rounded_layers"]
        path = modelpress.export(result, tmp_path / f"{rounding}.onnx", sample=calibration).path
        (out,) = run(make_session(path), held_out)
        errors[rounding] = float(np.linalg.norm(out - reference) / np.linalg.norm(reference))
    assert rounded == {"gptq": 2, "nearest": 0}
    assert errors["gptq"] < 0.95 * errors["nearest"], errors  # measured 0.0184 vs 0.0197


@pytest.mark.parametrize(
    "samples, probes", [(100, 1), (16, 2)], ids=["rows-enough", "too-few-rows"]
)
def test_one_probe_session_when_every_conv_has_rows_enough(monkeypatch, samples, probes):
    """conv_codes counts each Conv's input rows on one probe session of the Convs' inputs; where every
    Conv has rows enough, the Gram matrices are summed on that same session (one session per run, not
    two); where some have not (16 samples), a probe of the others' inputs is made for them (the
    first one's session gone by then)."""
    from modelpress.plugin_api import load_dataset
    from modelpress.plugins.quantize import conv_rounding
    from modelpress.plugins.quantize.affine import INT8_WEIGHTS

    rng = np.random.default_rng(2)
    # NOTE: a Conv after a Conv; the second (K = 5 x 3 x 3) needs more rows than 16 samples give it
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("Conv", ["y", "w2"], ["y2"], name="conv2"),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 12, 12])],
        [helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["n", 4, 10, 10])],
        {
            "w": rng.normal(0, 0.3, (5, 3, 3, 3)).astype(np.float32),
            "w2": rng.normal(0, 0.3, (4, 5, 3, 3)).astype(np.float32),
        },
    )
    data = load_dataset(
        {"x": rng.standard_normal((samples, 3, 12, 12)).astype(np.float32)},
        model.signature,
        what="calibration",
    )
    made: list[list[str]] = []
    real = conv_rounding._probe
    monkeypatch.setattr(
        conv_rounding, "_probe", lambda m, names: made.append(names) or real(m, names)
    )
    layers = model.weighted_layers()
    codes = conv_rounding.conv_codes(model, layers, data, INT8_WEIGHTS, per_channel=True)
    assert len(made) == probes
    assert sorted(codes) == (["conv", "conv2"] if samples == 100 else ["conv"])
