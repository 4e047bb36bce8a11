"""int8-static's search stops a candidate's sweep once its first samples decide a miss
(``MissBound``), and returns what full sweeps of every candidate would have returned (issue 24:
quantize CPU against ORT's: 22 of PP-OCR rec's 120 candidate runs were spent on candidates whose
first samples had already failed)."""

from __future__ import annotations

import numpy as np
import pytest

import modelpress
from modelpress.evaluation.criteria import Bounds, Criterion, MissBound, infer_criteria, judge
from modelpress.plugin_api import PassContext, load_dataset
from modelpress.plugins.quantize.evaluate import Scorer, Unfinished
from modelpress.plugins.quantize.sensitivity import Ranking, search
from tests.test_criteria_kinds import flip_winners


def _decided(
    criterion: Criterion,
    ref: np.ndarray,
    out: np.ndarray,
    batch: int,
    rng: np.random.Generator | None = None,
) -> int | None:
    """The row count after which the bound decided a miss (None: never); with ``rng``, the batches
    are taken in a random order (each with its ``start``)."""
    bound = MissBound(criterion, ref)
    starts = list(range(0, len(out), batch))
    if rng is not None:
        starts = [starts[i] for i in rng.permutation(len(starts))]
    for seen, start in enumerate(starts, 1):
        if bound.add(out[start : start + batch], start if rng is not None else None):
            assert bound.spent >= 1.0  # the share of the allowance used says so too
            return min(seen * batch, len(out))
    return None


@pytest.mark.parametrize("metric", ["agreement", "cosine", "relative_error", "nrmse"])
def test_a_miss_bound_decides_only_what_the_whole_set_decides(digits, digits_mlp_path, metric):
    model = modelpress.load(digits_mlp_path, show_progress=False)
    data = load_dataset({"x": digits["x_test"][:128]}, model.signature, what="calibration")
    scorer = Scorer(model, data, Bounds(agreement=0.99, cosine=0.99, relative_error=0.1))
    (ref,) = scorer.expected
    specs = {
        "agreement": "agreement>=0.97",
        "cosine": "cosine>=0.99",
        "relative_error": "relative_error<=0.1",
        "nrmse": "nrmse<=0.1",
    }
    (criterion, *_) = infer_criteria(
        scorer.names, scorer.expected, model=model, overrides={scorer.names[0]: specs[metric]}
    )
    rng = np.random.default_rng(0)
    early = 0
    for trial in range(40):
        # NOTE: errors of every size, some concentrated in the first rows (decided early), some spread
        noise = rng.standard_normal(ref.shape).astype(np.float32) * ref.std() * rng.uniform(0, 0.3)
        if trial % 2:
            noise[rng.integers(8, len(ref)) :] = 0
        out = flip_winners(ref + noise, int(rng.integers(0, 12)))
        met = judge([criterion], [ref], [out]).met
        after = _decided(criterion, ref, out, int(rng.integers(1, 9)))
        assert after is None or not met, (trial, after)
        early += after is not None and after < len(ref)
        # NOTE: in any order of the rows, a miss is decided only where the whole set misses
        shuffled = _decided(criterion, ref, out, int(rng.integers(1, 9)), rng)
        assert shuffled is None or not met, (trial, shuffled)
    assert early >= 5  # the bound does decide misses before the last row
    # a perfect candidate never misses; a non-finite row decides at once
    assert _decided(criterion, ref, ref.copy(), 4) is None
    broken = ref.copy()
    broken[1, 0] = np.nan
    assert _decided(criterion, ref, broken, 4) == 4


def _candidates(model: modelpress.Model, bits: dict[str, int]):
    """``build(int8, weight_only)``: the model with the weights of the ``int8`` layers rounded to
    ``bits["int8"]`` bits, the ``weight_only`` ones to ``bits["weight_only"]``, the rest to
    ``bits["float"]`` (so that even the float candidate can miss a tight criterion)."""

    def build(int8: list[str], weight_only: list[str]) -> modelpress.Model:
        result = model.clone()
        for layer in result.weighted_layers():
            form = (
                "int8"
                if layer.name in int8
                else "weight_only"
                if layer.name in weight_only
                else "float"
            )
            w = layer.weight_array()
            step = float(np.abs(w).max()) / (2 ** (bits[form] - 1) - 1)
            result.replace_initializer(layer.weight.name, np.round(w / step) * step)
        return result

    return build


