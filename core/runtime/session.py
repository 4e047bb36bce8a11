"""Running models in ONNX Runtime."""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from modelpress.base.errors import InvalidModelError
from modelpress.ir.counting import weight_bytes as counted_weight_bytes
from modelpress.ir.model import Model, references_in_place

__all__ = [
    "FILE_FROM_BYTES",
    "INLINE_LIMIT_BYTES",
    "bound_malloc",
    "collect_garbage_if_grown",
    "external_folders",
    "in_memory_bytes",
    "make_session",
    "proto_tensor_bytes",
    "proto_weight_bytes",
    "release_free_memory",
    "run",
    "run_dataset",
    "weight_bytes",
    "with_outputs",
]

# NOTE: protobuf cannot serialise more than 2 GiB; past this, go through a file with external data.
INLINE_LIMIT_BYTES = 1_500_000_000
# NOTE: past this many bytes of weights in memory (and none in external data), a session is built
# from a temporary file with external data, which ORT memory-maps: the weights are held once (the
# file's pages) where arrays handed over by reference are copied by ORT (MiniLM: 90 MB less at the
# peak of each session, for ~0.1 s of writing)
FILE_FROM_BYTES = 1 << 23


def _options(
    threads: int | None,
    prepack: bool = True,
    spin: bool = True,
    arena: bool | None = None,
    fold: bool = True,
) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not fold:
        # NOTE: ORT's constant folding runs the constant subgraphs once at load with the kernels that
        # would run them anyway (the outputs are the same), at a transient cost of about the model's
        # size again: silero-vad's session peaks 13 MB above its base with it, 9 MB without
        opts.add_session_config_entry(
            "optimization.disable_specified_optimizers", "ConstantFolding"
        )
    if not spin:
        # NOTE: ORT's worker threads busy-wait between ops by default: for sessions that sweep data as
        # work (calibration, judging candidates) that burns a third of the CPU time for no gain.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not (spin if arena is None else arena):
        # NOTE: no memory arena (by default for sweeps): it grows in power-of-two chunks it never gives
        # back, so a sweep's session would hold up to twice its largest run's activations for its whole life
        opts.enable_cpu_mem_arena = False
    if not prepack:
        # NOTE: no MLAS pre-packing: the session is built in milliseconds and reads its external
        # weights from ORT's memory map instead of packed copies; right for a few runs (verification).
        opts.add_session_config_entry("session.disable_prepacking", "1")
    # NOTE: parallel tune trials / batch jobs each get one CPU: their sessions must not each take every core
    threads = threads or int(os.environ.get("MODELPRESS_THREADS", "0") or 0) or None
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return opts


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    # ORT prefixes messages with "[ONNXRuntimeError] : 1 : FAIL : "; keep the informative part.
    return " ".join(text.splitlines()[:2])[:600]


def external_folders(model: ir.Model) -> set[str]:
    """The folders the model's external-data tensors are read from (``base_dir`` of each)."""
    return {
        os.fspath(value.const_value.base_dir)
        for graph in model.graphs()
        for value in graph.initializers.values()
        if isinstance(value.const_value, ir.ExternalTensor)
    }


def in_memory_bytes(model: Model) -> int:
    """Bytes of the initializers held in memory (external-data tensors excluded)."""
    return sum(
        int(v.const_value.nbytes)
        for graph in model.ir.graphs()
        for v in graph.initializers.values()
        if v.const_value is not None and not isinstance(v.const_value, ir.ExternalTensor)
    )


# NOTE: numeric types numpy holds as they are (no int4, bfloat16 or float8 reinterpretation)
_BY_REFERENCE_TYPES = frozenset(
    {
        ir.DataType.FLOAT,
        ir.DataType.FLOAT16,
        ir.DataType.DOUBLE,
        ir.DataType.INT8,
        ir.DataType.UINT8,
        ir.DataType.INT16,
        ir.DataType.UINT16,
        ir.DataType.INT32,
        ir.DataType.INT64,
    }
)
_BY_REFERENCE_BYTES = 1 << 16
_IN_MEMORY = "modelpress-in-memory"


