"""Running one method on a model: option validation, isolation of the input, provenance, hooks."""

from __future__ import annotations

import time
import uuid
from typing import Any

import numpy as np
import onnx_ir as ir

from modelpress.base.errors import (
    DataError,
    ModelpressError,
    NoGainError,
    OptionsError,
    PluginError,
    UnknownMethodError,
    one_line,
)
from modelpress.ir.checks import dead_nodes, graph_problems
from modelpress.ir.model import Model, references_in_place
from modelpress.ir.provenance import PassRecord, figure_problem
from modelpress.plugin.config import env_defaults
from modelpress.plugin.methods import Method, Options, PassContext
from modelpress.plugin.registry import Registry, get_registry

__all__ = [
    "SIZE_KINDS",
    "apply",
    "check_result",
    "default_method",
    "distill",
    "model_bytes",
    "prune",
    "quantize",
]

# Kinds whose point is a smaller file: a result that is not smaller is no gain. NOTE: kept for
# compatibility; the registry's ``Kind.smaller`` is what is used.
SIZE_KINDS = frozenset({"quantize"})
# NOTE: below this, the serialised size (weights + graph) is measured; above, the graph's
# overhead is negligible next to the weights and serialising would hold a second copy.
_SERIALISE_LIMIT = 64_000_000


def _fingerprint(model: Model) -> tuple[object, ...]:
    """Cheap structural identity of a model: its nodes, their wiring and initializer tensors."""
    graph = model.ir.graph
    nodes = tuple(
        (id(n), n.op_type, tuple(id(v) for v in n.inputs), tuple(v.name for v in n.outputs))
        for n in graph
    )
    inits = tuple((name, id(v.const_value)) for name, v in graph.initializers.items())
    return nodes, inits, tuple(id(v) for v in graph.inputs), tuple(id(v) for v in graph.outputs)


def model_bytes(model: Model) -> int:
    """The size the model's file will have (serialised), or its weight bytes for big models."""
    weights = model.weight_bytes()
    if weights > _SERIALISE_LIMIT:
        return weights
    # NOTE: external tensors serialise as references: their bytes (in the data file) count too.
    external = sum(
        int(v.const_value.nbytes)
        for g in model.ir.graphs()
        for v in g.initializers.values()
        if isinstance(v.const_value, ir.ExternalTensor)
    )
    return _serialised_size(model.ir) + external


# NOTE: a main-graph initializer of at least this many bytes is sized, not serialised
_SIZED_BYTES = 1 << 12
_PLACEHOLDER = "modelpress-sized"