@pytest.mark.parametrize(
    "cosine, met", [(0.999, True), (0.99999999, False)], ids=["a-candidate-meets", "none-meets"]
)
def test_the_search_returns_what_full_sweeps_return(digits, digits_mlp_path, cosine, met):
    model = modelpress.load(digits_mlp_path, show_progress=False)
    data = load_dataset({"x": digits["x_test"][:96]}, model.signature, what="calibration")
    scorer = Scorer(model, data, Bounds(agreement=0.99, cosine=cosine), batch_size=8)
    order = [layer.name for layer in model.weighted_layers()]
    ranking = Ranking(order, dict.fromkeys(order, 1.0), dict.fromkeys(order, 4096))
    build = _candidates(model, {"int8": 3, "weight_only": 6, "float": 12})
    ctx = PassContext(show_progress=False)
    full = search(ranking, build, scorer.score, ctx, max_evaluations=6)
    evaluations = scorer.evaluations
    stopped = search(ranking, build, scorer.score, ctx, max_evaluations=6, finish=scorer.finish)
    assert scorer.evaluations == 2 * evaluations  # finishing a sweep is not another evaluation
    assert full is not None and stopped is not None and full.met is met
    assert (stopped.int8, stopped.weight_only, stopped.float_) == (
        full.int8,
        full.weight_only,
        full.float_,
    )
    assert stopped.judgement.values == full.judgement.values
    assert (stopped.met, stopped.evaluations) == (full.met, full.evaluations)
    assert not isinstance(stopped.judgement, Unfinished)
    # the fully int8 candidate misses on its first batch: that sweep stopped there
    first = scorer.score(build(order, []), stop_early=True)
    assert isinstance(first, Unfinished) and not first.met
    assert (
        scorer.finish(build(order, [])).values
        == judge(
            scorer.criteria,
            scorer.expected,
            [np.asarray(o) for o in _outputs(build(order, []), scorer)],
        ).values
    )


def _outputs(candidate: modelpress.Model, scorer: Scorer) -> list[np.ndarray]:
    from modelpress.plugin_api import make_session, run_dataset

    return run_dataset(make_session(candidate), scorer.data.batches(scorer.batch_size))


def test_a_stopped_sweep_runs_the_batches_nearest_a_miss_first(
    digits, digits_mlp_path, monkeypatch
):
    """The sweeps after the first run the batches that used most of the criteria's allowance first:
    a candidate whose flips sit in later samples is decided on its second sweep after the batches
    holding them (its first ran in the samples' order up to them); a full sweep out of order is
    judged exactly as one in order."""
    from modelpress.plugins.quantize import evaluate

    model = modelpress.load(digits_mlp_path, show_progress=False)
    x = digits["x_test"][:96].copy()
    x[-8:] = np.random.default_rng(0).uniform(0, 1, x[-8:].shape)  # noise: where low bits flip
    data = load_dataset({"x": x}, model.signature, what="calibration")
    scorer = Scorer(model, data, Bounds(agreement=0.99), batch_size=8)
    runs: list[int] = []
    real_run = evaluate.run
    monkeypatch.setattr(
        evaluate, "run", lambda session, feeds: runs.append(1) or real_run(session, feeds)
    )
    build = _candidates(model, {"int8": 4, "weight_only": 12, "float": 12})
    order = [layer.name for layer in model.weighted_layers()]
    coarse, good = build(order, []), build([], order)
    (out,) = _outputs(coarse, scorer)
    flips = (np.argmax(out, 1) != np.argmax(scorer.expected[0], 1)).reshape(12, 8).sum(axis=1)
    allowed = scorer.criteria[0].allowed()
    assert allowed is not None and flips.sum() > allowed
    # in order: the sweep stops at the batch whose flips pass what is allowed
    decided = int(np.argmax(np.cumsum(flips) > allowed)) + 1
    assert isinstance(scorer.score(coarse, stop_early=True), Unfinished) and len(runs) == decided
    # again: the batches with the most flips first, the miss decided after as few as it takes
    fewest = int(np.argmax(np.cumsum(np.sort(flips)[::-1]) > allowed)) + 1
    assert fewest < decided
    runs.clear()
    assert isinstance(scorer.score(coarse, stop_early=True), Unfinished) and len(runs) == fewest
    # out of order, a full sweep is judged as one in order
    assert scorer.order.next() != list(range(12))
    runs.clear()
    assert scorer.score(good, stop_early=True).values == scorer.score(good).values
    assert len(runs) == 12  # the in-order sweep runs through run_dataset
