"""How a text decoder is judged: perplexity, greedy generation, token agreement and decode speed in ONNX Runtime.

A *decoder* here is any model in optimum's / ONNX Runtime GenAI's layout: inputs ``input_ids`` and
``attention_mask`` (``position_ids`` and a KV cache ``past_key_values.{i}.key/value`` where it has
them), first output ``logits`` ``[batch, sequence, vocabulary]`` (then ``present.{i}.key/value``),
as the Hugging Face adapter exports causal LMs. Numpy and ONNX Runtime only: no tokenizer (samples
are token ids, as a plugin's ``modelpress_load_data`` cuts a text corpus) and no framework.

* :func:`perplexity`: ``exp`` of the mean next-token cross-entropy on whole sequences;
* :func:`greedy_generate`: greedy decoding as ``generate(do_sample=False)`` does, with the cache;
* :func:`token_agreement`: the share of greedily generated tokens two models have in common;
* :func:`decode_tokens_per_second`: one-token decode steps with the cache, per second;
* :class:`TextEvaluation`: all of them for a model against its reference on held-out samples, and
  :func:`text_floor` / :func:`text_misses`: the thresholds a chain of passes declared
  (:attr:`modelpress.Method.text_floor`) and what a result misses of them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from modelpress.base.errors import DataError, ModelpressError
from modelpress.data.samples import declared_axis_sizes
from modelpress.plugin.methods import TextFloor
from modelpress.runtime.session import make_session, run

if TYPE_CHECKING:
    from modelpress.ir.provenance import Provenance
    from modelpress.ir.signature import Signature
    from modelpress.plugin.registry import Registry

__all__ = [
    "DEFAULT_TEXT_FLOOR",
    "TextEvaluation",
    "decode_tokens_per_second",
    "decoder_sample",
    "greedy_generate",
    "is_decoder",
    "perplexity",
    "text_floor",
    "text_misses",
    "text_summary",
    "token_agreement",
]

_PAST = "past_key_values."


def is_decoder(signature: Signature) -> bool:
    """Whether a model's signature is a text decoder's (see the module docstring)."""
    names = set(signature.input_names)
    first = signature.outputs[0] if signature.outputs else None
    return (
        {"input_ids", "attention_mask"} <= names
        and first is not None
        and first.name == "logits"
        and first.shape is not None
        and len(first.shape) == 3
    )


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
            raise DataError(
                f"not a decoder in optimum's layout: no input {', '.join(sorted(missing))} (inputs: {', '.join(names)})"
            )
        past = [i for i in session.get_inputs() if i.name.startswith(_PAST)]
        return cls(
            names,
            [i.name for i in past],
            {i.name: (int(i.shape[1]), int(i.shape[3])) for i in past},
        )

    def empty_past(
        self, batch: int, length: int = 0, rng: np.random.Generator | None = None
    ) -> dict[str, np.ndarray]:
        out = {}
        for name in self.past:
            heads, size = self.heads_and_size[name]
            shape = (batch, heads, length, size)
            out[name] = (
                rng.standard_normal(shape).astype(np.float32)
                if rng is not None
                else np.zeros(shape, np.float32)
            )
        return out


def _session(model: Any) -> Any:
    return model if hasattr(model, "get_inputs") else make_session(model)


def decoder_sample(
    model: Any,
    *,
    batch: int = 2,
    sequence: int | None = None,
    past: int | None = None,
    vocab_size: int | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Verification inputs for a decoder (``modelpress.export(..., sample=decoder_sample(model))``):
    token ids, a past of ``past`` positions, the mask over past and new tokens, and the positions
    after the past. The generic sample generator cannot know that the mask spans past + new tokens.
    ``sequence`` and ``past`` default to the sizes the model's adapter declared for its axes
    (``sample_axis_sizes``: a decode step, past 11 and 1 new token, for a directly written graph,
    whose GroupQueryAttention takes several new tokens after a past only at batch 1), else 8 and 4."""
    declared = _declared_sizes(model)
    if sequence is None:
        sequence = int(declared.get("sequence_length", 8))
    if past is None:
        past = int(declared.get("past_sequence_length", 4))
    session = _session(model)
    layout = _Layout.of(session)
    rng = np.random.default_rng(seed)
    vocab = vocab_size or _vocab_size(session)
    length = past if layout.past else 0
    feeds = {
        "input_ids": rng.integers(0, vocab, size=(batch, sequence)).astype(np.int64),
        "attention_mask": np.ones((batch, length + sequence), np.int64),
    }
    if "position_ids" in layout.names:
        feeds["position_ids"] = np.broadcast_to(
            np.arange(length, length + sequence, dtype=np.int64), (batch, sequence)
        ).copy()
    feeds.update(layout.empty_past(batch, length, rng))
    return feeds


def _declared_sizes(model: Any) -> dict[str, int]:
    extra = getattr(getattr(model, "provenance", None), "extra", None)
    return declared_axis_sizes(extra) if isinstance(extra, dict) else {}


