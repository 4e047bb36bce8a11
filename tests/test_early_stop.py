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


def _decided(criterion: Criterion, ref: np.ndarray, out: np.ndarray, batch: int) -> int | None:
    """The row count after which the bound decided a miss (None: never)."""
    bound = MissBound(criterion, ref)
    for start in range(0, len(out), batch):
        if bound.add(out[start : start + batch]):
            return start + batch
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
