"""``modelpress.plugin_api``: everything a plugin needs, in one documented place.

The built-in methods, adapters and codecs import only from here and from ``modelpress`` itself
(a test checks it), so a third-party plugin can do everything a built-in does. Names here are
public API: they keep working across minor versions. Each name is imported on first use (PEP 562),
so a plugin pays only for what it imports: a codec plugin (``Codec``, ``TensorInfo``, ``hookimpl``)
imports no onnx, onnx-ir or ONNX Runtime, and ``modelpress unpack`` stays light.

Writing a method (see ``docs/writing-a-plugin.md``)
    :class:`Method`, :class:`Options`, :class:`PassContext`, :class:`Kind`, :data:`BUILTIN_KINDS`,
    :func:`hookimpl`, :class:`Tuning` and :class:`TuneStage` (how ``modelpress tune`` searches it);
    the IR: :class:`Model` (with its graph-building toolkit: ``builder``,
    ``consumers``, ``producer``, ``fresh_name``, ``replace_node``, ``insert_after``, ``cleanup``,
    ``infer_shapes``), :class:`GraphBuilder` (and :class:`Out`, how a new node's output is named and typed), :class:`WeightedLayer`, :func:`ensure_opset`,
    :func:`recurrent_refusals` (name the LSTM/GRU/RNN weights a method leaves alone).
Running and judging models in ONNX Runtime
    :func:`make_session` (one session factory: threads, external data, ``.mpk``),
    :func:`with_outputs` (a session that also returns inner tensors), :func:`run`,
    :func:`run_dataset`; :func:`infer_criteria`, :func:`judge`, :class:`Judgement`, :class:`Criterion`, :class:`Bounds`
    (each output's kind and rule, ``docs/verification.md``), :func:`lower_is_better` (per metric),
    :class:`MissBound` (when the first samples already decide a miss: a search can stop a sweep);
    :func:`compare_outputs` (the figures export verifies by: cosine, agreement, max |diff|).
    :func:`activation_stats` (min/max/mean/abs-max of inner tensors over a data set, streamed
    batch by batch: :class:`TensorStats`), :class:`ActivationCollector` and
    :func:`calibration_batch` (its session and batch sizing, for a method's own loop).
    Text decoders (optimum's layout): :func:`greedy_generate`, :func:`perplexity`, :func:`decoder_sample`
    (verification inputs with a KV cache); :class:`TextFloor` (what a method's results keep of a decoder's text).
Data
    :class:`Dataset`, :func:`load_dataset`, :func:`sample_inputs`, :data:`AXIS_SIZES_KEY` (the sizes of named
    axes an adapter declares for generated samples).
Training (needs the ``torch`` extra; imported lazily)
    :func:`to_torch`, :func:`fit`, :func:`update_weights`, :func:`held_out_scores` (the loss to keep
    a fine-tuning epoch by), :func:`choose_loss` (the loss fitting a model's output), :func:`kd_loss`
    (the one distillation loss).
Writing an adapter
    :class:`Adapter`, :meth:`Model.from_onnx`, :class:`Provenance`, :func:`check_import` (the
    numeric import check every built-in adapter runs), :func:`normalize_on_import`,
    :func:`type_initializers` (after deserialising a proto yourself), :func:`proto_tensor_bytes` (a
    TensorProto's value bytes from its dims and type, without serialising it);
    :func:`modelpress.testing.check_adapter` for your tests.
Writing a codec
    :class:`Codec`, :class:`TensorInfo` (its ``dtype`` an :class:`ElementType`), :func:`numpy_dtype`, :data:`PACK_MAGIC`, :func:`read_packed`;
    :func:`current_registry` (the registry of the ``modelpress.load`` in progress: decode and load with it).
Errors and progress
    the :class:`ModelpressError` family, :func:`one_line` (a message fit for one line),
    :func:`progress_bar`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# NOTE: what type checkers see; at run time __getattr__ imports each name on first use
if TYPE_CHECKING:
    from modelpress.base.errors import (
        DataError,
        InvalidModelError,
        ModelpressError,
        OptionsError,
        PluginError,
        UnsafeExternalDataError,
        UnsupportedModelError,
        VerificationError,
        one_line,
    )
    from modelpress.base.progress import progress_bar
    from modelpress.data.samples import AXIS_SIZES_KEY, Dataset, load_dataset, sample_inputs
    from modelpress.evaluation.comparison import check_import, compare_outputs
    from modelpress.evaluation.criteria import (
        Bounds,
        Criterion,
        Judgement,
        MissBound,
        infer_criteria,
        judge,
        lower_is_better,
    )
    from modelpress.evaluation.text import decoder_sample, greedy_generate, perplexity
    from modelpress.io.framework_bridge import (
        choose_loss,
        fit,
        held_out_scores,
        kd_loss,
        to_torch,
        update_weights,
    )
    from modelpress.ir.builder import GraphBuilder, Out
    from modelpress.ir.layers import WEIGHTED_OPS, WeightedLayer, recurrent_refusals
    from modelpress.ir.model import Model, type_initializers
    from modelpress.ir.opsets import ensure_opset
    from modelpress.ir.provenance import Provenance
    from modelpress.packing.container import MAGIC as PACK_MAGIC
    from modelpress.packing.container import read_packed
    from modelpress.plugin.adapter import Adapter
    from modelpress.plugin.codec import Codec, ElementType, TensorInfo, numpy_dtype
    from modelpress.plugin.hookspecs import hookimpl
    from modelpress.plugin.methods import (
        BUILTIN_KINDS,
        Kind,
        Method,
        Options,
        PassContext,
        TextFloor,
    )
    from modelpress.plugin.registry import current_registry
    from modelpress.plugin.tuning import TuneStage, Tuning
    from modelpress.runtime.activations import (
        ActivationCollector,
        TensorStats,
        activation_stats,
        calibration_batch,
    )
    from modelpress.runtime.import_check import normalize_on_import
    from modelpress.runtime.session import (
        make_session,
        proto_tensor_bytes,
        run,
        run_dataset,
        with_outputs,
    )

# NOTE: each name and (module, name there): imported on first use (PEP 562), so a plugin that imports
# Codec and hookimpl (a codec plugin: what `modelpress unpack` loads) imports no onnx, onnx-ir or ONNX Runtime
_API: dict[str, tuple[str, str]] = {
    "DataError": ("modelpress.base.errors", "DataError"),
    "InvalidModelError": ("modelpress.base.errors", "InvalidModelError"),
    "ModelpressError": ("modelpress.base.errors", "ModelpressError"),
    "OptionsError": ("modelpress.base.errors", "OptionsError"),
    "PluginError": ("modelpress.base.errors", "PluginError"),
    "UnsafeExternalDataError": ("modelpress.base.errors", "UnsafeExternalDataError"),
    "UnsupportedModelError": ("modelpress.base.errors", "UnsupportedModelError"),
    "VerificationError": ("modelpress.base.errors", "VerificationError"),
    "one_line": ("modelpress.base.errors", "one_line"),
    "progress_bar": ("modelpress.base.progress", "progress_bar"),
    "AXIS_SIZES_KEY": ("modelpress.data.samples", "AXIS_SIZES_KEY"),
    "Dataset": ("modelpress.data.samples", "Dataset"),
    "load_dataset": ("modelpress.data.samples", "load_dataset"),
    "sample_inputs": ("modelpress.data.samples", "sample_inputs"),
    "check_import": ("modelpress.evaluation.comparison", "check_import"),
    "compare_outputs": ("modelpress.evaluation.comparison", "compare_outputs"),
    "Bounds": ("modelpress.evaluation.criteria", "Bounds"),
    "Criterion": ("modelpress.evaluation.criteria", "Criterion"),
    "Judgement": ("modelpress.evaluation.criteria", "Judgement"),
    "MissBound": ("modelpress.evaluation.criteria", "MissBound"),
    "infer_criteria": ("modelpress.evaluation.criteria", "infer_criteria"),
    "judge": ("modelpress.evaluation.criteria", "judge"),
    "lower_is_better": ("modelpress.evaluation.criteria", "lower_is_better"),
    "decoder_sample": ("modelpress.evaluation.text", "decoder_sample"),
    "greedy_generate": ("modelpress.evaluation.text", "greedy_generate"),
    "perplexity": ("modelpress.evaluation.text", "perplexity"),
    "choose_loss": ("modelpress.io.framework_bridge", "choose_loss"),
    "fit": ("modelpress.io.framework_bridge", "fit"),
    "held_out_scores": ("modelpress.io.framework_bridge", "held_out_scores"),
    "kd_loss": ("modelpress.io.framework_bridge", "kd_loss"),
    "to_torch": ("modelpress.io.framework_bridge", "to_torch"),
    "update_weights": ("modelpress.io.framework_bridge", "update_weights"),
    "GraphBuilder": ("modelpress.ir.builder", "GraphBuilder"),
    "Out": ("modelpress.ir.builder", "Out"),
    "WEIGHTED_OPS": ("modelpress.ir.layers", "WEIGHTED_OPS"),
    "WeightedLayer": ("modelpress.ir.layers", "WeightedLayer"),
    "recurrent_refusals": ("modelpress.ir.layers", "recurrent_refusals"),
    "Model": ("modelpress.ir.model", "Model"),
    "type_initializers": ("modelpress.ir.model", "type_initializers"),
    "ensure_opset": ("modelpress.ir.opsets", "ensure_opset"),
    "Provenance": ("modelpress.ir.provenance", "Provenance"),
    "PACK_MAGIC": ("modelpress.packing.format", "MAGIC"),
    "read_packed": ("modelpress.packing.reader", "read_packed"),
    "Adapter": ("modelpress.plugin.adapter", "Adapter"),
    "Codec": ("modelpress.plugin.codec", "Codec"),
    "ElementType": ("modelpress.plugin.codec", "ElementType"),
    "TensorInfo": ("modelpress.plugin.codec", "TensorInfo"),
    "numpy_dtype": ("modelpress.plugin.codec", "numpy_dtype"),
    "hookimpl": ("modelpress.plugin.hookspecs", "hookimpl"),
    "BUILTIN_KINDS": ("modelpress.plugin.methods", "BUILTIN_KINDS"),
    "Kind": ("modelpress.plugin.methods", "Kind"),
    "Method": ("modelpress.plugin.methods", "Method"),
    "Options": ("modelpress.plugin.methods", "Options"),
    "PassContext": ("modelpress.plugin.methods", "PassContext"),
    "TextFloor": ("modelpress.plugin.methods", "TextFloor"),
    "current_registry": ("modelpress.plugin.registry", "current_registry"),
    "TuneStage": ("modelpress.plugin.tuning", "TuneStage"),
    "Tuning": ("modelpress.plugin.tuning", "Tuning"),
    "ActivationCollector": ("modelpress.runtime.activations", "ActivationCollector"),
    "TensorStats": ("modelpress.runtime.activations", "TensorStats"),
    "activation_stats": ("modelpress.runtime.activations", "activation_stats"),
    "calibration_batch": ("modelpress.runtime.activations", "calibration_batch"),
    "normalize_on_import": ("modelpress.runtime.import_check", "normalize_on_import"),
    "make_session": ("modelpress.runtime.session", "make_session"),
    "proto_tensor_bytes": ("modelpress.runtime.session", "proto_tensor_bytes"),
    "run": ("modelpress.runtime.session", "run"),
    "run_dataset": ("modelpress.runtime.session", "run_dataset"),
    "with_outputs": ("modelpress.runtime.session", "with_outputs"),
}


def __getattr__(name: str) -> Any:
    where = _API.get(name)
    if where is None:
        raise AttributeError(f"module 'modelpress.plugin_api' has no attribute {name!r}")
    value = getattr(importlib.import_module(where[0]), where[1])
    globals()[name] = value  # NOTE: the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "AXIS_SIZES_KEY",
    "BUILTIN_KINDS",
    "PACK_MAGIC",
    "WEIGHTED_OPS",
    "ActivationCollector",
    "Adapter",
    "Bounds",
    "Codec",
    "Criterion",
    "DataError",
    "Dataset",
    "ElementType",
    "GraphBuilder",
    "InvalidModelError",
    "Judgement",
    "Kind",
    "Method",
    "MissBound",
    "Model",
    "ModelpressError",
    "Options",
    "OptionsError",
    "Out",
    "PassContext",
    "PluginError",
    "Provenance",
    "TensorInfo",
    "TensorStats",
    "TextFloor",
    "TuneStage",
    "Tuning",
    "UnsafeExternalDataError",
    "UnsupportedModelError",
    "VerificationError",
    "WeightedLayer",
    "activation_stats",
    "calibration_batch",
    "check_import",
    "choose_loss",
    "compare_outputs",
    "current_registry",
    "decoder_sample",
    "ensure_opset",
    "fit",
    "greedy_generate",
    "held_out_scores",
    "hookimpl",
    "infer_criteria",
    "judge",
    "kd_loss",
    "load_dataset",
    "lower_is_better",
    "make_session",
    "normalize_on_import",
    "numpy_dtype",
    "one_line",
    "perplexity",
    "progress_bar",
    "proto_tensor_bytes",
    "read_packed",
    "recurrent_refusals",
    "run",
    "run_dataset",
    "sample_inputs",
    "to_torch",
    "type_initializers",
    "update_weights",
    "with_outputs",
]
