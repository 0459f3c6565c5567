"""Lower- and upper-level losses of DreamPRM.

Lower level (training data, Monte-Carlo accuracy labels ``y_i in [0, 1]``):

    L_tr = sum_i m_i w[d_i] (p_i - y_i)^2 / sum_i m_i                     (2)

with ``w = softplus(r) / mean(softplus(r))`` (see :mod:`domain_weights`) and ``m`` a
padding mask; instance weighting puts a weight per record ``w_i`` in place of ``w[d_i]``
(:func:`sample_weighted_mse` is the loss of both). Upper level (meta data, one chain of ``S`` step prefixes with pre-sigmoid
logits ``z_s = log(p_s / (1 - p_s))`` and a 0/1 chain label):

    A = mean_s z_s  (reference code)   or   A = sum_s z_s  (paper)        (3)
                      or   A = min_s z_s  (the weakest step)
    L_meta = mean over chains of (sigmoid(A) - label)^2                   (4)

With ``min`` the gradient of a chain reaches only its weakest step: a correct chain asks
for its least trusted step to rise, a wrong chain for its most suspect step (the likely
error) to fall, and the steps before an error are left alone, where the sum and the mean ask
every step of a wrong chain to fall.

``A`` is formed from logits directly, never from probabilities, so saturated scores
(``|z| > 50``) still give finite losses and finite (possibly zero) gradients.

Ranking meta losses.  (4) asks each chain score to be calibrated; best-of-N only needs a
question's correct candidates ranked above its wrong ones. With chains grouped by question
(``question_index``), candidates ``J_q`` of question ``q`` and its correct ones ``P_q``:

    listwise:  L = mean over {q : |P_q| >= 1} of  logsumexp_{j in J_q} A_j - logsumexp_{j in P_q} A_j
               (= -log sum_{j in P_q} softmax_{J_q}(A)_j)                              (5)
    pairwise:  L = mean over pairs (i in P_q, j in J_q - P_q), all q, of softplus(A_j - A_i)   (6)

Both are invariant to adding a constant to the scores of a question, and a question whose
candidates are all correct or all wrong gives no pair to (6) (and zero loss to (5)).

Neither is invariant to the *scale* of the scores: (6) falls when every margin grows, so its
hypergradient also rewards a domain that makes the PRM more confident without ordering the
candidates any better. The normalised pairwise loss removes that incentive by dividing the
scores by their pooled within-question standard deviation over the batch,

    sigma = sqrt(mean over chains c of questions with >= 2 chains of (A_c - mean_{q(c)} A)^2 + eps^2)
    pairwise_normalized:  (6) on A / sigma                                                (7)

so it is unchanged when all scores are multiplied by a positive constant (up to ``eps``) as
well as when a constant is added to a question's scores.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from dreamprm_jax.bilevel.domain_weights import sample_weights

__all__ = ["CHAIN_REDUCTIONS", "weighted_mse", "sample_weighted_mse", "aggregation_loss", "chain_scores",
           "listwise_loss", "pairwise_loss", "normalized_pairwise_loss", "META_LOSSES", "meta_loss"]

#: How :func:`chain_scores` reduces a chain's step logits to its score ``A``.
CHAIN_REDUCTIONS = ("mean", "sum", "min")

#: Names of the upper-level losses :func:`meta_loss` computes.
META_LOSSES = ("chain_mse", "listwise", "pairwise", "pairwise_normalized")

#: ``eps`` of equation (7), in chain-score (log-odds) units: keeps ``sigma > 0`` when a batch's
#: candidates all score alike; trained PRMs here have ``sigma`` of order 0.3 to 1.
NORMALIZED_PAIRWISE_EPS = 1e-2


def _safe_mean(num: jax.Array, den: jax.Array) -> jax.Array:
    """``num / den`` with 0 where ``den == 0`` (an all-padding batch has zero loss, not NaN)."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def sample_weighted_mse(
    probs: jax.Array,
    labels: jax.Array,
    weights: jax.Array,
    sample_mask: jax.Array | None = None,
) -> jax.Array:
    """Per-sample weighted squared error, the lower-level loss of every weighting:

        L_tr = sum_i m_i w_i (p_i - y_i)^2 / sum_i m_i

    (normalised by the number of real samples, not by the sum of weights: a weight scales a
    sample's share of the inner step). Domain weighting passes ``w_i = w[d_i]``
    (:func:`weighted_mse`); instance weighting a weight per record
    (:mod:`~dreamprm_jax.bilevel.instance_weights`, :mod:`~dreamprm_jax.bilevel.instance_net`).

    Args:
      probs: ``[B]`` predicted probabilities ``p_i``.
      labels: ``[B]`` targets ``y_i`` (Monte-Carlo accuracies).
      weights: ``[B]`` per-sample weights ``w_i``.
      sample_mask: ``[B]`` 1 for real samples, 0 for padding; ``None`` means all ones.

    Returns:
      Scalar loss (0 when the mask is empty).
    """
    if sample_mask is None:
        sample_mask = jnp.ones_like(labels)
    # Trace-time shape checks: a [B, 1] head output against [B] labels would broadcast to [B, B].
    chex.assert_rank(probs, 1)
    chex.assert_equal_shape([probs, labels, weights, sample_mask])
    sq = jnp.square(probs - labels.astype(probs.dtype))  # [B]
    m = sample_mask.astype(sq.dtype)  # [B]
    return _safe_mean(jnp.sum(m * weights.astype(sq.dtype) * jnp.where(m > 0, sq, 0.0)), jnp.sum(m))


