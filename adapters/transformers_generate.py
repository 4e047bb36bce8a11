"""Running an exported decoder in ONNX Runtime: consistent sample inputs and greedy generation.

Works on any model with optimum's decoder layout (``input_ids``, ``attention_mask``,
``position_ids``, and for a KV cache ``past_key_values.{i}.key/value`` -> ``present.{i}.key/value``),
as :mod:`modelpress.adapters.transformers` exports it; numpy and ONNX Runtime only (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from modelpress.plugin_api import DataError, make_session, run

__all__ = ["decoder_sample", "greedy_generate", "perplexity"]

_PAST = "past_key_values."


@dataclass
class _Layout:
    """A decoder session's inputs: which past tensors it takes and their fixed sizes."""

    names: list[str]
    past: list[str]
    heads_and_size: dict[str, tuple[int, int]]

    @classmethod
    def of(cls, session: Any) -> _Layout:
        names = [i.name for i in session.get_inputs()]
        missing = {"input_ids", "attention_mask"} - set(names)
        if missing:
            raise DataError(f"not a decoder in optimum's layout: no input {', '.join(sorted(missing))} (inputs: {', '.join(names)})")
        past = [i for i in session.get_inputs() if i.name.startswith(_PAST)]
        return cls(names, [i.name for i in past], {i.name: (int(i.shape[1]), int(i.shape[3])) for i in past})

    def empty_past(self, batch: int, length: int = 0, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        out = {}
        for name in self.past:
            heads, size = self.heads_and_size[name]
            shape = (batch, heads, length, size)
            out[name] = rng.standard_normal(shape).astype(np.float32) if rng is not None else np.zeros(shape, np.float32)
        return out


def _session(model: Any) -> Any:
    return model if hasattr(model, "get_inputs") else make_session(model)


def decoder_sample(model: Any, *, batch: int = 2, sequence: int = 8, past: int = 4, vocab_size: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Verification inputs for a decoder (``modelpress.export(..., sample=decoder_sample(model))``):
    token ids, a past of ``past`` positions, the mask over past and new tokens, and the positions
    after the past. The generic sample generator cannot know that the mask spans past + new tokens."""
    session = _session(model)
    layout = _Layout.of(session)
    rng = np.random.default_rng(seed)
    vocab = vocab_size or _vocab_size(session)
    length = past if layout.past else 0
    feeds = {"input_ids": rng.integers(0, vocab, size=(batch, sequence)).astype(np.int64),
             "attention_mask": np.ones((batch, length + sequence), np.int64)}
    if "position_ids" in layout.names:
        feeds["position_ids"] = np.broadcast_to(np.arange(length, length + sequence, dtype=np.int64), (batch, sequence)).copy()
    feeds.update(layout.empty_past(batch, length, rng))
    return feeds


def _vocab_size(session: Any) -> int:
    shape = session.get_outputs()[0].shape
    if not isinstance(shape[-1], int):
        raise DataError("the vocabulary size is not fixed in the logits' shape; pass vocab_size=")
    return int(shape[-1])


def _positions(mask: np.ndarray) -> np.ndarray:
    """Positions as transformers computes them for a left-padded batch (padding at position 1)."""
    positions = np.cumsum(mask, axis=1) - 1
    return np.where(mask == 0, 1, positions).astype(np.int64)


def greedy_generate(
    model: Any, input_ids: np.ndarray, *, attention_mask: np.ndarray | None = None, max_new_tokens: int = 10,
    eos_token_id: int | None = None, pad_token_id: int = 0,
) -> np.ndarray:
    """Greedy decoding with an exported decoder in ONNX Runtime, as ``generate(do_sample=False)`` does:
    the prompt (left-padded, ``attention_mask`` 0 on padding) and the new tokens; a sequence that
    emitted ``eos_token_id`` continues with ``pad_token_id`` and decoding stops when all have.
    A model with a KV cache runs the prompt once, then one token per step; one without re-runs the sequence."""
    session = _session(model)
    layout = _Layout.of(session)
    tokens = np.asarray(input_ids, np.int64)
    mask = np.ones_like(tokens) if attention_mask is None else np.asarray(attention_mask, np.int64)
    past = layout.empty_past(len(tokens))
    step_ids, done = tokens, np.zeros(len(tokens), bool)
    for _ in range(max_new_tokens):
        positions = _positions(mask)[:, -step_ids.shape[1]:]
        feeds = {"input_ids": step_ids, "attention_mask": mask, **past}
        if "position_ids" in layout.names:
            feeds["position_ids"] = positions
        outputs = run(session, feeds)
        chosen = np.argmax(outputs[0][:, -1], axis=-1).astype(np.int64)
        chosen = np.where(done, pad_token_id, chosen)
        tokens = np.concatenate([tokens, chosen[:, None]], axis=1)
        mask = np.concatenate([mask, np.ones((len(tokens), 1), np.int64)], axis=1)
        done |= eos_token_id is not None and chosen == eos_token_id
        if layout.past:
            past = dict(zip(layout.past, outputs[1:], strict=True))
            step_ids = chosen[:, None]
        else:
            step_ids = tokens
        if done.all():
            break
    return tokens


def perplexity(model: Any, samples: dict[str, np.ndarray], *, batch_size: int = 8) -> float:
    """The perplexity of a decoder on ``samples`` (whole sequences with an empty past, as
    :func:`modelpress.adapters.transformers_data.text_samples` makes them): ``exp`` of the mean
    cross-entropy of each next token where the mask is 1."""
    session = _session(model)
    total, count = 0.0, 0
    for start in range(0, len(samples["input_ids"]), batch_size):
        feeds = {name: array[start:start + batch_size] for name, array in samples.items()}
        logits = run(session, feeds)[0][:, :-1].astype(np.float64)
        targets = feeds["input_ids"][:, 1:]
        shifted = logits - logits.max(axis=-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        picked = np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
        keep = feeds["attention_mask"][:, 1:] == 1
        total -= float(picked[keep].sum())
        count += int(keep.sum())
    if count == 0:
        raise DataError("no token to score: the samples are empty or fully masked")
    return float(np.exp(total / count))
