"""Paired bootstrap, AUROC and Spearman against cases with known answers."""

import itertools

import numpy as np
import pytest

from dreamprm_jax.evaluation import statistics


def test_paired_bootstrap_matches_normal_theory():
    # Differences in {-1, 0, 1} with known mean 0.1 and variance: the bootstrap interval of
    # the mean must match mean +- 1.96 sd / sqrt(Q) to within a few percent of its width.
    rng = np.random.default_rng(0)
    q = 4000
    d = rng.choice([-1.0, 0.0, 1.0], size=q, p=[0.15, 0.60, 0.25])
    result = statistics.paired_bootstrap([d], num_resamples=4000, seed=1)
    half = 1.96 * d.std(ddof=1) / np.sqrt(q)
    assert result.diff == pytest.approx(d.mean(), abs=1e-12)
    assert result.ci95[0] == pytest.approx(d.mean() - half, abs=0.1 * half)
    assert result.ci95[1] == pytest.approx(d.mean() + half, abs=0.1 * half)
    assert result.num_questions == q


def test_paired_bootstrap_pools_seed_means():
    a = np.ones(10)            # seed 0: arm always better
    b = np.zeros(1000)         # seed 1: never
    result = statistics.paired_bootstrap([a, b], num_resamples=200)
    assert result.diff == pytest.approx(0.5, abs=1e-12)  # mean of seed means, not of questions
    assert result.ci95 == pytest.approx((0.5, 0.5), abs=1e-12)  # constant within each seed


def test_paired_bootstrap_rejects_empty():
    with pytest.raises(ValueError, match="at least one"):
        statistics.paired_bootstrap([np.zeros(0)])


def test_auroc_against_pairwise_count():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 5, size=60).astype(float)  # many ties
    labels = rng.random(60) < 0.4
    pos, neg = scores[labels], scores[~labels]
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert statistics.auroc(scores, labels) == pytest.approx(brute, abs=1e-12)
    assert np.isnan(statistics.auroc(scores, np.ones(60, bool)))


def test_within_question_auroc_skips_one_class_questions():
    scores = np.array([[3.0, 1.0, 2.0], [0.0, 1.0, 2.0], [5.0, 5.0, 5.0]])
    correct = np.array([[True, False, False], [True, False, False], [True, True, True]])
    # q0: correct ranks first (1.0); q1: correct ranks last (0.0); q2 has no wrong candidate.
    assert statistics.within_question_auroc(scores, correct) == pytest.approx(0.5, abs=1e-12)
    mask = np.array([[True, True, False], [True, False, True], [True, True, True]])
    assert statistics.within_question_auroc(scores, correct, mask) == pytest.approx(0.5, abs=1e-12)


def test_spearman_known_values():
    assert statistics.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0, abs=1e-12)
    assert statistics.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0, abs=1e-12)
    assert np.isnan(statistics.spearman([1, 1, 1], [1, 2, 3]))


def test_spearman_critical_value_for_six_domains():
    # The exact one-sided 5 % critical value of Spearman's rho for K = 6 is 0.829 (tables):
    # rho = 0.829 (sum d^2 = 6) has p <= 0.05, the next lower value 0.771 has p > 0.05.
    x = np.arange(6)
    rhos = sorted({round(statistics.spearman(x, p), 6) for p in itertools.permutations(range(6))})
    below = max(r for r in rhos if r < 0.82)
    one_swap = np.array([0, 1, 2, 3, 5, 4])   # sum d^2 = 2 -> 0.943
    assert statistics.spearman(x, one_swap) == pytest.approx(0.942857, abs=1e-6)
    y = np.array([1, 0, 2, 3, 5, 4])          # two adjacent swaps: sum d^2 = 4 -> 0.886
    assert statistics.spearman(x, y) == pytest.approx(0.885714, abs=1e-6)
    z = np.array([0, 2, 3, 1, 4, 5])          # sum d^2 = 6 -> 0.829
    assert statistics.spearman(x, z) == pytest.approx(0.828571, abs=1e-6)
    assert statistics.spearman_permutation_p(x, z) <= 0.05
    assert below == pytest.approx(0.771429, abs=1e-6)
    w = np.array([0, 1, 4, 3, 2, 5])          # sum d^2 = 8 -> 0.771
    assert statistics.spearman(x, w) == pytest.approx(0.771429, abs=1e-6)
    assert statistics.spearman_permutation_p(x, w) > 0.05


def test_spearman_permutation_p_monte_carlo_agrees_with_exact():
    x = np.arange(7)
    y = np.array([0, 2, 1, 3, 5, 4, 6])
    exact = statistics.spearman_permutation_p(x, y)
    sampled = statistics.spearman_permutation_p(x, y, exact_up_to=0, num_samples=20000, seed=2)
    assert sampled == pytest.approx(exact, abs=0.01)


def test_spearman_closed_forms():
    x = [0.1, 0.5, 0.2, 0.9]
    assert statistics.spearman(x, [1, 3, 2, 4]) == pytest.approx(1.0, abs=1e-12)   # same order
    assert statistics.spearman(x, [4, 2, 3, 1]) == pytest.approx(-1.0, abs=1e-12)  # reversed
    # no ties: 1 - 6 sum d^2 / (n (n^2 - 1)); ranks of x = [0, 2, 1, 3], of y = [0, 1, 3, 2]: sum d^2 = 6
    assert statistics.spearman(x, [1, 2, 4, 3]) == pytest.approx(1 - 6 * 6 / (4 * 15), abs=1e-12)
    # ties: Pearson of the average ranks [0.5, 0.5, 2] and [0, 1, 2] = sqrt(3) / 2
    assert statistics.spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(np.sqrt(3) / 2, abs=1e-12)
