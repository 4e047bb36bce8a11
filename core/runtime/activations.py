"""Activation statistics: the named tensors of a model observed over a data set, in one ONNX
Runtime session, batch by batch.

All tensors are added as outputs of *one* session, which sweeps the data once. Memory is
bounded: the data is streamed in batches sized so that one batch's observed activations fit
``ACTIVATION_BUDGET`` (measured on the largest sample; samples of different shapes, such as
sequences of different lengths, are run in separate batches, and a model exported with batch 1
one sample at a time), and only running statistics are kept (min, max, sum; optionally
per-channel sums and a 2048-bin histogram of ``|x|``), never the activations of earlier batches,
so peak memory does not grow with the number of samples. The histogram's range starts at the
first batch's ``max|x|`` and doubles when a later batch exceeds it, merging bins pairwise (exact:
no count moves to a wrong bin; the resolution stays >= 1024 bins over the final ``max|x|``).

Plugin authors call :func:`modelpress.plugin_api.activation_stats`; int8-static's calibration
is built on :class:`ActivationCollector`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from modelpress.data.samples import Dataset, load_dataset
from modelpress.ir.model import Model
from modelpress.plugin.methods import PassContext
from modelpress.runtime.session import make_session, run, with_outputs

__all__ = [
    "ACTIVATION_BUDGET",
    "BINS",
    "ActivationCollector",
    "TensorStats",
    "activation_stats",
    "calibration_batch",
]

BINS = 2048
# Elements binned at once into the histogram (its temporaries: ~20 bytes an element).
HIST_CHUNK = 1 << 16
# Bytes of observed activations one batch may produce.
ACTIVATION_BUDGET = 16 * 1024 * 1024
# Bytes of observed activations one run may produce: a batch is run in parts (its statistics unchanged).
RUN_BUDGET = ACTIVATION_BUDGET // 4


@dataclass
class TensorStats:
    """Running statistics of one tensor: ``min``, ``max``, ``absmax``, ``mean`` (over every element
    seen), ``channel_mean`` and ``channel_max`` (per channel of the axis asked for, else None) and ``hist`` (counts of
    ``|x|`` in ``BINS`` bins over ``[0, hist_range]``; zeros unless asked for)."""

    min: float = float("inf")
    max: float = float("-inf")
    channel_sum: np.ndarray | None = None
    channel_max: np.ndarray | None = None
    count: int = 0  # elements per channel seen (for channel_mean)
    hist: np.ndarray = field(default_factory=lambda: np.zeros(BINS, np.int64))
    hist_range: float = 0.0  # the histogram covers |x| in [0, hist_range]
    total: float = 0.0  # sum of every element seen
    elements: int = 0

    @property
    def absmax(self) -> float:
        return max(abs(self.min), abs(self.max))

    @property
    def mean(self) -> float:
        return self.total / self.elements if self.elements else float("nan")

    @property
    def channel_mean(self) -> np.ndarray | None:
        return None if self.channel_sum is None or not self.count else self.channel_sum / self.count


def observe(s: TensorStats, x: np.ndarray, channel_axis: int | None, histogram: bool) -> None:
    """Fold one batch of a tensor into its running statistics."""
    lo, hi = float(x.min()), float(x.max())
    s.min, s.max = min(s.min, lo), max(s.max, hi)
    s.total += float(x.sum(dtype=np.float64))
    s.elements += int(x.size)
    if channel_axis is not None and x.ndim >= 2:
        channel = channel_axis % x.ndim
        others = tuple(a for a in range(x.ndim) if a != channel)
        per_channel = x.sum(axis=others, dtype=np.float64)
        s.channel_sum = per_channel if s.channel_sum is None else s.channel_sum + per_channel
        top = x.max(axis=others)
        s.channel_max = top if s.channel_max is None else np.maximum(s.channel_max, top)
        s.count += int(x.size // per_channel.size)
    if not histogram or s.absmax <= 0:
        return
    if s.hist_range <= 0:
        s.hist_range = s.absmax
    elif s.absmax > s.hist_range:
        _widen(s, s.absmax)
    # NOTE: bincount on precomputed bin indices: same counts as np.histogram, ~3x faster; a chunk
    # at a time: the bin indices of a whole tensor took 5 temporaries of its size (int64 ones twice
    # its bytes), 21 MB over the 4 MB tensor of MTCNN ONet's calibration batch, the pass's peak.
    # The chunk's indices are made in two buffers reused chunk after chunk (half the time of a new
    # array per step): |x| * scale in the tensor's float type, clamped to the last bin, truncated to int64 (the
    # same indices as truncating first and clamping after).
    flat, scale = x.reshape(-1), BINS / s.hist_range
    size = min(flat.size, HIST_CHUNK)
    scaled, bins = np.empty(size, flat.dtype), np.empty(size, np.int64)
    for start in range(0, flat.size, HIST_CHUNK):
        chunk = flat[start : start + HIST_CHUNK]
        f, b = scaled[: chunk.size], bins[: chunk.size]
        np.multiply(np.abs(chunk, out=f), scale, out=f)
        np.minimum(f, BINS - 1, out=f)
        b[...] = f
        s.hist += np.bincount(b, minlength=BINS)


def _widen(s: TensorStats, absmax: float) -> None:
    """Double the histogram's range until it covers ``absmax``, merging bins pairwise."""
    factor = 1
    while s.hist_range * factor < absmax and factor < BINS:
        factor *= 2
    merged = np.zeros(BINS, np.int64)
    merged[: BINS // factor] = s.hist.reshape(BINS // factor, factor).sum(axis=1)
    s.hist, s.hist_range = merged, s.hist_range * factor
    if s.hist_range < absmax:  # NOTE: more than 2048x wider: the old counts all sit in bin 0
        s.hist_range = absmax


@dataclass(frozen=True)
class _SizingRun:
    """The run on the largest sample that sizes the batches: its feeds and outputs, kept so that a
    first batch of that one sample is not run twice."""

    feeds: dict[str, np.ndarray]
    outputs: list[Any]

    @property
    def nbytes(self) -> int:
        return sum(int(np.asarray(r).nbytes) for r in self.outputs)


def calibration_batch(session: Any, data: Dataset, batch_size: int) -> int:
    """Samples per batch: at most ``batch_size``, and few enough that one batch's observed tensors
    fit ``ACTIVATION_BUDGET`` (sized from a run on the largest sample: the first when all have one
    shape). Samples of different shapes are never batched together."""
    return _batch_and_part(session, data, batch_size)[0]


def _batch_and_part(
    session: Any, data: Dataset, batch_size: int
) -> tuple[int, int, _SizingRun | None]:
    """:func:`calibration_batch`'s samples per batch, and per run (``RUN_BUDGET``; 0 where a batch
    is one sample), from one run on the largest sample (returned too; None where none was made)."""
    if len(data) <= 1 or batch_size <= 1 or data.max_batch == 1 or data.whole_feeds:
        return 1, 0, None
    feeds = data.largest_sample()
    sizing = _SizingRun(feeds, list(run(session, feeds)))
    per_sample = max(sizing.nbytes, 1)
    step = max(1, min(batch_size, ACTIVATION_BUDGET // per_sample))
    part = max(1, min(step, RUN_BUDGET // per_sample)) if step > 1 else 0
    return step, part, sizing


class ActivationCollector:
    """One session that outputs the named tensors (names the model does not have are left out).

    A batch (:meth:`batch`) is run in parts of at most ``RUN_BUDGET`` of observed tensors each: the
    statistics are those of the batch (min, max, sums, the histogram's range set by the first
    batch's ``max|x|``, found by a first sweep of its parts), while ORT holds a part's outputs."""

    def __init__(self, model: Model, names: list[str]) -> None:
        names = list(dict.fromkeys(names))
        self.session = make_session(with_outputs(model, names), spin=False)
        outputs = [o.name for o in self.session.get_outputs()]
        self.index = {name: outputs.index(name) for name in names if name in outputs}
        self.part = 0  # samples per run (0: the whole batch)
        self.sized: _SizingRun | None = None

    def batch(self, data: Dataset, batch_size: int) -> int:
        step, self.part, sized = _batch_and_part(self.session, data, batch_size)
        self.sized = sized if step == 1 else None
        return step

    def _sized_outputs(self, feeds: dict[str, np.ndarray]) -> list | None:  # type: ignore[type-arg]
        """The sizing run's outputs (:meth:`batch`) when ``feeds`` is that same one sample: the
        first batch's run, not made twice (PP-OCR det: ~0.1 CPU-s). Given out once."""
        sized, self.sized = self.sized, None
        if sized is not None and sized.feeds.keys() == feeds.keys():
            if all(np.array_equal(sized.feeds[k], feeds[k]) for k in feeds):
                return list(sized.outputs)
        return None

    def _parts(self, feeds: dict[str, np.ndarray], max_batch: int | None) -> list[dict]:
        if not self.part:
            return [feeds]
        return list(Dataset(feeds, max_batch=max_batch).batches(self.part))

    def _first_ranges(self, stats: dict[str, TensorStats], parts: list[dict]) -> None:
        """Each histogram's range from the first batch's ``max|x|`` over its parts (what one run of
        the whole batch sets): the bins are those of the batch, whichever part comes first."""
        peaks = dict.fromkeys(self.index, 0.0)
        for feeds in parts:
            results = run(self.session, feeds)
            for name, i in self.index.items():
                if results[i].size:
                    peaks[name] = max(peaks[name], float(np.max(np.abs(results[i]))))
            del results
        for name, peak in peaks.items():
            stats[name].hist_range = peak

    def collect(
        self,
        data: Dataset,
        step: int,
        *,
        histogram: bool,
        channel_axes: dict[str, int] | None,
        advance: Callable[[int], None],
    ) -> dict[str, TensorStats]:
        channel_axes = channel_axes or {}
        stats = {name: TensorStats() for name in self.index}
        for count, batch in enumerate(data.batches(step)):
            parts = self._parts(batch, data.max_batch)
            if histogram and count == 0 and len(parts) > 1:
                self._first_ranges(stats, parts)
            for feeds in parts:
                self._observe(stats, feeds, channel_axes, histogram)
            advance(1)
        return stats

    def _observe(
        self,
        stats: dict[str, TensorStats],
        feeds: dict[str, np.ndarray],
        channel_axes: dict[str, int],
        histogram: bool,
    ) -> None:
        sized = self._sized_outputs(feeds)
        results: list[np.ndarray | None] = (
            sized if sized is not None else list(run(self.session, feeds))
        )
        for name, i in self.index.items():
            x = np.asarray(results[i], np.float32)
            # NOTE: each output freed once observed: the next one's temporaries come on fewer
            results[i] = None
            if x.size:
                observe(stats[name], x, channel_axes.get(name), histogram)
            del x


def activation_stats(
    model: Model,
    names: list[str],
    data: Any,
    *,
    batch_size: int = 64,
    histogram: bool = False,
    channel_axes: dict[str, int] | None = None,
    context: PassContext | None = None,
) -> dict[str, TensorStats]:
    """Statistics of the tensors ``names`` (graph values: node outputs, inputs) of ``model`` over
    ``data``: ``{name: TensorStats}`` with ``min``, ``max``, ``absmax``, ``mean``.

    ``data``: a :class:`~modelpress.data.samples.Dataset` or anything ``load_dataset`` takes
    (``context.calibration``, a path, a dict of arrays). Streamed in batches of at most
    ``batch_size`` samples, fewer when one batch's observed tensors would pass 16 MB.
    ``histogram=True`` also keeps a histogram of ``|x|``; ``channel_axes`` (``{name: axis}``)
    per-channel means. ``context``: the running method's, for its progress bar (none without).
    A name the model does not have is left out of the result.
    """
    data = load_dataset(data, model.signature, what="statistics")
    collector = ActivationCollector(model, names)
    step = collector.batch(data, batch_size)
    context = context or PassContext(show_progress=False)
    with context.progress(
        "collecting activation statistics", total=data.batch_count(step)
    ) as advance:
        return collector.collect(
            data, step, histogram=histogram, channel_axes=channel_axes, advance=advance
        )
