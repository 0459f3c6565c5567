"""Aggregations against hand computations (float64; tolerances stated per assertion)."""

import math

import numpy as np
import pytest

from dreamprm_jax.evaluation import aggregation as agg

# three chains, S = 4: [1, -2, 3], [0.5], and an empty chain (no step)
LOGITS = np.array([[1.0, -2.0, 3.0, 99.0], [0.5, 7.0, 7.0, 7.0], [4.0, 4.0, 4.0, 4.0]])   # [3, 4]
MASK = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=bool)                    # [3, 4]


def _log_sigmoid(z):
    return math.log(1.0 / (1.0 + math.exp(-z)))


def _sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z))


HAND = {
    "mean": [(1 - 2 + 3) / 3, 0.5],
    "sum": [2.0, 0.5],
    "min": [-2.0, 0.5],
    "max": [3.0, 0.5],
    "log_prod": [_log_sigmoid(1) + _log_sigmoid(-2) + _log_sigmoid(3), _log_sigmoid(0.5)],
    "last": [3.0, 0.5],
    "mean_prob": [(_sigmoid(1) + _sigmoid(-2) + _sigmoid(3)) / 3, _sigmoid(0.5)],
}


@pytest.mark.parametrize("name", sorted(HAND))
def test_matches_hand_computation(name):
    scores = agg.aggregate(name, LOGITS, MASK)
    assert scores.dtype == np.float64
    np.testing.assert_allclose(scores[:2], HAND[name], rtol=1e-12, atol=1e-12)
    assert scores[2] == -np.inf  # the empty chain never wins


def test_batch_dims_are_kept():
    logits = np.stack([LOGITS, LOGITS + 1.0])   # [2, 3, 4]
    mask = np.stack([MASK, MASK])
    out = agg.aggregate("mean", logits, mask)
    assert out.shape == (2, 3)
    np.testing.assert_allclose(out[1, :2], np.array(HAND["mean"]) + 1.0, rtol=0, atol=1e-12)


def test_log_prod_is_stable_for_extreme_logits():
    z = np.array([[-1000.0, 1000.0, -745.0, 40.0]])
    out = agg.log_prod_prob(z, np.ones_like(z, dtype=bool))
    assert np.isfinite(out).all()
    # log sigmoid(-x) ~ -x for large x; log sigmoid(x) ~ -exp(-x)
    np.testing.assert_allclose(out, [-1000.0 - 745.0 - math.exp(-40.0)], rtol=1e-12)
    np.testing.assert_allclose(agg.mean_prob(z, np.ones_like(z, dtype=bool)), [(0 + 1 + 0 + 1) / 4],
                               atol=1e-12)


def test_last_uses_last_masked_step_even_with_holes():
    z = np.array([[1.0, 2.0, 3.0, 4.0]])
    m = np.array([[1, 0, 1, 0]], dtype=bool)
    assert agg.last_logit(z, m)[0] == 3.0


def test_mean_and_sum_rank_differently():
    # the paper's sum favours long chains; the reference mean does not
    z = np.array([[1.0, 1.0, 1.0], [2.0, 0.0, 0.0]])
    m = np.array([[1, 1, 1], [1, 0, 0]], dtype=bool)
    assert np.argmax(agg.aggregate("sum", z, m)) == 0
    assert np.argmax(agg.aggregate("mean", z, m)) == 1


def test_errors_and_registry():
    with pytest.raises(ValueError, match="unknown aggregation 'median'"):
        agg.aggregate("median", LOGITS, MASK)
    with pytest.raises(ValueError, match="shape"):
        agg.aggregate("mean", LOGITS, MASK[:, :3])
    bad = LOGITS.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        agg.aggregate("mean", bad, MASK)
    with pytest.raises(ValueError, match="already registered"):
        agg.register_aggregation("mean", agg.sum_logit)
    try:
        agg.register_aggregation("first_step", lambda z, m: np.asarray(z)[..., 0])
        np.testing.assert_allclose(agg.aggregate("first_step", LOGITS, MASK), LOGITS[:, 0], atol=0)
        assert "first_step" in agg.aggregation_names()
    finally:
        agg.AGGREGATIONS.pop("first_step", None)
