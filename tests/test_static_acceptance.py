"""int8-static's acceptance of a candidate (issue 24: "what passes generalises"): agreement must meet
the threshold by its point estimate, not merely be explained by chance at it as export verification's
binomial test allows. Magika's byte CNN flipped 2 of 64 judged files fully int8, passed that test and
agreed on 98.05 % of 768 held-out files (``benchmarks/byte_cnn.py``; the slow zoo test runs it)."""

from __future__ import annotations

import pytest

import modelpress
from modelpress.evaluation.criteria import Bounds, allowed_flips, infer_criteria, judge
from modelpress.plugin_api import load_dataset
from modelpress.plugins.quantize.evaluate import ACCEPT_ALPHA, Scorer
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