@contextlib.contextmanager
def _weights_by_reference(graph: ir.Graph, opts: ort.SessionOptions) -> Iterator[list[np.ndarray]]:
    """While serialising: the large in-memory initializers of ``graph`` stand as external-data
    references, and ``opts`` hands ORT their arrays (``add_external_initializers``), so building a
    session holds no serialised copy of the weights beside the model (a 90 MB encoder: 180 MB less
    at the peak). Yields the arrays, which must outlive the session."""
    chosen: list[ir.Value] = []
    names, values, arrays = [], [], []
    for value in graph.initializers.values():
        tensor = value.const_value
        if (
            tensor is None
            or isinstance(tensor, ir.ExternalTensor)
            or tensor.dtype not in _BY_REFERENCE_TYPES
            or tensor.nbytes < _BY_REFERENCE_BYTES
            or value.is_graph_input()
            or not value.name
        ):
            continue
        array = np.ascontiguousarray(tensor.numpy())
        arrays.append(array)
        names.append(value.name)
        values.append(ort.OrtValue.ortvalue_from_numpy(array))
        chosen.append(value)
    with references_in_place(chosen, _IN_MEMORY):
        if names:
            opts.add_external_initializers(names, values)
        yield arrays


def proto_tensor_bytes(tensor: onnx.TensorProto) -> int:
    """The bytes a TensorProto's values take, from its dims and data type. NOTE: not ``ByteSize()``,
    which serialises the tensor (a transient copy of its weights) to count them; strings, and
    types onnx_ir does not know, are counted that way still."""
    try:
        bits = ir.DataType(tensor.data_type).bitwidth
    except (ValueError, TypeError, NotImplementedError):
        return tensor.ByteSize()
    count = 1
    for dim in tensor.dims:
        count *= max(int(dim), 0)
    return -(-count * bits // 8)


def _light_proto(proto: onnx.ModelProto, place) -> bytes:  # type: ignore[no-untyped-def]
    """``proto`` serialised with its large main-graph weights as external-data references (``proto`` is
    not changed): ``place(tensor)`` puts each one somewhere and returns its (location, offset, length)."""
    light = onnx.ModelProto()
    _copy_fields(proto, light, skip="graph")
    _copy_fields(proto.graph, light.graph, skip="initializer")
    inputs = {v.name for v in proto.graph.input}
    for tensor in proto.graph.initializer:
        light_tensor = light.graph.initializer.add()
        if not _proto_by_reference(tensor, inputs):
            light_tensor.CopyFrom(tensor)
            continue
        location, offset, length = place(tensor)
        light_tensor.name, light_tensor.data_type = tensor.name, tensor.data_type
        light_tensor.dims.extend(tensor.dims)
        light_tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, text in (("location", location), ("offset", str(offset)), ("length", str(length))):
            light_tensor.external_data.add(key=key, value=text)
    return light.SerializeToString()


def _proto_by_reference(tensor: onnx.TensorProto, inputs: set[str]) -> bool:
    return not (
        tensor.data_location == onnx.TensorProto.EXTERNAL
        or proto_tensor_bytes(tensor) < _BY_REFERENCE_BYTES
        or tensor.data_type not in _BY_REFERENCE_TYPES
        or tensor.name in inputs
        or not tensor.name
    )


def _tensor_bytes(tensor: onnx.TensorProto) -> bytes:
    """The tensor's values as external data holds them (little-endian), one copy made."""
    if tensor.HasField("raw_data") and sys.byteorder == "little":
        return tensor.raw_data
    return (
        onnx.numpy_helper.to_array(tensor)
        .astype(onnx.numpy_helper.to_array(tensor).dtype.newbyteorder("<"))
        .tobytes()
    )


def _proto_session(
    proto: onnx.ModelProto, opts: ort.SessionOptions, providers: list[str]
) -> ort.InferenceSession:
    """A session for a ModelProto whose large weights reach ORT without a serialised copy: past
    :data:`FILE_FROM_BYTES`, through a temporary external-data file ORT memory-maps, else as arrays
    handed over by reference (``add_external_initializers``, which ORT copies)."""
    inputs = {v.name for v in proto.graph.input}
    large = sum(
        proto_tensor_bytes(t) for t in proto.graph.initializer if _proto_by_reference(t, inputs)
    )
    if not large:
        # NOTE: nothing to hand over (weights in Constant nodes or subgraphs, as silero's If branches
        # hold them): serialised as it is, without the light copy of every node that is then serialised
        return ort.InferenceSession(proto.SerializeToString(), opts, providers=providers)
    if large < FILE_FROM_BYTES or any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer
    ):
        names, values, arrays = [], [], []

        def hand_over(tensor: onnx.TensorProto) -> tuple[str, int, int]:
            array = np.ascontiguousarray(onnx.numpy_helper.to_array(tensor))
            arrays.append(array)
            names.append(tensor.name)
            values.append(ort.OrtValue.ortvalue_from_numpy(array))
            return _IN_MEMORY, 0, array.nbytes

        data = _light_proto(proto, hand_over)
        if names:
            opts.add_external_initializers(names, values)
        session = ort.InferenceSession(data, opts, providers=providers)
        session._modelpress_weights = arrays  # NOTE: ORT may read them for the session's life
        return session
    tmp = Path(tempfile.mkdtemp(prefix="modelpress-session-"))
    try:
        with open(tmp / "model.onnx.data", "wb") as out:

            def write(tensor: onnx.TensorProto) -> tuple[str, int, int]:
                out.write(b"\0" * (-out.tell() % 4096))  # NOTE: page-aligned, so ORT can map it
                offset = out.tell()
                length = out.write(_tensor_bytes(tensor))
                return "model.onnx.data", offset, length

            (tmp / "model.onnx").write_bytes(_light_proto(proto, write))
        return ort.InferenceSession(str(tmp / "model.onnx"), opts, providers=providers)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _copy_fields(source, target, skip: str) -> None:  # type: ignore[no-untyped-def]
    for desc, value in source.ListFields():
        if desc.name == skip:
            continue
        # NOTE: protobuf >= 5.29 names it is_repeated (label is gone in 7)
        if desc.is_repeated if hasattr(desc, "is_repeated") else desc.label == desc.LABEL_REPEATED:
            getattr(target, desc.name).extend(value)
        elif desc.message_type is not None:
            getattr(target, desc.name).CopyFrom(value)
        else:
            setattr(target, desc.name, value)


