"""Tiny Hugging Face checkpoints made in the test session: nothing comes from the hub.

* :func:`corpus`: English text that ships with Python (the docstrings of standard-library modules
  and their public functions and classes);
* :func:`train_tokenizer`: a byte-level BPE tokenizer trained on it with ``tokenizers``, wrapped in
  a ``PreTrainedTokenizerFast`` so ``save_pretrained`` writes the usual files;
* :func:`make_checkpoint`: a tiny model built from a config (Llama, GPT-2, BERT, ...), trained for a
  fixed number of steps on the corpus (a few seconds on a CPU) so greedy generation means
  something, then saved with the tokenizer by ``save_pretrained`` into a folder.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

VOCAB_SIZE = 384
_MODULES = (
    "json",
    "re",
    "os",
    "collections",
    "itertools",
    "functools",
    "string",
    "textwrap",
    "pathlib",
    "argparse",
    "logging",
    "shutil",
)


@functools.cache
def corpus() -> tuple[str, ...]:
    """Paragraphs of standard-library docstrings (module, public functions and classes)."""
    import importlib

    texts: list[str] = []
    for name in _MODULES:
        module = importlib.import_module(name)
        docs = [module.__doc__] + [
            getattr(module, attr).__doc__
            for attr in sorted(dir(module))
            if not attr.startswith("_")
        ]
        for doc in docs:
            if isinstance(doc, str):
                texts.extend(
                    " ".join(p.split())
                    for p in inspect.cleandoc(doc).split("\n\n")
                    if len(p.strip()) > 40
                )
    return tuple(texts)


def train_tokenizer(texts: Sequence[str], vocab_size: int = VOCAB_SIZE) -> Any:
    """A byte-level BPE tokenizer trained on ``texts`` (with ``<s>``, ``</s>`` and ``<pad>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="left",
    )


@functools.cache
def tokenizer() -> Any:
    """The tokenizer trained on :func:`corpus` (trained once per session; do not modify it)."""
    return train_tokenizer(corpus())


_DECODER = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}


def config(family: str, tokenizer: Any, **changes: Any) -> Any:
    """A tiny config of ``family`` whose vocabulary is ``tokenizer``'s, with ``changes`` applied."""
    import transformers

    vocab = len(tokenizer)
    special = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    decoders = {
        "llama": (transformers.LlamaConfig, {"tie_word_embeddings": True}),
        "qwen2": (transformers.Qwen2Config, {"tie_word_embeddings": True}),
        "phi3": (transformers.Phi3Config, {}),
        "mistral": (transformers.MistralConfig, {}),
    }
    if family in decoders:
        cls, own = decoders[family]
        return cls(vocab_size=vocab, **{**_DECODER, **own, **special, **changes})
    if family == "gpt2":
        return transformers.GPT2Config(
            vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=128, **special, **changes
        )
    if family == "bert":
        return transformers.BertConfig(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            pad_token_id=tokenizer.pad_token_id,
            **changes,
        )
    raise ValueError(family)


def random_checkpoint(folder: Path, family: str, **changes: Any) -> Path:
    """A random ``family`` model with large weights (a different greedy token at nearly every step:
    a cache that is not really used shows), saved in ``folder`` with the tokenizer."""
    import torch
    import transformers

    tok = tokenizer()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        config(family, tok, initializer_range=0.5, **changes)
    )
    model.eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _train(
    model: Any, tokenizer: Any, texts: Sequence[str], steps: int, seq: int = 32, lr: float = 1e-2
) -> float:
    """Next-token training for ``steps`` Adam steps on ``texts``; the last loss."""
    import torch

    ids = torch.tensor(tokenizer("\n\n".join(texts))["input_ids"])
    windows = ids[: len(ids) // seq * seq].view(-1, seq)
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    loss = torch.tensor(0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(
        1
    )  # NOTE: tiny matrices: more threads only contend (10x slower on a loaded 2-core machine)
    try:
        for _ in range(steps):
            batch = windows[torch.randint(len(windows), (16,), generator=generator)]
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return float(loss.detach())


def make_checkpoint(folder: Path, family: str, *, head: str = "causal-lm", steps: int = 40) -> Path:
    """A tiny ``family`` checkpoint with its tokenizer in ``folder`` (trained ``steps`` steps for a causal LM)."""
    import torch
    import transformers

    torch.manual_seed(0)
    texts = corpus()
    cfg = config(family, tokenizer())
    classes = {
        "causal-lm": transformers.AutoModelForCausalLM,
        "base": transformers.AutoModel,
        "sequence-classification": transformers.AutoModelForSequenceClassification,
    }
    model = classes[head].from_config(cfg)
    if head == "causal-lm" and steps:
        _train(model, tokenizer(), texts, steps)
    model.eval()
    model.save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder


PROMPTS = ["Return a new list of the", "The default"]


def same_greedy_tokens(model: Any, folder: Path) -> Any:
    """10 greedy tokens from two left-padded prompts: ONNX Runtime (``model``) against transformers'
    ``generate`` on the checkpoint ``folder`` in float32; asserted equal, returned."""
    import numpy as np
    import torch
    import transformers

    from modelpress.adapters.transformers_generate import greedy_generate

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, local_files_only=True
    ).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = hf.generate(**batch, max_new_tokens=10, do_sample=False).numpy()
    got = greedy_generate(
        model,
        batch["input_ids"].numpy(),
        attention_mask=batch["attention_mask"].numpy(),
        max_new_tokens=10,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    np.testing.assert_array_equal(got, expected)
    return got
