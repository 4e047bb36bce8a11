"""A Llama-architecture decoder written straight to ONNX from its checkpoint folder, without torch.

``LlamaForCausalLM``, ``Qwen2ForCausalLM`` (q/k/v biases) and ``MistralForCausalLM`` checkpoints whose
every part this graph states exactly (:func:`direct_plan` says why not otherwise: the adapter then
exports with ``torch.onnx`` instead) become the graph onnxruntime-genai's model builder emits for
CPU, with the same inputs and outputs:

* inputs ``input_ids``, ``attention_mask`` ``[batch_size, total_sequence_length]``,
  ``past_key_values.{i}.key/value`` ``[batch_size, num_kv_heads, past_sequence_length, head_dim]``;
  outputs ``logits``, ``present.{i}.key/value`` (``total_sequence_length``);
* ``SimplifiedLayerNormalization`` / ``com.microsoft.SkipSimplifiedLayerNormalization`` for each RMSNorm
  and residual add; one packed Q/K/V ``MatMul``; ``com.microsoft.GroupQueryAttention`` with the rotary
  embedding inside (``do_rotary``, cos/sin caches); SiLU as ``Sigmoid`` and ``Mul``; a tied LM head as
  ``MatMul(x, Transpose(table))`` so the table is stored once.

Unlike the builder's graph, masked positions get an additive ``attention_bias`` and every row counts as
full length: GroupQueryAttention rotates each token by its index in the sequence (the prompt's positions
0..S-1, then ``seqlens_k``), transformers by ``cumsum(mask) - 1``; a row's left padding shifts all of its
positions alike, and a rotary embedding depends only on the difference of two positions, so a left-padded
batch gives transformers' tokens (the padding itself is masked out by the bias).

Weights are read from the safetensors files one row block at a time
(:mod:`~modelpress.adapters.transformers_safetensors`) and written, transposed where a MatMul needs
``[in, out]``, into one external-data file: memory stays near one block whatever the model's size.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from modelpress.adapters.transformers_safetensors import SafetensorsIndex

__all__ = ["ARCHITECTURES", "DirectPlan", "direct_plan", "write_direct"]

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
_OPSET = 21
_BLOCK_BYTES = 32 << 20
_ALIGN = 64
DATA_FILE = "model.onnx.data"


@dataclass
class DirectPlan:
    """What the direct writer needs from a checkpoint's config.json."""

    architecture: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    tied: bool
    context: int
    inv_freq: np.ndarray = field(repr=False)

    @property
    def facts(self) -> dict[str, Any]:
        return {
            "num_layers": self.layers,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
        }


