"""The ranking meta losses of dreamprm_jax/bilevel/losses.py (listwise, pairwise,
pairwise_normalized) beside the chain MSE.

Each loss against a direct numpy computation, invariance to a per-question shift of the
chain scores (and, for pairwise_normalized, to their scale), finite gradients at saturated logits, and the exact hypergradient through each
loss against float64 central finite differences. Every tolerance is stated in its assertion.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamprm_jax import bilevel
from tests import problems

# A batch of M = 9 chain slots: question 0 (3 chains, 1 correct), question 1 (2 chains, both
# correct: no pair), question 5 (3 chains, 2 correct), question 7 (1 wrong chain: no correct),
# one dummy slot whose score is garbage.
SCORES = np.array([0.3, -1.2, 2.0, 0.7, -0.4, 1.5, -2.2, 0.1, 123.0], np.float32)
LABELS = np.array([1, 0, 0, 1, 1, 0, 1, 1, 0], np.float32)
QUESTIONS = np.array([0, 0, 0, 1, 1, 5, 5, 5, 7], np.int32)
QUESTIONS_WITH_DUMMY = np.array([0, 0, 0, 1, 1, 5, 5, 5, -1], np.int32)
MASK = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0], np.float32)


def numpy_listwise(a, y, q, m):
    losses = []
    for question in np.unique(q[m > 0]):
        sel = (q == question) & (m > 0)
        if not np.any(y[sel] > 0.5):
            continue
        a64 = a[sel].astype(np.float64)
        correct = y[sel] > 0.5
        softmax = np.exp(a64 - a64.max()) / np.exp(a64 - a64.max()).sum()
        losses.append(-np.log(softmax[correct].sum()))
    return np.mean(losses) if losses else 0.0


def numpy_pairwise(a, y, q, m):
    losses = []
    for i in range(len(a)):
        for j in range(len(a)):
            if m[i] > 0 and m[j] > 0 and q[i] == q[j] and y[i] > 0.5 and y[j] < 0.5:
                losses.append(np.log1p(np.exp(np.float64(a[j]) - np.float64(a[i]))))
    return np.mean(losses) if losses else 0.0


def numpy_normalized_pairwise(a, y, q, m, eps=1e-2):
    deviations = []
    for question in np.unique(q[m > 0]):
        sel = (q == question) & (m > 0)
        if sel.sum() >= 2:
            deviations.extend(a[sel].astype(np.float64) - a[sel].astype(np.float64).mean())
    sigma = np.sqrt(np.mean(np.square(deviations)) + eps ** 2) if deviations else eps
    return numpy_pairwise(np.where(m > 0, a.astype(np.float64), 0.0) / sigma, y, q, m)


NUMPY = {"listwise": numpy_listwise, "pairwise": numpy_pairwise, "pairwise_normalized": numpy_normalized_pairwise}
JAX = {"listwise": bilevel.listwise_loss, "pairwise": bilevel.pairwise_loss,
       "pairwise_normalized": bilevel.normalized_pairwise_loss}
RANKING = ["listwise", "pairwise", "pairwise_normalized"]


@pytest.mark.parametrize("name", RANKING)
@pytest.mark.parametrize("questions", [QUESTIONS, QUESTIONS_WITH_DUMMY])
def test_ranking_losses_match_numpy(name, questions):
    got = JAX[name](SCORES, LABELS, questions, MASK)
    np.testing.assert_allclose(got, NUMPY[name](SCORES, LABELS, questions, MASK), rtol=1e-6, atol=0)
    # hand check of pairwise: pairs (0,1), (0,2), (6,5), (7,5)
    if name == "pairwise":
        pairs = [(0, 1), (0, 2), (6, 5), (7, 5)]
        expected = np.mean([np.log1p(np.exp(SCORES[j] - SCORES[i])) for i, j in pairs])
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", RANKING)
def test_ranking_losses_without_any_usable_question_are_zero(name):
    one_class = np.array([1, 1, 1, 1], np.float32)  # every chain correct: no pair; listwise loss 0
    q = np.array([0, 0, 1, 1], np.int32)
    assert float(JAX[name](SCORES[:4], one_class, q, np.ones(4, np.float32))) == 0.0
    assert float(JAX[name](SCORES[:4], 1 - one_class, q, np.ones(4, np.float32))) == 0.0  # none correct
    assert float(JAX[name](SCORES[:4], LABELS[:4], q, np.zeros(4, np.float32))) == 0.0  # all dummy


@pytest.mark.parametrize("name", RANKING)
def test_ranking_losses_ignore_a_constant_added_to_a_question(name):
    shift = np.array([5.0, -30.0, 0.0, 80.0, 0.0, 0.0, 0.0, 0.0, 0.0], np.float32)  # per question id
    shifted = SCORES + shift[np.maximum(QUESTIONS, 0)]
    np.testing.assert_allclose(JAX[name](shifted, LABELS, QUESTIONS, MASK), JAX[name](SCORES, LABELS, QUESTIONS, MASK),
                               rtol=1e-5, atol=1e-6)
    # ... but not to one chain alone
    moved = SCORES.copy()
    moved[0] += 1.0
    assert abs(float(JAX[name](moved, LABELS, QUESTIONS, MASK)) - float(JAX[name](SCORES, LABELS, QUESTIONS, MASK))) > 1e-3


def test_normalized_pairwise_ignores_the_scale_of_the_scores_and_pairwise_does_not():
    for factor in (0.25, 4.0, 40.0):
        np.testing.assert_allclose(bilevel.normalized_pairwise_loss(SCORES * factor, LABELS, QUESTIONS, MASK),
                                   bilevel.normalized_pairwise_loss(SCORES, LABELS, QUESTIONS, MASK),
                                   rtol=2e-3, atol=0)  # eps = 1e-2 against sigma ~ 1: within 1e-4 relative
        assert abs(float(bilevel.pairwise_loss(SCORES * factor, LABELS, QUESTIONS, MASK))
                   - float(bilevel.pairwise_loss(SCORES, LABELS, QUESTIONS, MASK))) > 0.05
    # so its gradient along the scores themselves (d/dc L(c A) at c = 1) vanishes
    along = jax.grad(lambda c: bilevel.normalized_pairwise_loss(c * SCORES, LABELS, QUESTIONS, MASK))(1.0)
    assert abs(float(along)) < 1e-3, along


@pytest.mark.parametrize("reduce", ["mean", "sum", "min"])
@pytest.mark.parametrize("name", RANKING)
def test_meta_loss_ranks_aggregated_step_logits(name, reduce):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(9, 4)).astype(np.float32)  # [M, S]
    step_mask = (np.arange(4)[None, :] < rng.integers(1, 5, size=(9, 1))).astype(np.float32)  # [M, S]
    z_padded = np.where(step_mask > 0, z, np.nan).astype(np.float32)  # padding may hold anything
    a = (z * step_mask).sum(-1) / (step_mask.sum(-1) if reduce == "mean" else 1.0)
    if reduce == "min":
        a = np.where(step_mask > 0, z, np.inf).min(-1)
    got = bilevel.meta_loss(name, z_padded, step_mask, LABELS, MASK, QUESTIONS, reduce=reduce)
    np.testing.assert_allclose(got, NUMPY[name](a, LABELS, QUESTIONS, MASK), rtol=1e-5, atol=0)


def test_meta_loss_chain_mse_is_the_aggregation_loss_and_names_are_checked():
    z = np.array([[0.5, -1.0], [2.0, 1.0]], np.float32)
    sm, lab, cm = np.ones((2, 2), np.float32), np.array([1.0, 0.0], np.float32), np.ones(2, np.float32)
    assert float(bilevel.meta_loss("chain_mse", z, sm, lab, cm)) == float(bilevel.aggregation_loss(z, sm, lab, cm))
    assert bilevel.META_LOSSES == ("chain_mse", "listwise", "pairwise", "pairwise_normalized")
    with pytest.raises(ValueError, match="question_index"):
        bilevel.meta_loss("pairwise", z, sm, lab, cm)
    with pytest.raises(ValueError, match="expected a name among"):
        bilevel.meta_loss("hinge", z, sm, lab, cm, np.zeros(2, np.int32))


@pytest.mark.parametrize("name", ["chain_mse"] + RANKING)
def test_saturated_logits_give_finite_losses_and_gradients(name):
    # [M=6, S=2]; inf in a padded step, scores of +-200 (sigmoid and exp overflow float32 there)
    z = jnp.array([[200.0, 180.0], [-200.0, -190.0], [150.0, jnp.inf], [-300.0, 0.0], [90.0, 95.0], [-95.0, -99.0]])
    step_mask = jnp.array([[1, 1], [1, 1], [1, 0], [1, 1], [1, 1], [1, 1]], jnp.float32)
    labels = jnp.array([0.0, 1.0, 1.0, 0.0, 1.0, 0.0])  # badly ranked: the largest losses
    questions = jnp.array([0, 0, 1, 1, 2, 2], jnp.int32)
    chain_mask = jnp.ones(6)
    loss, grad = jax.value_and_grad(
        lambda x: bilevel.meta_loss(name, x, step_mask, labels, chain_mask, questions))(z)
    assert bool(jnp.isfinite(loss)) and bool(jnp.all(jnp.isfinite(grad))), (loss, grad)
    assert float(grad[2, 1]) == 0.0  # the padded step gets no gradient
    if name in ("listwise", "pairwise"):  # the ranking losses keep a gradient where the sigmoid has saturated
        assert float(loss) > 100.0 and float(jnp.max(jnp.abs(grad))) > 0.1, (loss, grad)
    if name == "pairwise_normalized":  # every pair misranked by about one sigma; gradients ~ 1 / sigma
        assert float(loss) > 1.0 and float(jnp.max(jnp.abs(grad))) > 1e-4, (loss, grad)


# ----------------------------------------------------------------------------------------
# Hypergradients through each meta loss (float64)
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def x64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("name,reduce", [("chain_mse", "mean")] + [(n, "mean") for n in RANKING]
                         + [("chain_mse", "min"), ("listwise", "min")])
def test_exact_hypergradient_through_each_meta_loss_matches_finite_differences(x64, name, reduce):
    """The engine sees only ``outer_loss(params, batch)``: a tiny transformer PRM whose six meta
    chains form two questions of three, each with a correct and a wrong chain."""
    base = problems.tiny_transformer(seed=0, dtype=jnp.float64, num_domains=3, inner_steps=2, batch_size=4,
                                     seq_len=5, vocab=8, embed=8, num_heads=2, num_chains=6, num_steps_per_chain=2,
                                     optimizer=bilevel.inner_adamw(1e-2))

    def outer_loss(p, batch):
        m, s = batch["step_mask"].shape
        z = problems.transformer_logits(p, batch["input_ids"], batch["attention_mask"]).reshape(m, s)  # [M, S]
        return bilevel.meta_loss(name, z, batch["step_mask"], batch["labels"], batch["chain_mask"],
                                 batch["question_index"], reduce=reduce)

    prob = dataclasses.replace(base, outer_loss=outer_loss, alpha=jnp.array([0.2, -0.1, 0.0], jnp.float64))
    inner, outer = prob.sample_batches(jax.random.PRNGKey(3))
    outer = dict(outer, labels=jnp.array([1.0, 0.0, 1.0, 0.0, 0.0, 1.0]),
                 question_index=jnp.array([0, 0, 0, 1, 1, 1], jnp.int32))
    g, aux = jax.jit(functools.partial(bilevel.hypergradient, "exact", prob.inner_loss, prob.outer_loss,
                                       prob.optimizer))(prob.params, prob.opt_state, prob.alpha, inner, outer)
    fd = problems.central_fd(prob, (inner, outer))
    assert np.linalg.norm(fd) > 1e-6, fd  # a hypergradient worth comparing
    rel = float(np.linalg.norm(np.asarray(g) - fd) / np.linalg.norm(fd))
    assert rel <= 1e-5, (name, g, fd)
    assert np.isfinite(float(aux["outer_loss"]))