def make_session(
    model: Model | onnx.ModelProto | str | os.PathLike[str] | bytes,
    *,
    threads: int | None = None,
    prepack: bool = True,
    spin: bool = True,
    arena: bool | None = None,
    fold: bool = True,
) -> ort.InferenceSession:
    """An ORT CPU session for a model, a file (a ``.mpk`` pack is decoded in memory), an
    ``onnx.ModelProto`` (not changed; its large weights go to ORT by reference) or a serialised
    ``ModelProto`` (``bytes``). Every ORT session of modelpress is made here.

    ``threads``: intra-op threads (one inter-op thread); default ``$MODELPRESS_THREADS``, else
    ORT's choice (every core).

    ``prepack=False`` skips ORT's weight pre-packing: building the session of a multi-GB model
    takes milliseconds instead of tens of seconds and no packed copy of the weights is made,
    at the price of slower runs; for sessions that run a few samples (verification).

    ``spin=False`` stops ORT's idle worker threads from busy-waiting: for sessions that run data
    through as part of a computation (calibration, scoring candidates), where CPU time matters
    more than the last millisecond of latency; it also turns ORT's memory arena off, unless
    ``arena=True`` keeps it (for a sweep of a few runs in a process whose heap keeps what it frees:
    the arena's blocks are reused run after run, where freed buffers would stay resident).

    ``fold=False`` turns ORT's constant folding off: the session's outputs are the same (the constant
    subgraphs run at each run, on the kernels folding would have used), its build holds no folded
    copies; for sessions that check a model on a few inputs (the import check, the reference of
    export's verification), whose build is most of their cost. Not for a quantized file run as users
    run it: ORT's QDQ fusions need the Mul of scales that gives an int32 bias its scale folded
    first. ORT's own calibrator goes further and turns every optimisation off.

    A model whose weights are (partly) in external data is handed to ORT as bytes that keep the
    external references, with ORT told the folder they live in: nothing is copied, and the
    references do not resolve against the working directory. A model with more than
    ~1.5 GB of weights in memory, or external data in several folders, goes through a
    temporary file, and so does one with over :data:`FILE_FROM_BYTES` (8 MB) of weights, all in
    memory: ORT memory-maps the file instead of copying arrays handed to it.
    """
    if isinstance(model, (str, os.PathLike)) and os.fspath(model).lower().endswith(".mpk"):
        from modelpress.plugin.loading import load

        model = load(model)
    opts = _options(threads, prepack, spin, arena, fold)
    providers = ["CPUExecutionProvider"]
    if not _BOUND:  # NOTE: the model is sized only until the process has decided (bound_malloc)
        bound_malloc(weight_bytes(model))
    collect_garbage_if_grown()
    release_free_memory()  # NOTE: what earlier sessions and arrays freed goes back before the next big allocation
    try:
        if isinstance(model, bytes):
            return ort.InferenceSession(model, opts, providers=providers)
        if isinstance(model, onnx.ModelProto):
            return _proto_session(model, opts, providers)
        if not isinstance(model, Model):
            return ort.InferenceSession(os.fspath(model), opts, providers=providers)
        folders = external_folders(model.ir)
        in_memory = in_memory_bytes(model)
        if (
            in_memory < INLINE_LIMIT_BYTES
            and len(folders) <= 1
            and "" not in folders
            and (in_memory < FILE_FROM_BYTES or folders)
        ):
            if folders:
                opts.add_session_config_entry(
                    "session.model_external_initializers_file_folder_path", folders.pop()
                )
            with (
                model.without_inferred_shapes() as plain,
                _weights_by_reference(plain.graph, opts) as arrays,
            ):
                # NOTE: what the exported file will hold; its large weights go to ORT as OrtValues over their arrays
                data = ir.serde.serialize_model(plain).SerializeToString()
            session = ort.InferenceSession(data, opts, providers=providers)
            session._modelpress_weights = arrays  # NOTE: ORT may read them for the session's life
            return session
        tmp = Path(tempfile.mkdtemp(prefix="modelpress-session-"))
        try:
            with model.without_inferred_shapes() as plain:
                ir.save(plain, tmp / "model.onnx", external_data="model.onnx.data")
            return ort.InferenceSession(str(tmp / "model.onnx"), opts, providers=providers)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except Exception as exc:
        name = (
            model.name
            if isinstance(model, Model)
            else "<in-memory model>"
            if isinstance(model, (bytes, onnx.ModelProto))
            else os.fspath(model)
        )
        raise InvalidModelError(
            f"ONNX Runtime cannot load model {name!r}: {_first_line(exc)}"
        ) from exc


