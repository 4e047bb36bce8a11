"""The TensorFlow/Keras adapter (extra ``tensorflow``): Keras 3 models, ``.keras``/``.h5`` files,
SavedModel folders and ``tf.function``s.

tf2onnx's ``from_keras`` does not work with Keras 3, so every source is wrapped in a
``tf.function`` with an explicit ``input_signature`` (batch dimension dynamic) and converted with
``tf2onnx.convert.from_function``. Keras models keep their layout at the model boundary (NHWC
images stay NHWC; tf2onnx inserts the transposes inside). Every import is verified against
TensorFlow on example inputs, like the torch import.

TensorFlow is imported only inside these functions: ``import modelpress`` never imports it.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from modelpress.plugin_api import (
    Adapter,
    DataError,
    InvalidModelError,
    Model,
    Provenance,
    UnsupportedModelError,
    WeightedLayer,
    check_import,
    hookimpl,
)

__all__ = ["load_tensorflow"]

_SUFFIXES = {".keras", ".h5", ".hdf5"}


def _is_tf_object(source: Any) -> bool:
    keras = sys.modules.get("keras")
    if keras is not None and isinstance(source, keras.Model):
        return True
    tf = sys.modules.get("tensorflow")
    if tf is None:
        return False
    return isinstance(
        source, (tf.types.experimental.GenericFunction, tf.types.experimental.ConcreteFunction)
    )


def _accepts(source: Any) -> bool:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        return path.suffix.lower() in _SUFFIXES or (
            path.is_dir() and (path / "saved_model.pb").is_file()
        )
    return _is_tf_object(source)


@hookimpl
def modelpress_register_adapters(register):  # type: ignore[no-untyped-def]
    register(
        Adapter(
            name="tensorflow",
            accepts=_accepts,
            load=load_tensorflow,
            priority=10,
            summary="Keras 3 models, .keras/.h5 files, SavedModel folders, tf.function",
        )
    )


def _require_tf() -> Any:
    try:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        with quiet_native_logs():
            import tensorflow as tf
            import tf2onnx  # noqa: F401
    except ImportError:
        raise UnsupportedModelError(
            "loading TensorFlow/Keras models needs the tensorflow extra: pip install -c constraints.txt 'modelpress[tensorflow]'"
        ) from None
    return tf


# NOTE: TensorFlow's C++ runtime writes these to file descriptor 2 before absl's logging is set
# up, so TF_CPP_MIN_LOG_LEVEL does not reach them ("oneDNN custom operations are on", "All log
# messages before absl::InitializeLog()", the CPU-instructions notice).
_NATIVE_NOISE = re.compile(
    r"^([IW]\d{4} \d\d:\d\d:\d\d|WARNING: All log messages before absl::InitializeLog"
    r"|To enable the following instructions:|This TensorFlow binary is optimized|.*oneDNN custom operations are on)"
)


@contextlib.contextmanager
def quiet_native_logs() -> Iterator[None]:
    """Hold back TensorFlow's native start-up log lines; everything else written to stderr
    (file descriptor 2) inside the block is written back when it ends."""
    try:
        fd = sys.stderr.fileno()
    except (
        AttributeError,
        OSError,
        ValueError,
    ):  # NOTE: a captured stderr (pytest, IDEs) has no fd
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            held.seek(0)
            kept = [
                line
                for line in held.read().decode(errors="replace").splitlines(keepends=True)
                if not _NATIVE_NOISE.match(line)
            ]
            if kept:
                sys.stderr.write("".join(kept))


def _keras_specs(model: Any, input_shape: Any, label: str) -> list[Any]:
    tf = _require_tf()
    inputs = None
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        inputs = None
    if inputs:
        return [
            tf.TensorSpec(
                (None, *tuple(t.shape)[1:]),
                t.dtype,
                name=_clean(getattr(t, "name", None) or f"input_{i}"),
            )
            for i, t in enumerate(inputs)
        ]
    if input_shape is None:
        input_shape = _built_shape(model)
    if input_shape is None:
        raise DataError(
            f"{label}: the Keras model has no defined input shape (a subclassed model that was never built or called, "
            f"or a Sequential without keras.Input); pass input_shape=(None, 8, 8, 1) (--input-shape), or call "
            f"model.build((None, 8, 8, 1)) first"
        )
    shapes = input_shape if isinstance(input_shape[0], (tuple, list)) else [input_shape]
    return [
        tf.TensorSpec((None, *tuple(s)[1:]), tf.float32, name=f"input_{i}")
        for i, s in enumerate(shapes)
    ]


def _built_shape(model: Any) -> Any:
    """The input shape a subclassed Keras 3 model was built with (``model.build(shape)`` or its
    first call record it), or None. A model with several inputs gives a list of shapes."""
    shapes = getattr(model, "_build_shapes_dict", None)
    if not isinstance(shapes, dict) or not shapes:
        return None
    values = [
        tuple(v)
        for v in shapes.values()
        if isinstance(v, (tuple, list)) and v and not isinstance(v[0], (tuple, list))
    ]
    if len(values) != len(shapes):
        return None
    return values[0] if len(values) == 1 else values


def _clean(name: str) -> str:
    return name.split(":")[0].replace("/", "_")


def _freeze_captured_constants(proto: Any, function: Any, specs: list[Any], label: str) -> None:
    """tf2onnx turns eager tensors captured by a tf.function into graph inputs; make them initializers."""
    from onnx import numpy_helper

    tf = _require_tf()
    wanted = {s.name for s in specs}
    extra = [i for i in proto.graph.input if i.name not in wanted]
    if not extra:
        return
    captured = [
        t for t in function.get_concrete_function().captured_inputs if t.dtype != tf.resource
    ]
    if len(captured) != len(extra):
        raise UnsupportedModelError(
            f"{label}: tf2onnx left inputs {[i.name for i in extra]} that are not the model's inputs"
        )
    for value_info, tensor in zip(extra, captured, strict=True):
        proto.graph.initializer.append(
            numpy_helper.from_array(np.asarray(tensor.numpy()), value_info.name)
        )
        proto.graph.input.remove(value_info)


def _tidy_names(model: Model, output_names: list[str]) -> None:
    """tf2onnx names outputs ``Identity:0`` and free axes ``unk__N``: use the model's names, ``batch``
    and :func:`_free_dim_names`."""
    import onnx_ir as ir

    graph = model.ir.graph
    if not output_names and any(":" in (v.name or "") for v in graph.outputs):
        output_names = [f"output_{i}" for i in range(len(graph.outputs))]
    if len(output_names) == len(graph.outputs) and len(set(output_names)) == len(output_names):
        taken = {v.name for v in graph.inputs}
        for value, name in zip(graph.outputs, output_names, strict=True):
            if name and name not in taken:
                value.name = name
    renamed = _free_dim_names(list(graph.inputs))
    for value in [*graph.inputs, *graph.outputs]:
        shape = value.shape
        if shape is None or not len(shape):
            continue
        dims = list(shape)
        for axis, dim in enumerate(dims):
            if isinstance(dim, int):
                continue
            if axis == 0 and (dim.value is None or str(dim.value).startswith("unk__")):
                dims[0] = ir.SymbolicDim("batch")
            elif str(dim.value).startswith("unk__"):
                wanted = renamed.get(str(dim.value), f"{value.name}_dim{axis}")
                dims[axis] = ir.SymbolicDim(wanted)
        value.shape = ir.Shape(dims)


def _free_dim_names(inputs: list[Any]) -> dict[str, str]:
    """New names for tf2onnx's ``unk__N`` free axes of the inputs past the batch: ``height`` and
    ``width`` for an image's spatial axes (rank 4 with 1-4 channels last or first; prefixed with the
    input's name when there are several inputs), else ``<input>_dim<axis>``. One name per ``unk__N``,
    so axes tf2onnx declared equal stay equal (a fully convolutional net's output)."""
    names: dict[str, str] = {}
    for value in inputs:
        shape = value.shape
        if shape is None:
            continue
        dims = list(shape)
        prefix = f"{value.name}_" if len(inputs) > 1 else ""
        spatial: tuple[int, ...] = ()
        if len(dims) == 4 and isinstance(dims[3], int) and dims[3] <= 4:
            spatial = (1, 2)
        elif len(dims) == 4 and isinstance(dims[1], int) and dims[1] <= 4:
            spatial = (2, 3)
        for axis, dim in enumerate(dims[1:], start=1):
            key = "" if isinstance(dim, int) else str(dim.value)
            if key.startswith("unk__") and key not in names:
                what = dict(zip(spatial, ("height", "width"), strict=False)).get(axis)
                names[key] = f"{prefix}{what}" if what else f"{value.name}_dim{axis}"
    return names


def _load_path(path: Path, label: str) -> tuple[Any, str]:
    tf = _require_tf()
    if path.is_dir():
        try:
            loaded = tf.saved_model.load(str(path))
        except Exception as exc:
            raise InvalidModelError(
                f"{label}: not a loadable SavedModel: {str(exc).splitlines()[0][:300]}"
            ) from None
        signatures = getattr(loaded, "signatures", {})
        if "serving_default" not in signatures:
            raise InvalidModelError(f"{label}: the SavedModel has no 'serving_default' signature")
        signature = signatures["serving_default"]
        # NOTE: the signature's variables live as long as the loaded object: keep it alive.
        signature._modelpress_owner = loaded
        return signature, "savedmodel"
    if not path.is_file():
        raise InvalidModelError(f"{label}: no such file")
    import keras

    try:
        return keras.models.load_model(str(path), compile=False), "keras"
    except Exception as exc:
        raise InvalidModelError(
            f"{label}: cannot be loaded by Keras: {str(exc).splitlines()[0][:300]}"
        ) from None


def load_tensorflow(
    source: Any,
    *,
    input_shape: Any = None,
    input_signature: list[Any] | None = None,
    example_inputs: Any = None,
    opset: int = 17,
    rtol: float = 1e-4,
    **_: Any,
) -> Model:
    """Import a TensorFlow/Keras model (see the module docstring).

    Args:
        input_shape: for Keras models without defined inputs, e.g. ``(None, 8, 8, 1)``.
        input_signature: ``tf.TensorSpec``s, for a ``tf.function`` without one.
        example_inputs: arrays for the import check (default: random, batch 2).
    """
    tf = _require_tf()
    import keras
    import tf2onnx

    label = str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__
    title = Path(source).stem if isinstance(source, (str, os.PathLike)) else None
    kind = "object"
    if isinstance(source, (str, os.PathLike)):
        source, kind = _load_path(Path(source), label)
    if not _is_tf_object(source):
        raise UnsupportedModelError(f"{label}: not a Keras model, tf.function or SavedModel")
    if isinstance(source, keras.Model):
        call, specs, output_names = _keras_callable(source, input_shape, label)
    else:
        call, specs, output_names = _function_callable(source, input_signature, label)

    function = tf.function(call, input_signature=specs)
    example = _example_arrays(specs, example_inputs)
    reference = _run_reference(function, example, label)
    proto = _convert(function, specs, opset, label)

    from modelpress.adapters.onnx import load_onnx

    model = load_onnx(
        proto, normalize=False
    )  # NOTE: a fresh export: keep its BatchNorms for training
    _tidy_names(model, output_names)
    _name_layers(model, source, title)
    feeds = {spec.name: e for spec, e in zip(model.signature.inputs, example, strict=True)}
    figures = check_import(reference, model, feeds, rtol, f"{label} (converted with tf2onnx)")
    model.provenance = Provenance(
        source_framework="tensorflow"
        if kind != "keras" and not isinstance(source, keras.Model)
        else "keras",
        source_version=f"tensorflow {tf.__version__}, keras {keras.__version__}",
        source=label,
        importer=f"tf2onnx {tf2onnx.__version__} from_function",
        extra={"import_check": figures, "kind": kind},
    )
    return model


# NOTE: Keras 3 calls each layer in a TensorFlow name scope that TF makes unique with a suffix
# (layer "dense" runs in scope "dense_1"): the suffix is dropped when that gives a layer's name
_SCOPE_SUFFIX = re.compile(r"_\d+$")
_GENERIC_KERAS = frozenset({"Sequential", "Functional", "Model"})


def _keras_layer_names(model: Any) -> set[str]:
    """The names of every layer of a Keras model, nested models' layers included."""
    names: set[str] = set()
    for layer in getattr(model, "layers", None) or []:
        names.add(layer.name)
        names |= _keras_layer_names(layer)
    return names


def keras_layer(layer: WeightedLayer, known: set[str], model_name: str) -> str | None:
    """The innermost Keras layer named in the path of ``layer``'s weight (which survives tf2onnx's
    fusions: a Conv folded with its BatchNorm keeps ``conv/convolution/merged_input``), else its node.
    Scopes carry TF's suffix when the model's own scope does (``sequential_1/dense_1`` is ``dense``)."""
    for text in (layer.weight.name or "", layer.node.name or ""):
        parts = text.split(":")[0].split("/")
        suffixed = parts[0] != model_name and _SCOPE_SUFFIX.sub("", parts[0]) == model_name
        for part in reversed(parts[1:]):
            name = _SCOPE_SUFFIX.sub("", part) if suffixed else part
            if name in known:
                return name
    return None


def _name_layers(model: Model, source: Any, title: str | None) -> None:
    """Weighted layers after their Keras layers (``dense``, ``conv_a``); the graph after the file,
    the Keras model (its class when subclassed, else its name) or the function."""
    import keras

    from modelpress.adapters.naming import rename_layers

    if isinstance(source, keras.Model):
        known = _keras_layer_names(source)
        rename_layers(model, lambda layer: keras_layer(layer, known, source.name))
        cls = type(source).__name__
        title = title or (source.name if cls in _GENERIC_KERAS else cls)
    # NOTE: not tf2onnx's 'tf2onnx' in errors and report titles
    model.ir.graph.name = title or getattr(source, "__name__", None) or type(source).__name__


def _keras_callable(
    source: Any, input_shape: Any, label: str
) -> tuple[Callable[..., Any], list[Any], list[str]]:
    """A Keras model as ``call(*inputs)`` in inference mode, its input specs (batch dynamic) and
    its output names."""
    specs = _keras_specs(source, input_shape, label)
    multi = len(specs) > 1

    def call(*args: Any) -> Any:
        return source(list(args) if multi else args[0], training=False)

    return call, specs, [_clean(n) for n in (getattr(source, "output_names", None) or [])]


def _function_callable(
    source: Any, input_signature: list[Any] | None, label: str
) -> tuple[Callable[..., Any], list[Any], list[str]]:
    """A ``tf.function`` (or a concrete function, e.g. a SavedModel's signature) as ``call(*inputs)``
    with positional inputs (keyword inputs in name order) returning a list, its input specs and
    output names (a dict output's sorted keys)."""
    tf = _require_tf()
    concrete = source
    if isinstance(source, tf.types.experimental.GenericFunction):
        if input_signature is None and source.input_signature is None:
            raise DataError(f"{label}: a tf.function needs an input_signature to be converted")
        concrete = source.get_concrete_function(*(input_signature or source.input_signature))
    args_sig, kwargs_sig = concrete.structured_input_signature
    flat = list(args_sig) + [kwargs_sig[k] for k in sorted(kwargs_sig)]
    names = [_clean(s.name or f"input_{i}") for i, s in enumerate(flat)]
    specs = [tf.TensorSpec(s.shape, s.dtype, name=n) for s, n in zip(flat, names, strict=True)]
    keyword = bool(kwargs_sig)
    kw_names = sorted(kwargs_sig)
    structured = concrete.structured_outputs
    output_names = sorted(structured) if isinstance(structured, dict) else []

    def call(*args: Any) -> Any:
        out = concrete(**dict(zip(kw_names, args, strict=True))) if keyword else concrete(*args)
        if isinstance(out, dict):
            return [out[k] for k in sorted(out)]
        return out

    return call, specs, output_names


_FREE_SIZE = 32


def _example_arrays(specs: list[Any], example_inputs: Any) -> list[np.ndarray]:
    """The example inputs given (an array, a list/tuple or a dict of them), else random ones of
    the specs' shapes (batch 2)."""
    if example_inputs is None:
        rng = np.random.default_rng(0)
        # NOTE: batch 2; a free height/width (a fully convolutional net) gets 32, which every usual
        # stride pattern accepts; pass example_inputs= for a size the model needs
        return [
            rng.standard_normal(
                [(2 if i == 0 else _FREE_SIZE) if d is None else d for i, d in enumerate(s.shape)]
            ).astype(s.dtype.as_numpy_dtype)
            for s in specs
        ]
    example = (
        list(example_inputs.values())
        if isinstance(example_inputs, dict)
        else (
            list(example_inputs) if isinstance(example_inputs, (list, tuple)) else [example_inputs]
        )
    )
    return [np.asarray(e) for e in example]


def _run_reference(function: Any, example: list[np.ndarray], label: str) -> list[np.ndarray]:
    """TensorFlow's outputs on the example inputs (what the import is checked against)."""
    tf = _require_tf()
    try:
        with quiet_native_logs():
            reference = function(*[tf.constant(e) for e in example])
    except Exception as exc:
        shapes = ", ".join(str(e.shape) for e in example)
        raise DataError(
            f"{label}: the example inputs ({shapes}) do not fit the model: {tf_message(exc)}; pass example_inputs= "
            f"(--example-inputs) with arrays of the shapes the model takes"
        ) from None
    reference_list = reference if isinstance(reference, (list, tuple)) else [reference]
    return [np.asarray(r) for r in reference_list]


def tf_message(exc: BaseException) -> str:
    """TensorFlow's message without its noise: an ``OpError``'s own message (not the ``Graph
    execution error:`` header or the Python traceback TensorFlow appends), on one line."""
    text = str(getattr(exc, "message", None) or exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    frames = [i for i, line in enumerate(lines) if line.startswith("File ")]
    if frames:  # NOTE: "Detected at node ... defined at (most recent call last):" then frames, each a File line and its code
        lines = (
            lines[
                : next(
                    i
                    for i, line in enumerate(lines)
                    if line.startswith(("Detected at node", "File "))
                )
            ]
            + lines[frames[-1] + 2 :]
        )
    lines = [line for line in lines if line != "Graph execution error:"]
    text = " ".join(lines) or type(exc).__name__
    return text if len(text) <= 600 else text[:597] + "..."


def _convert(function: Any, specs: list[Any], opset: int, label: str) -> Any:
    """tf2onnx's ONNX proto of ``function``, its captured eager tensors made initializers."""
    import tf2onnx

    try:
        with quiet_native_logs():
            proto, _ = tf2onnx.convert.from_function(function, input_signature=specs, opset=opset)
    except Exception as exc:
        raise UnsupportedModelError(
            f"{label}: tf2onnx could not convert the model: {type(exc).__name__}: {tf_message(exc)}"
        ) from None
    _freeze_captured_constants(proto, function, specs, label)
    return proto
