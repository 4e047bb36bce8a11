"""The ONNX adapter: load ``.onnx`` files, bytes, ``onnx.ModelProto`` and ``onnx_ir.Model``.

Loading validates: an empty, truncated or non-ONNX file, a model that fails the ONNX checker or
strict shape inference, and external data that points outside the model's folder are each a
:class:`modelpress.InvalidModelError` naming the file. Weights in external data are not read:
onnx_ir memory-maps them when a pass needs them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from modelpress.adapters.onnx_checks import (
    all_tensors,
    check_attributes,
    check_external_data,
    check_text,
    densify_sparse,
)
from modelpress.plugin_api import (
    Adapter,
    InvalidModelError,
    Model,
    Provenance,
    hookimpl,
    normalize_on_import,
    one_line,
    proto_tensor_bytes,
    type_initializers,
)

__all__ = ["load_onnx"]

# Suffixes other adapters own; any other existing file is tried as ONNX.
_FOREIGN_SUFFIXES = {
    ".pt",
    ".pt2",
    ".pth",
    ".ts",
    ".keras",
    ".h5",
    ".hdf5",
    ".pb",
    ".tflite",
    ".npz",
    ".npy",
}


def _accepts(source: Any) -> bool:
    if isinstance(source, (bytes, bytearray, onnx.ModelProto, ir.Model)):
        return True
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        return path.suffix.lower() == ".onnx" or (
            path.is_file() and path.suffix.lower() not in _FOREIGN_SUFFIXES
        )
    return False


@hookimpl
def modelpress_register_adapters(register):  # type: ignore[no-untyped-def]
    register(
        Adapter(
            name="onnx",
            accepts=_accepts,
            load=load_onnx,
            summary="ONNX files, bytes, ModelProto, onnx_ir.Model",
        )
    )


def _parse(data: bytes, label: str) -> onnx.ModelProto:
    if not data:
        raise InvalidModelError(f"{label}: the file is empty (0 bytes); it is not an ONNX model")
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise InvalidModelError(
            f"{label}: not a valid ONNX model (the protobuf cannot be parsed: {exc}); the file is truncated, corrupt or not ONNX"
        ) from None
    if proto.ir_version <= 0 or not proto.HasField("graph") or not proto.opset_import:
        raise InvalidModelError(
            f"{label}: not an ONNX model (no ir_version, graph or opset_import); the file is probably another format renamed .onnx"
        )
    return proto


def _check_file(source: Any) -> str | None:
    """The ONNX checker's verdict on a file source (``None``: passed, or not a file), run before the file is
    read into this process: the checker's C++ holds the file's bytes and a parsed copy of its own, which
    then do not come on top of the Python proto (MiniLM: 110 MB less at the peak). Its message is raised
    by :func:`_check`, after the checks that name a more precise fault (empty, not ONNX, unsafe external data)."""
    if not isinstance(source, (str, os.PathLike)) or not Path(source).is_file():
        return None
    try:
        # NOTE: from the file: the checker resolves external data relative to it
        onnx.checker.check_model(os.fspath(source))
    except Exception as exc:  # NOTE: ValidationError, but also UnicodeDecodeError on damaged names
        return _first(exc)
    return None


def _check(
    proto: onnx.ModelProto, label: str, path: Path | None, checked: str | None
) -> onnx.ModelProto:
    """``checked``: what :func:`_check_file` said of ``path``."""
    if path is None:
        try:
            onnx.checker.check_model(proto)
        except (
            Exception
        ) as exc:  # NOTE: ValidationError, but also UnicodeDecodeError on damaged names
            checked = _first(exc)
    if checked is not None:
        raise InvalidModelError(f"{label}: fails the ONNX checker: {checked}")
    # NOTE: shape inference copies the model four times (serialized, parsed in C++, and back): it runs on
    # a copy without the large weights' bytes, which it never reads (data propagation reads small shape
    # tensors), and the weights go into its result once
    try:
        inferred = onnx.shape_inference.infer_shapes(
            _without_weights(proto), strict_mode=True, data_prop=True
        )
    except Exception as exc:
        raise InvalidModelError(f"{label}: fails ONNX shape inference: {_first(exc)}") from None
    _take_inferred(proto, inferred)
    return proto


def _take_inferred(proto: onnx.ModelProto, inferred: onnx.ModelProto) -> None:
    """``proto`` given what shape inference wrote into its weight-free copy ``inferred``: every field but
    the initializers (which inference never changes) and the nodes, and in the graphs of nodes with
    subgraphs their inputs, outputs and value_info (what inference fills). NOTE: the weights stay where
    they are: copying them (or whole If nodes, whose branches can hold every weight: silero-vad) into
    the proto's arena held them twice for the loaded model's life."""
    for name in _field_names(proto, skip=("graph",)):
        proto.ClearField(name)
    _copy_fields(inferred, proto, skip="graph")
    graph, typed_graph = proto.graph, inferred.graph
    for name in _field_names(graph, skip=("initializer", "node")):
        graph.ClearField(name)
    for desc, value in typed_graph.ListFields():
        if desc.name not in ("initializer", "node"):
            _copy_field(desc, value, graph)
    _take_subgraph_types(graph, typed_graph)


def _subgraphs(attr: onnx.AttributeProto) -> list[onnx.GraphProto]:
    """The graphs an attribute holds (``g``, or ``graphs``; none for other types)."""
    return ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)


def _take_subgraph_types(graph: onnx.GraphProto, typed: onnx.GraphProto) -> None:
    for node, typed_node in zip(graph.node, typed.node, strict=True):
        for attr, typed_attr in zip(node.attribute, typed_node.attribute, strict=True):
            for sub, typed_sub in zip(_subgraphs(attr), _subgraphs(typed_attr), strict=True):
                for name in ("input", "output", "value_info"):
                    sub.ClearField(name)
                    getattr(sub, name).extend(getattr(typed_sub, name))
                _take_subgraph_types(sub, typed_sub)


def _field_names(message: Any, skip: tuple[str, ...]) -> list[str]:
    return [desc.name for desc, _ in message.ListFields() if desc.name not in skip]


def _large(tensor: onnx.TensorProto) -> bool:
    return (
        tensor.data_location != onnx.TensorProto.EXTERNAL and proto_tensor_bytes(tensor) > 1 << 16
    )  # NOTE: shape tensors are far smaller; not ByteSize(), which serialises the tensor to count it


def _copy_fields(source: Any, target: Any, skip: str) -> None:
    for desc, value in source.ListFields():
        if desc.name != skip:
            _copy_field(desc, value, target)


def _copy_field(desc: Any, value: Any, target: Any) -> None:
    # NOTE: protobuf >= 5.29 names it is_repeated (label is gone in 7)
    repeated = (
        desc.is_repeated if hasattr(desc, "is_repeated") else desc.label == desc.LABEL_REPEATED
    )
    if repeated:
        getattr(target, desc.name).extend(value)
    elif desc.message_type is not None:
        getattr(target, desc.name).CopyFrom(value)
    else:
        setattr(target, desc.name, value)


def _without_weights(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``proto`` whose large initializers (of every graph) keep their name, type and shape but no bytes."""
    light = onnx.ModelProto()
    _copy_fields(proto, light, skip="graph")
    _light_graph(proto.graph, light.graph)
    return light