def _vocab_size(session: Any) -> int:
    shape = session.get_outputs()[0].shape
    if not isinstance(shape[-1], int):
        raise DataError("the vocabulary size is not fixed in the logits' shape; pass vocab_size=")
    return int(shape[-1])


def _positions(mask: np.ndarray) -> np.ndarray:
    """Positions as transformers computes them for a left-padded batch (padding at position 1)."""
    positions = np.cumsum(mask, axis=1) - 1
    return np.where(mask == 0, 1, positions).astype(np.int64)


@dataclass
class _Decoding:
    """One greedy decoding in progress: the tokens so far, the mask, the cache, which sequences ended."""

    session: Any
    layout: _Layout
    tokens: np.ndarray
    mask: np.ndarray
    past: dict[str, np.ndarray]
    done: np.ndarray
    step_ids: np.ndarray

    @classmethod
    def start(
        cls, model: Any, input_ids: np.ndarray, attention_mask: np.ndarray | None
    ) -> _Decoding:
        session = _session(model)
        layout = _Layout.of(session)
        tokens = np.asarray(input_ids, np.int64)
        mask = (
            np.ones_like(tokens) if attention_mask is None else np.asarray(attention_mask, np.int64)
        )
        return cls(
            session,
            layout,
            tokens,
            mask,
            layout.empty_past(len(tokens)),
            np.zeros(len(tokens), bool),
            tokens,
        )

    def step(self, eos_token_id: int | None, pad_token_id: int) -> None:
        """Run the model on the new tokens (all of them without a cache) and append each sequence's argmax."""
        feeds = {"input_ids": self.step_ids, "attention_mask": self.mask, **self.past}
        if "position_ids" in self.layout.names:
            feeds["position_ids"] = _positions(self.mask)[:, -self.step_ids.shape[1] :]
        outputs = run(self.session, feeds)
        chosen = np.where(self.done, pad_token_id, np.argmax(outputs[0][:, -1], axis=-1)).astype(
            np.int64
        )
        self.tokens = np.concatenate([self.tokens, chosen[:, None]], axis=1)
        self.mask = np.concatenate([self.mask, np.ones((len(self.tokens), 1), np.int64)], axis=1)
        self.done |= eos_token_id is not None and chosen == eos_token_id
        if self.layout.past:
            self.past = dict(zip(self.layout.past, outputs[1:], strict=True))
            self.step_ids = chosen[:, None]
        else:
            self.step_ids = self.tokens


def greedy_generate(
    model: Any,
    input_ids: np.ndarray,
    *,
    attention_mask: np.ndarray | None = None,
    max_new_tokens: int = 10,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
) -> np.ndarray:
    """Greedy decoding with an exported decoder in ONNX Runtime, as ``generate(do_sample=False)`` does:
    the prompt (left-padded, ``attention_mask`` 0 on padding) and the new tokens; a sequence that
    emitted ``eos_token_id`` continues with ``pad_token_id`` and decoding stops when all have.
    A model with a KV cache runs the prompt once, then one token per step; one without re-runs the sequence."""
    decoding = _Decoding.start(model, input_ids, attention_mask)
    for _ in range(max_new_tokens):
        decoding.step(eos_token_id, pad_token_id)
        if decoding.done.all():
            break
    return decoding.tokens


def decode_tokens_per_second(model: Any, input_ids: np.ndarray, *, new_tokens: int = 16) -> float:
    """Decode speed: after the prompt ``input_ids`` (one sequence) is run, ``new_tokens`` greedy steps
    (one token each with a KV cache) are timed; tokens per second of those steps."""
    decoding = _Decoding.start(model, np.asarray(input_ids, np.int64)[:1], None)
    decoding.step(None, 0)  # NOTE: the prompt (prefill) is not part of the decode speed
    start = time.perf_counter()
    for _ in range(new_tokens):
        decoding.step(None, 0)
    return new_tokens / max(time.perf_counter() - start, 1e-9)


def token_agreement(reference: np.ndarray, tokens: np.ndarray, prompt_length: int) -> float:
    """The share of generated positions (after ``prompt_length``) where ``tokens`` equals ``reference``."""
    new_ref, new = np.asarray(reference)[:, prompt_length:], np.asarray(tokens)[:, prompt_length:]
    width = min(new_ref.shape[1], new.shape[1])
    return float(np.mean(new_ref[:, :width] == new[:, :width])) if width else 1.0


def perplexity(model: Any, samples: dict[str, np.ndarray], *, batch_size: int = 8) -> float:
    """The perplexity of a decoder on ``samples`` (whole sequences with an empty past, as a text
    corpus is cut into samples): ``exp`` of the mean cross-entropy of each next token where the mask is 1."""
    session = _session(model)
    total, count = 0.0, 0
    for start in range(0, len(samples["input_ids"]), batch_size):
        feeds = {name: array[start : start + batch_size] for name, array in samples.items()}
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


