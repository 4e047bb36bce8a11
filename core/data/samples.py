"""Data for calibration, training, evaluation and verification.

One convention everywhere in modelpress: a dataset is a set of arrays named after the model's
inputs, plus optionally an array named ``labels``. It can be given as

* a path to an ``.npz`` file (arrays named after the inputs, optionally ``labels``) or an
  ``.npy`` file (for a single-input model);
* a dict ``{input_name: array, ..., "labels": array}``, or one array for a single-input model;
* an iterable of batches, each a dict, an array, or an ``(inputs, labels)`` tuple — this covers
  a torch ``DataLoader`` and a ``tf.data.Dataset`` (tensors are converted with ``.numpy()``).

Problems (empty data, a missing input, a wrong rank, size or dtype, NaN or inf) are a
:class:`modelpress.DataError` raised before any work starts.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelpress.base.errors import DataError, one_line
from modelpress.ir.signature import Signature, TensorSpec

__all__ = ["LABELS", "Dataset", "index_limits", "load_dataset", "sample_inputs"]

LABELS = "labels"


@dataclass(frozen=True)
class Dataset:
    """Validated arrays, one per model input (all with the same number of samples), and labels."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def batches(self, batch_size: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        n = len(self)
        step = n if not batch_size else batch_size
        for start in range(0, n, step):
            yield {k: v[start : start + step] for k, v in self.inputs.items()}

    def take(self, n: int) -> Dataset:
        labels = self.labels[:n] if self.labels is not None else None
        return Dataset({k: v[:n] for k, v in self.inputs.items()}, labels)


def _to_numpy(obj: Any) -> np.ndarray:
    if hasattr(obj, "detach"):  # torch tensor
        obj = obj.detach().cpu()
    if hasattr(obj, "numpy") and not isinstance(obj, np.ndarray):
        obj = obj.numpy()
    return np.asarray(obj)


def _memory_bytes() -> int:
    """Physical memory: no single data array may declare more than this."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 1 << 40


def _check_npy_header(stream: Any, stored: int, label: str) -> None:
    """Read an .npy header from ``stream`` and refuse arrays whose declared size cannot be right.

    NOTE: numpy allocates what the header declares before it reads a byte of data, so a header
    that claims 10^11 rows is a MemoryError (or a machine swapping) unless it is checked first.
    """
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    except Exception as exc:
        raise DataError(f"{label}: not a numpy array (bad .npy header: {one_line(exc, 160)}); the file is damaged or not numpy data") from None
    if dtype.hasobject:
        raise DataError(f"{label}: holds Python objects (dtype {dtype}); only numeric arrays are accepted (loading objects runs code)")
    declared = dtype.itemsize * int(np.prod(shape, dtype=object))
    header = stream.tell()
    if declared > max(stored - header, 0):
        raise DataError(
            f"{label}: its header declares shape {shape} of {dtype} ({declared:,} bytes) but only {max(stored - header, 0):,} "
            "bytes of data are stored; the file is truncated or damaged"
        )
    if declared > _memory_bytes():
        raise DataError(f"{label}: declares {declared:,} bytes (shape {shape}), more than this machine's memory; use a smaller data set")


def _check_declared_sizes(path: Path, what: str) -> None:
    """Check every array's declared size against the bytes stored before numpy allocates it."""
    if path.suffix == ".npy":
        with path.open("rb") as stream:
            _check_npy_header(stream, path.stat().st_size, f"{what} data file {str(path)!r}")
        return
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            label = f"{what} data file {str(path)!r} array {info.filename.removesuffix('.npy')!r}"
            # NOTE: the zip's own uncompressed size is a claim too; deflate cannot expand more than ~1030x.
            if (info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size) or (
                info.compress_type == zipfile.ZIP_DEFLATED and info.file_size > 1100 * info.compress_size + 4096
            ):
                raise DataError(f"{label}: the archive claims {info.file_size:,} bytes from {info.compress_size:,} stored; the file is damaged")
            with archive.open(info) as stream:
                _check_npy_header(stream, info.file_size, label)


