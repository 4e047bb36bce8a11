"""Validation of ONNX protos before they reach onnx_ir: what the ONNX checker lets through.

Each check refuses one way a file can be damaged or hostile with an
:class:`~modelpress.InvalidModelError` naming the file and the tensor, node or field: external
data that escapes the model's folder or does not fit, text that is not UTF-8, function-only
attributes in a graph, sparse initializers that cannot be expanded (valid ones are expanded,
since onnx_ir does not read them).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from modelpress.plugin_api import InvalidModelError, UnsafeExternalDataError, one_line

__all__ = ["all_tensors", "check_attributes", "check_external_data", "check_text", "densify_sparse"]

_SPARSE_DENSE_LIMIT = 1 << 31  # bytes a sparse initializer may expand to (float64 worst case)


def all_tensors(graph: onnx.GraphProto):  # type: ignore[no-untyped-def]
    """Every TensorProto of a graph and its subgraphs (initializers and tensor attributes)."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from all_tensors(attr.g)
            for g in attr.graphs:
                yield from all_tensors(g)


def _external_entry(tensor: onnx.TensorProto, what: str) -> tuple[str, int, int | None]:
    """The ``location``, ``offset`` and ``length`` of an external tensor, validated (not trusted)."""
    entries = {entry.key: entry.value for entry in tensor.external_data}
    location = entries.get("location", "")
    if "\x00" in location:
        raise InvalidModelError(
            f"{what}: its external-data location {location!r} contains a NUL byte; the file is corrupt"
        )

    def number(key: str) -> int | None:
        text = entries.get(key)
        if text is None or text == "":
            return None
        try:
            value = int(text)
        except ValueError:
            raise InvalidModelError(
                f"{what}: its external-data {key} {text[:40]!r} is not a whole number of bytes; the file is corrupt"
            ) from None
        if value < 0:
            raise InvalidModelError(
                f"{what}: its external-data {key} is negative ({value}); the file is corrupt"
            )
        return value

    return location, number("offset") or 0, number("length")


