"""The Hugging Face Transformers adapter (extra ``transformers``): checkpoint folders and ``PreTrainedModel``.

``modelpress.load("ckpt/")`` (a folder with a ``config.json``, as ``save_pretrained`` writes it) or
``modelpress.load(model)`` (a ``PreTrainedModel``) exports the model to ONNX with
``torch.onnx.export(dynamo=True)`` for a task read from the config's ``architectures`` (or the
model's class), which ``task=`` overrides:

* ``feature-extraction`` (encoders, base models): ``last_hidden_state``;
* ``text-classification`` (``...ForSequenceClassification``): ``logits``;
* ``text-generation-with-past`` (``...ForCausalLM``, ``...LMHeadModel``): logits with a KV cache,
  ``past_key_values.{i}.key/value`` in and ``present.{i}.key/value`` out, in the layout ONNX
  Runtime GenAI and optimum use; ``text-generation`` is the same model without a cache.

The input names and dynamic axes are optimum's (see :mod:`modelpress.adapters.transformers_export`).
A Llama, Qwen2 or Mistral causal LM folder with a cache is instead written directly as onnxruntime-genai's
builder graph, without torch in this process (:mod:`~modelpress.adapters.transformers_direct`;
``exporter="dynamo"`` exports it with torch).
The import is verified: the model in torch and the export in ONNX Runtime run the same inputs
(for a decoder with a cache: a past of 3 and 5 new tokens) and differ by at most ``rtol``.
Encoder-decoder models and architectures the exporter cannot handle are refused by name.

Nothing is downloaded: a folder is opened with ``local_files_only=True``.

A folder with more than :data:`CHILD_EXPORT_BYTES` (256 MB) of weight files is loaded and exported in a
child process (:mod:`~modelpress.adapters.transformers_child`) into a temporary ONNX file with external
data, which this process then imports with its weights read lazily: the torch weights are gone before the
export is checked and compressed. Its errors are raised here as the same ``ModelpressError``, and any
other failure as an ``InvalidModelError`` with the child's last output lines; Ctrl-C stops the child.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from modelpress.plugin_api import (
    AXIS_SIZES_KEY,
    Adapter,
    InvalidModelError,
    Model,
    OptionsError,
    Provenance,
    UnsupportedModelError,
    hookimpl,
    one_line,
)

__all__ = ["TASKS", "load_transformers", "task_of", "tasks_of"]

TASKS = (
    "feature-extraction",
    "text-classification",
    "text-generation",
    "text-generation-with-past",
)
_DECODER_TASKS = ("text-generation", "text-generation-with-past")


def _is_pretrained(source: Any) -> bool:
    transformers = sys.modules.get("transformers")
    if (
        transformers is None
    ):  # NOTE: a PreTrainedModel cannot exist before transformers was imported
        return False
    return isinstance(source, transformers.PreTrainedModel)


def _accepts(source: Any) -> bool:
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        # NOTE: a TensorFlow SavedModel folder may carry a config.json too; it is the tensorflow adapter's
        return (
            folder.is_dir()
            and (folder / "config.json").is_file()
            and not (folder / "saved_model.pb").exists()
        )
    return _is_pretrained(source)


@hookimpl
def modelpress_register_adapters(register):  # type: ignore[no-untyped-def]
    register(
        Adapter(
            name="transformers",
            accepts=_accepts,
            load=load_transformers,
            priority=20,  # NOTE: before the torch adapter, which would take a PreTrainedModel as any nn.Module
            summary="Hugging Face Transformers checkpoint folders (config.json) and PreTrainedModel",
        )
    )


@hookimpl
def modelpress_load_data(path: Path, model: Model, what: str, sequence_length: int | None) -> Any:
    """A ``.txt`` or ``.jsonl`` corpus as inputs of a model this adapter imported: tokenised with its
    checkpoint's tokenizer into sequences of ``sequence_length`` tokens (default 64; at most 64
    sequences), see :func:`~modelpress.adapters.transformers_data.text_samples`. For calibration the
    last eighth of the sequences is held out; ``what="held-out"`` reads that part (None: nothing held out)."""
    if model.provenance.source_framework != "transformers" or path.suffix.lower() not in (
        ".txt",
        ".jsonl",
    ):
        return None
    from modelpress.adapters.transformers_data import held_out_samples, text_samples

    length = sequence_length or 64
    if what == "held-out":
        return held_out_samples(model, path, sequence_length=length)
    return text_samples(
        model, path, sequence_length=length, part="calibration" if what == "calibration" else "all"
    )


@hookimpl
def modelpress_export_finish(model: Model, result: Any) -> None:
    """A causal LM with a cache exported as ``model.onnx``: its folder made one onnxruntime-genai runs
    (the tokenizer files and ``genai_config.json`` beside it, see :mod:`~modelpress.adapters.transformers_genai`)."""
    if result.path.name != "model.onnx" or model.provenance.source_framework != "transformers":
        return
    from modelpress.adapters.transformers_genai import is_genai_decoder, write_genai_folder

    if is_genai_decoder(model):
        write_genai_folder(model, result.path.parent)


def _require() -> Any:
    try:
        import torch  # noqa: F401
        import transformers
    except ImportError:
        raise UnsupportedModelError(
            "loading Hugging Face models needs the transformers extra: pip install -c constraints.txt 'modelpress[transformers]'"
        ) from None
    return transformers


def task_of(architecture: str) -> str:
    """The default task of a model class name (``LlamaForCausalLM`` -> ``text-generation-with-past``)."""
    return tasks_of(architecture)[0]


def tasks_of(architecture: str) -> tuple[str, ...]:
    """The tasks a model class can be exported for, its default first: a causal LM generates (with or
    without a cache) or gives its hidden states; a classifier classifies or gives its hidden states;
    any other model gives its hidden states."""
    if architecture.endswith(("ForCausalLM", "LMHeadModel")):
        return ("text-generation-with-past", "text-generation", "feature-extraction")
    if architecture.endswith("ForSequenceClassification"):
        return ("text-classification", "feature-extraction")
    return ("feature-extraction",)


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise InvalidModelError(
            f"{str(folder)!r}: config.json cannot be read: {one_line(exc)}"
        ) from None
    if not isinstance(config, dict):
        raise InvalidModelError(f"{str(folder)!r}: config.json does not hold a JSON object")
    return config


def _check_task(task: str | None, architecture: str, label: str) -> str:
    """``task`` (default: the architecture's), refused by name unless the model can do it."""
    possible = tasks_of(architecture)
    chosen = task or possible[0]
    if chosen not in possible:
        what = "unknown task" if chosen not in TASKS else "task"
        raise OptionsError(
            f"{label}: {what} {chosen!r}: {architecture or 'the model'} can do {', '.join(possible)} (--task / task=)"
        )
    return chosen


def _auto_class(transformers: Any, task: str) -> Any:
    if task in _DECODER_TASKS:
        return transformers.AutoModelForCausalLM
    if task == "text-classification":
        return transformers.AutoModelForSequenceClassification
    return transformers.AutoModel


@contextlib.contextmanager
def _no_progress_bars(transformers: Any) -> Iterator[None]:
    """transformers' own tqdm bars ("Loading weights: 100%") off while it loads: modelpress's progress
    line says what is loading, and ``-q`` means one result line."""
    logging = transformers.utils.logging
    was_on = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            logging.enable_progress_bar()


def _open_folder(
    transformers: Any, folder: Path, task: str | None, *, float32: bool = False
) -> tuple[Any, str]:
    """The model of a checkpoint folder, loaded for its task (``AutoModelFor...``, local files only;
    in float32 with ``float32``)."""
    config = _read_config(folder)
    architecture = (config.get("architectures") or [""])[0] or str(config.get("model_type", ""))
    chosen = _check_task(task, architecture, repr(str(folder)))
    if config.get("is_encoder_decoder"):
        raise UnsupportedModelError(
            f"{str(folder)!r}: {architecture} is an encoder-decoder model; only encoders and decoders are supported"
        )
    try:
        with warnings.catch_warnings(), _no_progress_bars(transformers):
            warnings.simplefilter("ignore")
            dtype = {"dtype": sys.modules["torch"].float32} if float32 else {}
            model = _auto_class(transformers, chosen).from_pretrained(
                str(folder), local_files_only=True, **dtype
            )
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidModelError(
            f"{str(folder)!r}: transformers cannot load {architecture or 'the checkpoint'} for {chosen}: {one_line(exc)}"
        ) from None
    return model, chosen


def _for_task(model: Any, task: str | None, label: str) -> tuple[Any, str]:
    """A ``PreTrainedModel`` and its task; features of a model with a head come from its base model."""
    architecture = type(model).__name__
    chosen = _check_task(task, architecture, label)
    if getattr(model.config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{label}: {architecture} is an encoder-decoder model; only encoders and decoders are supported"
        )
    if chosen == "feature-extraction" and task_of(architecture) != chosen:
        return (
            model.base_model,
            chosen,
        )  # NOTE: the hidden states of a model with a head are its base model's
    return model, chosen


def _refuse_unsupported(model: Any, task: str, label: str) -> None:
    """Refuse, by name, what the export cannot represent faithfully."""
    architecture = type(model).__name__
    if "input_ids" not in inspect.signature(model.forward).parameters:
        raise UnsupportedModelError(
            f"{label}: {architecture} does not take input_ids (only text models are supported)"
        )
    layer_types = getattr(model.config, "layer_types", None) or []
    if task == "text-generation-with-past" and any(
        kind != "full_attention" for kind in layer_types
    ):
        kinds = sorted(set(layer_types) - {"full_attention"})
        raise UnsupportedModelError(
            f"{label}: {architecture} has {', '.join(kinds)} layers, whose cache the past/present layout does not hold; "
            f"export it without a cache: task='text-generation'"
        )


# NOTE: a checkpoint folder whose weight files hold more bytes than this is exported in a child process
# (:mod:`~modelpress.adapters.transformers_child`): its torch weights, and what of them onnxscript keeps,
# go back to the OS before ONNX Runtime loads the export and before it is compressed. Below, the child's
# start (importing torch and transformers again) costs more than the memory it saves.
CHILD_EXPORT_BYTES = 256 << 20
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _checkpoint_bytes(folder: Path) -> int:
    return sum(
        p.stat().st_size for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file()
    )


def load_transformers(
    source: Any,
    *,
    task: str | None = None,
    example_inputs: Any = None,
    rtol: float = 1e-4,
    opset: int | None = None,
    exporter: str | None = None,
    **_: Any,
) -> Model:
    """Import a Hugging Face checkpoint folder or ``PreTrainedModel`` (see the module docstring).

    A folder with more than :data:`CHILD_EXPORT_BYTES` of weights is exported in a child process
    (:mod:`~modelpress.adapters.transformers_child`); a ``PreTrainedModel``, already in memory, and a
    smaller folder are exported in this process.

    Args:
        task: one of :data:`TASKS` (default: from the config's ``architectures`` / the model's class).
        example_inputs: token ids ``[batch, sequence]`` to export and check on (default: random ids).
        rtol: the largest relative difference between torch and ONNX Runtime the import accepts.
        exporter: ``"auto"`` (default, or ``MODELPRESS_TRANSFORMERS_EXPORTER``): a Llama, Qwen2 or Mistral
            causal LM folder written directly as onnxruntime-genai's builder graph where every part of it can
            be (:mod:`~modelpress.adapters.transformers_direct`), torch.onnx otherwise; ``"direct"`` or ``"dynamo"``.
    """
    direct = _direct(source, task, exporter)
    importer = "torch.onnx.export(dynamo=True)"
    if direct is not None:
        from modelpress.adapters.transformers_direct import export_direct

        staged, meta, label = export_direct(
            Path(source), direct[0], direct[1], example_inputs=example_inputs
        )
        importer = "modelpress direct writer (onnxruntime-genai builder graph)"
    elif (
        isinstance(source, (str, os.PathLike))
        and Path(source).is_dir()
        and _checkpoint_bytes(Path(source)) > CHILD_EXPORT_BYTES
    ):
        from modelpress.adapters.transformers_child import export_in_child

        staged: Any = export_in_child(  # type: ignore[no-redef]
            Path(source), task, example_inputs=example_inputs, opset=opset
        )
        meta, label = staged.meta, str(source)
    else:
        staged, meta, label = _export_here(source, task, example_inputs, opset)
    imported, figures = staged.check(rtol)
    imported.provenance = Provenance(
        source_framework="transformers",
        source_version=meta["transformers_version"],
        source=label,
        importer=importer,
        extra={
            "task": meta["task"],
            "architecture": meta["architecture"],
            "model_type": meta["model_type"],
            **figures,
            **_sample_axes(meta["task"], direct is not None),
        },
    )
    return imported


def _direct(
    source: Any, task: str | None, exporter: str | None
) -> tuple[Any, dict[str, Any]] | None:
    """The direct writer's plan and the config for a checkpoint folder it writes, else None."""
    from modelpress.adapters.transformers_direct import choose_direct

    if not isinstance(source, (str, os.PathLike)) or not Path(source).is_dir():
        if exporter == "direct":
            raise OptionsError(
                "exporter='direct' writes checkpoint folders; a PreTrainedModel is exported with torch.onnx"
            )
        return None
    folder = Path(source)
    config = _read_config(folder)
    architecture = (config.get("architectures") or [""])[0] or str(config.get("model_type", ""))
    chosen = _check_task(task, architecture, repr(str(folder)))
    plan = choose_direct(folder, config, chosen, exporter)
    return None if plan is None else (plan, config)


def _export_here(
    source: Any, task: str | None, example_inputs: Any, opset: int | None
) -> tuple[Any, dict[str, Any], str]:
    """The in-process export: the staged export, the facts of the provenance, and the source's label."""
    transformers = _require()
    if isinstance(source, (str, os.PathLike)):
        label = str(source)
        model, task = _open_folder(transformers, Path(source), task)
    elif _is_pretrained(source):
        label = type(source).__name__
        model, task = _for_task(source, task, label)
    else:
        raise UnsupportedModelError(
            f"{type(source).__name__}: not a Hugging Face checkpoint folder or PreTrainedModel"
        )
    _refuse_unsupported(model, task, label)
    from modelpress.adapters.transformers_export import export_staged

    staged = export_staged(model, task, label, example_inputs=example_inputs, opset=opset)
    meta = {
        "task": task,
        "architecture": type(model).__name__,
        "model_type": getattr(model.config, "model_type", ""),
        "transformers_version": transformers.__version__,
    }
    # NOTE: not held here while ONNX Runtime loads the export to check it; its weights still stay mapped, as
    # onnxscript's rewrite rules keep the last graph they matched (SimplePatternMatcher._graph), which wraps
    # them (a large checkpoint folder is exported in a child process for that reason)
    del model
    return staged, meta, label


def _sample_axes(task: str, direct: bool = False) -> dict[str, Any]:
    """The sizes generated verification samples give the named axes (``Provenance.extra[AXIS_SIZES_KEY]``):
    with a cache, the mask spans the past and the new tokens, so ``total_sequence_length`` is their sum.
    A directly written graph is checked on a decode step (one new token after a past of 11): onnxruntime's
    GroupQueryAttention takes a past with several new tokens at batch 1 only."""
    if task != "text-generation-with-past":
        return {}
    new = 1 if direct else 8
    return {
        AXIS_SIZES_KEY: {
            "sequence_length": new,
            "past_sequence_length": 12 - new,
            "total_sequence_length": 12,
        }
    }
