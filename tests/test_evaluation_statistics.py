"""Rank statistics: Spearman's correlation against closed forms (exact: atol 1e-12)."""

import numpy as np
import pytest

from dreamprm_jax.evaluation.statistics import ranks, spearman


def test_ranks_average_ties():
    np.testing.assert_array_equal(ranks([3.0, 1.0, 3.0, 2.0]), [2.5, 0.0, 2.5, 1.0])


def test_spearman_closed_forms():
    x = [0.1, 0.5, 0.2, 0.9]
    assert spearman(x, [1, 3, 2, 4]) == pytest.approx(1.0, abs=1e-12)   # same order
    assert spearman(x, [4, 2, 3, 1]) == pytest.approx(-1.0, abs=1e-12)  # reversed
    # no ties: 1 - 6 sum d^2 / (n (n^2 - 1)); ranks of x = [0, 2, 1, 3], of y = [0, 1, 3, 2]: sum d^2 = 6
    assert spearman(x, [1, 2, 4, 3]) == pytest.approx(1 - 6 * 6 / (4 * 15), abs=1e-12)
    # ties: Pearson of the average ranks [0.5, 0.5, 2] and [0, 1, 2] = sqrt(3) / 2
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(np.sqrt(3) / 2, abs=1e-12)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))  # a constant sample has no ranking
