"""Data for calibration, training, evaluation and verification.

One convention everywhere in modelpress: a dataset is a set of arrays named after the model's
inputs, plus optionally an array named ``labels``. It can be given as

* a path to an ``.npz`` file (arrays named after the inputs, optionally ``labels``) or an
  ``.npy`` file (for a single-input model);
* an ``.npz`` of samples one by one: ``input/0``, ``input/1``, ... for every input (and
  ``labels/0``, ...), each one sample (with or without its batch axis), shapes free to differ;
* a dict ``{input_name: array, ..., "labels": array}``, or one array for a single-input model;
  a dict of lists ``{input_name: [sample, sample, ...]}`` is samples one by one;
* an iterable of batches or samples, each a dict, an array, or an ``(inputs, labels)`` tuple —
  this covers a list of samples, a generator, a torch ``DataLoader`` and a ``tf.data.Dataset``
  (tensors are converted with ``.numpy()``). An array one rank below its input's is one sample.

Samples may differ in shape (sequences of different lengths): consecutive samples of one shape
are stacked into a run, and a model is never fed two shapes in one batch. A model declared with
a first axis of 1 (exported with batch 1) takes data with any number of samples on that axis and
is fed one sample at a time. Likewise a model exported with a fixed batch of ``B`` (every input's
first axis ``B``, as ``torch.export.export(net, (x[:2],))`` gives) is fed in batches of exactly ``B``;
the last ``len % B`` samples of a run, which cannot fill a batch, are left out with a warning (a model
with a dynamic batch uses them all), and data with fewer than ``B`` samples is an error naming the fix.

A model whose inputs share no batch axis 0 (a scalar input, as silero-vad's sample rate, or one whose first
axis is fixed above 1 beside a dynamic one, as its ``state [2, N, 128]``) is fed each item whole, as given.

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

__all__ = [
    "AXIS_SIZES_KEY",
    "LABELS",
    "Dataset",
    "declared_axis_sizes",
    "index_limits",
    "load_dataset",
    "sample_inputs",
]

LABELS = "labels"
# NOTE: the key of ``Provenance.extra`` under which an adapter declares the sizes of named symbolic axes
# for generated samples (see :func:`declared_axis_sizes`).
AXIS_SIZES_KEY = "sample_axis_sizes"


@dataclass(frozen=True)
class Run:
    """Consecutive samples of one shape, stacked: one array per model input (and maybe labels)."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    whole: bool = False  # NOTE: one feed as given, never cut (see _whole_feeds): one sample

    def __len__(self) -> int:
        return 1 if self.whole else len(next(iter(self.inputs.values())))

    def take(self, n: int) -> Run:
        if self.whole:
            return self
        return Run(
            {k: v[:n] for k, v in self.inputs.items()},
            self.labels[:n] if self.labels is not None else None,
        )