def _rope(config: dict[str, Any], head_dim: int) -> np.ndarray | str:
    """The rotary inverse frequencies as transformers computes them (float32), or why they cannot be."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    if float(config.get("partial_rotary_factor", 1.0) or 1.0) != 1.0:
        return "a partial rotary embedding"
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)
    if kind == "default":
        return inv_freq
    if kind != "llama3":
        return f"rope type {kind!r}"
    factor, low, high = (
        float(params[k]) for k in ("factor", "low_freq_factor", "high_freq_factor")
    )
    old = float(params["original_max_position_embeddings"])
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > old / low, inv_freq / np.float32(factor), inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _unsupported(config: dict[str, Any], architecture: str) -> str | None:
    if architecture not in ARCHITECTURES:
        return f"{architecture or 'the architecture'} is not one of {', '.join(ARCHITECTURES)}"
    if config.get("hidden_act", "silu") != "silu":
        return f"activation {config.get('hidden_act')!r}"
    kinds = set(config.get("layer_types") or []) - {"full_attention"}
    windowed = config.get("use_sliding_window", architecture == "MistralForCausalLM")
    if kinds or (windowed and config.get("sliding_window") is not None):
        return "sliding-window attention"
    if config.get("pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    return None


def direct_plan(folder: Path, config: dict[str, Any]) -> DirectPlan | str:
    """The plan for writing ``folder`` directly, or the reason it cannot be (the caller uses torch.onnx)."""
    architecture = (config.get("architectures") or [""])[0]
    reason = _unsupported(config, architecture)
    if reason is None and not SafetensorsIndex.has_weights(folder):
        reason = "no .safetensors weights"
    if reason is not None:
        return reason
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    inv_freq = _rope(config, head_dim)
    if isinstance(inv_freq, str):
        return inv_freq
    return DirectPlan(
        architecture=architecture,
        layers=int(config["num_hidden_layers"]),
        hidden=hidden,
        heads=heads,
        kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        vocab=int(config["vocab_size"]),
        eps=float(config.get("rms_norm_eps", 1e-6)),
        tied=bool(config.get("tie_word_embeddings", False)),
        context=int(config.get("max_position_embeddings", 2048)),
        inv_freq=inv_freq,
    )


# -- the external data ------------------------------------------------------------------------------
class _Data:
    """One external-data file written block by block; each tensor an initializer pointing into it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.size = 0
        self.initializers: list[TensorProto] = []

    def reserve(self, name: str, shape: tuple[int, ...]) -> int:
        offset = -(-self.size // _ALIGN) * _ALIGN
        length = int(np.prod(shape, dtype=np.int64)) * 4
        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", offset), ("length", length)):
            tensor.external_data.add(key=key, value=str(value))
        self.initializers.append(tensor)
        self.size = offset + length
        os.ftruncate(self.fd, self.size)
        return offset

    def array(self, name: str, value: np.ndarray) -> str:
        value = np.ascontiguousarray(value, dtype=np.float32)
        os.pwrite(self.fd, value.tobytes(), self.reserve(name, value.shape))
        return name

    def copy(self, name: str, weights: SafetensorsIndex, source: str) -> str:
        """Tensor ``source`` as it is stored (a table, a norm's scale), block by block."""
        entry = weights.entry(source)
        offset = self.reserve(name, entry.shape)
        rows = entry.shape[0] if entry.shape else 1
        step = max(1, _BLOCK_BYTES // max(entry.row_bytes, 1))
        for start in range(0, rows, step):
            block = weights.rows(source, start, min(rows, start + step))
            os.pwrite(self.fd, block.tobytes(), offset + start * (block.nbytes // len(block)))
        return name

    def transposed(self, name: str, weights: SafetensorsIndex, sources: list[str]) -> str:
        """Linear weights ``[out_i, in]`` side by side as one MatMul weight ``[in, sum(out_i)]``."""
        inner = weights.shape(sources[0])[1]
        total = sum(weights.shape(s)[0] for s in sources)
        offset = self.reserve(name, (inner, total))
        column = 0
        for source in sources:
            rows = weights.shape(source)[0]
            step = max(1, _BLOCK_BYTES // (inner * 4))
            for start in range(0, rows, step):
                block = np.ascontiguousarray(weights.rows(source, start, min(rows, start + step)).T)
                for d in range(inner):
                    os.pwrite(
                        self.fd, block[d].tobytes(), offset + 4 * (d * total + column + start)
                    )
            column += rows
        return name

    def close(self) -> None:
        os.close(self.fd)


# -- the graph ------------------------------------------------------------------------------------
class _Nodes:
    """The graph's nodes, each named ``{scope}/{op}`` and its outputs ``{node}/output_{i}``."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.constants: list[TensorProto] = []
        self.names: set[str] = set()

    def op(
        self,
        op_type: str,
        inputs: list[str],
        scope: str,
        outputs: int | list[str] = 1,
        **attrs: Any,
    ) -> list[str]:
        domain = attrs.pop("domain", "")
        name = f"{scope}/{op_type}"
        index = 1
        while name in self.names:
            index += 1
            name = f"{scope}/{op_type}_{index}"
        self.names.add(name)
        out = (
            [f"{name}/output_{i}" for i in range(outputs)] if isinstance(outputs, int) else outputs
        )
        self.nodes.append(
            helper.make_node(op_type, inputs, out, name=name, domain=domain or None, **attrs)
        )
        return out

    def one(self, op_type: str, inputs: list[str], scope: str, **attrs: Any) -> str:
        return self.op(op_type, inputs, scope, 1, **attrs)[0]

    def constant(self, name: str, value: np.ndarray) -> str:
        if name not in self.names:
            self.names.add(name)
            self.constants.append(onnx.numpy_helper.from_array(np.asarray(value), name))
        return name

    def ints(self, *values: int) -> str:
        return self.constant(f"/model/constants/INT64/{list(values)}", np.array(values, np.int64))


@dataclass
class _Build:
    """One write in progress: the plan, the checkpoint, the data file and the nodes."""

    plan: DirectPlan
    weights: SafetensorsIndex
    data: _Data
    nodes: _Nodes
    mask: dict[str, str] = field(default_factory=dict)

    def matmul(self, x: str, scope: str, sources: list[str]) -> str:
        """``x @ W`` (+ the bias where the checkpoint has one) for the linear layers ``sources`` packed side by side."""
        layers = [s.removesuffix(".weight") for s in sources]
        name = layers[0] if len(layers) == 1 else layers[0].rsplit(".", 1)[0] + ".qkv_proj"
        weight = self.data.transposed(f"{name}.weight", self.weights, sources)
        out = self.nodes.one("MatMul", [x, weight], scope)
        if all(f"{layer}.bias" in self.weights for layer in layers):
            bias = np.concatenate([self.weights.rows(f"{layer}.bias") for layer in layers])
            out = self.nodes.one("Add", [out, self.data.array(f"{name}.bias", bias)], scope)
        return out


def _mask_inputs(build: _Build) -> None:
    """From the 2-D mask: GroupQueryAttention's lengths (every row the full length) and the padding bias."""
    n, scope = build.nodes, "/model/attn_mask_reformat"
    total = n.one("Shape", ["attention_mask"], scope, start=1, end=2)
    batch = n.one("Shape", ["input_ids"], scope, start=0, end=1)
    sequence = n.one("Shape", ["input_ids"], scope, start=1, end=2)
    last = n.one("Cast", [n.one("Sub", [total, n.ints(1)], scope)], scope, to=TensorProto.INT32)
    build.mask["seqlens_k"] = n.one("Expand", [last, batch], scope)
    build.mask["total_seq_len"] = n.one(
        "Cast", [n.one("Squeeze", [total, n.ints(0)], scope)], scope, to=TensorProto.INT32
    )
    keep = n.one("Cast", ["attention_mask"], scope, to=TensorProto.BOOL)
    zero = n.constant("/model/constants/FLOAT/0", np.array(0, np.float32))
    # NOTE: the lowest float, not -inf, as transformers: a row with every key masked (a padding token's) stays finite
    lowest = n.constant(
        "/model/constants/FLOAT/min", np.array(np.finfo(np.float32).min, np.float32)
    )
    bias = n.one("Where", [keep, zero, lowest], scope)
    # NOTE: GroupQueryAttention wants the bias as [batch, 1, sequence, total]; it does not broadcast
    rows = n.one("Concat", [n.ints(1, 1), sequence, n.ints(1)], scope, axis=0)
    build.mask["attention_bias"] = n.one(
        "Expand", [n.one("Unsqueeze", [bias, n.ints(1, 2)], scope), rows], scope
    )


def _rotary_caches(build: _Build) -> tuple[str, str]:
    positions = np.arange(build.plan.context, dtype=np.float32)
    freqs = np.outer(positions, build.plan.inv_freq).astype(np.float32)
    return build.data.array("cos_cache", np.cos(freqs)), build.data.array(
        "sin_cache", np.sin(freqs)
    )


def _attention(build: _Build, i: int, x: str, caches: tuple[str, str]) -> str:
    plan, n, scope = build.plan, build.nodes, f"/model/layers.{i}/attn"
    prefix = f"model.layers.{i}.self_attn"
    qkv = build.matmul(x, f"{scope}/qkv_proj", [f"{prefix}.{p}_proj.weight" for p in "qkv"])
    mask = build.mask
    out = n.op(
        "GroupQueryAttention",
        [
            qkv,
            "",
            "",
            f"past_key_values.{i}.key",
            f"past_key_values.{i}.value",
            mask["seqlens_k"],
            mask["total_seq_len"],
            *caches,
            "",
            mask["attention_bias"],
        ],
        f"{scope}/GroupQueryAttention",
        [f"{scope}/GroupQueryAttention/output_0", f"present.{i}.key", f"present.{i}.value"],
        domain="com.microsoft",
        num_heads=plan.heads,
        kv_num_heads=plan.kv_heads,
        scale=1.0 / math.sqrt(plan.head_dim),
        do_rotary=1,
        rotary_interleaved=0,
    )[0]
    return build.matmul(out, f"{scope}/o_proj", [f"{prefix}.o_proj.weight"])


def _mlp(build: _Build, i: int, x: str) -> str:
    n, scope, prefix = build.nodes, f"/model/layers.{i}/mlp", f"model.layers.{i}.mlp"
    gate = build.matmul(x, f"{scope}/gate_proj", [f"{prefix}.gate_proj.weight"])
    up = build.matmul(x, f"{scope}/up_proj", [f"{prefix}.up_proj.weight"])
    act = n.one("Mul", [gate, n.one("Sigmoid", [gate], f"{scope}/act_fn")], f"{scope}/act_fn")
    return build.matmul(
        n.one("Mul", [act, up], scope), f"{scope}/down_proj", [f"{prefix}.down_proj.weight"]
    )


def _rms_norm(build: _Build, x: str, scale: str, scope: str) -> str:
    """The first RMSNorm (no residual yet) as ``SkipSimplifiedLayerNormalization(x, x)`` with 4x the epsilon.

    NOTE: the builder's ``SimplifiedLayerNormalization`` sits in the default domain, where the ONNX checker
    knows no such op. RMSNorm(2x, 4 eps) = 2x / sqrt(4 mean(x^2) + 4 eps) = RMSNorm(x, eps), and scaling by
    powers of two is exact in floating point: the same bits as RMSNorm(x) in one fused node."""
    out = build.nodes.op(
        "SkipSimplifiedLayerNormalization",
        [x, x, scale],
        scope,
        1,
        domain="com.microsoft",
        epsilon=4 * build.plan.eps,
    )
    return out[0]


def _norm(build: _Build, x: str, residual: str | None, source: str, scope: str) -> tuple[str, str]:
    """RMSNorm of ``x + residual`` (of ``x`` alone first): the normalised value and the new residual."""
    scale = build.data.copy(source, build.weights, source)
    if residual is None:
        return _rms_norm(build, x, scale, scope), x
    out = build.nodes.op(
        "SkipSimplifiedLayerNormalization",
        [x, residual, scale],
        scope,
        4,
        domain="com.microsoft",
        epsilon=build.plan.eps,
    )
    return out[0], out[3]


def _decoder(build: _Build) -> None:
    n, weights = build.nodes, build.weights
    table = build.data.copy("model.embed_tokens.weight", weights, "model.embed_tokens.weight")
    x: str = n.one("Gather", [table, "input_ids"], "/model/embed_tokens")
    residual: str | None = None
    _mask_inputs(build)
    caches = _rotary_caches(build)
    for i in range(build.plan.layers):
        normed, residual = _norm(
            build,
            x,
            residual,
            f"model.layers.{i}.input_layernorm.weight",
            f"/model/layers.{i}/input_layernorm",
        )
        attended = _attention(build, i, normed, caches)
        normed, residual = _norm(
            build,
            attended,
            residual,
            f"model.layers.{i}.post_attention_layernorm.weight",
            f"/model/layers.{i}/post_attention_layernorm",
        )
        x = _mlp(build, i, normed)
    normed, _ = _norm(build, x, residual, "model.norm.weight", "/model/norm")
    if build.plan.tied or "lm_head.weight" not in weights:
        head = n.one("Transpose", [table], "/lm_head", perm=[1, 0])
        n.op("MatMul", [normed, head], "/lm_head", ["logits"])
    else:
        n.op(
            "MatMul",
            [normed, build.data.transposed("lm_head.weight", weights, ["lm_head.weight"])],
            "/lm_head",
            ["logits"],
        )


def _io(plan: DirectPlan) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    cache = ["batch_size", plan.kv_heads, "past_sequence_length", plan.head_dim]
    present = ["batch_size", plan.kv_heads, "total_sequence_length", plan.head_dim]
    kinds = [(i, kind) for i in range(plan.layers) for kind in ("key", "value")]
    inputs = [
        helper.make_tensor_value_info(
            "input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]
        ),
        helper.make_tensor_value_info(
            "attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]
        ),
        *(
            helper.make_tensor_value_info(f"past_key_values.{i}.{k}", TensorProto.FLOAT, cache)  # type: ignore[arg-type]
            for i, k in kinds
        ),
    ]
    outputs = [
        helper.make_tensor_value_info(
            "logits", TensorProto.FLOAT, ["batch_size", "sequence_length", plan.vocab]
        ),
        *(
            helper.make_tensor_value_info(f"present.{i}.{k}", TensorProto.FLOAT, present)  # type: ignore[arg-type]
            for i, k in kinds
        ),
    ]
    return inputs, outputs


def write_direct(folder: Path, plan: DirectPlan, out: Path) -> Path:
    """Write ``out/model.onnx`` and its external data ``out/model.onnx.data`` from the checkpoint ``folder``."""
    build = _Build(plan, SafetensorsIndex(folder), _Data(out / DATA_FILE), _Nodes())
    try:
        _decoder(build)
    finally:
        build.data.close()
    inputs, outputs = _io(plan)
    graph = helper.make_graph(
        build.nodes.nodes,
        "main_graph",
        inputs,
        outputs,
        [*build.data.initializers, *build.nodes.constants],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", _OPSET), helper.make_opsetid("com.microsoft", 1)],
        producer_name="modelpress",
        ir_version=10,
    )
    path = out / "model.onnx"
    onnx.save(model, str(path))
    return path
