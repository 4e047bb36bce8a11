"""plugin_api.activation_stats: statistics of inner tensors over a data set, streamed batch by
batch, equal to the statistics of every activation at once."""

from __future__ import annotations

import numpy as np
import pytest

import modelpress
from modelpress.plugin_api import PassContext, activation_stats, load_dataset
from modelpress.testing import tiny_mlp


def _hidden(model, x):
    """The first Gemm's output and the ReLU after it, in numpy."""
    w = model.ir.graph.initializers["fc1.weight"].const_value.numpy()
    b = model.ir.graph.initializers["fc1.bias"].const_value.numpy()
    h = x @ w.T + b
    return h, np.maximum(h, 0)


def test_streamed_statistics_equal_those_of_every_activation():
    model = tiny_mlp(in_features=8, hidden=16, classes=4)
    x = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32) * 3
    context = PassContext(show_progress=False)
    stats = activation_stats(
        model, ["h", "h_relu", "no-such-tensor"], {"x": x}, batch_size=7, context=context
    )
    assert set(stats) == {"h", "h_relu"}  # a name the model lacks is left out
    for name, reference in zip(("h", "h_relu"), _hidden(model, x), strict=True):
        s = stats[name]
        assert s.elements == reference.size == 50 * 16
        assert s.min == pytest.approx(reference.min(), abs=1e-5) and s.max == pytest.approx(
            reference.max(), abs=1e-5
        )
        assert s.mean == pytest.approx(reference.mean(), abs=1e-5)
        assert s.absmax == pytest.approx(np.abs(reference).max(), abs=1e-5)
        assert s.channel_mean is None and not s.hist.any()  # asked for neither
    assert stats["h"].min < 0 == stats["h_relu"].min


def test_histogram_channel_means_and_a_loaded_dataset():
    model = tiny_mlp(in_features=8, hidden=16, classes=4)
    x = np.random.default_rng(1).standard_normal((33, 8)).astype(np.float32)
    data = load_dataset({"x": x}, model.signature)
    stats = activation_stats(
        model, ["h"], data, batch_size=4, histogram=True, channel_axes={"h": -1}
    )
    h, _ = _hidden(model, x)
    assert stats["h"].hist.sum() == h.size and stats["h"].hist_range >= np.abs(h).max() - 1e-5
    np.testing.assert_allclose(stats["h"].channel_mean, h.mean(axis=0), atol=1e-5)


def test_bad_data_is_a_data_error():
    model = tiny_mlp(in_features=8, hidden=16, classes=4)
    with pytest.raises(modelpress.DataError):
        activation_stats(model, ["h"], {"x": np.zeros((4, 5), np.float32)})
    with pytest.raises(modelpress.DataError, match="no statistics data"):
        activation_stats(model, ["h"], None)


def test_histogram_of_a_tensor_larger_than_a_chunk_counts_every_element_in_its_bin():
    """A large tensor is binned a chunk at a time (bounded temporaries), into the same bins as the
    whole tensor at once, with a second batch that widens the range merging bins as before."""
    from modelpress.runtime.activations import BINS, HIST_CHUNK, TensorStats, observe

    rng = np.random.default_rng(2)
    first = rng.standard_normal((3, HIST_CHUNK + 123)).astype(np.float32)
    wider = (rng.standard_normal((2, 2 * HIST_CHUNK + 7)) * 5).astype(np.float32)
    s = TensorStats()
    observe(s, first, None, True)
    span = float(np.abs(first).max())
    whole = np.bincount(
        np.minimum((np.abs(first).ravel() * (BINS / span)).astype(np.int64), BINS - 1),
        minlength=BINS,
    )
    assert s.hist_range == span and np.array_equal(s.hist, whole)
    observe(s, wider, None, True)
    factor = round(s.hist_range / span)
    merged = np.zeros(BINS, np.int64)
    merged[: BINS // factor] = whole.reshape(BINS // factor, factor).sum(axis=1)
    merged += np.bincount(
        np.minimum((np.abs(wider).ravel() * (BINS / s.hist_range)).astype(np.int64), BINS - 1),
        minlength=BINS,
    )
    assert factor > 1 and np.array_equal(s.hist, merged)
    assert s.hist.sum() == first.size + wider.size


def test_a_batch_run_in_parts_has_the_statistics_of_the_whole_batch(monkeypatch):
    """Past RUN_BUDGET of observed tensors per run, a batch runs in parts: min, max and the
    histogram (its range set by the first batch's max|x|) are those of whole-batch runs."""
    from modelpress.runtime import activations

    model = tiny_mlp(in_features=8, hidden=16, classes=4)
    x = np.random.default_rng(3).standard_normal((40, 8)).astype(np.float32) * 2
    data = load_dataset({"x": x}, model.signature)

    def collect(parted: bool):
        collector = activations.ActivationCollector(model, ["h", "h_relu"])
        step = collector.batch(data, 12)
        if not parted:
            collector.part = 0
        stats = collector.collect(
            data, step, histogram=True, channel_axes={"h": -1}, advance=lambda n: None
        )
        return collector.part, stats

    monkeypatch.setattr(activations, "RUN_BUDGET", 16 * 4 * 2 * 3)  # ~3 samples of h and h_relu
    part, parted = collect(True)
    _, whole = collect(False)
    assert 1 < part < 12  # batches of 12 samples, run a few at a time
    for name in ("h", "h_relu"):
        a, b = parted[name], whole[name]
        assert (a.min, a.max, a.hist_range, a.elements) == (b.min, b.max, b.hist_range, b.elements)
        assert np.array_equal(a.hist, b.hist) and a.hist.sum() == 40 * 16
        assert a.mean == pytest.approx(b.mean, rel=1e-12)
    np.testing.assert_allclose(parted["h"].channel_mean, whole["h"].channel_mean, rtol=1e-12)