def read_arrays(path: Path, what: str) -> dict[str, np.ndarray] | np.ndarray:
    """The arrays of a ``.npz`` (a dict) or ``.npy`` file; damaged or lying files are a DataError."""
    if not path.exists():
        raise DataError(f"{what} data file {str(path)!r} does not exist")
    if path.suffix not in (".npz", ".npy"):
        raise DataError(f"{what} data file {str(path)!r}: expected a .npz or .npy file")
    if not path.is_file():
        raise DataError(f"{what} data file {str(path)!r} is not a regular file")
    try:
        _check_declared_sizes(path, what)
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        return np.load(path, allow_pickle=False)
    except DataError:
        raise
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError) as exc:
        # NOTE: zipfile and numpy raise all of these on truncated, damaged or exotic archives.
        raise DataError(f"{what} data file {str(path)!r} cannot be read as numpy data ({type(exc).__name__}: {one_line(exc, 200)}); the file is damaged or not numpy data") from None


def _collect(source: Any, signature: Signature, what: str) -> dict[str, np.ndarray]:
    """Turn any accepted source into one dict of full arrays (inputs and maybe labels)."""
    names = signature.input_names
    if isinstance(source, (str, os.PathLike)):
        source = read_arrays(Path(source), what)
    if isinstance(source, Mapping):
        return {str(k): _to_numpy(v) for k, v in source.items()}
    if isinstance(source, np.ndarray) or (hasattr(source, "__array__") and not hasattr(source, "__iter__")):
        if len(names) != 1:
            raise DataError(f"{what} data is a single array but the model has {len(names)} inputs ({', '.join(names)}); give a dict or .npz named after them")
        return {names[0]: _to_numpy(source)}
    if hasattr(source, "__iter__"):
        parts: dict[str, list[np.ndarray]] = {}
        for i, batch in enumerate(source):
            if isinstance(batch, Mapping):
                items = {str(k): _to_numpy(v) for k, v in batch.items()}
            elif isinstance(batch, (tuple, list)):
                if len(batch) == len(names) + 1:
                    items = {**{n: _to_numpy(b) for n, b in zip(names, batch[:-1], strict=True)}, LABELS: _to_numpy(batch[-1])}
                elif len(batch) == len(names):
                    items = {n: _to_numpy(b) for n, b in zip(names, batch, strict=True)}
                else:
                    raise DataError(f"{what} data batch {i} has {len(batch)} parts; expected {len(names)} inputs (+ labels)")
            else:
                if len(names) != 1:
                    raise DataError(f"{what} data batch {i} is one array but the model has inputs {', '.join(names)}")
                items = {names[0]: _to_numpy(batch)}
            for k, v in items.items():
                parts.setdefault(k, []).append(v if v.ndim else v.reshape(1))
        return {k: np.concatenate(v, axis=0) for k, v in parts.items()}
    raise DataError(f"{what} data of type {type(source).__name__} is not supported; give a .npz path, a dict of arrays or an iterable of batches")


def _check_input(spec: TensorSpec, array: np.ndarray, what: str) -> np.ndarray:
    if spec.shape is not None:
        if array.ndim != len(spec.shape):
            raise DataError(f"{what} data for input {spec.name!r} has shape {array.shape}; the model expects {spec.describe()}")
        for axis, (got, want) in enumerate(zip(array.shape, spec.shape, strict=True)):
            if isinstance(want, int) and want >= 0 and got != want:
                raise DataError(f"{what} data for input {spec.name!r} has size {got} on axis {axis}; the model expects {spec.describe()}")
    want_dtype = spec.dtype
    if array.dtype != want_dtype:
        real = np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating) or array.dtype == np.bool_
        if np.issubdtype(want_dtype, np.floating) and real:
            array = array.astype(want_dtype)
        elif np.issubdtype(want_dtype, np.integer) and np.issubdtype(array.dtype, np.integer):
            array = array.astype(want_dtype)
        elif want_dtype == np.bool_ and array.dtype == np.bool_:
            pass
        else:
            raise DataError(f"{what} data for input {spec.name!r} is {array.dtype}; the model expects {want_dtype}")
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise DataError(f"{what} data for input {spec.name!r} has {bad} NaN or infinite values")
    return array


