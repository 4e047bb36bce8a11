"""The torch side of the Transformers adapter: what is exported for each task, and how.

Imported only when a Hugging Face model is loaded (it imports torch and transformers).

Each task exports a small wrapper module whose arguments are the ONNX inputs, in the names and
layout optimum-onnx and ONNX Runtime GenAI use:

* ``feature-extraction``: ``input_ids``, ``attention_mask`` (``token_type_ids`` where the encoder
  takes them) -> ``last_hidden_state``;
* ``text-classification``: the same inputs -> ``logits``;
* ``text-generation``: ``input_ids``, ``attention_mask``, ``position_ids`` -> ``logits`` (no cache);
* ``text-generation-with-past``: also ``past_key_values.{i}.key`` / ``.value``
  ``[batch_size, num_kv_heads, past_sequence_length, head_dim]`` -> ``logits`` and
  ``present.{i}.key`` / ``.value`` ``[batch_size, num_kv_heads, total_sequence_length, head_dim]``.

Every axis but the model's own sizes is dynamic, and named as optimum names it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["FILE_EXPORT_BYTES", "ExportPlan", "StagedExport", "export_staged", "plan_export"]

# NOTE: the example a model is exported and checked on: a past of 3 and 5 new tokens, batch 2
# (0 and 1 would be specialised by torch.export; the exported axes stay dynamic).
_BATCH, _SEQUENCE, _PAST = 2, 5, 3


@dataclass
class ExportPlan:
    """What to export for one task: the wrapper, its example arguments, the ONNX names and axes."""

    module: nn.Module
    args: tuple[Any, ...]
    input_names: list[str]
    output_names: list[str]
    axes: dict[str, dict[int, str]] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)

    def feeds(self) -> dict[str, np.ndarray]:
        flat = [a for arg in self.args for a in (arg if isinstance(arg, (tuple, list)) else (arg,))]
        return {
            name: t.detach().cpu().numpy() for name, t in zip(self.input_names, flat, strict=True)
        }

    def dynamic_shapes(self) -> tuple[Any, ...]:
        """``torch.export`` dynamic shapes (every named axis dynamic; the past as one tuple argument)."""
        dynamic = torch.export.Dim.DYNAMIC
        shapes = [
            {axis: dynamic for axis in self.axes.get(name, {})} or None for name in self.input_names
        ]
        head = [
            s
            for s, name in zip(shapes, self.input_names, strict=True)
            if not name.startswith("past_key_values.")
        ]
        past = [
            s
            for s, name in zip(shapes, self.input_names, strict=True)
            if name.startswith("past_key_values.")
        ]
        return (*head, tuple(past)) if past else tuple(head)


class _Encoder(nn.Module):
    """An encoder's first output (``last_hidden_state`` or a classifier's ``logits``)."""

    def __init__(self, model: nn.Module, with_token_types: bool) -> None:
        super().__init__()
        self.model = model
        self.with_token_types = with_token_types

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        extra = {"token_type_ids": token_type_ids} if self.with_token_types else {}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra)[0]


class _CausalLM(nn.Module):
    """A decoder's logits for the whole sequence, no cache (``use_cache=False``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        return self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).logits


class _CausalLMWithPast(nn.Module):
    """A decoder step with a KV cache: flat past tensors in, logits and flat presents out."""

    def __init__(self, model: nn.Module, layers: int, cache_argument: str) -> None:
        super().__init__()
        self.model = model
        self.layers = layers
        self.cache_argument = (
            cache_argument  # NOTE: "cache" in transformers 5.x, "past_key_values" before
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(
            [(past[2 * i], past[2 * i + 1]) for i in range(self.layers)],
            config=self.model.config,  # type: ignore[arg-type]
        )
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self.cache_argument: cache},
        )
        presents = getattr(out, "cache", None) or out.past_key_values
        flat: list[torch.Tensor] = []
        for layer in presents.layers:
            flat += [layer.keys, layer.values]
        return (out.logits, *flat)


def _accepts_argument(model: nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def _tokens(model: nn.Module, input_ids: torch.Tensor | None, seed: int) -> torch.Tensor:
    if input_ids is not None:
        return input_ids.to(torch.long)
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, int(model.config.vocab_size), (_BATCH, _SEQUENCE), generator=generator)  # type: ignore[arg-type, union-attr]


def _encoder_plan(model: nn.Module, task: str, input_ids: torch.Tensor | None) -> ExportPlan:
    ids = _tokens(model, input_ids, seed=0)
    types = (
        _accepts_argument(model, "token_type_ids")
        and int(getattr(model.config, "type_vocab_size", 0) or 0) > 0
    )
    args: tuple[Any, ...] = (ids, torch.ones_like(ids)) + (
        (torch.zeros_like(ids),) if types else ()
    )
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if types else [])
    output = "last_hidden_state" if task == "feature-extraction" else "logits"
    axes = {name: {0: "batch_size", 1: "sequence_length"} for name in names}
    axes[output] = {0: "batch_size"} | (
        {1: "sequence_length"} if task == "feature-extraction" else {}
    )
    return ExportPlan(_Encoder(model, types), args, names, [output], axes)


