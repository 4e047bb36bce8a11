"""A folder onnxruntime-genai runs: ``model.onnx``, the tokenizer files and ``genai_config.json``.

When a causal LM with a KV cache that the Transformers adapter imported is exported as a file
named ``model.onnx`` (``modelpress.export(model, "out/model.onnx")``, ``modelpress quantize ckpt/
... -o out/model.onnx``), the adapter's ``modelpress_export_finish`` observer calls
:func:`write_genai_folder`: it copies the checkpoint's tokenizer files beside the model and writes
a ``genai_config.json`` in the format of onnxruntime-genai's model builder, so ``og.Model("out")``
generates with it. Called directly, it does the same for any file name (``filename=``).

Plain file operations and JSON (no torch, no transformers).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from modelpress.plugin_api import DataError, Model, one_line

__all__ = [
    "GENAI_CONFIG",
    "TOKENIZER_FILES",
    "genai_config",
    "is_genai_decoder",
    "write_genai_folder",
]

GENAI_CONFIG = "genai_config.json"
# NOTE: what onnxruntime-genai's tokenizer (onnxruntime-extensions) reads; the builder copies the same files
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
)


def is_genai_decoder(model: Model) -> bool:
    """Whether ``model`` is a causal LM with a KV cache imported by the Transformers adapter."""
    extra = model.provenance.extra
    return (
        model.provenance.source_framework == "transformers"
        and extra.get("task") == "text-generation-with-past"
    )


def _checkpoint_config(checkpoint: Path) -> dict[str, Any]:
    try:
        config = json.loads((checkpoint / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise DataError(
            f"{str(checkpoint)!r}: its config.json cannot be read for genai_config.json: {one_line(exc)}"
        ) from None
    return config if isinstance(config, dict) else {}


def _first(config: dict[str, Any], *keys: str, default: Any = None) -> Any:
    return next((config[k] for k in keys if config.get(k) is not None), default)


def _decoder(model: Model, config: dict[str, Any], filename: str) -> dict[str, Any]:
    extra = model.provenance.extra
    names = model.signature.input_names
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    if "position_ids" in names:
        inputs["position_ids"] = "position_ids"
    return {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": filename,
        "head_size": int(extra["head_dim"]),
        "hidden_size": int(_first(config, "hidden_size", "n_embd")),
        "inputs": {
            **inputs,
            "past_key_names": "past_key_values.%d.key",
            "past_value_names": "past_key_values.%d.value",
        },
        "outputs": {
            "logits": "logits",
            "present_key_names": "present.%d.key",
            "present_value_names": "present.%d.value",
        },
        "num_attention_heads": int(_first(config, "num_attention_heads", "n_head")),
        "num_hidden_layers": int(extra["num_layers"]),
        "num_key_value_heads": int(extra["num_key_value_heads"]),
    }


def genai_config(
    model: Model,
    checkpoint: str | os.PathLike[str],
    *,
    filename: str = "model.onnx",
    max_length: int | None = None,
) -> dict[str, Any]:
    """The ``genai_config.json`` of ``model`` (a causal LM with a cache the Transformers adapter
    imported) from its checkpoint's ``config.json``: model type ``decoder`` (onnxruntime-genai's
    generic decoder-only model), the decoder's input/output names (``%d`` for the layer), layers,
    KV heads, head size, the token ids, and greedy search up to ``max_length`` tokens (default: the
    context length)."""
    if not is_genai_decoder(model):
        raise DataError(
            f"{model.name!r} is not a causal LM with a KV cache imported from Hugging Face; onnxruntime-genai cannot run it"
        )
    config = _checkpoint_config(Path(checkpoint))
    eos = _first(config, "eos_token_id", default=0)
    context = int(_first(config, "max_position_embeddings", "n_positions", "n_ctx", default=2048))
    vocab = model.signature.outputs[0].shape[-1] if model.signature.outputs[0].shape else None
    return {
        "model": {
            "bos_token_id": _first(config, "bos_token_id", default=eos),
            "context_length": context,
            "decoder": _decoder(model, config, filename),
            "eos_token_id": eos,
            "pad_token_id": _first(
                config, "pad_token_id", default=eos if isinstance(eos, int) else eos[0]
            ),
            # NOTE: onnxruntime-genai's generic decoder-only model: the architecture is all in the graph (its
            # "gpt2" type, for one, expects an older combined-past layout)
            "type": "decoder",
            "vocab_size": int(vocab) if isinstance(vocab, int) else int(config["vocab_size"]),
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": int(max_length or context),
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def write_genai_folder(
    model: Model,
    folder: str | os.PathLike[str],
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    filename: str = "model.onnx",
) -> list[Path]:
    """Write ``genai_config.json`` and copy the tokenizer files of ``checkpoint`` (default: the folder
    the model was loaded from) into ``folder``, beside the exported ``filename``; the paths written."""
    source = Path(checkpoint or model.provenance.source)
    if not source.is_dir():
        raise DataError(
            f"{model.name!r} was not loaded from a checkpoint folder ({str(source)!r}); pass checkpoint= (the folder with config.json and the tokenizer)"
        )
    target = Path(folder)
    written = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file() and (source / name).resolve() != (target / name).resolve():
            shutil.copyfile(source / name, target / name)
            written.append(target / name)
    config_path = target / GENAI_CONFIG
    config_path.write_text(
        json.dumps(genai_config(model, source, filename=filename), indent=4) + "\n"
    )
    return [*written, config_path]
