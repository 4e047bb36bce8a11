"""The direct ONNX writer for Llama-architecture checkpoint folders (adapters/transformers_llama.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
pytest.importorskip("tokenizers")

import modelpress  # noqa: E402
from modelpress.adapters.transformers_llama import direct_plan  # noqa: E402
from modelpress.adapters.transformers_safetensors import SafetensorsIndex  # noqa: E402
from modelpress.plugin_api import InvalidModelError, OptionsError, UnsupportedModelError  # noqa: E402
from tests import hf_fixtures  # noqa: E402


def test_safetensors_rows_without_torch_in_every_stored_type(tmp_path):
    from safetensors.torch import save_file

    value = torch.randn(6, 5)
    save_file(
        {"f32": value, "bf16": value.to(torch.bfloat16), "f16": value.half()},
        str(tmp_path / "model.safetensors"),
    )
    index = SafetensorsIndex(tmp_path)
    assert index.shape("bf16") == (6, 5)
    np.testing.assert_array_equal(index.rows("f32"), value.numpy())
    np.testing.assert_array_equal(
        index.rows("bf16", 2, 4), value.to(torch.bfloat16).float()[2:4].numpy()
    )
    np.testing.assert_array_equal(index.rows("f16", 5), value.half().float()[5:].numpy())


def test_a_cut_short_safetensors_file_is_named(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(64, 64)}, str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(
        InvalidModelError, match=r"model.safetensors' is cut short: tensor 'w' ends at byte"
    ):
        SafetensorsIndex(tmp_path)


def _folder(tmp_path: Path, **config) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"")
    return tmp_path


LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "vocab_size": 100,
}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel is not one of"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn'"),
        ({"hidden_act": "gelu"}, "activation 'gelu'"),
        ({"architectures": ["MistralForCausalLM"], "sliding_window": 16}, "sliding-window"),
        ({"partial_rotary_factor": 0.5}, "partial rotary"),
    ],
)
def test_what_the_writer_cannot_state_is_named(tmp_path, change, reason):
    config = LLAMA | change
    assert reason in direct_plan(_folder(tmp_path, **config), config)


def test_the_writer_plans_llama3_rope_as_transformers_computes_it(tmp_path):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    config = LLAMA | {"rope_parameters": rope, "max_position_embeddings": 512}
    plan = direct_plan(_folder(tmp_path, **config), config)
    hf = transformers.LlamaConfig(**{k: v for k, v in config.items() if k != "architectures"})
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    np.testing.assert_allclose(plan.inv_freq, expected.numpy(), rtol=1e-6)


def test_exporter_choices_are_checked(tmp_path, monkeypatch):
    folder = _folder(
        tmp_path, **(LLAMA | {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    with pytest.raises(
        UnsupportedModelError, match="direct ONNX writer cannot state GPT2LMHeadModel"
    ):
        modelpress.load(folder, exporter="direct", show_progress=False)
    monkeypatch.setenv("MODELPRESS_TRANSFORMERS_EXPORTER", "fast")
    with pytest.raises(OptionsError, match=r"exporter 'fast'.*auto, direct, dynamo"):
        modelpress.load(folder, show_progress=False)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("family", "changes"),
    [
        ("mistral", {"sliding_window": None}),
        # NOTE: untied head, llama3 rope, bfloat16 weights (read as float32, as the check runs torch)
        (
            "llama",
            {
                "tie_word_embeddings": False,
                "dtype": "bfloat16",
                "rope_parameters": {
                    "rope_type": "llama3",
                    "rope_theta": 10000.0,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16,
                },
            },
        ),
    ],
)
def test_direct_families_generate_as_transformers(family, changes, tmp_path):
    folder = hf_fixtures.random_checkpoint(tmp_path, family, **changes)
    model = modelpress.load(folder, exporter="direct", show_progress=False)
    extra = model.provenance.extra
    assert extra["greedy_tokens_identical"] and extra["import_check"]["max_rel_diff"] <= 1e-4
    ops = {n.op_type for n in model.ir.graph}
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= ops
    tokens = hf_fixtures.same_greedy_tokens(model, folder)
    assert len(set(tokens[0, -10:].tolist())) >= 4


@pytest.mark.slow
def test_the_dynamo_exporter_stays_selectable(tmp_path, monkeypatch):
    folder = hf_fixtures.make_checkpoint(tmp_path / "llama", "llama", steps=2)
    monkeypatch.setenv("MODELPRESS_TRANSFORMERS_EXPORTER", "dynamo")
    model = modelpress.load(folder, show_progress=False)
    assert model.provenance.importer.startswith("torch.onnx")
    assert model.signature.input_names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert "GroupQueryAttention" not in {n.op_type for n in model.ir.graph}


@pytest.mark.slow
def test_the_direct_path_never_imports_torch_in_the_caller(tmp_path):
    """torch runs the check in a child process: the caller holds neither torch nor the checkpoint's tensors."""
    folder = hf_fixtures.make_checkpoint(tmp_path / "llama", "llama", steps=2)
    code = (
        "import sys, modelpress; m = modelpress.load(sys.argv[1], show_progress=False); "
        "print(m.provenance.extra['greedy_tokens_identical'], 'torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(folder)], capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["True", "False", "False"]


def test_the_torch_reference_is_transformers_own_step_and_greedy_tokens():
    """The child's torch side (transformers_reference): one step with a random past whose presents
    extend that past, and greedy tokens that are the argmax of the model's own next-token logits."""
    from modelpress.adapters.transformers_reference import GREEDY_NEW_TOKENS, reference_arrays

    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    arrays = reference_arrays(model, None, (2, 2, 8))
    assert arrays["reference.0"].shape == (1, 5, 64)  # logits of 5 new tokens
    past = arrays["feed.past_key_values.0.key"]
    present = arrays["reference.1"]
    assert present.shape == (1, 2, 3 + 5, 8)
    np.testing.assert_allclose(present[:, :, :3], past, atol=1e-6)  # the past, then the new keys
    prompts, tokens = arrays["greedy.prompts"], arrays["greedy.tokens"]
    assert tokens.shape == (2, prompts.shape[1] + GREEDY_NEW_TOKENS)
    with torch.no_grad():
        logits = model(torch.as_tensor(tokens[:, :-1])).logits.numpy()
    start = prompts.shape[1] - 1
    np.testing.assert_array_equal(logits[:, start:].argmax(-1), tokens[:, start + 1 :])
