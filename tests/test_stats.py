"""rr_tf.stats: paired differences and their percentile bootstrap interval,
checked against values computed by hand."""

import math

import numpy as np
import pytest

from rr_tf import stats


def test_paired_differences_use_only_the_seeds_both_arms_have():
    arm = {0: 0.5, 1: 0.6, 2: 0.7, 4: None}
    base = {0: 0.4, 1: 0.4, 2: 0.4, 3: 0.1, 4: 0.3}
    p = stats.paired_difference(arm, base)
    assert p["seeds"] == [0, 1, 2]  # seed 3 has no arm run, seed 4 no arm value
    assert p["diffs"] == pytest.approx([0.1, 0.2, 0.3])
    assert p["diff_mean"] == pytest.approx(0.2)
    assert p["diff_std"] == pytest.approx(0.1)  # sqrt(((-0.1)^2 + 0 + 0.1^2) / 2)


def test_bootstrap_of_one_two_three_spans_one_to_three():
    # Resample means of [1, 2, 3] lie in {1, 4/3, ..., 3}; P(mean = 1) = P(mean = 3)
    # = 1/27 = 3.7 % > 2.5 %, so the 2.5 % and 97.5 % quantiles are 1 and 3.
    d = [1.0, 2.0, 3.0]
    assert np.mean(d) == 2.0
    assert stats.bootstrap_ci(d) == (1.0, 3.0)


def test_bootstrap_interval_is_the_quantiles_of_the_resample_means():
    d = [1.0, 2.0, 3.0]
    means = stats.resample_means(d, resamples=4, seed=7)
    # every resample mean is a mean of three of the values
    assert all(any(math.isclose(m, k / 3) for k in range(3, 10)) for m in means)
    m = np.sort(means)
    # linear interpolation at positions 0.025 * 3 = 0.075 and 0.975 * 3 = 2.925
    lo = m[0] + 0.075 * (m[1] - m[0])
    hi = m[2] + 0.925 * (m[3] - m[2])
    assert stats.bootstrap_ci(d, resamples=4, seed=7) == pytest.approx((lo, hi))
    # the same rng seed gives the same interval, another seed (usually) another one
    assert stats.bootstrap_ci([0.1, -0.2, 0.05, 0.3], seed=3) == \
        stats.bootstrap_ci([0.1, -0.2, 0.05, 0.3], seed=3)


def test_single_seed_has_no_interval():
    p = stats.paired_difference({0: 0.7}, {0: 0.5})
    assert p["diff_mean"] == pytest.approx(0.2)
    assert all(math.isnan(c) for c in p["diff_ci95"]) and math.isnan(p["diff_std"])
    empty = stats.paired_difference({}, {0: 0.5})
    assert empty["seeds"] == [] and math.isnan(empty["diff_mean"])


def test_interval_width_matches_the_planning_rule_for_many_seeds():
    rng = np.random.default_rng(0)
    d = rng.normal(0.03, 0.05, size=200)
    lo, hi = stats.bootstrap_ci(d)
    s = d.std(ddof=1)
    assert lo < d.mean() < hi
    assert (hi - lo) / 2 == pytest.approx(1.96 * s / math.sqrt(len(d)), rel=0.1)
    assert stats.half_width(s, len(d)) == pytest.approx(2.0 * s / math.sqrt(200))


def test_seeds_needed():
    assert stats.seeds_needed(0.05, 0.05) == 4           # (2 * 0.05 / 0.05)^2
    assert stats.seeds_needed(0.07, 0.05) == 8           # 7.84 -> 8
    assert stats.seeds_needed(0.001, 0.05) == 2          # never fewer than two
    assert math.isnan(stats.seeds_needed(math.nan, 0.05))
    assert stats.half_width(0.05, 4) == pytest.approx(0.05)
