"""torch models for the quantization tests, with normalisation and activations written out by hand
the way converters emit them (decomposed LayerNorm, erf/tanh GELU, attention-mask Add, Softmax).
This module imports torch."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn


def layer_norm(x, weight, bias, eps: float = 1e-5):  # type: ignore[no-untyped-def]
    mean = x.mean(-1, keepdim=True)
    d = x - mean
    var = (d * d).mean(-1, keepdim=True)
    return d / torch.sqrt(var + eps) * weight + bias


def gelu_erf(x):  # type: ignore[no-untyped-def]
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def gelu_tanh(x):  # type: ignore[no-untyped-def]
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, tanh: bool) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.ln1_w, self.ln1_b = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d))
        self.ln2_w, self.ln2_b = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d))
        self.heads, self.tanh = heads, tanh

    def forward(self, x, mask):  # type: ignore[no-untyped-def]
        n, t, d = x.shape
        h = self.heads
        q, k, v = self.qkv(x).reshape(n, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // h) + mask
        attn = torch.softmax(scores, dim=-1) @ v
        x = layer_norm(x + self.out(attn.transpose(1, 2).reshape(n, t, d)), self.ln1_w, self.ln1_b)
        act = gelu_tanh if self.tanh else gelu_erf
        return layer_norm(x + self.down(act(self.up(x))), self.ln2_w, self.ln2_b)


class Encoder(nn.Module):
    """Digits as 8 row tokens; ``head="logits"`` classifies, ``head="embedding"`` returns the
    mean-pooled, L2-normalised sentence-style vector (trained as a classifier underneath)."""

    def __init__(self, d: int = 48, head: str = "logits") -> None:
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.position = nn.Parameter(torch.randn(1, 8, d) * 0.1)
        self.blocks = nn.ModuleList([Block(d, 4, tanh=False), Block(d, 4, tanh=True)])
        self.cls = nn.Linear(d, 10)
        self.head = head

    def features(self, rows):  # type: ignore[no-untyped-def]
        # blank rows are masked out: the -10000 additive mask exporters emit
        valid = (rows.abs().sum(-1) > 0).float()  # all-zero rows (blank image rows) are padding
        mask = (1.0 - valid)[:, None, None, :] * -10000.0
        x = self.embed(rows) + self.position
        for block in self.blocks:
            x = block(x, mask)
        return x.mean(dim=1)

    def forward(self, rows):  # type: ignore[no-untyped-def]
        pooled = self.features(rows)
        if self.head == "embedding":
            return pooled / torch.sqrt((pooled * pooled).sum(-1, keepdim=True))
        return self.cls(pooled)


class ConvNet(nn.Module):
    """Conv-heavy: most parameters in convolutions (the case where int8 should give ~4x)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = (
            nn.Conv2d(1, 32, 3, padding=1),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.Conv2d(64, 128, 3, padding=1),
        )
        self.fc = nn.Linear(128, 10)

    def forward(self, x):  # type: ignore[no-untyped-def]
        x = torch.relu(self.c1(x))
        x = torch.nn.functional.max_pool2d(torch.relu(self.c2(x)), 2)
        x = torch.relu(self.c3(x)).mean(dim=(2, 3))
        return self.fc(x)


def train(
    module: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, lr: float = 3e-3
) -> nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long)
    module.train()
    for _ in range(epochs):
        for i in torch.randperm(len(xt)).split(64):
            opt.zero_grad()
            out = (
                module(xt[i])
                if not isinstance(module, Encoder)
                else module.cls(module.features(xt[i]))
            )
            nn.functional.cross_entropy(out, yt[i]).backward()
            opt.step()
    return module.eval()


def export(
    module: nn.Module, example: np.ndarray, path: Path, input_name: str, output_name: str
) -> Path:
    torch.onnx.export(
        module,
        (torch.tensor(example[:2], dtype=torch.float32),),
        str(path),
        input_names=[input_name],
        output_names=[output_name],
        dynamic_axes={input_name: {0: "n"}, output_name: {0: "n"}},
        opset_version=17,
        dynamo=False,
    )
    return path
