"""The claim statistics (adapterbench/results/stats.py) against direct computations."""

import numpy as np
import pytest
from scipy import stats as S

from adapterbench.results import stats


def test_one_task_equals_the_paired_t_test():
    d = [1.2, 0.4, 2.0, -0.3, 0.9]
    est = stats.stratified({"rte": d})
    ref = S.ttest_1samp(d, 0.0, alternative="greater")
    assert est.delta == pytest.approx(np.mean(d)) and est.df == pytest.approx(4)
    assert est.p_greater() == pytest.approx(ref.pvalue)
    lo, hi = est.ci
    ci = S.t.interval(0.95, 4, loc=np.mean(d), scale=S.sem(d))
    assert (lo, hi) == pytest.approx(ci)


def test_tasks_are_strata_not_replicates():
    # task a: 5 seeds at +1, task b: 2 seeds at -1 -> pooled mean would be +0.43, stratified is 0
    est = stats.stratified({"a": [1.1, 0.9, 1.0, 1.05, 0.95], "b": [-1.1, -0.9]})
    assert est.delta == pytest.approx(0.0, abs=1e-12)
    var_a, var_b = np.var([1.1, 0.9, 1.0, 1.05, 0.95], ddof=1), np.var([-1.1, -0.9], ddof=1)
    assert est.se == pytest.approx(np.sqrt(var_a / 5 + var_b / 2) / 2)


def test_power_grows_with_seeds_and_matches_a_simulation():
    rng = np.random.default_rng(0)
    est = stats.stratified({"a": [0.5, 1.5, 1.0, 0.2], "b": [1.0, 2.0, 0.0, 1.4]})
    p3, p10 = stats.power(est, 1.0, 3), stats.power(est, 1.0, 10)
    assert 0 < p3 < p10 < 1
    k = stats.seeds_for_power(est, 1.0)
    assert stats.power(est, 1.0, k) >= 0.8 > stats.power(est, 1.0, k - 1)
    # simulate the one-task case: power of a one-sided t-test at effect 1, sd 1, n 6
    one = stats.Estimate(0.0, 1.0, 5.0, (1.0,), (6,))
    hits = 0
    for _ in range(4000):
        x = rng.normal(1.0, 1.0, 6)
        hits += S.ttest_1samp(x, 0.0, alternative="greater").pvalue < 0.05
    assert stats.power(one, 1.0) == pytest.approx(hits / 4000, abs=0.03)


def test_holm():
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5]) == [0.5]