@functools.cache
def _libc() -> Any:
    """glibc (with ``malloc_trim`` and ``mallopt``), or None (another C library)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:  # pragma: no cover - not glibc
        return None


# glibc's mallopt parameters, and the values modelpress sets (see bound_malloc)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 128 * 1024
TRIM_THRESHOLD_BYTES = 1 << 20
# Models with at most this many bytes of weights get bounded memory (see bound_malloc)
SMALL_MODEL_BYTES = 2 << 20
MALLOC_ENV = "MODELPRESS_MALLOC"
_BOUND: list[bool] = []  # the process's decision, once made


def weight_bytes(model: object) -> int | None:
    """Bytes of a model's weights, initializers and ``Constant`` tensors in every graph (a
    :class:`Model` or ``onnx_ir.Model``, an ``onnx.ModelProto``), or the length of serialised bytes
    or of a file, without reading external data; None for what it cannot size."""
    if isinstance(model, Model):
        return model.weight_bytes()
    if isinstance(model, ir.Model):
        return counted_weight_bytes(model)
    if isinstance(model, onnx.ModelProto):
        return proto_weight_bytes(model.graph)
    if isinstance(model, bytes):
        return len(model)
    if isinstance(model, (str, os.PathLike)):
        with contextlib.suppress(OSError):
            return os.path.getsize(model)
    return None


def proto_weight_bytes(graph: onnx.GraphProto) -> int:
    """The bytes of the graph's tensors (initializers, Constant values; subgraphs included), from their
    dims: ``ByteSize()`` would serialise the whole model to count it."""
    total = sum(proto_tensor_bytes(t) for t in graph.initializer)
    for node in graph.node:
        for attr in node.attribute:
            total += sum(proto_tensor_bytes(t) for t in ([attr.t] if attr.HasField("t") else []))
            total += sum(proto_tensor_bytes(t) for t in attr.tensors)
            total += sum(proto_weight_bytes(g) for g in ([attr.g] if attr.HasField("g") else []))
            total += sum(proto_weight_bytes(g) for g in attr.graphs)
    return total


def bound_malloc(model_bytes: int | None = None) -> bool:
    """Whether this process's memory is bounded, decided once per process by the first model of
    known size (``model_bytes``; None leaves the decision to a later call): bounded for a model of
    at most :data:`SMALL_MODEL_BYTES` of weights, or for any with ``$MODELPRESS_MALLOC=bounded``,
    never with ``default``. Bounded, on glibc: blocks of 128 KiB and more (numpy arrays, ORT's
    buffers: its arena is off for sweeps) are mapped on their own and unmapped when freed, a
    heap gives back free memory above 1 MiB at its top, and :func:`collect_garbage_if_grown`
    collects dropped graphs.

    NOTE: glibc's default raises the mapping threshold to the largest block freed so far (up to
    32 MB): after the first calibration batch, the later batches' arrays come from the heaps of
    ORT's worker threads, whose freed holes stay resident (PP-OCR cls: 6 MB over its int8-static
    peak of ~140 MB, the sensitivity sweep 16 MB above its first run). Bounding costs a page
    fault per 4 KiB of every large block, in proportion to the activations a model produces:
    +20 % quantize CPU on MiniLM (90 MB of weights), +10 % on yolov8n (12 MB), where the few MB
    kept are a small share of a peak far below ORT's; a small model's peak is mostly those MB on
    top of the imports, and its runs are short (PP-OCR cls: 136 MB instead of 143, ORT static's
    142, for +13 % CPU; MTCNN ONet 122 instead of 140)."""
    if _BOUND:
        return _BOUND[0]
    setting = os.environ.get(MALLOC_ENV, "").lower()
    if setting not in ("default", "bounded") and model_bytes is None:
        return False
    bound = setting == "bounded" or (
        setting != "default" and model_bytes is not None and model_bytes <= SMALL_MODEL_BYTES
    )
    _BOUND.append(bound)
    libc = _libc()
    if bound and libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    return bound


# NOTE: RSS growth (a fraction of RSS after the last collection) past which a session's creation
# first runs a full garbage collection
GC_GROWTH = 1 / 32
_COLLECTED_AT: list[int] = []


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # pragma: no cover - no procfs
        return 0


def collect_garbage_if_grown() -> bool:
    """Where memory is bounded (:func:`bound_malloc`), a full garbage collection when the process's
    RSS grew by :data:`GC_GROWTH` since the last one (the first call only takes the measure);
    returns whether it ran.

    NOTE: onnx-ir's graphs are reference cycles (nodes, values and uses point at each other), so a
    model a pass drops (a candidate judged, a probe model handed to ORT) is freed only by a full
    collection, which Python rarely runs: int8-static on PP-OCR cls left ~1 MB of graph objects per
    candidate, 12 graphs by its end. A collection costs ~40 ms in a process of that size, ~50 ms
    on PP-OCR det (10 of them, 4 % of its quantize CPU): only where memory is bounded."""
    if not (_BOUND and _BOUND[0]):
        return False
    rss = _rss_bytes()
    if not rss:  # pragma: no cover - no procfs
        return False
    if _COLLECTED_AT and rss < _COLLECTED_AT[0] * (1 + GC_GROWTH):
        return False
    ran = bool(_COLLECTED_AT)
    if ran:
        gc.collect()
        release_free_memory()
    _COLLECTED_AT[:] = [_rss_bytes() or rss]
    return ran


def release_free_memory() -> None:
    """Hand memory numpy and ORT have freed back to the operating system (glibc's ``malloc_trim``;
    a no-op elsewhere). NOTE: freed blocks of the worker threads' malloc arenas otherwise stay
    in the process's RSS, and the next big allocation (an ORT session) comes on top of them."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