def weighted_mse(
    probs: jax.Array,
    labels: jax.Array,
    domain_ids: jax.Array,
    raw_weights: jax.Array,
    sample_mask: jax.Array | None = None,
) -> jax.Array:
    """Domain-weighted squared error, equation (2): :func:`sample_weighted_mse` with
    ``w_i = w[d_i]``, ``w = softplus(r) / mean(softplus(r))``.

    Args:
      probs: ``[B]`` predicted probabilities ``p_i``.
      labels: ``[B]`` targets ``y_i`` (Monte-Carlo accuracies).
      domain_ids: ``[B]`` int domain index ``d_i`` in ``[0, K)``.
      raw_weights: ``[K]`` raw domain weights ``r`` (the upper-level variable).
      sample_mask: ``[B]`` 1 for real samples, 0 for padding; ``None`` means all ones.

    Returns:
      Scalar ``sum_i m_i w[d_i] (p_i - y_i)^2 / sum_i m_i`` (0 when the mask is empty).
    """
    chex.assert_rank(raw_weights, 1)
    chex.assert_equal_shape([probs, domain_ids])
    return sample_weighted_mse(probs, labels, sample_weights(raw_weights, domain_ids), sample_mask)


def chain_scores(step_logits: jax.Array, step_mask: jax.Array, reduce: str = "mean") -> jax.Array:
    """Aggregated chain logit ``A``, equation (3): masked mean or sum of step logits.

    Args:
      step_logits: ``[M, S]`` pre-sigmoid step scores.
      step_mask: ``[M, S]`` 1 for real steps, 0 for padding.
      reduce: ``"mean"`` (DreamPRM reference code), ``"sum"`` (paper) or ``"min"`` (the
        weakest step; its gradient reaches that step alone, split evenly between ties).

    Returns:
      ``[M]`` chain logits (0 for a chain with no real step).
    """
    chex.assert_rank(step_logits, 2)
    chex.assert_equal_shape([step_logits, step_mask])
    m = step_mask.astype(step_logits.dtype)  # [M, S]
    z = jnp.where(m > 0, step_logits, 0.0)  # [M, S]; padding may hold inf/nan
    total = jnp.sum(z * m, axis=-1)  # [M]
    if reduce == "sum":
        return total
    if reduce == "mean":
        return _safe_mean(total, jnp.sum(m, axis=-1))
    if reduce == "min":
        real = m > 0  # [M, S]
        lowest = jnp.min(jnp.where(real, step_logits, jnp.inf), axis=-1)  # [M]; inf for a chain with no step
        return jnp.where(jnp.any(real, axis=-1), lowest, 0.0)
    raise ValueError(f"losses.chain_scores: reduce must be one of {CHAIN_REDUCTIONS}, got {reduce!r}")