class Dataset:
    """Validated samples, as runs of consecutive samples of one shape (one run when every sample
    has the same shape: then ``inputs`` holds one array per model input with all the samples).

    ``max_batch`` is the model's fixed batch, when it has one (1 for a model exported with batch 1): every
    feed then holds exactly that many samples, whatever batch size is asked for.
    Everything that runs a model over a data set goes through :meth:`batches`, one run at a time.
    """

    __slots__ = ("max_batch", "runs")

    def __init__(
        self,
        inputs: Mapping[str, np.ndarray] | None = None,
        labels: np.ndarray | None = None,
        *,
        runs: tuple[Run, ...] = (),
        max_batch: int | None = None,
    ):
        self.runs: tuple[Run, ...] = (
            (Run(dict(inputs), labels),) if inputs is not None else tuple(runs)
        )
        self.max_batch = max_batch

    @property
    def inputs(self) -> dict[str, np.ndarray]:
        """One array per model input holding every sample (all samples must have one shape)."""
        if len(self.runs) == 1:
            return self.runs[0].inputs
        shapes = sorted({str({k: v.shape[1:] for k, v in run.inputs.items()}) for run in self.runs})
        raise DataError(
            f"this data holds samples of {len(shapes)} different shapes ({', '.join(shapes[:3])}{', ...' if len(shapes) > 3 else ''}); "
            "this use needs them all of one shape: pad them to one length"
        )

    @property
    def labels(self) -> np.ndarray | None:
        parts = [run.labels for run in self.runs]
        if any(p is None for p in parts):
            return None
        if len(parts) == 1:
            return parts[0]
        try:
            return np.concatenate(parts, axis=0)  # type: ignore[arg-type]
        except ValueError:
            raise DataError(
                "the labels of this data have different shapes from sample to sample; pad them to one shape"
            ) from None

    @property
    def whole_feeds(self) -> bool:
        """Whether the feeds are run as given, never cut nor joined (a model with no common batch axis 0)."""
        return any(run.whole for run in self.runs)

    @property
    def ragged(self) -> bool:
        """Whether the samples have different shapes (more than one run)."""
        return len(self.runs) > 1

    def __len__(self) -> int:
        return sum(len(run) for run in self.runs)

    def _step(self, run: Run, batch_size: int | None) -> int:
        return 1 if run.whole else self.max_batch or batch_size or len(run)

    def _feeds(self, batch_size: int | None) -> Iterator[Run]:
        """Each feed :meth:`batches` yields, as a run (with its labels): a whole feed as given."""
        for run in self.runs:
            if run.whole:
                yield run
                continue
            step = self._step(run, batch_size)
            for start in range(0, len(run), step):
                yield Run(
                    {k: v[start : start + step] for k, v in run.inputs.items()},
                    run.labels[start : start + step] if run.labels is not None else None,
                )

    def batches(self, batch_size: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Feeds of at most ``batch_size`` samples (all of a run when None), never more than
        ``max_batch``, never mixing samples of different shapes; in the order given."""
        for feed in self._feeds(batch_size):
            yield dict(feed.inputs)

    def select_feeds(self, keep: list[bool], batch_size: int | None = None) -> Dataset:
        """The feeds :meth:`batches` yields for ``batch_size`` whose ``keep`` is true (one flag per feed, in
        order), as a dataset (int8-static calibrates an If branch on the feeds that take it)."""
        runs = tuple(feed for feed, kept in zip(self._feeds(batch_size), keep, strict=True) if kept)
        if not runs:
            raise DataError("no feed of this data was selected")
        return Dataset(runs=runs, max_batch=self.max_batch)

    def batch_count(self, batch_size: int | None = None) -> int:
        """How many feeds :meth:`batches` yields for ``batch_size``."""
        return sum(-(-len(run) // self._step(run, batch_size)) for run in self.runs)

    def largest_sample(self) -> dict[str, np.ndarray]:
        """One sample of the run whose samples are largest (to size batches by memory)."""
        run = max(
            self.runs,
            key=lambda r: sum((v if r.whole else v[:1]).nbytes for v in r.inputs.values()),
        )
        if run.whole:
            return dict(run.inputs)
        return {
            k: v[: self.max_batch or 1] for k, v in run.inputs.items()
        }  # NOTE: a fixed batch is fed whole

    def take(self, n: int) -> Dataset:
        """The first ``n`` samples (for a fixed batch: a whole number of batches, at least one)."""
        if self.max_batch and self.max_batch > 1:
            n = max(n - n % self.max_batch, self.max_batch)
        runs: list[Run] = []
        for run in self.runs:
            if n <= 0:
                break
            runs.append(run if len(run) <= n else run.take(n))
            n -= len(runs[-1])
        return Dataset(runs=tuple(runs), max_batch=self.max_batch)

    def __repr__(self) -> str:
        return (
            f"Dataset({len(self)} samples in {len(self.runs)} run(s), max_batch={self.max_batch})"
        )


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
        raise DataError(
            f"{label}: not a numpy array (bad .npy header: {one_line(exc, 160)}); the file is damaged or not numpy data"
        ) from None
    if dtype.hasobject:
        raise DataError(
            f"{label}: holds Python objects (dtype {dtype}); only numeric arrays are accepted (loading objects runs code)"
        )
    declared = dtype.itemsize * int(np.prod(shape, dtype=object))
    header = stream.tell()
    if declared > max(stored - header, 0):
        raise DataError(
            f"{label}: its header declares shape {shape} of {dtype} ({declared:,} bytes) but only {max(stored - header, 0):,} "
            "bytes of data are stored; the file is truncated or damaged"
        )
    if declared > _memory_bytes():
        raise DataError(
            f"{label}: declares {declared:,} bytes (shape {shape}), more than this machine's memory; use a smaller data set"
        )


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
            if (
                info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size
            ) or (
                info.compress_type == zipfile.ZIP_DEFLATED
                and info.file_size > 1100 * info.compress_size + 4096
            ):
                raise DataError(
                    f"{label}: the archive claims {info.file_size:,} bytes from {info.compress_size:,} stored; the file is damaged"
                )
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
    except (
        ValueError,
        OSError,
        EOFError,
        KeyError,
        zipfile.BadZipFile,
        zlib.error,
        NotImplementedError,
        RuntimeError,
    ) as exc:
        # NOTE: zipfile and numpy raise all of these on truncated, damaged or exotic archives.
        raise DataError(
            f"{what} data file {str(path)!r} cannot be read as numpy data ({type(exc).__name__}: {one_line(exc, 200)}); the file is damaged or not numpy data"
        ) from None


def per_sample_arrays(
    arrays: Mapping[str, np.ndarray], names: list[str], label: str
) -> list[dict[str, np.ndarray]] | None:
    """The samples of an .npz in the per-sample layout (``input/0``, ``input/1``, ..., ``labels/0``, ...),
    in index order; None for the one-array-per-input layout."""
    keyed: dict[str, tuple[str, int]] = {}
    for key in arrays:
        name, sep, index = key.rpartition("/")
        if sep and index.isdigit() and key not in names and (name in names or name == LABELS):
            keyed[key] = (name, int(index))
    if not keyed:
        return None
    if len(keyed) != len(arrays):
        whole = [k for k in arrays if k not in keyed]
        raise DataError(
            f"{label} mixes per-sample arrays ({next(iter(keyed))!r}, ...) with whole arrays ({', '.join(map(repr, whole[:3]))}); "
            "use one layout: `input/0`, `input/1`, ... for every input, or one array per input"
        )
    samples: list[dict[str, np.ndarray]] = [
        {} for _ in range(max(i for _, i in keyed.values()) + 1)
    ]
    for key, (name, i) in keyed.items():
        samples[i][name] = arrays[key]
    for i, sample in enumerate(samples):
        missing = [f"{n}/{i}" for n in names if n not in sample]
        if missing:
            raise DataError(
                f"{label} has no array {', '.join(map(repr, missing))}: each sample i needs one array `input/i` per model input ({', '.join(names)})"
            )
    return samples


def _listed(value: Any) -> bool:
    """A list or tuple of arrays (one per sample), as opposed to an array written as a list of numbers."""
    return (
        isinstance(value, (list, tuple)) and bool(value) and all(hasattr(v, "shape") for v in value)
    )


def _mapping_items(source: Mapping[Any, Any], what: str) -> list[dict[str, np.ndarray]]:
    """A dict of arrays is one item; a dict of lists of arrays (one per sample) is one item per sample."""
    if not any(_listed(v) for v in source.values()):
        return [{str(k): _to_numpy(v) for k, v in source.items()}]
    lengths = {str(k): len(v) if _listed(v) else None for k, v in source.items()}
    if len(set(lengths.values())) != 1:
        raise DataError(
            f"{what} data gives lists of different lengths (or lists beside arrays): {lengths}; give one array per sample for every input"
        )
    count = next(iter(lengths.values())) or 0
    return [{str(k): _to_numpy(v[i]) for k, v in source.items()} for i in range(count)]


def _item(batch: Any, i: int, names: list[str], what: str) -> dict[str, np.ndarray]:
    """One element of an iterable (a batch, or one sample): a dict, an (inputs..., labels) tuple or an array."""
    if isinstance(batch, Mapping):
        return {str(k): _to_numpy(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        if len(batch) == len(names) + 1:
            return {
                **{n: _to_numpy(b) for n, b in zip(names, batch[:-1], strict=True)},
                LABELS: _to_numpy(batch[-1]),
            }
        if len(batch) == len(names):
            return {n: _to_numpy(b) for n, b in zip(names, batch, strict=True)}
        raise DataError(
            f"{what} data batch {i} has {len(batch)} parts; expected {len(names)} inputs (+ labels)"
        )
    if len(names) != 1:
        raise DataError(
            f"{what} data batch {i} is one array but the model has inputs {', '.join(names)}"
        )
    return {names[0]: _to_numpy(batch)}


def _collect(source: Any, signature: Signature, what: str) -> list[dict[str, np.ndarray]]:
    """Turn any accepted source into its items in order (each a dict of arrays: a batch, or one sample)."""
    names = signature.input_names
    if isinstance(source, (str, os.PathLike)):
        arrays = read_arrays(Path(source), what)
        if isinstance(arrays, dict):
            return per_sample_arrays(arrays, names, f"{what} data file {str(source)!r}") or [arrays]
        source = arrays
    if isinstance(source, Mapping):
        samples = per_sample_arrays(source, names, f"{what} data")
        return (
            _mapping_items(source, what)
            if samples is None
            else [{k: _to_numpy(v) for k, v in s.items()} for s in samples]
        )
    if isinstance(source, np.ndarray) or (
        hasattr(source, "__array__") and not hasattr(source, "__iter__")
    ):
        if len(names) != 1:
            raise DataError(
                f"{what} data is a single array but the model has {len(names)} inputs ({', '.join(names)}); give a dict or .npz named after them"
            )
        return [{names[0]: _to_numpy(source)}]
    if hasattr(source, "__iter__"):
        return [_item(batch, i, names, what) for i, batch in enumerate(source)]
    raise DataError(
        f"{what} data of type {type(source).__name__} is not supported; give a .npz path, a dict of arrays or an iterable of batches"
    )


def _one_sample(array: np.ndarray, declared: tuple[Any, ...]) -> bool:
    """Whether ``array`` is one sample of an input declared ``declared``: one rank below, every fixed size right."""
    return array.ndim == len(declared) - 1 and all(
        not isinstance(d, int) or d < 0 or d == g
        for d, g in zip(declared[1:], array.shape, strict=True)
    )


def _batched(item: dict[str, np.ndarray], signature: Signature) -> dict[str, np.ndarray]:
    """``item`` with a batch axis added where it is one sample without one (an array one rank
    below its input's that fits its fixed sizes; a 0-d label), labels too when its inputs were single samples."""
    shapes = {spec.name: spec.shape for spec in signature.inputs if spec.shape is not None}
    out: dict[str, np.ndarray] = {}
    single = False
    for k, v in item.items():
        if k != LABELS and (v.ndim == 0 or (k in shapes and _one_sample(v, shapes[k]))):
            out[k], single = v[np.newaxis], True
        else:
            out[k] = v
    labels = out.get(LABELS)
    if labels is not None and (labels.ndim == 0 or single):
        out[LABELS] = labels[np.newaxis]
    return out


def _stack(
    items: list[dict[str, np.ndarray]], signature: Signature, what: str
) -> list[dict[str, np.ndarray]]:
    """Consecutive items whose arrays agree in shape (but for the batch axis) stacked into one."""
    groups: list[list[dict[str, np.ndarray]]] = []
    last: Any = None
    for i, raw in enumerate(items):
        item = _batched(raw, signature)
        if groups and set(item) != set(groups[-1][0]):
            raise DataError(
                f"{what} data item {i} has arrays {', '.join(item)} but item 0 has {', '.join(groups[0][0])}; give every item the same arrays"
            )
        key = tuple((k, v.shape[1:]) for k, v in item.items())
        if key != last:
            groups.append([])
        groups[-1].append(item)
        last = key
    return [
        g[0] if len(g) == 1 else {k: np.concatenate([part[k] for part in g], axis=0) for k in g[0]}
        for g in groups
    ]


def _check_input(
    spec: TensorSpec, array: np.ndarray, what: str, batch: int | None = None
) -> np.ndarray:
    if spec.shape is not None:
        if array.ndim != len(spec.shape):
            raise DataError(
                f"{what} data for input {spec.name!r} has shape {array.shape}; the model expects {spec.describe()}"
            )
        for axis, (got, want) in enumerate(zip(array.shape, spec.shape, strict=True)):
            if (
                isinstance(want, int)
                and want >= 0
                and got != want
                and not (axis == 0 and want == batch)
            ):
                raise DataError(
                    f"{what} data for input {spec.name!r} has size {got} on axis {axis}; the model expects {spec.describe()}"
                )
    want_dtype = spec.dtype
    if array.dtype != want_dtype:
        real = (
            np.issubdtype(array.dtype, np.integer)
            or np.issubdtype(array.dtype, np.floating)
            or array.dtype == np.bool_
        )
        if np.issubdtype(want_dtype, np.floating) and real:
            array = array.astype(want_dtype)
        elif np.issubdtype(want_dtype, np.integer) and np.issubdtype(array.dtype, np.integer):
            array = array.astype(want_dtype)
        elif want_dtype == np.bool_ and array.dtype == np.bool_:
            pass
        else:
            raise DataError(
                f"{what} data for input {spec.name!r} is {array.dtype}; the model expects {want_dtype}"
            )
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise DataError(f"{what} data for input {spec.name!r} has {bad} NaN or infinite values")
    return array


def _check_run(
    arrays: dict[str, np.ndarray],
    signature: Signature,
    what: str,
    where: str,
    batch: int | None = None,
) -> Run:
    """One run of samples of one shape, checked against the signature (names, ranks, sizes, dtypes, counts)."""
    labels = arrays.pop(LABELS, None)
    missing = [n for n in signature.input_names if n not in arrays]
    if missing:
        have = ", ".join(arrays) or "nothing"
        raise DataError(
            f"{what} data{where} has no array for model input(s) {', '.join(missing)} (it has {have})"
        )
    unknown = [k for k in arrays if k not in signature.input_names]
    if unknown:
        raise DataError(
            f"{what} data{where} has arrays {', '.join(unknown)} that are not model inputs ({', '.join(signature.input_names)}) nor {LABELS!r}"
        )
    inputs = {
        spec.name: _check_input(spec, arrays[spec.name], what, batch) for spec in signature.inputs
    }
    counts = {k: len(v) for k, v in inputs.items()}
    if len(set(counts.values())) > 1:
        raise DataError(f"{what} data{where} inputs have different numbers of samples: {counts}")
    n = next(iter(counts.values())) if counts else 0
    if labels is not None and len(labels) != n:
        raise DataError(f"{what} data{where} has {len(labels)} labels for {n} samples")
    return Run(inputs, labels)


def batch_limit(signature: Signature) -> int | None:
    """The model's fixed batch: 1 when an input is declared with a first axis of 1 (exported with batch 1),
    ``B`` when every input's first axis is ``B``; else None (a dynamic batch: no limit)."""
    firsts = [spec.shape[0] if spec.shape else None for spec in signature.inputs]
    if any(isinstance(f, int) and f == 1 for f in firsts):
        return 1
    same = set(firsts)
    return firsts[0] if len(same) == 1 and isinstance(firsts[0], int) and firsts[0] > 1 else None  # type: ignore[return-value]


def _whole_batches(
    runs: tuple[Run, ...], batch: int | None, signature: Signature, what: str
) -> tuple[Run, ...]:
    """Each run cut to a whole number of the model's fixed batches (see the module docstring)."""
    if not batch or batch == 1:
        return runs
    total = sum(len(run) for run in runs)
    kept = tuple(run.take(len(run) - len(run) % batch) for run in runs if len(run) >= batch)
    used = sum(len(run) for run in kept)
    shape = signature.inputs[0].describe()
    fix = (
        "re-export it with a dynamic batch: torch.export.export(net, (x,), dynamic_shapes=({0: torch.export.Dim('batch')},)), "
        "or torch.onnx.export(..., dynamic_axes={'input': {0: 'batch'}})"
    )
    if not used:
        raise DataError(
            f"{what} data has {total} sample(s); the model was exported with a fixed batch of {batch} ({shape}) "
            f"and is fed {batch} at a time: give at least {batch} samples, or {fix}"
        )
    if used < total:
        import warnings

        warnings.warn(
            f"{what} data: the model was exported with a fixed batch of {batch} ({shape}), so it is fed {batch} samples at a time "
            f"and {total - used} of {total} samples that cannot fill a batch are left out; to use them all, {fix}",
            stacklevel=3,
        )
    return kept


def load_dataset(
    source: Any, signature: Signature, *, what: str = "input", need_labels: bool = False
) -> Dataset:
    """Validate ``source`` against the model's ``signature`` (see the module docstring)."""
    if source is None:
        raise DataError(f"no {what} data was given")
    if isinstance(source, Dataset):
        return source
    if _whole_feeds(signature):
        return _whole_dataset(_collect(source, signature, what), signature, what)
    items = _stack(_collect(source, signature, what), signature, what)
    if not items:
        raise DataError(f"{what} data is empty (0 samples)")
    batch = batch_limit(signature)
    runs = tuple(
        _check_run(
            dict(arrays),
            signature,
            what,
            f" (samples of shape {i + 1} of {len(items)})" if len(items) > 1 else "",
            batch,
        )
        for i, arrays in enumerate(items)
    )
    if any(run.labels is None for run in runs) and any(run.labels is not None for run in runs):
        raise DataError(f"{what} data has labels for some samples but not all")
    data = Dataset(
        runs=_whole_batches(tuple(run for run in runs if len(run)), batch, signature, what),
        max_batch=batch,
    )
    if not len(data):
        raise DataError(f"{what} data is empty (0 samples)")
    if need_labels and runs[0].labels is None:
        raise DataError(f"{what} data needs an array named {LABELS!r}")
    return data


def _whole_feeds(signature: Signature) -> bool:
    """Whether the model's inputs have no common batch axis 0: a scalar input (silero-vad's sample rate), or
    one whose first axis is fixed above 1 beside a dynamic one (its ``state [2, batch, 128]``). Each item
    given is then one feed, checked and run as given, never stacked with others nor cut."""
    firsts = [spec.shape[0] if spec.shape else "scalar" for spec in signature.inputs]
    if any(spec.shape is not None and len(spec.shape) == 0 for spec in signature.inputs):
        return True
    fixed = [f for f in firsts if isinstance(f, int) and f > 1]
    return bool(fixed) and any(not isinstance(f, int) for f in firsts)


def _whole_dataset(items: list[dict[str, np.ndarray]], signature: Signature, what: str) -> Dataset:
    """Each item one whole feed (see :func:`_whole_feeds`), checked against the signature."""
    runs = []
    for i, arrays in enumerate(items):
        arrays = dict(arrays)
        labels = arrays.pop(LABELS, None)
        where = f" (feed {i + 1} of {len(items)})" if len(items) > 1 else ""
        missing = [n for n in signature.input_names if n not in arrays]
        unknown = [k for k in arrays if k not in signature.input_names]
        if missing or unknown:
            raise DataError(
                f"{what} data{where} lacks model input(s) {', '.join(missing) or 'none'} and has arrays "
                f"{', '.join(unknown) or 'none'} that are not inputs ({', '.join(signature.input_names)})"
            )
        inputs = {
            spec.name: _check_input(spec, arrays[spec.name], what) for spec in signature.inputs
        }
        runs.append(Run(inputs, labels, whole=True))
    if not runs:
        raise DataError(f"{what} data is empty (0 samples)")
    return Dataset(runs=tuple(runs))


# Ops that hand an index on unchanged (input 0 only; Concat: any input), and those that shift it by a constant.
_PASS_THROUGH = frozenset(
    {
        "Cast",
        "Reshape",
        "Unsqueeze",
        "Squeeze",
        "Flatten",
        "Identity",
        "Slice",
        "Expand",
        "Transpose",
        "Tile",
    }
)
_TABLE_SOURCES = frozenset({"DequantizeLinear", "Cast", "Identity"})


def _constant(value: Any) -> np.ndarray | None:
    """The value of an initializer or a Constant node's output, else None."""
    if value is None:
        return None
    tensor = value.const_value
    if tensor is None:
        from onnx_ir import convenience

        tensor = convenience.get_const_tensor(value)
    return None if tensor is None else np.asarray(tensor.numpy())


def _table_rows(gather: Any) -> int | None:
    """The size of a Gather's table on the gathered axis: from the table's constant (also behind a
    DequantizeLinear or Cast, as a quantized embedding is) or its static shape."""
    attr = gather.attributes.get("axis")
    axis = attr.as_int() if attr is not None else 0
    value = gather.inputs[0]
    while value is not None:
        shape = value.const_value.shape if value.const_value is not None else value.shape
        if (
            shape is not None
            and -len(shape) <= axis < len(shape)
            and isinstance(shape[axis], int)
            and shape[axis] > 0
        ):
            return int(shape[axis])
        producer = value.producer()
        value = (
            producer.inputs[0]
            if producer is not None and producer.op_type in _TABLE_SOURCES and producer.inputs
            else None
        )
    return None


def _next_offsets(user: Any, index: int, offset: tuple[int, int]) -> tuple[int, int] | None:
    """The offset range of ``user``'s output when input ``index`` is an index shifted by ``offset``;
    None when the op does not hand the index on (or adds something not constant)."""
    if (user.op_type in _PASS_THROUGH and index == 0) or user.op_type == "Concat":
        return offset
    if (
        user.op_type in ("Add", "Sub")
        and len(user.inputs) == 2
        and (user.op_type == "Add" or index == 0)
    ):
        other = _constant(user.inputs[1 - index])
        if (
            other is None
            or other.size == 0
            or not np.issubdtype(other.dtype, np.number)
            or not np.all(np.isfinite(other))
        ):
            return None
        lo, hi = (
            (float(other.min()), float(other.max()))
            if user.op_type == "Add"
            else (-float(other.max()), -float(other.min()))
        )
        return offset[0] + int(np.floor(lo)), offset[1] + int(np.ceil(hi))
    return None


def _index_range(value: Any) -> tuple[int, int] | None:
    """``[low, high)`` for an integer input so that it indexes every Gather table it reaches in range."""
    low, high, found = 0, None, False
    frontier: list[tuple[Any, tuple[int, int]]] = [(value, (0, 0))]
    seen: set[tuple[int, int, tuple[int, int]]] = set()
    while frontier:
        current, offset = frontier.pop()
        for user, index in current.uses():
            if (id(user), index, offset) in seen:
                continue
            seen.add((id(user), index, offset))
            if user.op_type == "Gather" and index == 1:
                rows = _table_rows(user)
                if rows is not None:
                    found = True
                    low, high = (
                        max(low, -offset[0]),
                        rows - offset[1] if high is None else min(high, rows - offset[1]),
                    )
                continue
            shifted = _next_offsets(user, index, offset)
            if shifted is not None:
                frontier.extend((out, shifted) for out in user.outputs)
    return (low, high) if found and high is not None else None


def index_limits(graph: Any) -> dict[str, int | tuple[int, int]]:
    """For each integer graph input that reaches the indices of a ``Gather`` (directly or through
    Cast, Reshape, Unsqueeze, Squeeze, Flatten, Slice, Expand, Transpose, Tile, Concat, and Add or
    Sub of a constant): the values it may take so that every table it reaches is indexed in range —
    the smallest table's rows less the largest constant added (an int ``n`` for ``[0, n)``, else a
    ``(low, high)`` pair when a negative constant is added). Tables are found as constants, also
    behind a DequantizeLinear (a quantized embedding), or from a static shape."""
    limits: dict[str, int | tuple[int, int]] = {}
    for value in graph.inputs:
        if value.dtype is None or not value.dtype.is_integer():
            continue
        found = _index_range(value)
        if found is not None:
            limits[value.name] = found[1] if found[0] == 0 else found
    return limits


# NOTE: a generated input is kept under this size; a declared 10^9 batch is capped, never allocated.
SAMPLE_BYTES_LIMIT = 64 * 2**20
SEQUENCE_LENGTH = 16


def declared_axis_sizes(extra: Mapping[str, Any]) -> dict[str, int]:
    """The sizes a model declares for its named symbolic axes in generated samples: the
    ``"sample_axis_sizes"`` entry (:data:`AXIS_SIZES_KEY`) of its ``provenance.extra``, a JSON
    object of axis name -> positive int. An adapter sets it when axes are related in a way the
    names alone do not say (a decoder's mask spans ``past_sequence_length + sequence_length``);
    it travels in the exported file with the provenance. Empty when none is declared."""
    sizes = extra.get(AXIS_SIZES_KEY) or {}
    if not isinstance(sizes, Mapping) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v > 0
        for k, v in sizes.items()
    ):
        raise DataError(
            f"the model's provenance declares {AXIS_SIZES_KEY}={sizes!r}; it must map axis names to positive ints (fix the adapter that set it)"
        )
    return dict(sizes)


def _sample_shape(spec: TensorSpec, batch: int, axis_sizes: Mapping[str, int]) -> tuple[int, ...]:
    """A symbolic axis named in ``axis_sizes`` -> that size; else a symbolic batch (first axis) ->
    ``batch``, other symbolic axes -> 16 for token/sequence inputs (integer, or float of rank <= 3),
    ``batch`` for image-like ones; capped in bytes."""
    if spec.shape is None:
        raise DataError(
            f"cannot generate sample data for input {spec.describe()} (unknown rank); pass sample inputs"
        )
    sequence = np.issubdtype(spec.dtype, np.integer) or len(spec.shape) <= 3
    shape = [
        d
        if isinstance(d, int) and d >= 0
        else axis_sizes[d]
        if isinstance(d, str) and d in axis_sizes
        else (batch if axis == 0 or not sequence else SEQUENCE_LENGTH)
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


def _indices(
    rng: np.random.Generator, spec: TensorSpec, shape: tuple[int, ...], limit: int | tuple[int, int]
) -> np.ndarray:
    low, high = (0, limit) if isinstance(limit, int) else limit
    if high <= low:
        raise DataError(
            f"cannot generate sample data for input {spec.describe()}: no value indexes every table it reaches in range "
            f"(it would have to be in [{low}, {high})); pass sample inputs"
        )
    return rng.integers(low, high, size=shape).astype(spec.dtype)


def sample_inputs(
    signature: Signature,
    *,
    batch: int = 2,
    seed: int = 0,
    limits: Mapping[str, int | tuple[int, int]] | None = None,
    axis_sizes: Mapping[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """Realistic random inputs that fit ``signature`` (for verification when no data is given).

    Symbolic axes named in ``axis_sizes`` take those sizes (one size per name across all inputs;
    see :func:`declared_axis_sizes`), other symbolic batch axes become ``batch``, other symbolic
    axes of sequence-like inputs 16; an input
    declared larger than 64 MB is capped (never allocated whole). Floats are standard normal;
    integers feeding an embedding table (``limits``, see :func:`index_limits`) are token ids over
    the whole range that indexes every table they reach, inputs named like masks are ones, other integers are drawn from [0, 10).
    """
    rng = np.random.default_rng(seed)
    limits = limits or {}
    feeds: dict[str, np.ndarray] = {}
    for spec in signature.inputs:
        shape = _sample_shape(spec, batch, axis_sizes or {})
        if np.issubdtype(spec.dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif np.issubdtype(spec.dtype, np.integer):
            if "mask" in spec.name.lower():
                feeds[spec.name] = np.ones(shape, spec.dtype)
            else:
                feeds[spec.name] = _indices(rng, spec, shape, limits.get(spec.name, 10))
        elif spec.dtype == np.bool_:
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(np.bool_)
        else:
            raise DataError(
                f"cannot generate sample data for input {spec.describe()}; pass sample inputs"
            )
    return feeds