RUN_TIMEOUT_ENV = "MODELPRESS_RUN_TIMEOUT"


def run_timeout() -> float | None:
    """Seconds one ONNX Runtime run may take (``$MODELPRESS_RUN_TIMEOUT``; unset or 0: no limit)."""
    try:
        value = float(os.environ.get(RUN_TIMEOUT_ENV, "") or 0)
    except ValueError:
        return None
    return value if value > 0 else None


def run(
    session: ort.InferenceSession, feeds: Mapping[str, np.ndarray], *, timeout: float | None = None
) -> list[np.ndarray]:
    """Run once; returns the outputs in graph order.

    With ``timeout`` (default ``$MODELPRESS_RUN_TIMEOUT``) a run still going after that many
    seconds is stopped through ORT's ``RunOptions.terminate`` and raises ``InvalidModelError``:
    a model that never finishes (a Loop whose trip count is corrupt) fails cleanly instead of
    hanging. NOTE: a Python signal cannot interrupt ORT while it runs; its terminate flag can."""
    limit = timeout if timeout is not None else run_timeout()
    options = ort.RunOptions()
    # NOTE: ORT logs a failed run (and "terminate flag") as coloured errors on stderr; the exception
    # below says it once, and a caller that tries inputs (the import check) catches it quietly
    options.log_severity_level = 4
    timer = threading.Timer(limit, setattr, (options, "terminate", True)) if limit else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        return [np.asarray(o) for o in session.run(None, dict(feeds), options)]
    except Exception as exc:
        if options.terminate:
            raise InvalidModelError(
                f"ONNX Runtime run stopped after {limit:g} s ({RUN_TIMEOUT_ENV}): the model did not finish "
                "(a Loop with a huge trip count?); check the model, or raise the limit"
            ) from exc
        raise InvalidModelError(
            f"ONNX Runtime failed to run the model: {_first_line(exc)}"
        ) from exc
    finally:
        if timer is not None:
            timer.cancel()