def aggregation_loss(
    step_logits: jax.Array,
    step_mask: jax.Array,
    labels: jax.Array,
    chain_mask: jax.Array | None = None,
    reduce: str = "mean",
) -> jax.Array:
    """Meta loss of DreamPRM, equations (3)-(4).

    Args:
      step_logits: ``[M, S]`` pre-sigmoid scores of the step prefixes, chain-major.
      step_mask: ``[M, S]`` 1 for real steps.
      labels: ``[M]`` 0/1 correctness of each chain.
      chain_mask: ``[M]`` 1 for real chains (``None``: all real).
      reduce: aggregation of the step logits, one of :data:`CHAIN_REDUCTIONS`.

    Returns:
      Scalar ``sum_c cm_c (sigmoid(A_c) - label_c)^2 / sum_c cm_c``.
    """
    a = chain_scores(step_logits, step_mask, reduce)  # [M]
    p = jax.nn.sigmoid(a)  # [M]; lax.logistic is stable for |a| >> 1
    if chain_mask is None:
        chain_mask = jnp.ones_like(p)
    cm = chain_mask.astype(p.dtype)  # [M]
    sq = jnp.square(p - labels.astype(p.dtype))  # [M]
    return _safe_mean(jnp.sum(cm * sq), jnp.sum(cm))


def _same_question(question_index: jax.Array, chain_mask: jax.Array) -> jax.Array:
    """``[M, M]`` bool: chains i and j are real chains of one question."""
    real = chain_mask > 0  # [M]
    return (question_index[:, None] == question_index[None, :]) & real[:, None] & real[None, :]


