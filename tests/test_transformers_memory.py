"""A large checkpoint is exported through a file with external data (no ModelProto of its weights in memory,
no 2 GB limit): the imported model reads its weights lazily from that file and computes what the in-memory
route computes."""

import numpy as np
import onnx_ir as ir
import pytest

pytest.importorskip("transformers")

import modelpress
from modelpress.adapters import transformers_export
from modelpress.adapters.transformers_generate import decoder_sample, greedy_generate
from modelpress.runtime.session import make_session, run
from tests import hf_fixtures


@pytest.mark.slow
def test_a_large_checkpoint_is_exported_through_a_file(tmp_path, monkeypatch):
    folder = hf_fixtures.make_checkpoint(tmp_path / "llama", "llama", steps=0)
    # NOTE: the torch.onnx routes (a Llama folder is written directly by default: tests/test_transformers_direct.py)
    monkeypatch.setenv("MODELPRESS_TRANSFORMERS_EXPORTER", "dynamo")
    in_memory = modelpress.load(folder, show_progress=False)
    monkeypatch.setattr(transformers_export, "FILE_EXPORT_BYTES", 0)
    through_file = modelpress.load(folder, show_progress=False)
    weights = [
        v.const_value
        for v in through_file.ir.graph.initializers.values()
        if v.const_value is not None and v.const_value.size > 1000
    ]
    assert weights and all(isinstance(w, ir.ExternalTensor) for w in weights)
    assert not any(
        isinstance(v.const_value, ir.ExternalTensor)
        for v in in_memory.ir.graph.initializers.values()
    )
    assert through_file.signature.input_names == in_memory.signature.input_names
    feeds = decoder_sample(in_memory)
    for a, b in zip(
        run(make_session(through_file), feeds), run(make_session(in_memory), feeds), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    quantized = modelpress.quantize(
        through_file, "int4-weight-only", block_size=32, show_progress=False
    )
    (tmp_path / "out").mkdir()
    result = modelpress.export(quantized, tmp_path / "out" / "model.onnx", sample=feeds)
    prompts = np.array([[1, 5, 9, 12, 30, 7]], np.int64)
    assert greedy_generate(result.path, prompts, max_new_tokens=4).shape == (1, 10)
