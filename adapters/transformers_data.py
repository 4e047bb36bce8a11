"""Text as model inputs: a corpus tokenised with the checkpoint's tokenizer into fixed-length sequences.

``text_samples(model, "corpus.txt")`` gives the inputs of an imported Hugging Face model
(``input_ids``, ``attention_mask``, and ``position_ids``, ``token_type_ids``, an empty past where
the model takes them) for calibration (``modelpress.quantize(..., calibration=...)``) or, saved with
``numpy.savez``, for ``--calib FILE.npz``. A corpus given for calibration holds its last eighth out
(``part="calibration"`` / ``"held-out"``): the report's perplexity is measured on text the
calibration did not see.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from modelpress.plugin_api import DataError, Model, UnsupportedModelError, one_line

__all__ = ["HELD_OUT_SHARE", "held_out_count", "held_out_samples", "read_texts", "text_samples"]


def read_texts(source: str | os.PathLike[str] | Sequence[str]) -> list[str]:
    """The texts of ``source``: a list of strings, a ``.txt`` file (one text), or a ``.jsonl`` file
    (the ``"text"`` field of each line)."""
    if not isinstance(source, (str, os.PathLike)):
        return [str(text) for text in source]
    path = Path(source)
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{str(path)!r}: cannot read the text corpus: {one_line(exc)}") from None
    if path.suffix.lower() != ".jsonl":
        return [content]
    texts = []
    for number, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{str(path)!r} line {number}: not JSON: {one_line(exc)}") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(
                f'{str(path)!r} line {number}: a JSON object with a string field "text" is needed'
            )
        texts.append(record["text"])
    return texts


def _tokenizer(model: Model, tokenizer: Any) -> Any:
    """``tokenizer`` (an object or a folder), else the one saved in the checkpoint folder the model came from."""
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    folder = tokenizer or model.provenance.source
    if not folder or not Path(folder).is_dir():
        raise DataError(
            f"no tokenizer: {model.name!r} was not loaded from a checkpoint folder; pass tokenizer= (an object or a folder)"
        )
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except ImportError:
        raise UnsupportedModelError(
            "tokenising text needs the transformers extra: pip install -c constraints.txt 'modelpress[transformers]'"
        ) from None
    except (OSError, ValueError) as exc:
        raise DataError(
            f"{str(folder)!r}: no tokenizer can be loaded from it: {one_line(exc)}"
        ) from None


# NOTE: a corpus given for calibration keeps its last eighth (at least one sequence) out of the
# calibration: perplexity on it is measured on text the calibration never saw
HELD_OUT_SHARE = 8
PARTS = ("all", "calibration", "held-out")


def held_out_count(windows: int) -> int:
    """How many of a corpus's ``windows`` sequences its calibration reading leaves out (the last ones)."""
    return max(1, windows // HELD_OUT_SHARE) if windows >= 2 else 0


def text_samples(
    model: Model,
    texts: str | os.PathLike[str] | Sequence[str],
    *,
    tokenizer: Any = None,
    sequence_length: int = 64,
    max_samples: int = 64,
    part: str = "all",
) -> dict[str, np.ndarray]:
    """The model's inputs for ``texts`` (see :func:`read_texts`): all texts tokenised, joined, and cut
    into windows of ``sequence_length`` tokens (one sample each; a decoder's past is empty), at most
    ``max_samples`` of them. ``part``: ``"all"`` the windows from the first; ``"calibration"`` those
    before the held-out ones; ``"held-out"`` the last eighth of the windows (at least one; a
    corpus of one window holds none out). The tokenizer is the checkpoint folder's unless ``tokenizer`` is given."""
    if part not in PARTS:
        raise DataError(f"part {part!r}: choose one of {', '.join(PARTS)}")
    if not isinstance(sequence_length, int) or sequence_length < 2:
        raise DataError(f"sequence_length {sequence_length!r}: give a whole number of tokens >= 2")
    windows = _windows(model, texts, tokenizer, sequence_length)
    held = held_out_count(len(windows))
    first, last = {
        "all": (0, len(windows)),
        "calibration": (0, len(windows) - held),
        "held-out": (len(windows) - held, len(windows)),
    }[part]
    if last <= first:
        raise DataError(
            f"the text has {len(windows)} sequence(s) of {sequence_length} tokens: none is left to hold out; "
            "give more text or a shorter sequence_length"
        )
    return _feeds(model, windows[first : min(last, first + max_samples)])


def _windows(
    model: Model,
    texts: str | os.PathLike[str] | Sequence[str],
    tokenizer: Any,
    sequence_length: int,
) -> np.ndarray:
    """Every text tokenised and joined, cut into ``[windows, sequence_length]`` token ids."""
    tok = _tokenizer(model, tokenizer)
    ids: list[int] = []
    for text in read_texts(texts):
        ids += list(tok(text)["input_ids"])
    windows = len(ids) // sequence_length
    if windows == 0:
        raise DataError(
            f"the text has {len(ids)} tokens, fewer than one sequence of {sequence_length}; give more text or a shorter sequence_length"
        )
    return np.asarray(ids[: windows * sequence_length], np.int64).reshape(windows, sequence_length)


def held_out_samples(
    model: Model, path: str | os.PathLike[str], *, sequence_length: int = 64
) -> dict[str, np.ndarray] | None:
    """The held-out part of a calibration corpus (see :func:`text_samples`), None when it is too short to hold any out."""
    if held_out_count(len(_windows(model, path, None, sequence_length))) == 0:
        return None
    return text_samples(model, path, sequence_length=sequence_length, part="held-out")


def _feeds(model: Model, tokens: np.ndarray) -> dict[str, np.ndarray]:
    count, length = tokens.shape
    feeds: dict[str, np.ndarray] = {}
    for spec in model.signature.inputs:
        if spec.name == "input_ids":
            feeds[spec.name] = tokens
        elif spec.name == "attention_mask":
            feeds[spec.name] = np.ones_like(tokens)
        elif spec.name == "position_ids":
            feeds[spec.name] = np.broadcast_to(
                np.arange(length, dtype=np.int64), tokens.shape
            ).copy()
        elif spec.name == "token_type_ids":
            feeds[spec.name] = np.zeros_like(tokens)
        elif spec.name.startswith("past_key_values.") and spec.shape is not None:
            feeds[spec.name] = np.zeros(
                (count, int(spec.shape[1]), 0, int(spec.shape[3])), np.float32
            )
        else:
            raise DataError(
                f"input {spec.describe()} of {model.name!r} is not a text input this helper knows (input_ids, "
                "attention_mask, position_ids, token_type_ids, past_key_values.*)"
            )
    return feeds
