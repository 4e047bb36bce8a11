"""The onnxruntime-genai folder files (``genai_config.json``, the tokenizer copied beside the model)
from a checkpoint's ``config.json``: plain files and JSON, no torch (the fast tier's test of
``modelpress.adapters.transformers_genai``; tests/test_transformers.py runs onnxruntime-genai on a
real export)."""

from __future__ import annotations

import json

import pytest

import modelpress
from modelpress.adapters.transformers_genai import GENAI_CONFIG, genai_config, write_genai_folder
from modelpress.ir.provenance import Provenance
from modelpress.testing import tiny_mlp


def _decoder(checkpoint) -> modelpress.Model:  # type: ignore[no-untyped-def]
    """A graph standing in for an imported causal LM: the provenance the adapter records."""
    model = tiny_mlp(classes=96)
    model.provenance = Provenance(
        source_framework="transformers",
        source=str(checkpoint),
        extra={
            "task": "text-generation-with-past",
            "head_dim": 16,
            "num_layers": 2,
            "num_key_value_heads": 2,
        },
    )
    return model


def test_the_folder_gets_the_tokenizer_and_a_config_from_the_checkpoint(tmp_path):
    checkpoint, out = tmp_path / "ckpt", tmp_path / "out"
    checkpoint.mkdir()
    out.mkdir()
    (checkpoint / "config.json").write_text(
        json.dumps(
            {"hidden_size": 64, "num_attention_heads": 4, "eos_token_id": 1, "n_positions": 128}
        )
    )
    (checkpoint / "tokenizer.json").write_text('{"model": {}}')
    written = write_genai_folder(_decoder(checkpoint), out, filename="int4.onnx")
    assert [p.name for p in written] == ["tokenizer.json", GENAI_CONFIG]
    assert (out / "tokenizer.json").read_text() == '{"model": {}}'
    config = json.loads((out / GENAI_CONFIG).read_text())
    decoder = config["model"]["decoder"]
    assert (decoder["filename"], decoder["hidden_size"], decoder["num_attention_heads"]) == (
        "int4.onnx",
        64,
        4,
    )
    assert (decoder["head_size"], decoder["num_hidden_layers"], decoder["num_key_value_heads"]) == (
        16,
        2,
        2,
    )
    assert "position_ids" not in decoder["inputs"]  # the graph has none
    assert decoder["inputs"]["past_key_names"] == "past_key_values.%d.key"
    model = config["model"]
    assert (model["type"], model["vocab_size"], model["context_length"]) == ("decoder", 96, 128)
    assert (model["eos_token_id"], model["bos_token_id"], model["pad_token_id"]) == (1, 1, 1)
    assert config["search"]["max_length"] == 128 and config["search"]["do_sample"] is False
    limited = genai_config(_decoder(checkpoint), checkpoint, max_length=32)
    assert limited["search"]["max_length"] == 32


def test_what_genai_cannot_run_is_refused_by_name(tmp_path):
    plain = tiny_mlp()
    with pytest.raises(modelpress.DataError, match="not a causal LM with a KV cache"):
        genai_config(plain, tmp_path)
    file_model = _decoder(tmp_path / "model.onnx")
    with pytest.raises(modelpress.DataError, match="pass checkpoint="):
        write_genai_folder(file_model, tmp_path)
    with pytest.raises(modelpress.DataError, match=r"config\.json cannot be read"):
        write_genai_folder(file_model, tmp_path, checkpoint=tmp_path)
