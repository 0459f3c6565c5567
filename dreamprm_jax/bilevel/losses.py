"""Lower- and upper-level losses of DreamPRM.

Lower level (training data, Monte-Carlo accuracy labels ``y_i in [0, 1]``):

    L_tr = sum_i m_i w[d_i] (p_i - y_i)^2 / sum_i m_i                     (2)

with ``w = softplus(r) / mean(softplus(r))`` (see :mod:`domain_weights`) and ``m`` a
padding mask. Upper level (meta data, one chain of ``S`` step prefixes with pre-sigmoid
logits ``z_s = log(p_s / (1 - p_s))`` and a 0/1 chain label):

    A = mean_s z_s  (reference code)   or   A = sum_s z_s  (paper)        (3)
    L_meta = mean over chains of (sigmoid(A) - label)^2                   (4)

``A`` is formed from logits directly, never from probabilities, so saturated scores
(``|z| > 50``) still give finite losses and finite (possibly zero) gradients.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from dreamprm_jax.bilevel.domain_weights import sample_weights

__all__ = ["weighted_mse", "aggregation_loss", "chain_scores"]


def _safe_mean(num: jax.Array, den: jax.Array) -> jax.Array:
    """``num / den`` with 0 where ``den == 0`` (an all-padding batch has zero loss, not NaN)."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def weighted_mse(
    probs: jax.Array,
    labels: jax.Array,
    domain_ids: jax.Array,
    raw_weights: jax.Array,
    sample_mask: jax.Array | None = None,
) -> jax.Array:
    """Domain-weighted squared error, equation (2).

    Args:
      probs: ``[B]`` predicted probabilities ``p_i``.
      labels: ``[B]`` targets ``y_i`` (Monte-Carlo accuracies).
      domain_ids: ``[B]`` int domain index ``d_i`` in ``[0, K)``.
      raw_weights: ``[K]`` raw domain weights ``r`` (the upper-level variable).
      sample_mask: ``[B]`` 1 for real samples, 0 for padding; ``None`` means all ones.

    Returns:
      Scalar ``sum_i m_i w[d_i] (p_i - y_i)^2 / sum_i m_i`` (0 when the mask is empty).
    """
    if sample_mask is None:
        sample_mask = jnp.ones_like(labels)
    # Trace-time shape checks: a [B, 1] head output against [B] labels would broadcast to [B, B].
    chex.assert_rank([probs, raw_weights], 1)
    chex.assert_equal_shape([probs, labels, domain_ids, sample_mask])
    w = sample_weights(raw_weights, domain_ids)  # [B]
    sq = jnp.square(probs - labels.astype(probs.dtype))  # [B]
    m = sample_mask.astype(sq.dtype)  # [B]
    return _safe_mean(jnp.sum(m * w.astype(sq.dtype) * jnp.where(m > 0, sq, 0.0)), jnp.sum(m))


def chain_scores(step_logits: jax.Array, step_mask: jax.Array, reduce: str = "mean") -> jax.Array:
    """Aggregated chain logit ``A``, equation (3): masked mean or sum of step logits.

    Args:
      step_logits: ``[M, S]`` pre-sigmoid step scores.
      step_mask: ``[M, S]`` 1 for real steps, 0 for padding.
      reduce: ``"mean"`` (DreamPRM reference code) or ``"sum"`` (paper).

    Returns:
      ``[M]`` chain logits.
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
    raise ValueError(f"losses.chain_scores: reduce must be 'mean' or 'sum', got {reduce!r}")


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
      reduce: ``"mean"`` or ``"sum"`` aggregation of the step logits.

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
