"""int8-static's acceptance of a candidate (issue 24: "what passes generalises"): agreement must meet
the threshold by its point estimate, not merely be explained by chance at it as export verification's
binomial test allows. Magika's byte CNN flipped 2 of 64 judged files fully int8, passed that test and
agreed on 98.05 % of 768 held-out files (``benchmarks/byte_cnn.py``; the slow zoo test runs it)."""

from __future__ import annotations

import numpy as np
import pytest

import modelpress
from modelpress.evaluation.criteria import Bounds, allowed_flips, infer_criteria, judge
from modelpress.plugin_api import load_dataset
from modelpress.plugins.quantize.evaluate import ACCEPT_ALPHA, ACCEPT_MARGIN, Scorer
from tests.test_criteria_kinds import flip_winners


def test_the_quantizer_needs_the_threshold_met_where_verification_gives_chance_its_due(
    digits, digits_mlp_path
):
    model = modelpress.load(digits_mlp_path, show_progress=False)
    data = load_dataset({"x": digits["x_test"][:64]}, model.signature, what="calibration")
    bounds = Bounds(agreement=0.99, cosine=0.9)
    scorer = Scorer(model, data, bounds)
    (logits,) = scorer.expected
    assert len(logits) == 64 and logits.shape[1] == 10
    verification = infer_criteria(scorer.names, scorer.expected, model=model, bounds=bounds)
    for flips, accepted, verified in ((0, True, True), (1, False, True), (2, False, True)):
        flipped = [flip_winners(logits, flips)]
        assert judge(scorer.criteria, scorer.expected, flipped).met is accepted, flips
        assert judge(verification, scorer.expected, flipped).met is verified, flips
    two = judge(scorer.criteria, scorer.expected, [flip_winners(logits, 2)]).summary()
    assert "2 of 64 differ, more than the 0 that 99.00% agreement allows on 64 rows" in two
    # more rows: the point estimate's allowance, 1 % of them, rounded down (the median count)
    assert [allowed_flips(n, 0.99, ACCEPT_ALPHA) for n in (64, 256, 1000)] == [0, 2, 10]
    assert allowed_flips(1000, 0.99) == 15


@pytest.mark.parametrize("n", [200_000, 1_000_000])
def test_the_normal_approximation_keeps_the_level(n):
    """Past 1000 expected flips the binomial tail is approximated; the level still applies."""
    assert allowed_flips(n, 0.99, 0.5) == n // 100
    assert n // 100 < allowed_flips(n, 0.99) <= n // 100 + 1.65 * (n * 0.0099) ** 0.5


def _with_cosines(ref, cosines, rng):
    """``ref``'s rows each turned so that its cosine to the original is the one given."""
    out = ref.astype(np.float64).copy()
    for i, c in enumerate(cosines):
        r = out[i]
        noise = rng.standard_normal(r.shape)
        noise -= noise @ r / (r @ r) * r  # orthogonal to the row
        noise *= np.linalg.norm(r) / np.linalg.norm(noise)
        out[i] = c * r + np.sqrt(1 - c * c) * noise
    return out.astype(ref.dtype)


def test_the_quantizer_judges_a_mean_cosine_by_what_its_spread_leaves(digits, digits_mlp_path):
    """One far-off sample among perfect ones gives the same mean cosine as a small error spread
    evenly; held-out samples repeat the first by chance, so the quantizer asks the mean less one
    standard error to meet the bound (verification judges the mean, as the user's bound reads)."""
    model = modelpress.load(digits_mlp_path, show_progress=False)
    data = load_dataset({"x": digits["x_test"][:16]}, model.signature, what="calibration")
    bounds = Bounds(agreement=0.0, cosine=0.99)
    scorer = Scorer(model, data, bounds)
    (logits,) = scorer.expected
    verification = infer_criteria(scorer.names, scorer.expected, model=model, bounds=bounds)
    assert ACCEPT_MARGIN == 1.0
    assert [c.margin for c in scorer.criteria if c.metric == "cosine"] == [1.0]
    rng = np.random.default_rng(0)
    even = _with_cosines(logits, [0.992] * 16, rng)  # mean 0.992, no spread
    one_off = _with_cosines(logits, [1.0] * 15 + [0.872], rng)  # mean 0.992, s.e. 0.008
    for outputs, accepted in ((even, True), (one_off, False)):
        assert judge(verification, scorer.expected, [outputs]).met
        judged = judge(scorer.criteria, scorer.expected, [outputs])
        assert judged.met is accepted
    text = judge(scorer.criteria, scorer.expected, [one_off]).summary()
    assert "cosine (mean - 1 standard error) 0.98400 (needs >= 0.99)" in text