def load_dataset(source: Any, signature: Signature, *, what: str = "input", need_labels: bool = False) -> Dataset:
    """Validate ``source`` against the model's ``signature`` (see the module docstring)."""
    if source is None:
        raise DataError(f"no {what} data was given")
    if isinstance(source, Dataset):
        return source
    arrays = _collect(source, signature, what)
    labels = arrays.pop(LABELS, None)
    missing = [n for n in signature.input_names if n not in arrays]
    if missing:
        have = ", ".join(arrays) or "nothing"
        raise DataError(f"{what} data has no array for model input(s) {', '.join(missing)} (it has {have})")
    unknown = [k for k in arrays if k not in signature.input_names]
    if unknown:
        raise DataError(f"{what} data has arrays {', '.join(unknown)} that are not model inputs ({', '.join(signature.input_names)}) nor {LABELS!r}")
    inputs = {spec.name: _check_input(spec, arrays[spec.name], what) for spec in signature.inputs}
    counts = {k: len(v) for k, v in inputs.items()}
    if len(set(counts.values())) > 1:
        raise DataError(f"{what} data inputs have different numbers of samples: {counts}")
    n = next(iter(counts.values())) if counts else 0
    if n == 0:
        raise DataError(f"{what} data is empty (0 samples)")
    if labels is not None and len(labels) != n:
        raise DataError(f"{what} data has {len(labels)} labels for {n} samples")
    if need_labels and labels is None:
        raise DataError(f"{what} data needs an array named {LABELS!r}")
    return Dataset(inputs, labels)


_PASS_THROUGH = frozenset({"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"})


def index_limits(graph: Any) -> dict[str, int]:
    """For each integer graph input used (directly or through Cast/Reshape/...) as the indices of a
    ``Gather`` on a constant table: the table's size on the gathered axis (the vocabulary size)."""
    limits: dict[str, int] = {}
    for value in graph.inputs:
        if value.dtype is None or not value.dtype.is_integer():
            continue
        frontier, seen = [value], set()
        while frontier:
            current = frontier.pop()
            for user, index in current.uses():
                if id(user) in seen:
                    continue
                seen.add(id(user))
                if user.op_type == "Gather" and index == 1 and user.inputs[0] is not None and user.inputs[0].const_value is not None:
                    attr = user.attributes.get("axis")
                    axis = attr.as_int() if attr is not None else 0
                    size = int(user.inputs[0].const_value.shape[axis])
                    limits[value.name] = min(limits.get(value.name, size), size)
                elif user.op_type in _PASS_THROUGH and index == 0:
                    frontier.extend(user.outputs)
    return limits


# NOTE: a generated input is kept under this size; a declared 10^9 batch is capped, never allocated.
SAMPLE_BYTES_LIMIT = 64 * 2**20
SEQUENCE_LENGTH = 16


def _sample_shape(spec: TensorSpec, batch: int) -> tuple[int, ...]:
    """Symbolic batch (first axis) -> ``batch``; other symbolic axes -> 16 for token/sequence
    inputs (integer, or float of rank <= 3), ``batch`` for image-like ones; capped in bytes."""
    if spec.shape is None:
        raise DataError(f"cannot generate sample data for input {spec.describe()} (unknown rank); pass sample inputs")
    sequence = np.issubdtype(spec.dtype, np.integer) or len(spec.shape) <= 3
    shape = [
        d if isinstance(d, int) and d >= 0 else (batch if axis == 0 or not sequence else SEQUENCE_LENGTH)
        for axis, d in enumerate(spec.shape)
    ]
    itemsize = np.dtype(spec.dtype).itemsize
    for axis in range(len(shape)):
        total = itemsize
        for d in shape:
            total *= d  # NOTE: Python ints: a declared 10^9 x 10^9 does not overflow
        if total <= SAMPLE_BYTES_LIMIT:
            break
        shape[axis] = max(1, shape[axis] * SAMPLE_BYTES_LIMIT // total)
    return tuple(shape)


def sample_inputs(signature: Signature, *, batch: int = 2, seed: int = 0, limits: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """Realistic random inputs that fit ``signature`` (for verification when no data is given).

    Symbolic batch axes become ``batch``, other symbolic axes of sequence-like inputs 16; an input
    declared larger than 64 MB is capped (never allocated whole). Floats are standard normal;
    integers feeding an embedding table (``limits``, see :func:`index_limits`) are token ids over
    the whole table, inputs named like masks are ones, other integers are drawn from [0, 10).
    """
    rng = np.random.default_rng(seed)
    limits = limits or {}
    feeds: dict[str, np.ndarray] = {}
    for spec in signature.inputs:
        shape = _sample_shape(spec, batch)
        if np.issubdtype(spec.dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif np.issubdtype(spec.dtype, np.integer):
            if "mask" in spec.name.lower():
                feeds[spec.name] = np.ones(shape, spec.dtype)
            else:
                feeds[spec.name] = rng.integers(0, limits.get(spec.name, 10), size=shape).astype(spec.dtype)
        elif spec.dtype == np.bool_:
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(np.bool_)
        else:
            raise DataError(f"cannot generate sample data for input {spec.describe()}; pass sample inputs")
    return feeds