def _varint_len(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def _raw_data_bytes(tensor: ir.TensorProtocol) -> int | None:
    """How many bytes of values ``serialize_tensor_into`` writes as ``raw_data`` beside the name, type and
    dims (the whole TensorProto's size, negated, for a tensor it copies from its own proto); None: it writes
    more than that (a doc string, metadata, strings, an external reference) or is too small to matter."""
    if tensor.metadata_props or tensor.nbytes < _SIZED_BYTES:
        return None
    if isinstance(tensor, ir.TensorProtoTensor):
        # NOTE: serialised by CopyFrom: its own encoding (int64_data, float_data, ...), its own size
        return -int(tensor.raw.ByteSize())
    if type(tensor) in (ir.Tensor, ir.PackedTensor) and tensor.dtype != ir.DataType.STRING:
        return None if tensor.doc_string else int(tensor.nbytes)
    return None


def _serialised_size(model: ir.Model) -> int:
    """``serialize_model(model).ByteSize()``, exactly, without copying the large weights: each large
    initializer of the main graph is serialised as an empty reference (name, type, dims), and the size
    its values add (a ``raw_data`` field, or its own proto's) is added to the sizes that enclose it."""
    graph = model.graph
    sized: dict[str, int] = {}
    chosen: list[ir.Value] = []
    for value in graph.initializers.values():
        tensor = value.const_value
        if tensor is None or not value.name:
            continue
        # NOTE: as serialize_graph_into does to every initializer (a TensorProtoTensor's proto too)
        tensor.name = value.name
        size = _raw_data_bytes(tensor)
        if size is None:
            continue
        sized[value.name or ""] = size
        chosen.append(value)
    with references_in_place(chosen, _PLACEHOLDER):
        proto = ir.serde.serialize_model(model)
    added = 0
    for tensor_proto in proto.graph.initializer:
        if tensor_proto.name not in sized or tensor_proto.data_location != tensor_proto.EXTERNAL:
            continue
        tensor_proto.ClearField("external_data")
        tensor_proto.ClearField("data_location")
        light, raw = tensor_proto.ByteSize(), sized[tensor_proto.name]
        full = -raw if raw < 0 else light + 1 + _varint_len(raw) + raw
        added += full - light + _varint_len(full) - _varint_len(light)
    graph_light = proto.graph.ByteSize()
    return (
        int(proto.ByteSize()) + added + _varint_len(graph_light + added) - _varint_len(graph_light)
    )


def _content(model: Model) -> tuple[object, ...]:
    """What a method can change: nodes (op, wiring by name, attributes) and weight tensors.
    A clone shares the tensors, so an untouched weight keeps its identity."""
    nodes = tuple(
        (
            n.op_type,
            n.domain,
            tuple(v.name if v is not None else None for v in n.inputs),
            tuple(v.name for v in n.outputs),
            tuple(
                (k, repr(a.value))
                for k, a in n.attributes.items()
                if a.type not in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
            ),
        )
        for n in model.ir.graph.all_nodes()
    )
    return (
        nodes,
        tuple(v.name for v in model.graph.inputs),
        tuple(v.name for v in model.graph.outputs),
    )


def _tensors(model: Model) -> dict[str, Any]:
    return {name: v.const_value for g in model.ir.graphs() for name, v in g.initializers.items()}


def _same_weights(before: dict[str, Any], after: dict[str, Any]) -> bool:
    """Same names and values. A clone shares tensors, so only replaced ones are compared by value."""
    if before.keys() != after.keys():
        return False
    for name, old in before.items():
        new = after[name]
        if new is old:
            continue
        if (
            old is None
            or new is None
            or old.dtype != new.dtype
            or tuple(old.shape) != tuple(new.shape)
        ):
            return False
        if not np.array_equal(old.numpy(), new.numpy()):
            return False
    return True


def _no_gain(
    smaller: bool,
    model: Model,
    result: Model,
    before: tuple[tuple[object, ...], dict[str, Any]],
    figures: dict[str, Any],
) -> str | None:
    """Why ``result`` is no gain over ``model``, or None; size figures go into ``figures``."""
    if _content(result) == before[0] and _same_weights(before[1], _tensors(result)):
        return "the result is identical to the input (the method changed nothing)"
    if smaller:
        size_in, size_out = model_bytes(model), model_bytes(result)
        figures.update({"model_bytes_before": size_in, "model_bytes_after": size_out})
        if size_out >= size_in:
            return (
                f"the result ({size_out:,} bytes) is not smaller than the input ({size_in:,} bytes)"
            )
    return None


def _smaller(registry: Registry, kind: str) -> bool:
    """Whether results of ``kind`` must be smaller files (a method passed directly may bring a new kind)."""
    try:
        return registry.kind(kind).smaller
    except UnknownMethodError:
        return False


def apply(
    model: Model,
    method: str | Method,
    *,
    kind: str | None = None,
    options: dict[str, Any] | Options | None = None,
    calibration: Any = None,
    train: Any = None,
    eval: Any = None,
    show_progress: bool = True,
    registry: Registry | None = None,
    extra: dict[str, Any] | None = None,
    allow_no_gain: bool = False,
    stage: str | None = None,
    **more_options: Any,
) -> Model:
    """Apply a registered method to ``model`` and return the result; ``model`` is not changed.

    ``options`` (or keyword arguments) are validated against the method's schema before any
    work starts. Errors raised inside a plugin become :class:`PluginError` naming the plugin and
    method. ``extra`` carries objects a method needs that are not options (e.g. a student model).
    The result's provenance records the method, its options, its plugin and version,
    its wall time and the figures it reported.

    A result with no gain (a quantize method's result not smaller than its input, or any method
    that changed nothing) raises :class:`NoGainError` saying so in one line, unless
    ``allow_no_gain=True``: then it is returned and ``figures["no_gain"]`` says why.

    A data file modelpress does not read itself (not ``.npz``/``.npy``) is offered to the plugins'
    ``modelpress_load_data`` hook with ``model`` (the Hugging Face adapter reads a ``.txt``/``.jsonl``
    corpus with the checkpoint's tokenizer). The data the method declares it needs
    (``Method.requires`` / ``requires_if``) is checked before
    it runs: missing data is one :class:`DataError` naming the method, the data and how to give it.
    Every result is checked before it is returned: the ONNX checker on each node, topological
    order, no dangling input (a value nothing provides) and no dead node (one whose outputs reach
    no graph output); a failure is a :class:`PluginError` naming the plugin and the method.

    Observers get a fresh ``pass_id`` for each call and ``stage`` (the recipe stage's name when
    :func:`modelpress.compress` runs it; None otherwise).
    """
    registry = registry or get_registry()
    if not isinstance(model, Model):
        raise TypeError(
            f"apply() takes a modelpress.Model, not {type(model).__name__}; use modelpress.load() first"
        )
    m = method if isinstance(method, Method) else registry.method(method, kind)
    raw = dict(options.model_dump() if isinstance(options, Options) else options or {})
    raw.update(more_options)
    opts = _validate(m, raw)
    # NOTE: a data file of a type only a plugin reads (a text corpus) becomes arrays for this model here
    calibration, train, eval = (
        registry.load_data(data, model, role)
        for data, role in ((calibration, "calibration"), (train, "training"), (eval, "evaluation"))
    )
    _check_needs(m, opts, {"calibration": calibration, "train": train, "eval": eval})
    ctx = PassContext(
        calibration=calibration,
        train=train,
        eval=eval,
        show_progress=show_progress,
        extra=dict(extra or {}),
        registry=registry,
    )

    content_before = (_content(model), _tensors(model))
    where = {"pass_id": uuid.uuid4().hex[:12], "stage": stage}
    result, seconds = _run_pass(m, model, opts, ctx, where)
    _check_figures(m, ctx.figures)
    no_gain = _no_gain(_smaller(registry, m.kind), model, result, content_before, ctx.figures)
    if no_gain is not None:
        message = f"{m.qualname}: no gain on {model.name!r}: {no_gain}"
        if not allow_no_gain:
            error = NoGainError(
                f"{message}; nothing is written (allow_no_gain=True / --allow-no-gain accepts it)"
            )
            registry.hook.modelpress_pass_error(method=m, model=model, error=error, **where)
            raise error
        ctx.figures["no_gain"] = no_gain
    record = _record(m, model, result, opts, seconds, ctx.figures)
    registry.hook.modelpress_pass_finish(method=m, model=result, record=record, **where)
    return result


def _validate(m: Method, raw: dict[str, Any]) -> Options:
    """``raw`` validated, with the plugin's defaults from the environment under it (explicit options win)."""
    defaults = {k: v for k, v in env_defaults(m).items() if k not in raw}
    try:
        return m.validate_options({**{k: value for k, (_, value) in defaults.items()}, **raw})
    except OptionsError as exc:
        if not defaults:
            raise
        given = ", ".join(f"{variable}={value!r}" for variable, value in defaults.values())
        raise OptionsError(f"{exc} (defaults from the environment: {given})") from None


def _label(m: Method) -> str:
    """How errors name a method: ``kind/name (plugin NAME VERSION)``."""
    return (
        f"{m.qualname} (plugin {' '.join(filter(None, [m.plugin or 'local', m.plugin_version]))})"
    )


def _run_pass(
    m: Method, model: Model, opts: Options, ctx: PassContext, where: dict[str, Any]
) -> tuple[Model, float]:
    """Run the method (on a clone when it mutates) between the start and error hooks; returns the
    result, checked against the method's ``mutates`` contract, and the wall time."""
    registry = ctx.registry
    label = _label(m)
    work = model.clone() if m.mutates else model
    before = None if m.mutates else _fingerprint(model)
    registry.hook.modelpress_pass_start(method=m, model=model, options=opts, **where)
    start = time.perf_counter()
    try:
        returned = m.apply(work, opts, ctx)
    except (KeyboardInterrupt, ModelpressError) as exc:
        registry.hook.modelpress_pass_error(method=m, model=model, error=exc, **where)
        if isinstance(exc, ModelpressError) and m.plugin and m.plugin not in str(exc):
            exc.args = (f"{label}: {exc}", *exc.args[1:])
        raise
    except Exception as exc:
        registry.hook.modelpress_pass_error(method=m, model=model, error=exc, **where)
        raise PluginError(
            f"{label} failed: {type(exc).__name__}: {one_line(exc)}", plugin=m.plugin, method=m.name
        ) from exc
    seconds = time.perf_counter() - start
    result = _honours_contract(m, model, work, returned, before)
    try:
        check_result(m, model, result)
    except PluginError as exc:
        registry.hook.modelpress_pass_error(method=m, model=model, error=exc, **where)
        raise
    return result, seconds


# How a caller gives each kind of data: the API argument, and the CLI flag.
_HOW_TO_GIVE = {
    "calibration": "calibration=... (CLI: --calib FILE)",
    "train": "train=... (prune()/distill(): data=...; CLI: --data FILE)",
    "eval": "eval=... (CLI: --eval FILE)",
}
_DATA_WORDS = {"calibration": "calibration", "train": "training", "eval": "evaluation"}


def _check_needs(m: Method, opts: Options, given: dict[str, Any]) -> None:
    """The data ``m`` declares it needs with ``opts`` is given; else one error naming what is missing."""
    missing = sorted(need for need in m.data_needs(opts) if given.get(need) is None)
    if not missing:
        return
    raw = opts.model_dump()
    parts = []
    for need in missing:
        why = next(
            (
                f" (option {opt!r} is set)"
                for opt, data in m.requires_if
                if data == need and raw.get(opt) and need not in m.requires
            ),
            "",
        )
        parts.append(f"{_DATA_WORDS[need]} data{why}: give {_HOW_TO_GIVE[need]}")
    raise DataError(f"{m.qualname} needs {'; and '.join(parts)}")


def check_result(m: Method, model: Model, result: Model) -> None:
    """``result`` of ``m`` on ``model`` is a valid graph (see :mod:`modelpress.ir.checks`); else a
    :class:`PluginError` naming the plugin and the method. Dead nodes ``model`` already had are not blamed."""
    known = frozenset(tuple(v.name for v in n.outputs) for n in dead_nodes(model.ir.graph))
    problems = graph_problems(result.ir, known_dead=known)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise PluginError(
            f"{_label(m)} returned an invalid model: {'; '.join(problems[:3])}{more}; fix the plugin "
            "(build nodes with model.builder(), which wires and names them, and remove what no output needs)",
            plugin=m.plugin,
            method=m.name,
        )


def _honours_contract(
    m: Method, model: Model, work: Model, returned: Any, before: tuple[object, ...] | None
) -> Model:
    """The pass's result, if the method kept its ``mutates`` promise: edit the clone it was given
    and return None (mutates=True), or return a new model and leave its input alone (mutates=False)."""
    label = _label(m)
    if m.mutates:
        if returned is not None and returned is not work:
            raise PluginError(
                f"{label} declares mutates=True but returned a new model; edit the model it was given and return None",
                plugin=m.plugin,
                method=m.name,
            )
        return work
    if not isinstance(returned, Model):
        raise PluginError(
            f"{label} declares mutates=False but returned {type(returned).__name__}, not a new modelpress.Model",
            plugin=m.plugin,
            method=m.name,
        )
    if returned is model or _fingerprint(model) != before:
        raise PluginError(
            f"{label} declares mutates=False but changed the model it was given; declare mutates=True or work on model.clone()",
            plugin=m.plugin,
            method=m.name,
        )
    return returned


def _check_figures(m: Method, figures: dict[str, Any]) -> None:
    for key, value in figures.items():
        problem = figure_problem(value)
        if problem is not None:
            raise PluginError(
                f"{_label(m)} reported figure {key!r} as {problem}; figures must be JSON-serialisable",
                plugin=m.plugin,
                method=m.name,
            )


def _record(
    m: Method, model: Model, result: Model, opts: Options, seconds: float, figures: dict[str, Any]
) -> PassRecord:
    """Record the pass in the result's provenance; the result's reference is the input's (or the input)."""
    options = opts.model_dump(mode="json")
    record = PassRecord(
        kind=m.kind,
        method=m.name,
        options=options,
        at_defaults=frozenset(options) - set(opts.model_dump(mode="json", exclude_defaults=True)),
        plugin=m.plugin or "local",
        plugin_version=m.plugin_version,
        seconds=round(seconds, 4),
        figures=dict(figures),
    )
    result.provenance = model.provenance.with_pass(record)
    result.reference = model.reference if model.reference is not None else model
    result.path = model.path
    return record


def default_method(kind: str, registry: Registry | None = None) -> Method:
    """The installed method of ``kind`` that declares ``kind_default=True`` (what the kind's shortcut runs
    when no method is named); an error when none or several do."""
    registry = registry or get_registry()
    chosen = [m for m in registry.methods(kind) if m.kind_default]
    if len(chosen) == 1:
        return chosen[0]
    if chosen:
        names = ", ".join(f"{m.qualname} (plugin {m.plugin})" for m in chosen)
        raise UnknownMethodError(
            f"several methods declare themselves the default of kind {kind!r}: {names}; name the method to use"
        )
    names = ", ".join(m.name for m in registry.methods(kind)) or "none installed"
    raise UnknownMethodError(
        f"no installed {kind} method declares itself the kind's default; name one ({names})"
    )


def quantize(
    model: Model, method: str | None = None, *, calibration: Any = None, **options: Any
) -> Model:
    """``apply(model, method, kind="quantize", ...)``: quantize with an installed method
    (``int8-static``, ``int8-dynamic``, ``int4-weight-only``, ``int8-weight-only``, ``fp16``,
    ``codebook``, or one from a plugin; by default the kind's default method, ``int8-static``).
    ``calibration`` is data in the usual convention."""
    method = method or default_method("quantize", options.get("registry"))
    return apply(model, method, kind="quantize", calibration=calibration, **options)


def prune(model: Model, method: str | None = None, *, data: Any = None, **options: Any) -> Model:
    """``apply(model, method, kind="prune", ...)``: prune with an installed method (``magnitude``,
    ``n:m``, ``channel``, or one from a plugin; by default the kind's default method, ``magnitude``).
    ``data`` (inputs and optionally ``labels``) feeds fine-tuning and the data-driven criteria."""
    method = method or default_method("prune", options.get("registry"))
    return apply(model, method, kind="prune", train=data, **options)


def distill(teacher: Model, student: Any = "auto", *, data: Any = None, **options: Any) -> Model:
    """Knowledge distillation (the distill kind's default method, ``kd``, unless ``method=`` names
    another): train ``student`` to match ``teacher`` on ``data`` (inputs, optionally ``labels``).
    ``student`` is a model (anything :func:`modelpress.load` accepts) or ``"auto"``: the teacher
    narrowed to ``width`` by channel pruning. Returns the trained student; its reference is the
    teacher. ``registry=`` (among the options) is the one the student is loaded and the pass run with."""
    from modelpress.plugin.loading import load

    method = options.pop("method", None) or default_method("distill", options.get("registry"))
    extra = {}
    if isinstance(student, str) and student == "auto":
        options.setdefault("student", "auto")
    else:
        extra["student"] = load(
            student, registry=options.get("registry")
        )  # NOTE: the adapters of the registry the pass runs in
        options.setdefault("student", "given")
    return apply(teacher, method, kind="distill", train=data, extra=extra, **options)
