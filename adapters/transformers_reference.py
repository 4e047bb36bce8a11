"""The torch side of checking a directly written decoder (:mod:`~modelpress.adapters.transformers_llama`).

Run in the child process of :func:`~modelpress.adapters.transformers_child.reference_in_child` (it imports
torch and transformers): the checkpoint in torch on the check's inputs (a past of 3 and 5 new tokens,
batch 1, positions after the past, as onnxruntime's GroupQueryAttention takes a past only at batch 1
for more than one new token), and greedy tokens from two prompts with ``generate``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["GREEDY_NEW_TOKENS", "reference_arrays"]

_SEQUENCE, _PAST = 5, 3
GREEDY_NEW_TOKENS = 8


def _ids(model: Any, ids: np.ndarray | None, count: int, length: int, seed: int) -> torch.Tensor:
    if ids is not None:
        return torch.as_tensor(np.asarray(ids, np.int64)[:count])
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, int(model.config.vocab_size), (count, length), generator=generator)


def _step(model: Any, ids: torch.Tensor, layout: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """The feeds and torch's logits and presents for one step with a random past."""
    from transformers import DynamicCache

    layers, kv_heads, head_dim = layout
    batch, sequence = ids.shape
    generator = torch.Generator().manual_seed(1)
    past = [
        torch.randn(batch, kv_heads, _PAST, head_dim, generator=generator)
        for _ in range(2 * layers)
    ]
    mask = torch.ones(batch, _PAST + sequence, dtype=torch.long)
    cache = DynamicCache(
        [(past[2 * i], past[2 * i + 1]) for i in range(layers)], config=model.config
    )
    positions = torch.arange(_PAST, _PAST + sequence).expand(batch, sequence)
    with torch.no_grad():
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        )
    arrays = {"feed.input_ids": ids.numpy(), "feed.attention_mask": mask.numpy()}
    for i in range(layers):
        arrays[f"feed.past_key_values.{i}.key"] = past[2 * i].numpy()
        arrays[f"feed.past_key_values.{i}.value"] = past[2 * i + 1].numpy()
    presents = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
    for j, tensor in enumerate([out.logits, *presents]):
        arrays[f"reference.{j}"] = tensor.numpy()
    return arrays


def _greedy(model: Any, prompts: torch.Tensor) -> np.ndarray:
    """transformers' greedy tokens, exactly ``GREEDY_NEW_TOKENS`` of them (no early end of sequence)."""
    with torch.no_grad():
        return model.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=GREEDY_NEW_TOKENS,
            min_new_tokens=GREEDY_NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
        ).numpy()


def reference_arrays(
    model: Any, ids: np.ndarray | None, layout: tuple[int, int, int]
) -> dict[str, np.ndarray]:
    """Everything the parent compares the export with: feeds, torch's outputs, prompts and greedy tokens."""
    model = model.eval()
    arrays = _step(model, _ids(model, ids, 1, _SEQUENCE, seed=0), layout)
    prompts = _ids(model, None, 2, 6, seed=2)
    arrays["greedy.prompts"] = prompts.numpy()
    arrays["greedy.tokens"] = _greedy(model, prompts)
    return arrays