def _masked_logsumexp(scores: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Row-wise ``log sum_{j : mask[i, j]} exp(scores[j])`` and whether row i has any j.

    Args:
      scores: ``[M]`` chain scores.
      mask: ``[M, M]`` bool.

    Returns:
      ``([M] log-sum-exp (0 for an empty row), [M] bool non-empty)``. Entries outside the
      mask are replaced by the row maximum *before* ``exp``, so no ``exp`` overflows and no
      ``0 * inf`` reaches a gradient.
    """
    x = jnp.broadcast_to(scores[None, :], mask.shape)  # [M, M]
    row_max = jnp.max(jnp.where(mask, x, -jnp.inf), axis=-1)  # [M]
    nonempty = jnp.any(mask, axis=-1)  # [M]
    row_max = jax.lax.stop_gradient(jnp.where(nonempty, row_max, 0.0))
    x = jnp.where(mask, x, row_max[:, None])  # [M, M]
    total = jnp.sum(jnp.where(mask, jnp.exp(x - row_max[:, None]), 0.0), axis=-1)  # [M], >= 1 where non-empty
    return jnp.log(jnp.where(nonempty, total, 1.0)) + row_max, nonempty


def _check_grouped(scores, labels, question_index, chain_mask):
    chex.assert_rank([scores, labels, question_index, chain_mask], 1)
    chex.assert_equal_shape([scores, labels, question_index, chain_mask])


def listwise_loss(scores: jax.Array, labels: jax.Array, question_index: jax.Array,
                  chain_mask: jax.Array) -> jax.Array:
    """Listwise ranking meta loss, equation (5): softmax cross-entropy over each question's chains.

    Args:
      scores: ``[M]`` chain scores ``A`` (logits, any finite value).
      labels: ``[M]`` 0/1 correctness of each chain.
      question_index: ``[M]`` int, equal for the chains of one question.
      chain_mask: ``[M]`` 1 for real chains.

    Returns:
      Scalar: the mean over questions with at least one correct chain of
      ``-log sum_{correct} softmax(A over the question's chains)`` (0 when there is none).
    """
    _check_grouped(scores, labels, question_index, chain_mask)
    same = _same_question(question_index, chain_mask)  # [M, M]
    correct = labels > 0.5  # [M]
    lse_all, _ = _masked_logsumexp(scores, same)  # [M]
    lse_correct, has_correct = _masked_logsumexp(scores, same & correct[None, :])  # [M]
    m = same.shape[0]
    earlier = jnp.tril(jnp.ones((m, m), bool), k=-1)  # [M, M]: j < i
    first_of_question = (chain_mask > 0) & ~jnp.any(same & earlier, axis=-1)  # [M]: one chain per question
    counted = (first_of_question & has_correct).astype(scores.dtype)  # [M]
    per_question = jnp.where(has_correct, lse_all - lse_correct, 0.0)  # [M]
    return _safe_mean(jnp.sum(counted * per_question), jnp.sum(counted))


def pairwise_loss(scores: jax.Array, labels: jax.Array, question_index: jax.Array,
                  chain_mask: jax.Array) -> jax.Array:
    """Pairwise ranking meta loss, equation (6): logistic loss on (correct, wrong) pairs of a question.

    Args: as :func:`listwise_loss`.

    Returns:
      Scalar: the mean over every (correct i, wrong j) pair of chains of one question of
      ``softplus(A_j - A_i)`` (0 when the batch has no such pair).
    """
    _check_grouped(scores, labels, question_index, chain_mask)
    same = _same_question(question_index, chain_mask)  # [M, M]
    correct = labels > 0.5  # [M]
    pairs = same & correct[:, None] & ~correct[None, :]  # [M, M]: (i correct, j wrong)
    margin = scores[None, :] - scores[:, None]  # [M, M]: A_j - A_i
    per_pair = jnp.where(pairs, jax.nn.softplus(jnp.where(pairs, margin, 0.0)), 0.0)  # [M, M]
    return _safe_mean(jnp.sum(per_pair), jnp.sum(pairs.astype(scores.dtype)))


def normalized_pairwise_loss(scores: jax.Array, labels: jax.Array, question_index: jax.Array,
                             chain_mask: jax.Array, eps: float = NORMALIZED_PAIRWISE_EPS) -> jax.Array:
    """Scale-free pairwise ranking meta loss, equation (7): :func:`pairwise_loss` on ``A / sigma``.

    ``sigma`` is the pooled within-question standard deviation of the real chains' scores of
    the batch (chains of one-chain questions excluded), with ``eps`` added in quadrature. The
    gradient flows through ``sigma`` too, so a meta step cannot lower the loss by scaling the
    scores up.

    Args: as :func:`listwise_loss`; ``eps`` in score units.
    """
    _check_grouped(scores, labels, question_index, chain_mask)
    same = _same_question(question_index, chain_mask).astype(scores.dtype)  # [M, M]
    size = jnp.sum(same, axis=-1)  # [M]: chains of i's question (0 for a dummy slot)
    a = jnp.where(chain_mask > 0, scores, 0.0)  # [M]; a dummy slot may hold anything
    question_mean = _safe_mean(same @ a, size)  # [M]
    counted = (size >= 2).astype(scores.dtype)  # [M]
    variance = _safe_mean(jnp.sum(counted * jnp.square(a - question_mean)), jnp.sum(counted))
    sigma = jnp.sqrt(variance + eps ** 2)
    return pairwise_loss(a / sigma, labels, question_index, chain_mask)


def meta_loss(
    name: str,
    step_logits: jax.Array,
    step_mask: jax.Array,
    labels: jax.Array,
    chain_mask: jax.Array | None = None,
    question_index: jax.Array | None = None,
    reduce: str = "mean",
) -> jax.Array:
    """The upper-level loss ``name`` (one of :data:`META_LOSSES`) of a meta batch.

    ``chain_mse`` is DreamPRM's :func:`aggregation_loss`; ``listwise``, ``pairwise`` and
    ``pairwise_normalized`` (:func:`listwise_loss`, :func:`pairwise_loss`,
    :func:`normalized_pairwise_loss`) rank the chain scores ``A`` (equation (3),
    ``reduce``) within each question and need ``question_index`` ``[M]``.
    """
    if name == "chain_mse":
        return aggregation_loss(step_logits, step_mask, labels, chain_mask, reduce=reduce)
    if name not in META_LOSSES:
        raise ValueError(f"losses.meta_loss: expected a name among {META_LOSSES}, got {name!r}")
    if question_index is None:
        raise ValueError(f"losses.meta_loss: the {name!r} loss ranks chains within questions; expected a "
                         "question_index [M] (a meta batch built from grouped meta records)")
    a = chain_scores(step_logits, step_mask, reduce)  # [M]
    if chain_mask is None:
        chain_mask = jnp.ones_like(a)
    rank = {"listwise": listwise_loss, "pairwise": pairwise_loss,
            "pairwise_normalized": normalized_pairwise_loss}[name]
    return rank(a, labels, question_index, chain_mask)