def _declared_bytes(tensor: onnx.TensorProto, what: str) -> int:
    """Bytes the tensor's dims and data type say it holds (checked before anything is read)."""
    count = 1
    for d in tensor.dims:
        if d < 0:
            raise InvalidModelError(f"{what}: dimension {d} is negative; the file is corrupt")
        count *= int(d)
    try:
        dtype = ir.DataType(tensor.data_type)
    except ValueError:
        raise InvalidModelError(
            f"{what}: data type {tensor.data_type} is not an ONNX data type; the file is corrupt"
        ) from None
    if dtype == ir.DataType.STRING or dtype == ir.DataType.UNDEFINED:
        raise InvalidModelError(
            f"{what}: data type {dtype.name} cannot be stored as external data; the file is corrupt"
        )
    return -(-count * dtype.bitwidth // 8)


def check_external_data(proto: onnx.ModelProto, base_dir: Path, label: str) -> None:
    """Refuse external data that escapes ``base_dir``, is missing, or is shorter than declared."""
    base = base_dir.resolve()
    for tensor in all_tensors(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        named = f"{label}: initializer {tensor.name!r}"
        location, offset, length = _external_entry(tensor, named)
        what = f"{named} has external data at {location!r}"
        if (
            not location
            or os.path.isabs(location)
            or Path(location).is_absolute()
            or location.startswith(("\\", "/"))
        ):
            raise UnsafeExternalDataError(
                f"{what}, an absolute path; external data must live beside the model (a relative path in its folder)"
            )
        try:
            full = (base / location).resolve()
        except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, a name the OS rejects
            raise UnsafeExternalDataError(
                f"{what}, which cannot be resolved ({exc}); refusing to read it"
            ) from None
        if full != base and base not in full.parents:
            raise UnsafeExternalDataError(
                f"{what}, which resolves outside the model's folder {str(base)!r} (../ or a symlink); refusing to read it"
            )
        if not full.exists():
            raise InvalidModelError(f"{what}, but that file does not exist next to the model")
        if not full.is_file():
            raise InvalidModelError(
                f"{what}, but that is not a regular file (a folder, FIFO or device); refusing to read it"
            )
        size = full.stat().st_size
        needed = _declared_bytes(tensor, what)
        # NOTE: no length means "to the end of the file"; dims tell what must fit.
        if length is not None and length < needed:
            raise InvalidModelError(
                f"{what} (length {length}), but its shape {list(tensor.dims)} needs {needed} bytes; the file is corrupt"
            )
        if offset + max(needed, length or 0) > size:
            raise InvalidModelError(
                f"{what} (offset {offset}, length {length if length is not None else needed}), but the file has only {size} bytes (truncated?)"
            )


def check_text(message: Any, label: str, where: str = "model") -> None:
    """Refuse names and other text fields that are not valid UTF-8.

    NOTE: protobuf hands such fields over as ``bytes`` instead of ``str``; the checker then fails
    with a UnicodeDecodeError and onnx_ir with a TypeError or on export, far from the cause."""
    if isinstance(message, onnx.TensorProto):
        # NOTE: ListFields() would copy every weight's raw_data; only the text fields matter here.
        for name in ("name", "doc_string"):
            if isinstance(getattr(message, name), bytes):
                raise InvalidModelError(
                    f"{label}: {where}.{name} is not valid UTF-8 text ({getattr(message, name)[:24]!r}); the file is damaged"
                )
        for i, entry in enumerate(message.external_data):
            check_text(entry, label, f"{where}.external_data[{i}]")
        return
    for field, value in message.ListFields():
        if field.type == field.TYPE_STRING:
            for i, text in enumerate(value if _repeated(field) else [value]):
                if isinstance(text, bytes):
                    index = f"[{i}]" if _repeated(field) else ""
                    raise InvalidModelError(
                        f"{label}: {where}.{field.name}{index} is not valid UTF-8 text ({text[:24]!r}); the file is damaged"
                    )
        elif field.type == field.TYPE_MESSAGE:
            if _repeated(field):
                for i, item in enumerate(value):
                    check_text(item, label, f"{where}.{field.name}[{_describe(item, i)}]")
            else:
                check_text(value, label, f"{where}.{field.name}")


def _repeated(field: Any) -> bool:
    repeated = getattr(field, "is_repeated", None)  # NOTE: protobuf >= 5 dropped `label` in upb
    return bool(repeated if repeated is not None else field.label == field.LABEL_REPEATED)


def _describe(item: Any, index: int) -> str:
    name = getattr(item, "name", "")
    return f"{index} {name!r}" if isinstance(name, str) and name else str(index)


def check_attributes(graph: onnx.GraphProto, label: str) -> None:
    """Refuse attributes that only make sense inside a function (``ref_attr_name``) in a graph.

    NOTE: the ONNX checker lets them through, but nothing can give them a value there (onnx_ir
    and ONNX Runtime fail on them with an unrelated error)."""
    for node in graph.node:
        for attr in node.attribute:
            if attr.ref_attr_name:
                raise InvalidModelError(
                    f"{label}: node {node.name or node.op_type!r} attribute {attr.name!r} refers to a function attribute "
                    f"({attr.ref_attr_name!r}) outside a function; the model is corrupt"
                )
            for sub in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
                check_attributes(sub, label)


def densify_sparse(proto: onnx.ModelProto, label: str) -> None:
    """Turn ``sparse_initializer`` entries into ordinary initializers.

    NOTE: onnx_ir does not read sparse initializers (nodes using one would be left with a
    dangling input), and ONNX Runtime densifies them at load anyway."""
    graph = proto.graph
    if not graph.sparse_initializer:
        return
    for sparse in graph.sparse_initializer:
        name = sparse.values.name
        what = f"{label}: sparse initializer {name!r}"
        dims = list(sparse.dims)
        values_tensor = sparse.values
        try:
            count = int(np.prod(dims, dtype=np.int64)) if dims else 1
            if any(d < 0 for d in dims) or count * 8 > _SPARSE_DENSE_LIMIT:
                raise InvalidModelError(
                    f"{what}: dense shape {dims} is negative or too large to expand; the file is corrupt"
                )
            values = onnx.numpy_helper.to_array(values_tensor).reshape(-1)
            indices = onnx.numpy_helper.to_array(sparse.indices).astype(np.int64)
            if indices.ndim == 2:
                if indices.shape[1] != len(dims):
                    raise ValueError(
                        f"indices have {indices.shape[1]} columns for {len(dims)} dims"
                    )
                indices = (
                    np.ravel_multi_index(tuple(indices.T), dims)
                    if len(indices)
                    else indices.reshape(0)
                )
            indices = indices.reshape(-1)
            if len(indices) != len(values) or (
                len(indices) and (indices.min() < 0 or indices.max() >= count)
            ):
                raise ValueError(
                    f"{len(indices)} indices (range "
                    f"{indices.min() if len(indices) else '-'}..{indices.max() if len(indices) else '-'}) for "
                    f"{len(values)} values in {count} elements"
                )
            dense = np.zeros(count, dtype=values.dtype)
            dense[indices] = values
        except InvalidModelError:
            raise
        except Exception as exc:
            raise InvalidModelError(
                f"{what} cannot be expanded: {one_line(exc, 200)}; the file is corrupt"
            ) from None
        graph.initializer.append(onnx.numpy_helper.from_array(dense.reshape(dims), name))
    del graph.sparse_initializer[:]