def _cache_layout(config: Any) -> tuple[int, int, int]:
    """(layers, KV heads, head size) of a decoder's config."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layers = int(getattr(text, "num_hidden_layers", None) or text.n_layer)
    heads = int(getattr(text, "num_attention_heads", None) or text.n_head)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    hidden = int(getattr(text, "hidden_size", None) or text.n_embd)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    return layers, kv_heads, head_dim


def _decoder_plan(model: nn.Module, task: str, input_ids: torch.Tensor | None) -> ExportPlan:
    ids = _tokens(model, input_ids, seed=0)
    batch, sequence = ids.shape
    names = ["input_ids", "attention_mask", "position_ids"]
    axes = {name: {0: "batch_size", 1: "sequence_length"} for name in names}
    if task == "text-generation":
        positions = torch.arange(sequence).expand(batch, sequence)
        axes["logits"] = {0: "batch_size", 1: "sequence_length"}
        return ExportPlan(
            _CausalLM(model), (ids, torch.ones_like(ids), positions), names, ["logits"], axes
        )
    layers, kv_heads, head_dim = _cache_layout(model.config)
    generator = torch.Generator().manual_seed(1)
    past = tuple(
        torch.randn(batch, kv_heads, _PAST, head_dim, generator=generator)
        for _ in range(2 * layers)
    )
    positions = torch.arange(_PAST, _PAST + sequence).expand(batch, sequence)
    mask = torch.ones(batch, _PAST + sequence, dtype=torch.long)
    kinds = [(i, kind) for i in range(layers) for kind in ("key", "value")]
    names += [f"past_key_values.{i}.{kind}" for i, kind in kinds]
    outputs = ["logits"] + [f"present.{i}.{kind}" for i, kind in kinds]
    axes["attention_mask"] = {0: "batch_size", 1: "total_sequence_length"}
    axes["logits"] = {0: "batch_size", 1: "sequence_length"}
    for i, kind in kinds:
        axes[f"past_key_values.{i}.{kind}"] = {0: "batch_size", 2: "past_sequence_length"}
        axes[f"present.{i}.{kind}"] = {0: "batch_size", 2: "total_sequence_length"}
    cache_argument = "cache" if _accepts_argument(model, "cache") else "past_key_values"
    facts = {"num_layers": layers, "num_key_value_heads": kv_heads, "head_dim": head_dim}
    return ExportPlan(
        _CausalLMWithPast(model, layers, cache_argument),
        (ids, mask, positions, *past),
        names,
        outputs,
        axes,
        facts,
    )


def plan_export(model: nn.Module, task: str, input_ids: torch.Tensor | None = None) -> ExportPlan:
    """The wrapper, example inputs and ONNX names that export ``model`` for ``task``."""
    if task in ("feature-extraction", "text-classification"):
        return _encoder_plan(model, task, input_ids)
    return _decoder_plan(model, task, input_ids)


def name_axes(proto: Any, axes: dict[str, dict[int, str]]) -> None:
    """Give the graph's inputs and outputs optimum's axis names (torch.export names them ``s0``, ``s1 + s2``...);
    the intermediate shapes, named after torch's symbols, are dropped (shape inference recomputes them)."""
    graph = proto.graph
    for value in [*graph.input, *graph.output]:
        for axis, name in axes.get(value.name, {}).items():
            dim = value.type.tensor_type.shape.dim[axis]
            dim.ClearField("dim_value")
            dim.dim_param = name
    del graph.value_info[:]


def _program(plan: ExportPlan, opset: int | None, label: str, architecture: str) -> Any:
    """``torch.onnx.export(dynamo=True)`` of the plan (its initializers are the module's own tensors, not
    copies); a failure refuses the architecture by name."""
    import warnings

    from modelpress.adapters.torch import _first_line, _quiet
    from modelpress.plugin_api import UnsupportedModelError

    try:
        with warnings.catch_warnings(), _quiet(), torch.no_grad():
            warnings.simplefilter("ignore")
            return torch.onnx.export(
                plan.module,
                plan.args,
                dynamo=True,
                input_names=plan.input_names,
                output_names=plan.output_names,
                dynamic_shapes=plan.dynamic_shapes(),
                opset_version=opset,
                verbose=False,
            )
    except Exception as exc:
        raise UnsupportedModelError(
            f"{label}: the ONNX exporter cannot handle {architecture}: {_reason(exc, _first_line)}"
        ) from None


def _export(plan: ExportPlan, opset: int | None, label: str, architecture: str) -> Any:
    """The plan exported as an in-memory ``ModelProto`` with named axes."""
    proto = _program(plan, opset, label, architecture).model_proto
    name_axes(proto, plan.axes)
    return proto


