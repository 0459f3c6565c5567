"""Domain weights and the DreamPRM losses (dreamprm_jax/bilevel/{domain_weights,losses}.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamprm_jax import bilevel


def test_domain_weights_mean_one_and_uniform_at_zero():
    w0 = bilevel.domain_weights(bilevel.init_raw_weights(5))
    np.testing.assert_allclose(w0, np.ones(5), rtol=0, atol=1e-7)
    w = bilevel.domain_weights(jnp.array([-3.0, 0.0, 2.0, 10.0]))
    np.testing.assert_allclose(jnp.mean(w), 1.0, rtol=1e-6)
    assert bool(jnp.all(w > 0))
    sp = np.log1p(np.exp(np.array([-3.0, 0.0, 2.0, 10.0])))
    np.testing.assert_allclose(w, sp / sp.mean(), rtol=1e-6)
    np.testing.assert_allclose(bilevel.sample_weights(jnp.array([-3.0, 0.0, 2.0, 10.0]), jnp.array([3, 0])),
                               (sp / sp.mean())[[3, 0]], rtol=1e-6)


def test_weighted_mse_matches_numpy_with_mask():
    rng = np.random.default_rng(0)
    p, y = rng.uniform(size=6).astype(np.float32), rng.uniform(size=6).astype(np.float32)
    d = np.array([0, 1, 2, 1, 0, 2], np.int32)
    r = np.array([0.3, -1.0, 2.0], np.float32)
    m = np.array([1, 1, 1, 1, 0, 0], np.float32)
    sp = np.log1p(np.exp(r))
    w = sp / sp.mean()
    expected = np.sum(m * w[d] * (p - y) ** 2) / m.sum()
    got = bilevel.weighted_mse(p, y, d, r, m)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # padding rows holding NaN probabilities do not leak into the loss
    p_nan = p.copy()
    p_nan[-1] = np.nan
    np.testing.assert_allclose(bilevel.weighted_mse(p_nan, y, d, r, m), expected, rtol=1e-6)
    assert float(bilevel.weighted_mse(p, y, d, r, np.zeros(6, np.float32))) == 0.0


@pytest.mark.parametrize("reduce", ["mean", "sum", "min"])
def test_aggregation_loss_matches_numpy(reduce):
    z = np.array([[0.5, -1.0, 2.0], [1.0, 0.0, -9.0]], np.float32)  # [M=2, S=3]
    sm = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
    lab = np.array([1.0, 0.0], np.float32)
    a = (z * sm).sum(-1)
    if reduce == "mean":
        a = a / sm.sum(-1)
    if reduce == "min":
        a = np.where(sm > 0, z, np.inf).min(-1)  # [M]; the padded -9 does not count
    expected = np.mean((1 / (1 + np.exp(-a)) - lab) ** 2)
    np.testing.assert_allclose(bilevel.aggregation_loss(z, sm, lab, reduce=reduce), expected, rtol=1e-6)
    # chain mask drops the second chain
    exp1 = (1 / (1 + np.exp(-a[0])) - lab[0]) ** 2
    np.testing.assert_allclose(bilevel.aggregation_loss(z, sm, lab, np.array([1.0, 0.0]), reduce=reduce), exp1,
                               rtol=1e-6)
    with pytest.raises(ValueError, match="reduce"):
        bilevel.aggregation_loss(z, sm, lab, reduce="max")


def test_min_chain_score_sends_its_gradient_to_the_weakest_step_only():
    z = jnp.array([[1.0, -2.0, 3.0], [0.5, 0.5, -7.0], [4.0, 4.0, 4.0]])  # [M=3, S=3]
    sm = jnp.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])  # the third chain has no real step
    np.testing.assert_array_equal(bilevel.chain_scores(z, sm, "min"), [-2.0, 0.5, 0.0])
    g = jax.grad(lambda x: jnp.sum(bilevel.chain_scores(x, sm, "min") * jnp.array([1.0, 2.0, 3.0])))(z)
    # the weakest step alone, ties split evenly, padding and step-less chains none
    np.testing.assert_array_equal(g, [[0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])


def test_saturated_logits_give_finite_loss_and_grads():
    z = jnp.array([[80.0, 120.0], [-200.0, -60.0], [55.0, jnp.inf]])  # [M, S]; inf is masked out
    sm = jnp.array([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    lab = jnp.array([0.0, 1.0, 1.0])
    for reduce in bilevel.CHAIN_REDUCTIONS:
        loss, g = jax.value_and_grad(bilevel.aggregation_loss)(z, sm, lab, reduce=reduce)
        assert bool(jnp.isfinite(loss)) and bool(jnp.all(jnp.isfinite(g))), (reduce, loss, g)
        np.testing.assert_allclose(loss, 2.0 / 3.0, rtol=1e-6)  # two wrong saturated chains, one right
    # inner loss on saturated probabilities: finite grads w.r.t. logits and raw weights
    f = lambda logits, r: bilevel.weighted_mse(jax.nn.sigmoid(logits), jnp.array([0.0, 1.0]), jnp.array([0, 1]), r)
    gz, gr = jax.grad(f, argnums=(0, 1))(jnp.array([90.0, -90.0]), jnp.zeros(2))
    assert bool(jnp.all(jnp.isfinite(gz))) and bool(jnp.all(jnp.isfinite(gr)))
