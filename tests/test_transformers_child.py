"""A large checkpoint folder is exported in a child process (its torch weights never live in the caller):
the child route computes what the in-process route computes, and its errors reach the caller clearly."""

import numpy as np
import onnx_ir as ir
import pytest

pytest.importorskip("transformers")

import modelpress
from modelpress.adapters import transformers as hf_adapter
from modelpress.adapters.transformers_generate import decoder_sample
from modelpress.runtime.session import make_session, run
from tests import hf_fixtures


@pytest.mark.slow
def test_the_child_route_matches_the_in_process_route(tmp_path, monkeypatch):
    folder = hf_fixtures.make_checkpoint(tmp_path / "llama", "llama", steps=0)
    # NOTE: the torch.onnx routes (a Llama folder is written directly by default: tests/test_transformers_direct.py)
    monkeypatch.setenv("MODELPRESS_TRANSFORMERS_EXPORTER", "dynamo")
    in_process = modelpress.load(folder, show_progress=False)
    monkeypatch.setattr(hf_adapter, "CHILD_EXPORT_BYTES", 0)
    in_child = modelpress.load(folder, show_progress=False)
    weights = [
        v.const_value
        for v in in_child.ir.graph.initializers.values()
        if v.const_value is not None and v.const_value.size > 1000
    ]
    assert weights and all(isinstance(w, ir.ExternalTensor) for w in weights)
    assert in_child.signature.input_names == in_process.signature.input_names
    assert in_child.signature.output_names == in_process.signature.output_names
    for key in (
        "task",
        "architecture",
        "model_type",
        "num_layers",
        "num_key_value_heads",
        "head_dim",
    ):
        assert in_child.provenance.extra[key] == in_process.provenance.extra[key]
    assert in_child.provenance.source_version == in_process.provenance.source_version
    feeds = decoder_sample(in_process)
    for a, b in zip(
        run(make_session(in_child), feeds), run(make_session(in_process), feeds), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    ids = np.array([[1, 5, 9, 12, 30, 7]], np.int64)
    with_ids = modelpress.load(
        folder, example_inputs=(ids,), task="text-generation", show_progress=False
    )
    assert with_ids.provenance.extra["task"] == "text-generation"


@pytest.mark.slow
def test_errors_of_the_child_reach_the_caller(tmp_path, monkeypatch):
    folder = hf_fixtures.make_checkpoint(tmp_path / "llama", "llama", steps=0)
    # NOTE: the torch.onnx routes (a Llama folder is written directly by default: tests/test_transformers_direct.py)
    monkeypatch.setenv("MODELPRESS_TRANSFORMERS_EXPORTER", "dynamo")
    monkeypatch.setattr(hf_adapter, "CHILD_EXPORT_BYTES", 0)
    # a ModelpressError raised in the child: the same class and message as in this process
    with pytest.raises(
        modelpress.OptionsError, match=r"text-classification.*LlamaForCausalLM can do"
    ):
        modelpress.load(folder, task="text-classification", show_progress=False)
    # a checkpoint whose weights are cut short: the folder named, with the child's own last lines
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(modelpress.InvalidModelError) as caught:
        modelpress.load(folder, show_progress=False)
    message = str(caught.value)
    assert str(folder) in message
    assert "child process failed (exit status 1)" in message
    assert (
        "SafetensorError" in message and "from_pretrained" in message
    )  # NOTE: the child's traceback, not lost
