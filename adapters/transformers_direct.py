"""Choosing and running the direct writer (:mod:`~modelpress.adapters.transformers_llama`) for a checkpoint folder.

``exporter="auto"`` (the default, or ``MODELPRESS_TRANSFORMERS_EXPORTER`` for the command line) writes a
Llama-architecture causal LM with a KV cache directly when :func:`direct_plan` can state it exactly, and
leaves everything else to ``torch.onnx.export(dynamo=True)``; ``"direct"`` refuses, by the reason, what the
writer cannot state; ``"dynamo"`` always exports with torch.

This process never imports torch on the direct path: the ONNX file is written from the safetensors files,
and torch runs the checkpoint in a child process for the check (:func:`reference_in_child`): the export's
outputs against torch's (``rtol``) and greedy tokens from two prompts against ``generate``'s, recorded as
``greedy_tokens_identical`` in the provenance.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from modelpress.plugin_api import OptionsError, UnsupportedModelError

__all__ = ["EXPORTERS", "DirectExport", "choose_direct", "export_direct"]

EXPORTERS = ("auto", "direct", "dynamo")
ENVIRONMENT = "MODELPRESS_TRANSFORMERS_EXPORTER"
# NOTE: as transformers_export.FILE_EXPORT_BYTES (that module imports torch): a smaller model is held in memory
IN_MEMORY_BYTES = 256 << 20


def _exporter(exporter: str | None) -> str:
    chosen = exporter or os.environ.get(ENVIRONMENT) or "auto"
    if chosen not in EXPORTERS:
        raise OptionsError(
            f"exporter {chosen!r} (exporter= / {ENVIRONMENT}): choose one of {', '.join(EXPORTERS)}"
        )
    return chosen


def choose_direct(folder: Path, config: dict[str, Any], task: str, exporter: str | None) -> Any:
    """The direct writer's plan for ``folder``, or None where torch.onnx exports it."""
    from modelpress.adapters.transformers_llama import direct_plan

    chosen = _exporter(exporter)
    if chosen == "dynamo":
        return None
    plan = direct_plan(folder, config) if task == "text-generation-with-past" else f"task {task!r}"
    if isinstance(plan, str):
        if chosen == "direct":
            raise UnsupportedModelError(
                f"{str(folder)!r}: the direct ONNX writer cannot state {plan} exactly; use exporter='dynamo'"
            )
        return None
    return plan


def _source(path: Path) -> Any:
    """The written file, or below :data:`IN_MEMORY_BYTES` of weights its ``ModelProto`` with the weights inside,
    as the in-process torch export gives a small model (a model whose proto is serialised whole, as ``tune``
    copies its source, keeps its weights)."""
    from modelpress.adapters.transformers_llama import DATA_FILE

    if (path.parent / DATA_FILE).stat().st_size > IN_MEMORY_BYTES:
        return path
    import onnx

    return onnx.load(str(path))


@dataclass
class DirectExport:
    """A written export and torch's side of its check (a staged export, as ``StagedExport``)."""

    path: Path
    run: Any  # a transformers_child.ReferenceRun
    facts: dict[str, Any]
    label: str

    def check(self, rtol: float) -> tuple[Any, dict[str, Any]]:
        """The export as a :class:`modelpress.Model`: its outputs checked against torch's, its greedy tokens compared."""
        from modelpress.adapters.onnx import load_onnx
        from modelpress.plugin_api import check_import, greedy_generate

        imported = load_onnx(_source(self.path), sample=self.run.feeds)
        figures = check_import(self.run.reference, imported, self.run.feeds, rtol, self.label)
        new = self.run.tokens.shape[1] - self.run.prompts.shape[1]
        tokens = greedy_generate(imported, self.run.prompts, max_new_tokens=new)
        same = tokens.shape == self.run.tokens.shape and bool((tokens == self.run.tokens).all())
        return imported, {"import_check": figures, "greedy_tokens_identical": same, **self.facts}


def export_direct(
    folder: Path, plan: Any, config: dict[str, Any], *, example_inputs: Any = None
) -> tuple[DirectExport, dict[str, Any], str]:
    """Write ``folder`` as ONNX and run torch on it in a child: the staged export, the provenance's facts, the label."""
    from modelpress.adapters.transformers_child import reference_in_child, work_folder
    from modelpress.adapters.transformers_llama import write_direct

    work = work_folder()
    path = write_direct(folder, plan, work)
    layout = (plan.layers, plan.kv_heads, plan.head_dim)
    task = "text-generation-with-past"
    run = reference_in_child(folder, work, task, layout, example_inputs=example_inputs)
    meta = {
        "task": task,
        "architecture": plan.architecture,
        "model_type": str(config.get("model_type", "")),
        "transformers_version": metadata.version("transformers"),
    }
    label = f"{folder} ({plan.architecture}, {task})"
    return DirectExport(path, run, plan.facts, label), meta, str(folder)
