"""A model exported with a fixed batch (torch.export.export(net, (x[:2],)) gives batch 2) is fed its data
in batches of that size: quantize, evaluation and verification work on 540-row data instead of refusing it."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from onnx import TensorProto, helper

import modelpress
from modelpress.data.samples import load_dataset
from modelpress.testing import make_model


def _fixed_batch_mlp(batch: int = 2) -> modelpress.Model:
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"], name="fc2", transB=1),
    ]
    inits = {
        "w1": (rng.standard_normal((64, 16)) / 4).astype(np.float32),
        "b1": np.zeros(64, np.float32),
        "w2": (rng.standard_normal((8, 64)) / 8).astype(np.float32),
        "b2": np.zeros(8, np.float32),
    }
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 8])],
        inits,
    )


def test_data_is_fed_in_the_models_fixed_batch():
    model = _fixed_batch_mlp()
    x = np.random.default_rng(1).standard_normal((540, 16)).astype(np.float32)
    data = load_dataset({"x": x, "labels": np.zeros(540, np.int64)}, model.signature, what="eval")
    assert len(data) == 540 and data.max_batch == 2
    assert {len(b["x"]) for b in data.batches(256)} == {2} and data.batch_count(256) == 270
    assert len(data.take(63)) == 62  # whole batches only
    with pytest.warns(
        UserWarning,
        match=r"fixed batch of 2 .* 1 of 541 samples that cannot fill a batch are left out.*dynamic_shapes",
    ):
        odd = load_dataset({"x": np.concatenate([x, x[:1]])}, model.signature, what="eval")
    assert len(odd) == 540
    with pytest.raises(
        modelpress.DataError,
        match=r"eval data has 1 sample\(s\); the model was exported with a fixed batch of 2 .*Dim\('batch'\)",
    ):
        load_dataset({"x": x[:1]}, model.signature, what="eval")


def test_quantize_and_export_a_fixed_batch_model_with_many_rows(tmp_path):
    model = _fixed_batch_mlp()
    x = np.random.default_rng(1).standard_normal((540, 16)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter(
            "error"
        )  # 540 rows fill whole batches: nothing left out, nothing to say
        quantized = modelpress.quantize(
            model,
            "int8-static",
            calibration={"x": x},
            sensitivity=False,
            show_progress=False,
            allow_no_gain=True,
        )
        exported = modelpress.export(
            quantized, tmp_path / "q.onnx", sample={"x": x}, show_progress=False
        )
    assert exported.verification.cosine > 0.99