def _export_to_file(
    plan: ExportPlan, opset: int | None, label: str, architecture: str, folder: Path | None = None
) -> Path:
    """The plan exported into ``folder`` (default: a temporary folder removed at exit), every weight in one
    external-data file written tensor by tensor from the module's own tensors: no in-memory ``ModelProto`` of
    the weights, and the imported model reads them lazily from that file as it does any ONNX file with
    external data."""
    import atexit
    import shutil
    import tempfile

    import onnx

    if folder is None:
        folder = Path(tempfile.mkdtemp(prefix="modelpress-transformers-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
    path = folder / "model.onnx"
    _program(plan, opset, label, architecture).save(path, external_data=True)
    proto = onnx.load(str(path), load_external_data=False)
    name_axes(proto, plan.axes)
    onnx.save(proto, str(path))
    return path


def _reason(exc: BaseException, first_line: Any) -> str:
    """The cause torch.onnx states under "## Exception summary" (its first line is boilerplate), without colour codes."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    _, found, summary = text.partition("## Exception summary")
    lines = [line.strip() for line in summary.splitlines() if line.strip()]
    return lines[0][:300] if found and lines else first_line(exc)


def _outputs(plan: ExportPlan) -> list[np.ndarray]:
    with torch.no_grad():
        out = plan.module.eval()(*plan.args)
    return [t.detach().cpu().numpy() for t in (out if isinstance(out, tuple) else (out,))]


# NOTE: a model with more parameter bytes than this is exported through a file (:func:`_export_to_file`): the
# in-memory route holds the torch weights, a ModelProto of them and its copies at once (7.8x a 0.5 GB
# checkpoint at the peak), and a ModelProto cannot hold more than 2 GB.
FILE_EXPORT_BYTES = 256 << 20


@dataclass
class StagedExport:
    """An exported model not yet imported: what the import check needs, without the torch module, so the
    caller can free a model it loaded before ONNX Runtime loads the export (:meth:`check`)."""

    source: Any  # a ModelProto, or the path of a file with external data
    reference: list[np.ndarray]
    feeds: dict[str, np.ndarray]
    facts: dict[str, Any]
    label: str

    def check(self, rtol: float) -> tuple[Any, dict[str, Any]]:
        """The export as a :class:`modelpress.Model`, checked against torch's outputs on the plan's inputs."""
        from modelpress.adapters.onnx import load_onnx
        from modelpress.plugin_api import check_import

        imported = load_onnx(self.source, sample=self.feeds)
        figures = check_import(self.reference, imported, self.feeds, rtol, self.label)
        return imported, {"import_check": figures, **self.facts}


def _parameter_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def export_staged(
    model: nn.Module,
    task: str,
    label: str,
    *,
    example_inputs: Any,
    opset: int | None,
    folder: Path | None = None,
) -> StagedExport:
    """Export ``model`` for ``task`` (through a file with external data above :data:`FILE_EXPORT_BYTES`, or
    into ``folder`` whenever one is given) and run torch on the plan's example inputs; nothing of the torch
    module is kept."""
    ids = _example_ids(example_inputs)
    plan = plan_export(model.eval(), task, ids)
    reference = _outputs(plan)
    architecture = type(model).__name__
    if folder is not None or _parameter_bytes(model) > FILE_EXPORT_BYTES:
        source: Any = _export_to_file(plan, opset, label, architecture, folder)
    else:
        source = _export(plan, opset, label, architecture)
    return StagedExport(
        source, reference, plan.feeds(), plan.facts, f"{label} ({architecture}, {task})"
    )


def export_checked(
    model: nn.Module, task: str, label: str, *, example_inputs: Any, rtol: float, opset: int | None
) -> tuple[Any, dict[str, Any]]:
    """The model exported for ``task`` as a :class:`modelpress.Model`, checked against torch on the
    plan's example inputs; the figures (the check's, the cache layout) go into the provenance."""
    return export_staged(model, task, label, example_inputs=example_inputs, opset=opset).check(rtol)


def _example_ids(example_inputs: Any) -> torch.Tensor | None:
    """The token ids of ``example_inputs`` (a tensor/array, a tuple starting with one, or a dict with ``input_ids``)."""
    if example_inputs is None:
        return None
    if isinstance(example_inputs, dict):
        example_inputs = example_inputs.get("input_ids")
    elif isinstance(example_inputs, (tuple, list)):
        example_inputs = example_inputs[0] if example_inputs else None
    if example_inputs is None:
        return None
    ids = torch.as_tensor(
        np.asarray(example_inputs)
        if not isinstance(example_inputs, torch.Tensor)
        else example_inputs
    ).to(torch.long)
    if ids.dim() != 2:
        from modelpress.plugin_api import DataError

        raise DataError(
            f"example_inputs: token ids of shape [batch, sequence] are needed, not {tuple(ids.shape)}"
        )
    # NOTE: torch.export specialises axes of size 0 or 1: a batch of 1 or a single token would be exported as fixed
    return ids.repeat(2 if ids.shape[0] < 2 else 1, 2 if ids.shape[1] < 2 else 1)