def _light_graph(graph: onnx.GraphProto, light: onnx.GraphProto) -> None:
    for desc, value in graph.ListFields():
        if desc.name not in ("initializer", "node"):
            _copy_field(desc, value, light)
    for node in graph.node:
        if not any(_subgraphs(attr) for attr in node.attribute):
            light.node.add().CopyFrom(node)
            continue
        copy = light.node.add()
        _copy_fields(node, copy, skip="attribute")
        for attr in node.attribute:
            new = copy.attribute.add()
            for desc, value in attr.ListFields():
                if desc.name not in ("g", "graphs"):
                    _copy_field(desc, value, new)
            if attr.HasField("g"):
                _light_graph(attr.g, new.g)
            for sub in attr.graphs:
                _light_graph(sub, new.graphs.add())
    for tensor in graph.initializer:
        if _large(tensor):
            light.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
        else:
            light.initializer.add().CopyFrom(tensor)


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return one_line(text.splitlines()[0] if text else type(exc).__name__)


def _read_source(source: Any) -> tuple[onnx.ModelProto, str, Path | None]:
    """The proto of an ONNX source (a path, bytes, a ModelProto or an onnx_ir.Model: never the caller's own
    object), its label for messages, and its path when it is a file."""
    if isinstance(source, ir.Model):
        return ir.serde.serialize_model(source), "onnx_ir.Model", None
    elif isinstance(source, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(source)  # NOTE: never touch the caller's proto
        return proto, "ModelProto", None
    elif isinstance(source, (bytes, bytearray)):
        return _parse(bytes(source), "ONNX bytes"), "ONNX bytes", None
    path = Path(source)
    label = str(path)
    if path.is_dir():
        raise InvalidModelError(f"{label}: is a folder, not an ONNX file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidModelError(f"{label}: cannot be read: {exc.strerror}") from None
    proto = _parse(data, label)
    del data  # NOTE: the file's bytes are not held while the proto is checked and converted
    check_external_data(proto, path.parent, label)
    return proto, label, path


def load_onnx(
    source: Any, *, check: bool = True, normalize: bool = True, sample: Any = None, **_: Any
) -> Model:
    """Load and validate an ONNX model (see the module docstring); ``normalize=False`` skips
    :mod:`modelpress.data.normalize` (Constant weights lifted, constants and BatchNorm folded, ...);
    ``sample`` (a feed dict) are the inputs its ORT equivalence check runs on (default: random)."""
    checked = _check_file(source) if check else None
    proto, label, path = _read_source(source)
    if path is None and any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in all_tensors(proto.graph)
    ):
        raise InvalidModelError(
            f"{label}: has external data but no file location; load it from its path instead"
        )
    declared = _declared_value_info(proto.graph)
    check_text(proto, label)
    check_attributes(proto.graph, label)
    densify_sparse(proto, label)
    if check:
        proto = _check(proto, label, path, checked)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:  # NOTE: fields the checker lets through (e.g. data type 999)
        raise InvalidModelError(
            f"{label}: cannot be read into the IR: {_first(exc)}; the file is corrupt"
        ) from None
    if path is not None:
        ir.external_data.set_base_dir(model.graph, path.parent)
    type_initializers(model)
    normalised: dict[str, Any] = {"skipped": "normalize=False"}
    if normalize:
        model, normalised = normalize_on_import(model, proto, label, sample)
    provenance = None
    if "modelpress.ir.provenance" not in model.metadata_props:
        provenance = Provenance(
            source_framework="onnx",
            source_version=f"opset {model.opset_imports.get('', 0)}, producer {proto.producer_name or '?'} {proto.producer_version}".strip(),
            source=str(path) if path else label,
            importer="modelpress.adapters.onnx",
            extra={"normalize": normalised},
        )
    result = Model(model, provenance=provenance, path=path, declared_value_info=declared)
    if (
        path is not None and provenance is not None and proto.producer_name == "pytorch"
    ):  # NOTE: the torch adapter names its own exports
        _torch_names(result)
    return result


def _torch_names(model: Model) -> None:
    """Layers of a file the torch exporter wrote, named as in the torch adapter: after the module
    holding the weight (``features.0``) instead of ``node_Conv_91``, from the parameter names and
    the module scopes the exporter records on each node (``pkg.torch.onnx.name_scopes``); an
    LSTM/GRU/RNN and an embedding lookup after their module (``lstm``, ``emb``)."""
    from modelpress.adapters.naming import layer_name, rename_layers
    from modelpress.adapters.torch import module_path, module_scope

    rename_layers(model, module_path)
    for node in model.ir.graph:
        if node.op_type in ("LSTM", "GRU", "RNN", "Gather") and node.domain in ("", "ai.onnx"):
            scope = layer_name(module_scope(node))
            if (
                scope
                and scope != node.name
                and (
                    node.op_type != "Gather"
                    or (node.inputs[0] is not None and node.inputs[0].const_value is not None)
                )
            ):
                node.name = model.fresh_name(scope, node=True)


def _declared_value_info(graph: onnx.GraphProto) -> frozenset[str]:
    """Names with a ``value_info`` in the file itself (this graph and its subgraphs), before the
    shape inference of the check adds the rest: only these are written back out."""
    names = {info.name for info in graph.value_info}
    for node in graph.node:
        for attr in node.attribute:
            for sub in _subgraphs(attr):
                names |= _declared_value_info(sub)
    return frozenset(names)
