"""Instance weights (DreamPRM-1.5, Cao and Xie, arXiv 2509.05542): one learned weight per
training record instead of one per domain.

The upper-level variable of the *instance table* is a raw vector ``r in R^N`` (one entry per
training record); record ``i`` weighs

    w_i = w_max * sigmoid(r_i),        0 < w_i < w_max                           (1)

in the lower-level loss ``sum_i m_i w_i (p_i - y_i)^2 / sum_i m_i``
(:func:`~dreamprm_jax.bilevel.losses.sample_weighted_mse`, the loss domain weighting uses
too). Why this bound rather than the domains' ``softplus(r) / mean(softplus(r))``:

* a mean over N records would couple every weight to every other one, so a batch's loss
  would depend on all N entries and each hypergradient would touch all of them; (1) keeps
  record ``i``'s weight a function of ``r_i`` alone, and the hypergradient of a batch is
  non-zero only on the records it holds;
* the bound ``w_max`` keeps one record from taking over the batch (a sample weight that can
  grow without limit multiplies the inner learning rate of that record), and the sigmoid
  keeps ``w_i > 0``, so a record is never trained *against* its label;
* ``r = logit(1 / w_max)`` gives ``w = 1`` for every record (the cold start is the unweighted
  PRM); with the default ``w_max = 2`` that is ``r = 0``, and the meta optimizer's weight
  decay then pulls every weight back towards 1.

``w_max > 1`` is required: the cold start must lie inside the range.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = ["DEFAULT_MAX_WEIGHT", "check_max_weight", "uniform_logit", "bounded_weights", "init_raw_instance_weights",
           "instance_weights", "record_weights"]

#: The default upper bound ``w_max`` of an instance weight.
DEFAULT_MAX_WEIGHT = 2.0


def check_max_weight(max_weight: float) -> float:
    """``max_weight`` as a float, or ``ValueError`` unless it is finite and > 1."""
    if not (math.isfinite(max_weight) and max_weight > 1.0):
        raise ValueError(f"instance weights: max_weight must be a finite number > 1 (the cold start w = 1 lies "
                         f"inside (0, max_weight)), got {max_weight!r}")
    return float(max_weight)


def uniform_logit(max_weight: float = DEFAULT_MAX_WEIGHT) -> float:
    """The raw value with weight 1: ``logit(1 / w_max) = -log(w_max - 1)`` (0 for ``w_max = 2``)."""
    return -math.log(check_max_weight(max_weight) - 1.0)


def bounded_weights(raw: jax.Array, max_weight: float = DEFAULT_MAX_WEIGHT) -> jax.Array:
    """Equation (1) elementwise: ``w_max * sigmoid(raw)``, in ``(0, w_max)`` for every finite
    ``raw`` (``0`` and ``w_max`` themselves only where float rounding saturates the sigmoid)."""
    return max_weight * jax.nn.sigmoid(raw)


def init_raw_instance_weights(num_records: int, max_weight: float = DEFAULT_MAX_WEIGHT,
                              dtype=jnp.float32) -> jax.Array:
    """Raw table ``[num_records]`` with every weight 1 (uniform: the cold start)."""
    if num_records < 1:
        raise ValueError(f"instance_weights.init_raw_instance_weights: num_records must be >= 1, got {num_records}")
    return jnp.full((num_records,), uniform_logit(max_weight), dtype)


def instance_weights(raw: jax.Array, max_weight: float = DEFAULT_MAX_WEIGHT) -> jax.Array:
    """The table's weights, equation (1): ``[N]`` raw -> ``[N]`` weights in ``(0, max_weight)``."""
    return bounded_weights(raw, max_weight)


def record_weights(raw: jax.Array, record_ids: jax.Array, max_weight: float = DEFAULT_MAX_WEIGHT) -> jax.Array:
    """Per-row weights ``w[record_ids]`` (a gather; any shape of ``record_ids``).

    Only the gathered entries are computed, so the gradient reaches ``raw`` at those records
    alone (a scatter-add of ``[B]`` values, not an ``[N]`` dense map per row).
    """
    return bounded_weights(jnp.take(raw, record_ids, axis=0), max_weight)