def run_dataset(session: ort.InferenceSession, batches, *, stop=None) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    """Run over an iterable of feed dicts and concatenate each output along axis 0.

    ``stop``, when given, is called with each batch's outputs; once it returns True the sweep ends
    there, and the outputs of the batches run so far are returned.

    Batches of samples of different shapes (sequences of different lengths) give outputs that
    differ beyond axis 0: those are joined as rows of their last axis, keeping the rank
    (``[1, seq, d]`` parts become ``[tokens, 1, d]``: one row per token, so an output is judged as
    the same kind as when every sample has one shape), or element by element when the last axis
    differs too.
    """
    collected: list[list[np.ndarray]] = []
    for feeds in batches:
        outs = run(session, feeds)
        if not collected:
            collected = [[] for _ in outs]
        for acc, out in zip(collected, outs, strict=True):
            acc.append(out)
        if stop is not None and stop(outs):
            break
    joined = []
    for i, parts in enumerate(collected):
        joined.append(_join(parts))
        collected[i] = []  # NOTE: each output's parts freed once joined, not after every join
    return joined


def _join(parts: list[np.ndarray]) -> np.ndarray:
    if len(parts) == 1:
        return parts[0]  # NOTE: one run's output as ORT gave it, not a copy
    if len({p.shape[1:] for p in parts}) <= 1:
        return np.concatenate(parts, axis=0)
    if len({p.shape[-1:] for p in parts}) == 1 and all(p.ndim >= 2 for p in parts):
        return np.concatenate(
            [p.reshape(-1, *[1] * (p.ndim - 2), p.shape[-1]) for p in parts], axis=0
        )
    return np.concatenate([p.reshape(-1, *[1] * (p.ndim - 1)) for p in parts], axis=0)


def with_outputs(model: Model, names: list[str]) -> Model:
    """A copy of ``model`` that also outputs the named intermediate tensors (for one ORT session
    that observes them all: calibration, statistics, teacher features)."""
    probe = model.clone()
    graph = probe.ir.graph
    values: dict[str, ir.Value] = {v.name: v for v in graph.inputs if v.name}
    for node in graph:
        for out in node.outputs:
            if out.name:
                values[out.name] = out
    existing = {v.name for v in graph.outputs}
    for name in names:
        if name not in existing and name in values:
            graph.outputs.append(values[name])
    return probe