class TextEvaluation:
    """A decoder's reference on held-out ``samples``: its perplexity and its greedy tokens from a few
    prompts (the first ``prompt_length`` tokens of the first ``prompts`` samples, ``new_tokens`` each);
    :meth:`measure` gives a model's figures against it."""

    def __init__(
        self,
        reference: Any,
        samples: dict[str, np.ndarray],
        *,
        prompts: int = 4,
        prompt_length: int = 8,
        new_tokens: int = 16,
    ) -> None:
        self.samples = samples
        self.prompt_length = min(prompt_length, samples["input_ids"].shape[1] - 1)
        self.prompts = samples["input_ids"][:prompts, : self.prompt_length]
        self.new_tokens = new_tokens
        self.reference_perplexity = perplexity(reference, samples)
        self.reference_tokens = greedy_generate(reference, self.prompts, max_new_tokens=new_tokens)

    def reference_figures(self, model: Any) -> dict[str, float]:
        """The reference's own figures (``model``: its file or session, for the decode speed)."""
        return {
            "perplexity": self.reference_perplexity,
            "perplexity_increase": 0.0,
            "token_agreement": 1.0,
            "decode_tokens_per_s": decode_tokens_per_second(
                _session(model), self.prompts, new_tokens=self.new_tokens
            ),
        }

    def measure(self, model: Any) -> dict[str, float]:
        """``perplexity``, ``perplexity_increase`` (relative to the reference's), ``token_agreement``
        (greedy tokens from the prompts) and ``decode_tokens_per_s`` of ``model`` (a file, Model or session)."""
        session = _session(model)
        value = perplexity(session, self.samples)
        tokens = greedy_generate(session, self.prompts, max_new_tokens=self.new_tokens)
        return {
            "perplexity": value,
            "perplexity_increase": value / self.reference_perplexity - 1,
            "token_agreement": token_agreement(self.reference_tokens, tokens, self.prompt_length),
            "decode_tokens_per_s": decode_tokens_per_second(
                session, self.prompts, new_tokens=self.new_tokens
            ),
        }


def _pass_text_floor(record: Any, registry: Registry) -> TextFloor | None:
    """One pass's declared text floor; undeclared: :data:`DEFAULT_TEXT_FLOOR`, unless its method
    changes outputs by design (no cosine floor either: distillation, structural pruning)."""
    from modelpress.evaluation.comparison import method_floor

    try:
        declared = registry.method(record.method, record.kind).text_floor
    except ModelpressError:
        declared = None
    if declared is not None:
        return declared
    return None if method_floor(record, registry) is None else DEFAULT_TEXT_FLOOR


def text_floor(provenance: Provenance, registry: Registry | None = None) -> TextFloor | None:
    """The text thresholds a model with this history is held to: the loosest its passes declared
    (:attr:`modelpress.Method.text_floor`); ``None`` without passes or when one pass has none."""
    from modelpress.plugin.registry import get_registry

    floors = [_pass_text_floor(p, registry or get_registry()) for p in provenance.passes]
    if not floors or any(f is None for f in floors):
        return None
    return TextFloor(
        min_token_agreement=min(f.min_token_agreement for f in floors if f is not None),
        max_perplexity_increase=max(f.max_perplexity_increase for f in floors if f is not None),
    )


def text_misses(figures: dict[str, float], floor: TextFloor | None) -> str | None:
    """What ``figures`` (:meth:`TextEvaluation.measure`) miss of ``floor``, in one line; None: nothing."""
    if floor is None:
        return None
    missed = []
    if figures["token_agreement"] < floor.min_token_agreement:
        missed.append(
            f"greedy-token agreement {figures['token_agreement']:.1%} < {floor.min_token_agreement:.0%}"
        )
    if figures["perplexity_increase"] > floor.max_perplexity_increase:
        missed.append(
            f"perplexity +{figures['perplexity_increase']:.1%} > +{floor.max_perplexity_increase:.0%}"
        )
    return "; ".join(missed) or None


# NOTE: the floor of a pass whose method declares none (and has a cosine floor): loose, catches a broken result
DEFAULT_TEXT_FLOOR = TextFloor(min_token_agreement=0.5, max_perplexity_increase=0.5)


def text_summary(figures: dict[str, Any]) -> str:
    """A text decoder's figures (:meth:`TextEvaluation.measure`, ``loss_accepted`` when kept anyway) in one line."""
    text = (
        f"perplexity {figures['perplexity']:.3f} ({figures['perplexity_increase']:+.2%}), greedy-token agreement "
        f"{figures['token_agreement']:.1%}, decode {figures['decode_tokens_per_s']:.1f} tokens/s"
    )
    return text + (
        f"; LOSS ACCEPTED: {figures['loss_accepted']}" if figures.get("loss_accepted") else ""
    )
